"""Where the examples lie: sequence-first models (batch_first=False), inputs broadcast over the
batch, and refusals that name the layer and the real cause. Float64 against one backward per
example (model_reference)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bk_kernels as bk
from python_tests.test_models import BACKENDS, check_model, classification_loss

DT = torch.float64


class SeqFirstMLP(nn.Module):
    """The shape of the 15 silently wrong cases: a Linear on [T, B, d], a head pooling over dim 0."""

    def __init__(self):
        super().__init__()
        self.mix, self.head = nn.Linear(17, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.mix(x)).mean(0))


def seq_first_loss(model, batch):
    return F.cross_entropy(model(batch["x"]), batch["y"], reduction="none")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T,B", [(3, 3), (5, 3), (1, 4), (4, 1)])
def test_sequence_first_linear_is_exact_with_batch_first_false(T, B, backend):
    torch.manual_seed(T * 10 + B)
    inputs = {"x": torch.randn(T, B, 17, dtype=DT), "y": torch.randint(0, 3, (B,))}
    check_model(SeqFirstMLP().to(DT), seq_first_loss, inputs, style="layer-wise", backend=backend,
                batch_dims={"x": 1}, batch_first=False)


def _one_step(model, loss_of, **engine_kwargs):
    model = bk.convert(model)
    engine = bk.PrivacyEngine(model, batch_size=4, sample_size=40, noise_multiplier=1.0, **engine_kwargs)
    opt = engine.attach(torch.optim.SGD(model.parameters(), lr=1.0))
    before = [p.detach().clone() for p in model.parameters()]
    return model, engine, opt, before, loss_of


def test_sequence_first_input_under_batch_first_true_is_refused_naming_the_cause():
    """T != B: the head sees B examples where the model's input said T; refused in the forward,
    nothing moved, no budget spent."""
    torch.manual_seed(0)
    model, engine, opt, before, _ = _one_step(SeqFirstMLP().to(DT), None)
    x, y = torch.randn(5, 3, 17, dtype=DT), torch.randint(0, 3, (3,))
    with pytest.raises(bk.UnsupportedLayoutError, match=r"Linear \(head\).*batch_first=False"):
        F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="without a backward"):
        opt.step()
    assert engine.steps == 0 and engine.epsilon() == 0
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


class SeqFirstEmbedding(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.norm, self.head = nn.Embedding(11, 6), nn.LayerNorm(6), nn.Linear(6, 3)

    def forward(self, ids):  # ids [T, B]
        return self.head(self.norm(self.emb(ids)).mean(0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T,B", [(4, 4), (6, 3)])
def test_sequence_first_embedding_and_layer_norm(T, B, backend):
    torch.manual_seed(1)
    inputs = {"ids": torch.randint(0, 11, (T, B)), "y": torch.randint(0, 3, (B,))}
    loss = lambda m, b: F.cross_entropy(m(b["ids"]), b["y"], reduction="none")  # noqa: E731
    check_model(SeqFirstEmbedding().to(DT), loss, inputs, style="all-layer", backend=backend,
                batch_dims={"ids": 1}, batch_first=False)


class TorchTransformer(nn.Module):
    """torch's own encoder layer at its default layout (batch_first=False)."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=12, dropout=0.0)
        self.head = nn.Linear(8, 3)

    def forward(self, x):  # [T, B, 8]
        return self.head(self.encoder(x).mean(0))


@pytest.mark.parametrize("T,B", [(4, 4), (5, 2)])
def test_torch_transformer_sequence_first(T, B):
    torch.manual_seed(2)
    inputs = {"x": torch.randn(T, B, 8, dtype=DT), "y": torch.randint(0, 3, (B,))}
    check_model(TorchTransformer().to(DT), seq_first_loss, inputs, style="layer-wise", backend="cpu",
                batch_dims={"x": 1}, batch_first=False)


def test_transformer_layout_disagreeing_with_the_engine_is_refused_up_front():
    model = bk.convert(TorchTransformer().to(DT))
    with pytest.raises(bk.UnsupportedLayoutError, match="batch_first=False"):
        bk.PrivacyEngine(model, batch_size=4, sample_size=40, noise_multiplier=1.0)
    batch_first_model = bk.convert(nn.Sequential(nn.TransformerEncoderLayer(8, 2, 12, batch_first=True)))
    with pytest.raises(bk.UnsupportedLayoutError, match="batch_first=True"):
        bk.PrivacyEngine(batch_first_model, batch_size=4, sample_size=40, noise_multiplier=1.0, batch_first=False)


class BroadcastPositions(nn.Module):
    """Positions looked up with ids shared by every example: [1, T] (Hugging Face's buffer) or
    1-D (nanoGPT's `wpe(torch.arange(T))`), and a Linear on a [1, T, d] learned-free constant."""

    def __init__(self, positions):
        super().__init__()
        self.tok, self.pos = nn.Embedding(13, 6), nn.Embedding(9, 6)
        self.bias_proj = nn.Linear(4, 6)
        self.register_buffer("const", torch.linspace(-1, 1, 9 * 4).view(1, 9, 4))
        self.head = nn.Linear(6, 13)
        self.positions = positions

    def forward(self, ids):
        T = ids.shape[1]
        where = torch.arange(T)
        pos = self.pos(where[None] if self.positions == "2d" else where)
        h = self.tok(ids) + pos + self.bias_proj(self.const[:, :T])
        return self.head(torch.tanh(h))


def lm_loss(model, batch):
    ids = batch["ids"]
    logits = model(ids)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view(
        len(ids), -1).mean(1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("positions", ["2d", "1d"])
@pytest.mark.parametrize("B", [1, 2, 5])
def test_inputs_broadcast_over_the_batch_are_exact(B, positions, backend):
    torch.manual_seed(B)
    inputs = {"ids": torch.randint(0, 13, (B, 7))}
    check_model(BroadcastPositions(positions).to(DT), lm_loss, inputs, style="all-layer", backend=backend)


def test_one_dimensional_positions_equal_to_the_batch_size_are_refused_not_guessed():
    torch.manual_seed(3)
    model = bk.convert(BroadcastPositions("1d").to(DT))
    engine = bk.PrivacyEngine(model, batch_size=4, sample_size=40, noise_multiplier=1.0)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(bk.UnsupportedLayoutError, match=r"Embedding \(pos\).*\[1, T\]"):
        lm_loss(model, {"ids": torch.randint(0, 13, (5, 5))})
    assert engine.steps == 0 and all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


class FoldedRows(nn.Module):
    """OPT's decoder MLP: [B, T, d] -> reshape(-1, d) -> LayerNorm, Linear, ReLU, Linear -> view
    back. The rows are the examples' rows folded example-major; `fold` says how the rows are made."""

    def __init__(self, fold="reshape", d=5):
        super().__init__()
        self.fold, self.d = fold, d
        self.emb = nn.Linear(3, d)
        self.norm, self.fc1, self.fc2, self.head = nn.LayerNorm(d), nn.Linear(d, 7), nn.Linear(7, d), nn.Linear(d, 2)

    def forward(self, x):  # x [B, T, 3]
        h = torch.tanh(self.emb(x))
        shape = h.shape
        if self.fold == "reshape":
            rows = h.reshape(-1, self.d)
        elif self.fold == "windows":  # Swin's shape: [B, T, d] -> [B*T/2, 2, d] windows -> [B*T, d] rows
            rows = h.reshape(-1, 2, self.d).view(-1, self.d)
        elif self.fold == "interleaved":  # row r holds example r % B: examples mixed into rows
            rows = h.transpose(0, 1).reshape(-1, self.d)
        else:  # "rolled": the rows shifted by one, so row r no longer belongs to example r // T
            rows = torch.roll(h.reshape(-1, self.d), 1, 0)
        out = rows + self.fc2(F.relu(self.fc1(self.norm(rows))))
        return self.head(out.view(shape).mean(1)) if self.fold in ("reshape", "windows") else self.head(out).sum()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,T", [(1, 4), (3, 4), (4, 4), (4, 1), (2, 3)])
@pytest.mark.parametrize("frozen", [False, True])
def test_rows_folded_example_major_are_exact(B, T, frozen, backend):
    """Proven from the graph (a reshape of a [B, ...] tensor through row-wise ops), or, when
    nothing before the layer trains, from the view's base."""
    torch.manual_seed(B * 10 + T)
    model = FoldedRows().to(DT)
    if frozen:
        model.emb.requires_grad_(False)
    inputs = {"x": torch.randn(B, T, 3, dtype=DT), "y": torch.randint(0, 2, (B,))}
    loss = lambda m, b: F.cross_entropy(m(b["x"]), b["y"], reduction="none")  # noqa: E731
    check_model(model, loss, inputs, style="all-layer", backend=backend)


@pytest.mark.parametrize("B", [1, 3])
def test_a_reshape_of_folded_rows_is_still_folded_example_major(B):
    """A reshape keeps the elements' order: [B*T/2, 2, d] windows of the examples' rows, reshaped
    to [B*T, d], are still example b's rows b*T .. b*T+T-1 (the proof walks through the chain)."""
    torch.manual_seed(B)
    inputs = {"x": torch.randn(B, 4, 3, dtype=DT), "y": torch.randint(0, 2, (B,))}
    loss = lambda m, b: F.cross_entropy(m(b["x"]), b["y"], reduction="none")  # noqa: E731
    check_model(FoldedRows("windows").to(DT), loss, inputs, style="all-layer", backend="cpu")


@pytest.mark.parametrize("fold", ["interleaved", "rolled"])
def test_rows_that_are_not_folded_example_major_are_refused_in_the_forward(fold):
    torch.manual_seed(5)
    model, engine, opt, before, _ = _one_step(FoldedRows(fold).to(DT), None)
    with pytest.raises(bk.UnsupportedLayoutError, match=r"LayerNorm \(norm\).*size 12 while the model's input "
                                                       r"has 4.*folded into rows"):
        model(torch.randn(4, 3, 3, dtype=DT)).backward()
    assert engine.steps == 0 and all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


class BroadcastOverRows(nn.Module):
    """Every row of the second Linear's [2B, B, 4] input holds every example: a [B, 4] softmax
    broadcast against a constant. Its dim 0 is a multiple of B, but it is no fold."""

    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        B = x.shape[0]
        spread = torch.linspace(-1, 1, 2 * B * B * 4, dtype=x.dtype).view(2 * B, B, 4)
        mixed = self.first(x).softmax(-1) * spread
        return self.second(mixed).view(B, -1).sum(1)


def test_a_per_example_tensor_broadcast_over_the_rows_is_refused_in_the_forward():
    torch.manual_seed(6)
    model, engine, opt, before, _ = _one_step(BroadcastOverRows().to(DT), None)
    with pytest.raises(bk.UnsupportedLayoutError, match=r"Linear \(second\).*size 8 while the model's input has 4"):
        model(torch.randn(4, 3, dtype=DT)).sum().backward()
    assert engine.steps == 0 and engine.epsilon() == 0
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


class SharedProjection(nn.Module):
    """A Linear of one grid (a [1, 4] buffer, shared by every example) whose output is used as
    `use` says, then added to every example's features. bk expands the grid to the batch, so
    the output is [B, 3]; `[0]` or `.mean(0)` then reads one copy, or all, for every example."""

    def __init__(self, use):
        super().__init__()
        self.grid_proj, self.body, self.use = nn.Linear(4, 3), nn.Linear(5, 3), use
        self.register_buffer("grid", torch.randn(1, 4))

    def forward(self, x):
        z = self.grid_proj(self.grid)
        z = {"index": lambda: z[0], "mean": lambda: z.mean(0), "repeat": lambda: z.repeat(2, 1)[:x.shape[0]],
             "broadcast": lambda: z, "tanh": lambda: torch.tanh(z) * 2, "squeeze": lambda: z.squeeze(0),
             "view": lambda: z.view(z.shape[0], 3, 1)[..., 0]}[self.use]()
        return self.body(x) + z


@pytest.mark.parametrize("use", ["index", "mean", "repeat"])
def test_an_expanded_shared_input_whose_copies_are_then_mixed_is_refused_in_the_forward(use):
    """Trained silently before (bk.verify: the clipped update 0.43 off for `index`): example 0's
    per-example gradient held every example's, so its clipping bounded nothing."""
    torch.manual_seed(6)
    model, engine, opt, before, _ = _one_step(SharedProjection(use).to(DT), None)
    x, y = torch.randn(4, 5, dtype=DT), torch.randint(0, 3, (4,))
    with pytest.raises(bk.UnsupportedLayoutError, match=r"Linear \(grid_proj\) got an input of size 1 .*does not keep "
                                                         r"the copies apart"):
        F.cross_entropy(model(x), y).backward()
    assert engine.steps == 0 and engine.epsilon() == 0
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize("use", ["broadcast", "tanh", "squeeze", "view"])
def test_an_expanded_shared_input_broadcast_against_the_examples_is_exact(use):
    """The copies met per-example tensors in a broadcast (after row-wise ops and views that
    keep dim 0): each example's copy carries its own gradient."""
    torch.manual_seed(6)
    model = SharedProjection(use).to(DT)
    x, y = torch.randn(4, 5, dtype=DT), torch.randint(0, 3, (4,))
    report = bk.verify(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), (x, y), rtol=1e-9)
    assert report.ok, str(report)


def test_a_lookup_shared_by_every_example_is_refused_naming_the_cause():
    """[q, k] ids with no example dim (a relative position table outside a T5-style attention):
    its per-example gradients live in a broadcast after the layer."""
    class SharedBias(nn.Module):
        def __init__(self):
            super().__init__()
            self.table, self.lin = nn.Embedding(9, 1), nn.Linear(5, 5)

        def forward(self, x):  # x [B, 5, 5]
            buckets = (torch.arange(5)[None, :] - torch.arange(3)[:, None]).clamp(0, 8)  # [3, 5]
            return (self.lin(x)[:, :3] + self.table(buckets)[..., 0]).sum()

    torch.manual_seed(6)
    model, engine, opt, before, _ = _one_step(SharedBias().to(DT), None)
    with pytest.raises(bk.UnsupportedLayoutError, match=r"Embedding \(table\).*shared by every example"):
        model(torch.randn(4, 5, 5, dtype=DT)).backward()
    assert engine.steps == 0 and all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_a_layer_called_outside_the_model_still_checks_at_the_backward():
    """Without the model's forward there is no batch size to check against in the forward; the
    backward still refuses inconsistent example counts before anything is recorded."""
    torch.manual_seed(4)
    model = bk.convert(nn.ModuleDict({"a": nn.Linear(3, 3), "b": nn.Linear(3, 1)}).to(DT))
    engine = bk.PrivacyEngine(model, batch_size=4, sample_size=40, noise_multiplier=1.0)
    x = torch.randn(4, 3, dtype=DT)
    loss = model["a"](x).sum() + model["b"](x[:1]).sum()
    with pytest.raises(bk.UnsupportedLayoutError, match="read 1 examples"):
        loss.backward()
    assert engine.steps == 0


# ---------------------------------------------------------------- inputs that hold no examples
# (found by running bk.verify over ~110 real models: shapes alone cannot tell a [T, T] table from
# [B, T] examples when T == B, and each of these was silently mis-clipped at that batch size)


class CoordsMLP(nn.Module):
    """timm's RelPosMlp shape, without timm: a Linear fed a buffer of coordinates [n, n, 2]."""

    def __init__(self, n=5):
        super().__init__()
        self.register_buffer("coords", torch.randn(n, n, 2, dtype=DT))
        self.mlp, self.lin = nn.Linear(2, 1, dtype=DT), nn.Linear(5, 5, dtype=DT)

    def forward(self, x):  # x [B, 5, 5]
        return (self.lin(x) + self.mlp(self.coords)[..., 0]).sum()


@pytest.mark.parametrize("B", [4, 5])
def test_a_layer_fed_a_buffer_is_refused_even_when_its_dim_0_is_the_batch_size(B):
    """B = 5 = the buffer's dim 0 used to be read as 5 examples (silently wrong)."""
    torch.manual_seed(7)
    model, engine, opt, before, _ = _one_step(CoordsMLP(), None)
    with pytest.raises(bk.UnsupportedLayoutError, match=r"Linear \(mlp\)"):
        model(torch.randn(B, 5, 5, dtype=DT)).backward()
    with pytest.raises(RuntimeError, match="without a backward"):
        opt.step()
    assert engine.steps == 0 and all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_buffers_expanded_over_the_batch_and_frozen_layers_on_buffers_still_pass():
    """HF BERT's token-type ids are a buffer expanded to [B, T] (stride 0: the same row for every
    example, which is exact to read per example); a frozen layer on a buffer records nothing."""
    class ExpandedIds(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("ids", torch.tensor([[1, 0, 2]]))
            self.register_buffer("coords", torch.randn(5, 5, 2, dtype=DT))
            self.emb, self.frozen = nn.Embedding(3, 4, dtype=DT), nn.Linear(2, 1, dtype=DT).requires_grad_(False)

        def forward(self, x):  # x [B, 3, 4] -> [B]
            shared = self.frozen(self.coords).sum()
            return (x * self.emb(self.ids.expand(x.shape[0], 3))).sum((1, 2)) + shared

    torch.manual_seed(8)
    inputs = {"x": torch.randn(5, 3, 4, dtype=DT)}
    check_model(ExpandedIds(), lambda m, b: m(b["x"]), inputs, style="all-layer", backend="cpu")


class SharedPositions(nn.Module):
    """Funnel's/XLNet's shape: a module on the generic path (its own Parameter r) given a [T, T]
    tensor of positions shared by every example, next to the examples' [B, T, d]."""

    def __init__(self, d=4):
        super().__init__()
        self.r = nn.Parameter(torch.randn(d, dtype=DT))

    def forward(self, x, pos):
        scores = x @ x.transpose(1, 2) + pos * (x @ self.r)[:, :, None]
        return scores.softmax(-1) @ x


class SharedPositionsNet(nn.Module):
    def __init__(self, d=4):
        super().__init__()
        self.attn, self.head = SharedPositions(d), nn.Linear(d, 3, dtype=DT)

    def forward(self, x):
        T = x.shape[1]
        pos = ((torch.arange(T)[None, :] - torch.arange(T)[:, None]) ** 2).to(DT) / T  # not Toeplitz-invariant
        return self.head(self.attn(x, pos).mean(1))


@pytest.mark.parametrize("B", [4, 6])
def test_generic_path_finds_inputs_shared_by_every_example_by_recomputing(B):
    """T = 6: at B = 6 the [T, T] positions have the batch size on dim 0 and were split per example
    (update error 2.0 relative). The recompute of each example is now checked against its part of
    the forward's output, and inputs with no gradient history are tried as shared until it agrees."""
    torch.manual_seed(9)
    inputs = {"x": torch.randn(B, 6, 4, dtype=DT), "y": torch.randint(0, 3, (B,))}
    check_model(SharedPositionsNet(), lambda m, b: F.cross_entropy(m(b["x"]), b["y"], reduction="none"), inputs,
                style="all-layer", backend="cpu")


def test_generic_path_refuses_a_module_that_mixes_examples():
    """A module whose output for one example depends on the others (a batch mean) has no
    per-example gradients; the recompute check refuses it at the backward, before anything is
    recorded (it used to give the gradients of each example alone, silently)."""
    class Centred(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(4, dtype=DT))

        def forward(self, x):
            return (x - x.mean(0)) * self.scale

    torch.manual_seed(10)
    model, engine, opt, before, _ = _one_step(nn.Sequential(nn.Linear(4, 4, dtype=DT), Centred()), None)
    with pytest.raises(bk.nn.generic.GenericError, match="mixes the examples"):
        model(torch.randn(4, 4, dtype=DT)).square().sum().backward()
    with pytest.raises(RuntimeError, match="without a backward"):
        opt.step()
    assert engine.steps == 0 and all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


class EyeNorm(nn.Module):
    """PEFT DoRA's shape: lora_B(lora_A(eye(d))) of an identity made in the forward (no examples),
    whose result is used detached (a weight norm) or, with detach=False, with its gradient."""

    def __init__(self, detach=True, d=5):
        super().__init__()
        self.detach = detach
        self.a, self.b, self.head = nn.Linear(d, 2, dtype=DT), nn.Linear(2, d, dtype=DT), nn.Linear(d, 3, dtype=DT)

    def forward(self, x):  # x [B, d]
        eye = torch.eye(x.shape[1], dtype=x.dtype)
        norm = self.b(self.a(eye)).norm(dim=1)
        norm = norm.detach() if self.detach else norm
        return self.head(self.b(self.a(x)) / norm)


def test_a_layer_on_an_input_with_no_examples_used_only_detached_is_exact():
    """DoRA on B != d: the layout refusal of lora_A(eye) waits for a gradient that never comes."""
    torch.manual_seed(12)
    inputs = {"x": torch.randn(4, 5, dtype=DT), "y": torch.randint(0, 3, (4,))}
    check_model(EyeNorm(), lambda m, b: F.cross_entropy(m(b["x"]), b["y"], reduction="none"), inputs,
                style="all-layer", backend="cpu")


def test_a_layer_on_an_input_with_no_examples_is_refused_when_its_gradient_arrives():
    torch.manual_seed(13)
    model, engine, opt, before, _ = _one_step(EyeNorm(detach=False), None)
    out = model(torch.randn(4, 5, dtype=DT))  # the forward passes: the eye's uses may never need a gradient
    with pytest.raises(bk.UnsupportedLayoutError, match=r"Linear \(b\)"):
        out.sum().backward()
    with pytest.raises(RuntimeError, match="without a backward"):
        opt.step()
    assert engine.steps == 0 and all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


class _Square(torch.autograd.Function):
    """A custom autograd Function in the old style (no setup_context): torch.func.vmap cannot run
    it, as PEFT LoHa's weight product."""

    @staticmethod
    def forward(ctx, w):
        ctx.save_for_backward(w)
        return w * w

    @staticmethod
    def backward(ctx, g):
        (w,) = ctx.saved_tensors
        return 2 * w * g


class SquaredScale(nn.Module):
    def __init__(self, d=4):
        super().__init__()
        self.scale = nn.Parameter(torch.rand(d, dtype=DT) + 0.5)

    def forward(self, x):
        return x * _Square.apply(self.scale)


def test_generic_path_loops_over_examples_when_vmap_cannot_run_the_forward():
    """vmap refuses the Function; the recompute then takes one example at a time by ordinary
    autograd (checked against the forward like the vmapped one)."""
    torch.manual_seed(14)
    model = nn.Sequential(nn.Linear(4, 4, dtype=DT), SquaredScale(), nn.Tanh(), nn.Linear(4, 3, dtype=DT))
    inputs = {"x": torch.randn(5, 4, dtype=DT), "y": torch.randint(0, 3, (5,))}
    check_model(model, classification_loss, inputs, style="all-layer", backend="cpu")


def _rows(B=2, T=3, d=4):
    """[B*T, d] rows folded example-major from a [B, T, d] tensor with a gradient history."""
    x = torch.randn(B, T, d, dtype=DT, requires_grad=True)
    return torch.tanh(x).reshape(-1, d)


def test_folded_rows_through_a_router():
    """An MoE router's weights: a linear map by a Parameter (trained or frozen, plain or a bk
    Linear), softmax and top-k along the last dim, renormalised; each row is still one token's."""
    from bk_kernels.nn._core import folded_rows

    for trained in (True, False):
        weight = nn.Parameter(torch.randn(5, 4, dtype=DT), requires_grad=trained)
        for bias in (None, nn.Parameter(torch.zeros(5, dtype=DT), requires_grad=trained)):
            probs = F.linear(_rows(), weight, bias).softmax(-1)
            top = probs.topk(2, dim=-1).values
            assert folded_rows(top / top.sum(-1, keepdim=True), 2)
            assert folded_rows(F.log_softmax(F.linear(_rows(), weight, bias), dim=1), 2)
    router = bk.nn.Linear(4, 5, dtype=DT).requires_grad_(False)
    assert folded_rows(router(_rows()).softmax(-1).mean(-1, keepdim=True), 2)
    # AFMoE's router: top-k of the biased scores picks the ids, the weights gathered by them
    scores = torch.sigmoid(F.linear(_rows(), nn.Parameter(torch.randn(5, 4, dtype=DT))))
    picked = scores.gather(1, (scores + torch.randn(5, dtype=DT)).topk(2, dim=1).indices)
    assert folded_rows(picked / picked.sum(-1, keepdim=True), 2)
    # MiniMax-M3's shared expert: a clamped SwiGLU on chunks of one projection; slices of the features
    gate, up = F.linear(_rows(), nn.Parameter(torch.randn(6, 4, dtype=DT))).chunk(2, dim=-1)
    glu = gate.clamp(max=0.5) * torch.sigmoid(gate * 1.7)
    assert folded_rows((up.clamp(min=-0.5, max=0.5) + 1.0) * glu, 2)
    assert folded_rows(torch.exp(gate[..., 1:]).pow(2) + up.split([1, 2], dim=-1)[1].abs(), 2)
    # Llama 4's router: the top-k logits scattered into -inf, then a sigmoid
    logits = F.linear(_rows(), nn.Parameter(torch.randn(5, 4, dtype=DT)))
    top = logits.topk(2, dim=1)
    assert folded_rows(torch.sigmoid(torch.full_like(logits, float("-inf")).scatter_(1, top.indices, top.values)), 2)
    # PhiMoE's sparsemixer: scores far below a row's maximum masked to -inf (a mask of no gradient)
    with torch.no_grad():
        far = (logits.max(-1, keepdim=True).values - logits) > 0.5
    assert folded_rows(logits.masked_fill(far, float("-inf")).softmax(-1).gather(-1, top.indices), 2)


def test_folded_rows_refuses_what_mixes_rows():
    from bk_kernels.nn._core import folded_rows

    weight = nn.Parameter(torch.randn(5, 4, dtype=DT))
    assert not folded_rows(F.linear(_rows(), weight).softmax(0), 2)  # along the rows
    assert not folded_rows(F.linear(_rows(), weight).topk(2, dim=0).values, 2)
    rows = F.linear(_rows(), weight)  # [6, 5]
    assert not folded_rows(rows.gather(0, torch.randint(0, 6, (6, 5))), 2)  # along the rows
    assert not folded_rows(rows.gather(1, torch.zeros(4, 2, dtype=torch.long)), 2)  # 4 of 6 rows: k changes
    assert not folded_rows(torch.zeros(6, 5, dtype=DT).scatter(0, torch.randint(0, 6, (6, 5)), rows), 2)
    assert not folded_rows(rows.chunk(2, dim=0)[0].repeat(2, 1), 2)  # the first example's rows twice
    assert not folded_rows(rows[2:].exp(), 2)  # a slice of the rows: out row 1 is example 1's first row
    halves = F.linear(_rows(), nn.Parameter(torch.randn(4, 4, dtype=DT))).reshape(12, 2)  # row r: half of row r // 2
    assert not folded_rows(torch.zeros(6, 5, dtype=DT).scatter(1, torch.zeros(6, 2, dtype=torch.long), halves), 2)
    logits = F.linear(_rows(), weight)
    assert not folded_rows(logits - logits.mean(0, keepdim=True), 2)  # a mean over the rows
    data = torch.randn(6, 4, dtype=DT)  # no Parameter: may hold examples (here: the other rows)
    assert not folded_rows(_rows() @ data.t(), 2)
    assert not folded_rows(_rows() @ _rows().t(), 2)  # rows times rows: every pair of examples
    y = torch.randn(2, 2, dtype=DT, requires_grad=True)  # [B, 2] flattened into one shared row
    assert not folded_rows(_rows() * torch.tanh(y).view(1, 4), 2)
    shared = torch.tanh(y).view(1, 4)  # one row broadcast by masked_fill over the mask's six
    assert not folded_rows(shared.masked_fill(torch.rand(6, 4) > 0.5, 0.0), 2)


def test_folded_rows_refuses_a_per_example_tensor_broadcast_over_the_rows():
    """A [B, m] tensor of the examples broadcast against a [k*B, B, m] constant: every row of the
    product holds every example. The broadcast operand (a softmax, a matmul by a Parameter, a bk
    layer's output) has fewer elements than the product; each must be refused, not read as a fold."""
    from bk_kernels.nn._core import folded_rows

    B, k, m = 3, 2, 4
    weight = nn.Parameter(torch.randn(m, 4, dtype=DT))
    examples = torch.tanh(torch.randn(B, 4, dtype=DT, requires_grad=True))
    spread = torch.randn(k * B, B, m, dtype=DT)  # a constant: no graph of its own
    for per_example in (F.linear(examples, weight).softmax(-1), F.linear(examples, weight),
                        F.linear(examples, weight).topk(2, dim=-1).values.sum(-1, keepdim=True),
                        bk.nn.Linear(4, m, dtype=DT).requires_grad_(False)(examples)):
        assert per_example.shape[0] == B
        assert not folded_rows(per_example * spread, B)
        assert not folded_rows(spread + per_example, B)
        assert not folded_rows(torch.relu(spread - per_example) / 2, B)
    # the rows' own operand broadcast along another dim keeps rows apart (a router's renormalisation)
    rows = F.linear(_rows(B, k), weight)
    assert folded_rows(rows / rows.sum(-1, keepdim=True), B)


def test_folded_rows_takes_operands_made_of_parameters_alone():
    """A shared operand that is a function of Parameters only (a gate's sigmoid, a scale viewed to
    broadcast) is the same for every row; one that holds a traced tensor of no fold is refused."""
    from bk_kernels.nn._core import folded_rows

    gate = nn.Parameter(torch.randn(4, dtype=DT))
    assert folded_rows(_rows() * torch.sigmoid(gate), 2)
    assert folded_rows(_rows() + gate.view(1, 4) * 2, 2)
    frozen_input = torch.randn(4, dtype=DT)
    assert not folded_rows(_rows() * (gate * frozen_input), 2)  # a saved operand that may hold examples


def test_folded_rows_through_window_partitions():
    """Swin's windows: [B, H, W, C] (rolled along H, W for shifted windows) -> view -> permute
    keeping dim 0 first -> [B * windows, N, C]: the view of the [B, ...] tensor proves the fold;
    windows taken before the examples are refused."""
    from bk_kernels.nn._core import folded_rows

    def windows(x, order=(0, 1, 3, 2, 4, 5), shift=True):
        B, H, W, C = x.shape
        x = torch.roll(torch.tanh(x), shifts=(1, 1), dims=(1, 2)) if shift else torch.tanh(x)
        parts = x.view(B, H // 2, 2, W // 2, 2, C).permute(*order).contiguous().view(-1, 2, 2, C)
        return parts.view(-1, 4, C)

    x = lambda: torch.randn(3, 4, 4, 5, dtype=DT, requires_grad=True)  # noqa: E731
    assert folded_rows(windows(x()), 3) and folded_rows(windows(x(), shift=False), 3)
    assert not folded_rows(windows(x(), order=(1, 0, 3, 2, 4, 5)), 3)  # windows before examples


def _attention_on_folds(q_rows, k_rows, v_rows, heads=2, fused=False):
    """MobileViT's attention on [k*B, n, d] folds: heads split by view + permute keeping dim 0,
    scores by a batched matmul (or fused attention), softmax along the last dim, merged back."""
    def split(t):
        return t.view(t.shape[0], t.shape[1], heads, -1).permute(0, 2, 1, 3)
    q, k, v = split(q_rows), split(k_rows), split(v_rows)
    if fused:
        out = F.scaled_dot_product_attention(q, k, v)
    else:
        out = torch.matmul(q, k.transpose(-1, -2)).div(2.0).softmax(-1) @ v
    return out.permute(0, 2, 1, 3).contiguous().view(q_rows.shape)


def test_folded_rows_through_attention_on_folds():
    """MobileViT folds each example's patches into [B * patch_area, patches, d] rows and runs
    attention on them: batched matmuls, fused attention, permutes and transposes that keep dim
    0, expands of other dims all keep row r of the fold example r // k's."""
    from bk_kernels.nn._core import folded_rows

    def folds(B=3, k=4, n=5, d=8):
        x = torch.randn(B, k, n, d, dtype=DT, requires_grad=True)
        return torch.tanh(x).reshape(B * k, n, d)

    weight = nn.Parameter(torch.randn(8, 8, dtype=DT))
    for fused in (False, True):
        rows = folds()
        q, kk, v = (F.linear(rows, weight) for _ in range(3))
        assert folded_rows(_attention_on_folds(q, kk, v, fused=fused), 3)
        assert folded_rows(_attention_on_folds(q, kk, v.detach(), fused=fused), 3)  # a frozen value path


def test_folded_rows_refuses_attention_across_examples():
    from bk_kernels.nn._core import folded_rows

    x = lambda: torch.tanh(torch.randn(3, 4, 5, 8, dtype=DT, requires_grad=True))  # noqa: E731
    rows = x().reshape(12, 5, 8)
    # folded position-major: [k, B, ...] -> [k*B, ...] through a transpose of dim 0
    assert not folded_rows(x().transpose(0, 1).reshape(12, 5, 8), 3)
    assert not folded_rows(_attention_on_folds(rows, rows.flip(0), rows), 3)  # keys of other examples
    assert not folded_rows(_attention_on_folds(rows, rows.roll(4, 0), rows, fused=True), 3)
    assert not folded_rows(torch.bmm(rows, rows[:1].expand(12, 5, 8).transpose(1, 2)), 3)  # one example's keys for all
    assert not folded_rows(rows.permute(1, 0, 2).reshape(12, 5, 8), 3)  # positions before examples


def test_folded_rows_through_a_qkv_split():
    """timm's and TimeSformer's attention split q, k and v with reshape(kB, n, 3, h, d).permute(2,
    0, 3, 1, 4)[i]: the fold moves to dim 1 and back; the walk follows it through."""
    from bk_kernels.nn._core import folded_rows

    weight = nn.Parameter(torch.randn(12, 4, dtype=DT))
    rows = torch.tanh(torch.randn(3, 2, 5, 4, dtype=DT, requires_grad=True)).reshape(6, 5, 4)  # k = 2
    qkv = F.linear(rows, weight).reshape(6, 5, 3, 2, 2).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    out = (q @ k.transpose(-2, -1)).softmax(-1) @ v  # [6, heads, 5, 2]
    assert folded_rows(out.transpose(1, 2).reshape(6, 5, 4), 3)
    # a select of another dim (a position) keeps every fold row: still folded
    first_position = F.linear(rows, weight).reshape(6, 5, 3, 4).permute(2, 1, 0, 3)[:, 0]  # [3, 6, 4]
    assert folded_rows(first_position.permute(1, 0, 2), 3)
    # qkv.permute(1, 0, ...)[0]: its dim 0 (3 = B entries) is the q/k/v index, not a fold: refused
    assert not folded_rows(qkv.permute(1, 0, 2, 3, 4)[0], 3)
    # the same split by qkv.unbind(0) (timm's Swin and ViT attention)
    q, k, v = qkv.unbind(0)
    assert folded_rows(((q @ k.transpose(-2, -1)).softmax(-1) @ v).transpose(1, 2).reshape(6, 5, 4), 3)
    assert not folded_rows(((q @ k.flip(0).transpose(-2, -1)).softmax(-1) @ v).transpose(1, 2).reshape(6, 5, 4), 3)
    assert not folded_rows(qkv.permute(1, 0, 2, 3, 4).unbind(0)[0], 3)


def test_video_frames_folded_into_a_convolution_are_exact():
    """A video's frames folded into the batch of a convolution ([B, T, C, H, W] ->
    [B * T, C, H, W], TimeSformer's patch embedding): each example's gradient sums its frames'."""
    class Frames(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, stride=2)
            self.head = nn.Linear(2 * 4 * 3 * 3, 3)

        def forward(self, video):  # [B, T, C, H, W]
            B, T = video.shape[:2]
            frames = self.conv(video.reshape(B * T, *video.shape[2:]))  # [B*T, 4, 3, 3]
            return self.head(torch.tanh(frames).reshape(B, -1))

    torch.manual_seed(0)
    inputs = {"x": torch.randn(5, 2, 3, 7, 7, dtype=DT), "y": torch.randint(0, 3, (5,))}
    model = Frames().to(DT)
    check_model(model, classification_loss, inputs, style="all-layer", backend="cpu")

    class FramesFirst(Frames):  # [T, B] order: frame-major, not the examples'
        def forward(self, video):
            B, T = video.shape[:2]
            frames = self.conv(video.transpose(0, 1).reshape(B * T, *video.shape[2:]))
            return self.head(torch.tanh(frames).reshape(B, -1))

    model = bk.convert(FramesFirst().to(DT))
    bk.PrivacyEngine(model, batch_size=5, sample_size=50, noise_multiplier=0.0, max_grad_norm=1.0)
    with pytest.raises(bk.UnsupportedLayoutError, match="should hold the examples"):
        model(inputs["x"])


def test_folded_rows_through_a_concatenation_of_per_example_tokens():
    """TimeSformer puts each example's cls token, repeated over its frames, before each frame's
    patches: cat along dim 1 of two folds keeps the fold; a cat along the fold's dim is refused."""
    from bk_kernels.nn._core import folded_rows

    B, T, n, d = 3, 2, 4, 5
    x = torch.tanh(torch.randn(B, 1 + T * n, d, dtype=DT, requires_grad=True))
    cls = x[:, 0].unsqueeze(1).repeat(1, T, 1).reshape(B * T, 1, d)  # each example's token, per frame
    patches = x[:, 1:].reshape(B, T, n, d).reshape(B * T, n, d)
    assert folded_rows(torch.cat([cls, patches], dim=1) * 2, 3)
    assert not folded_rows(torch.cat([patches[:3], patches[3:]], dim=0), 3)  # along the fold: rows reordered
    other = torch.tanh(torch.randn(B * T, 1, d, dtype=DT, requires_grad=True))
    assert not folded_rows(torch.cat([other, patches], dim=1), 3)  # a [6, 1, d] input of no proven fold



class _ExpandedLatents(nn.Module):
    """Perceiver's pattern: one Parameter expanded to the batch from the batch size alone."""

    def __init__(self):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(3, 4, dtype=torch.float64))

    def forward(self, batch_size):
        return self.latents.expand(batch_size, -1, -1)


class _LatentsModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.lat, self.proj = _ExpandedLatents(), nn.Linear(4, 4).double()

    def forward(self, x):
        return (self.proj(x) + self.lat(x.shape[0])).mean((1, 2))


def test_a_batch_made_from_its_size_is_refused_in_the_forward():
    """The generic path read such an output as shared by all examples and gave it another batch dim:
    [B, B, 3, 4], broadcast against [B, 3, 4] without an error, so the private model computed another
    function than the model (found with Perceiver, where a shape error happened to show it). Now
    refused in the forward, naming the module; nothing moves and no step is taken."""
    model = bk.convert(_LatentsModel())
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    engine = bk.PrivacyEngine(model, batch_size=5, sample_size=50, noise_multiplier=1.0, max_grad_norm=1.0)
    engine.attach(optimizer)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(bk.nn.generic.GenericError, match=r"_ExpandedLatents \(lat\).*batch size 5 as a number"):
        model(torch.randn(5, 3, 4, dtype=torch.float64))
    assert engine.steps == 0
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
    # B = 1: the one example's rows are its own (nothing to refuse), exact
    check_model(_LatentsModel(), lambda m, b: m(b["x"]), {"x": torch.randn(1, 3, 4, dtype=torch.float64)},
                style="all-layer", backend="cpu", R=0.1)


class _Positions(nn.Module):
    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(8, 4, dtype=torch.float64))

    def forward(self, seq_len):
        return self.table[:seq_len]


class _PositionsModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.pos, self.proj = _Positions(), nn.Linear(4, 3).double()

    def forward(self, x):
        return self.proj(x + self.pos(x.shape[1])).mean(1)


def test_a_sequence_length_equal_to_the_batch_size_is_not_a_batch_size():
    """forward(seq_len) returning T rows of a table, at T == B: shared by every example (not
    refused as a batch made from its size), and exact."""
    x, y = torch.randn(4, 4, 4, dtype=torch.float64), torch.randint(0, 3, (4,))
    check_model(_PositionsModel(), lambda m, b: F.cross_entropy(m(b["x"]), b["y"], reduction="none"),
                {"x": x, "y": y}, style="all-layer", backend="cpu", R=0.1)


# ---------------------------------------------------------------- packed sequences

def _packed_llama():
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=1)
    model = bk.convert(tf.LlamaForCausalLM(config).to(DT))
    engine = bk.PrivacyEngine(model, batch_size=3, sample_size=30, noise_multiplier=1.0)
    return tf, model, engine, engine.attach(torch.optim.SGD(model.parameters(), lr=0.1))


def test_sequences_packed_into_one_row_are_refused():
    """DataCollatorWithFlattening packs a batch's examples into ONE row, with position_ids that
    restart at each example and no attention_mask: Hugging Face models then keep the sequences
    apart, but the engine would clip the row as one example, the three together (their step
    went through silently before). Refused in the forward, nothing recorded."""
    tf, model, engine, opt = _packed_llama()
    features = [{"input_ids": list(range(1, n + 1))} for n in (5, 3, 6)]
    batch = tf.DataCollatorWithFlattening()(features)
    assert batch["input_ids"].shape == (1, 14)
    with pytest.raises(bk.UnsupportedLayoutError, match=r"restart inside row 0 .*clips each ROW as one example"):
        model(**batch)
    flash = tf.DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_position_ids=False)(features)
    with pytest.raises(bk.UnsupportedLayoutError, match="cu_seq_lens_q"):
        model(**flash)
    assert all(p.grad is None for p in model.parameters()) and engine.steps == 0
    with pytest.raises(RuntimeError, match="without a backward"):
        opt.step()
    with torch.no_grad():  # evaluation records nothing: packed rows run as the model runs them
        assert model(**batch).logits.shape == (1, 14, 64)


def test_a_row_with_an_attention_mask_is_one_sequence_and_trains():
    """With an attention_mask the model reads a row as one sequence whatever its position_ids
    (a pre-packed chunk sampled as a unit; left padding with position ids that restart), and so
    does the engine: it trains."""
    tf, model, engine, opt = _packed_llama()
    ids = torch.randint(0, 64, (2, 8))
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4], [1, 1, 1, 0, 1, 2, 3, 4]])
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    model(input_ids=ids, position_ids=positions, attention_mask=mask, labels=ids).loss.backward()
    opt.step()
    assert engine.steps == 1
