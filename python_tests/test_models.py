"""Whole models after bk.convert: one private step equals the per-example reference (float64,
one backward per example), for every clipping style and backend that runs here."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bk_kernels as bk
from python_tests.model_reference import assert_updates_close, expected_update, per_example_grads, private_update

DT = torch.float64
BACKENDS = [b for b in bk.ops.available_backends("cpu")]


def units_for(model, style):
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if style == "all-layer":
        return [names]
    if style == "layer-wise":  # one unit per module owning parameters (no sharing in these models)
        owners = {}
        for n in names:
            owners.setdefault(n.rsplit(".", 1)[0], []).append(n)
        return list(owners.values())
    return style


def check_model(model, example_loss, inputs, *, style, backend, clip_fn="abadi", R=0.7, batch_size=None,
                mode="auto", units=None, batch_dims=None, **engine_kwargs):
    first = next(iter(inputs))
    B = inputs[first].shape[(batch_dims or {}).get(first, 0)]
    batch_size = batch_size or B + 2  # the logical batch size differs from the actual one
    grads = per_example_grads(model, example_loss, inputs, batch_dims)
    want = expected_update(grads, units or units_for(model, style), R, clip_fn, batch_size)
    batch_loss = lambda m, x: example_loss(m, x).mean()  # noqa: E731  (loss_reduction="mean")
    got, _ = private_update(model, batch_loss, inputs, batch_size, max_grad_norm=R, clipping_fn=clip_fn,
                            clipping_style=style, backend=backend, clipping_mode=mode, **engine_kwargs)
    assert_updates_close(got, want)


def classification_loss(model, batch):
    return F.cross_entropy(model(batch["x"]), batch["y"], reduction="none")


STYLES = ["all-layer", "layer-wise"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("mode", ["auto", "ghost", "direct"])
def test_mlp(style, backend, mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 5)).to(DT)
    inputs = {"x": torch.randn(6, 7, dtype=DT), "y": torch.randint(0, 5, (6,))}
    check_model(model, classification_loss, inputs, style=style, backend=backend, mode=mode)


@pytest.mark.parametrize("clip_fn", ["abadi", "automatic", "normalized"])
def test_clipping_functions(clip_fn):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)
    inputs = {"x": torch.randn(5, 5, dtype=DT), "y": torch.randint(0, 3, (5,))}
    check_model(model, classification_loss, inputs, style="all-layer", backend="cpu", clip_fn=clip_fn, R=0.3)


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.norm1 = nn.GroupNorm(2, 8)
        self.depthwise = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8)
        self.norm2 = nn.GroupNorm(4, 8)
        self.conv1d = nn.Conv1d(8, 4, 2, dilation=2, padding_mode="reflect", padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        x = F.relu(self.norm1(self.conv1(x)))
        x = F.relu(self.norm2(self.depthwise(x)))
        x = self.conv1d(x.flatten(2))
        return self.head(x.mean(2))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("style", STYLES)
def test_cnn_with_group_norm_and_depthwise_conv(style, backend):
    torch.manual_seed(2)
    model = SmallCNN().to(DT)
    inputs = {"x": torch.randn(4, 3, 8, 8, dtype=DT), "y": torch.randint(0, 3, (4,))}
    check_model(model, classification_loss, inputs, style=style, backend=backend)


class LlamaBlock(nn.Module):
    """RMSNorm, causal attention from separate q/k/v/o linears, a SwiGLU MLP, tied embeddings."""

    def __init__(self, vocab=23, d=16, heads=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.norm1, self.norm2, self.norm_out = nn.RMSNorm(d), nn.RMSNorm(d), nn.RMSNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.gate, self.up = nn.Linear(d, 2 * d, bias=False), nn.Linear(d, 2 * d, bias=False)
        self.down = nn.Linear(2 * d, d, bias=False)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.embed.weight  # tied
        self.heads = heads

    def forward(self, ids):
        x = self.embed(ids)
        h = self.norm1(x)
        B, T, d = h.shape
        split = lambda t: t.view(B, T, self.heads, -1).transpose(1, 2)  # noqa: E731
        att = F.scaled_dot_product_attention(split(self.q(h)), split(self.k(h)), split(self.v(h)), is_causal=True)
        x = x + self.o(att.transpose(1, 2).reshape(B, T, d))
        h = self.norm2(x)
        x = x + self.down(F.silu(self.gate(h)) * self.up(h))
        return self.lm_head(self.norm_out(x))


def lm_loss(model, batch):
    logits = model(batch["ids"])
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["ids"][:, 1:].flatten(), reduction="none").view(
        len(batch["ids"]), -1).mean(1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("style", STYLES)
def test_llama_block_with_rmsnorm_and_tied_embeddings(style, backend):
    torch.manual_seed(3)
    model = LlamaBlock().to(DT)
    inputs = {"ids": torch.randint(0, 23, (3, 9))}
    units = None
    if style == "layer-wise":  # modules sharing a parameter form one unit
        names = [n for n, p in model.named_parameters()]
        units = [[n] for n in names if n != "embed.weight"] + [["embed.weight"]]
    check_model(model, lm_loss, inputs, style=style, backend=backend, units=units)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("style", STYLES)
def test_multihead_attention_transformer(style, backend):
    torch.manual_seed(4)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=24, dropout=0.0,
                                                    batch_first=True, dtype=DT)
            self.head = nn.Linear(16, 3, dtype=DT)

        def forward(self, x, padding):
            return self.head(self.layer(x, src_key_padding_mask=padding).mean(1))

    padding = torch.zeros(4, 5, dtype=torch.bool)
    padding[0, -1] = True  # a padded position in the first example
    inputs = {"x": torch.randn(4, 5, 16, dtype=DT), "padding": padding, "y": torch.randint(0, 3, (4,))}
    loss = lambda m, b: F.cross_entropy(m(b["x"], b["padding"]), b["y"], reduction="none")  # noqa: E731
    check_model(Model(), loss, inputs, style=style, backend=backend)


def test_sequence_first_attention_outside_transformer_layers():
    """nn.MultiheadAttention with batch_first=False is fine: it handles its own layout."""
    torch.manual_seed(6)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, dtype=DT)  # [L, N, E]
            self.head = nn.Linear(8, 2, dtype=DT)

        def forward(self, x):
            seq_first = x.transpose(0, 1)
            out, _ = self.attn(seq_first, seq_first, seq_first, attn_mask=torch.ones(5, 5).triu(1).bool())
            return self.head(out.mean(0))

    inputs = {"x": torch.randn(3, 5, 8, dtype=DT), "y": torch.randint(0, 2, (3,))}
    check_model(Model(), classification_loss, inputs, style="all-layer", backend="cpu")


def test_cross_attention_uses_disjoint_blocks_of_in_proj():
    torch.manual_seed(5)

    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True, dtype=DT)
            self.head = nn.Linear(8, 2, dtype=DT)

        def forward(self, x):
            q, kv = x[:, :3], x[:, 3:]
            out, _ = self.attn(q, kv, kv, need_weights=False)
            return self.head(out.mean(1))

    inputs = {"x": torch.randn(3, 7, 8, dtype=DT), "y": torch.randint(0, 2, (3,))}
    check_model(Cross(), classification_loss, inputs, style="all-layer", backend="cpu")


def test_groups_of_parameter_names_are_clipping_units():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3)).to(DT)
    groups = [["0.weight", "0.bias", "4.bias"], ["2.weight", "2.bias"], ["4.weight"]]
    inputs = {"x": torch.randn(5, 5, dtype=DT), "y": torch.randint(0, 3, (5,))}
    check_model(model, classification_loss, inputs, style=groups, backend="cpu", units=groups, R=0.4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_on_inputs_with_more_than_three_dims(backend):
    """Positions are every dim between the batch and the features: [B, H, W, d]."""
    torch.manual_seed(8)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.mix, self.head = nn.Linear(3, 5, dtype=DT), nn.Linear(5, 2, dtype=DT)

        def forward(self, x):
            return self.head(torch.tanh(self.mix(x)).mean((1, 2)))

    inputs = {"x": torch.randn(4, 3, 2, 3, dtype=DT), "y": torch.randint(0, 2, (4,))}
    check_model(Model(), classification_loss, inputs, style="layer-wise", backend=backend)


@pytest.mark.parametrize("folded", [False, True])
def test_linear_output_modified_in_place(folded):
    """A Linear with a bias on [B, T, d] (or on its rows folded example-major, OPT's reshape), its
    output then changed in place: ReLU(inplace=True), `+=` (Falcon's `mlp_output +=
    attention_output`). torch's F.linear returns a view there, which autograd forbids changing in
    place when a custom Function returns it: this raised a RuntimeError before."""
    torch.manual_seed(9)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.mlp, self.attn = (nn.Linear(3, 6, dtype=DT), nn.Linear(6, 6, dtype=DT),
                                             nn.Linear(6, 6, dtype=DT))
            self.act, self.head = nn.ReLU(inplace=True), nn.Linear(6, 2, dtype=DT)

        def forward(self, x):
            h = torch.tanh(self.inp(x))
            rows = h.reshape(-1, 6) if folded else h
            out = self.mlp(rows)
            out += self.attn(rows)
            return self.head(self.act(out).view(h.shape).mean(1))

    inputs = {"x": torch.randn(4, 5, 3, dtype=DT), "y": torch.randint(0, 2, (4,))}
    check_model(Model(), classification_loss, inputs, style="all-layer", backend="cpu")


@pytest.mark.parametrize("mode", ["auto", "ghost", "direct"])
def test_tied_weights_at_every_length_and_mode(mode):
    """The ghost/direct choice is made per call from T (here it flips between T=3 and T=12), and
    a tied weight's cross terms hold whichever form each use takes."""
    torch.manual_seed(9)
    model = LlamaBlock().to(DT)
    for T in (3, 12):
        inputs = {"ids": torch.randint(0, 23, (2, T))}
        check_model(model, lm_loss, inputs, style="all-layer", backend="cpu", mode=mode)


def test_one_engine_across_sequence_lengths():
    """Two steps of one engine at different T equal two reference steps."""
    torch.manual_seed(10)
    reference = LlamaBlock().to(DT)
    model = bk.convert(copy.deepcopy(reference))
    engine = bk.PrivacyEngine(model, batch_size=3, sample_size=30, noise_multiplier=0.0, max_grad_norm=0.5)
    opt = engine.attach(torch.optim.SGD(model.parameters(), lr=1.0))
    units = [[n for n, _ in reference.named_parameters()]]
    for T in (4, 15):
        inputs = {"ids": torch.randint(0, 23, (2, T))}
        want = expected_update(per_example_grads(reference, lm_loss, inputs), units, 0.5, "abadi", 3)
        with torch.no_grad():
            for name, p in reference.named_parameters():
                p += want[name]
        opt.zero_grad()
        lm_loss(model, inputs).mean().backward()
        opt.step()
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12, msg=name)


def test_bias_only_fine_tuning_keeps_no_activations():
    """BiTFiT: frozen weights, trainable biases. The update is exact and the linear layers save
    no input for their frozen weights."""
    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)
    for layer in (model[0], model[2]):
        layer.weight.requires_grad_(False)
    inputs = {"x": torch.randn(4, 6, dtype=DT), "y": torch.randint(0, 3, (4,))}
    check_model(model, classification_loss, inputs, style="all-layer", backend="cpu")

    converted = bk.convert(copy.deepcopy(model))
    bk.PrivacyEngine(converted, batch_size=4, sample_size=40, noise_multiplier=0.0)
    params = {id(p) for p in converted.parameters()}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        x = inputs["x"].requires_grad_(False)
        converted[2](converted[0](x))  # the two bk linears alone, no activation function
    assert all(id(t) in params for t in saved), [tuple(t.shape) for t in saved if id(t) not in params]


@pytest.mark.parametrize("backend", BACKENDS)
def test_embedding_of_one_id_per_example(backend):
    """1-D ids [B] (user or class ids) are B examples of one lookup each, on their own and in
    front of the layers that read the [B, d] output as B examples."""
    class Recommender(nn.Module):
        def __init__(self):
            super().__init__()
            self.users, self.items = nn.Embedding(7, 5), nn.Embedding(9, 5)
            self.out = nn.Linear(5, 2)

        def forward(self, x):
            return self.out(self.users(x[:, 0]) * self.items(x[:, 1]))

    torch.manual_seed(3)
    inputs = {"x": torch.stack([torch.randint(0, 7, (6,)), torch.randint(0, 9, (6,))], 1),
              "y": torch.randint(0, 2, (6,))}
    check_model(Recommender().to(DT), classification_loss, inputs, style="all-layer", backend=backend)
    only_embedding = nn.Sequential(nn.Embedding(7, 2)).to(DT)
    check_model(only_embedding, lambda m, b: F.cross_entropy(m(b["x"][:, 0]), b["y"], reduction="none"), inputs,
                style="all-layer", backend=backend)


class Matrix(nn.Module):
    def __init__(self, value):
        super().__init__()
        self.value = nn.Parameter(value)

    def forward(self, x):
        return x @ self.value


class SharedEverywhere(nn.Module):
    """One [d, d] weight as a Linear, as GPT-2's transposed Conv1D and, in a module's own forward
    (the generic path), as a plain matrix; one [V, d] table as an Embedding and as a transposed
    Conv1D; all in one forward: every pair of forms needs its cross term."""

    def __init__(self, V=9, d=5):
        super().__init__()
        transformers = pytest.importorskip("transformers")
        self.emb = nn.Embedding(V, d)
        self.lin = nn.Linear(d, d)
        self.conv1d = transformers.pytorch_utils.Conv1D(d, d)  # weight [in, out]
        self.conv1d.weight = self.lin.weight
        self.unembed = transformers.pytorch_utils.Conv1D(d, V)  # weight [V, d]: y = x_V @ W
        self.unembed.weight = self.emb.weight
        self.mix = Matrix(torch.randn(d, d) * 0.3)
        self.mix.value = self.lin.weight  # the generic path's dense per-example gradients of the same weight
        self.head = nn.Linear(d, 3)

    def forward(self, ids):
        h = self.emb(ids)                                     # [B, T, d]
        h = torch.tanh(self.lin(h)) + self.conv1d(h)
        h = self.mix(h) + F.softmax(self.unembed(F.one_hot(ids, 9).to(h.dtype)), -1)
        return self.head(h.mean(1))


@pytest.mark.parametrize("mode", ["ghost", "direct"])
def test_shared_parameters_in_every_form(mode):
    torch.manual_seed(12)
    inputs = {"ids": torch.randint(0, 9, (4, 6)), "y": torch.randint(0, 3, (4,))}
    loss = lambda m, b: F.cross_entropy(m(b["ids"]), b["y"], reduction="none")  # noqa: E731
    check_model(SharedEverywhere().to(DT), loss, inputs, style="all-layer", backend="cpu", mode=mode, R=0.3)


@pytest.mark.parametrize("kind", ["weight_norm", "orthogonal", "spectral_norm"])
def test_parametrized_layers_are_exact(kind):
    """torch.nn.utils.parametrizations (Wav2Vec2/HuBERT's weight-normed positional conv): the
    layer is recomputed per example with the originals as its own Parameters. It used to crash
    deep in the layer (the weight came back with a batch dim). spectral_norm is checked in eval
    mode: in training each forward takes a power-iteration step, so the one-backward-per-example
    reference would see B different weights."""
    P = nn.utils.parametrizations
    wrap = {"weight_norm": P.weight_norm, "orthogonal": P.orthogonal,
            "spectral_norm": P.spectral_norm}[kind]
    torch.manual_seed(11)
    model = nn.Sequential(wrap(nn.Conv1d(3, 4, 3, padding=1)), nn.Tanh(), nn.Flatten(), wrap(nn.Linear(28, 28)),
                          nn.Tanh(), nn.Linear(28, 3)).to(DT)
    model.train(kind != "spectral_norm")
    inputs = {"x": torch.randn(5, 3, 7, dtype=DT), "y": torch.randint(0, 3, (5,))}
    assert len(bk.generic_modules(bk.convert(copy.deepcopy(model)))) == 2
    check_model(model, classification_loss, inputs, style="all-layer", backend="cpu")


class _ScaledHead(nn.Linear):
    """A Linear subclass with a Parameter of its own that its forward uses besides the parent's
    (Dory's LM head: a learned per-class logit scale, named in a helper method)."""

    def __init__(self, d, k):
        super().__init__(d, k)
        self.logit_scale = nn.Parameter(torch.linspace(0.5, 1.5, k))

    def scale(self):
        return self.logit_scale * 2.0

    def forward(self, x):
        return super().forward(x) * self.scale()


class _OffsetEmbedding(nn.Embedding):
    """A subclass whose forward calls the parent's and owns no Parameter of its own besides (OPT's
    offset positions): it keeps the bk layer under it."""

    def forward(self, ids):
        return super().forward(ids + 1)


@pytest.mark.parametrize("B", [1, 4])
def test_subclass_with_a_parameter_of_its_own_takes_the_generic_path(B):
    """A torch-layer subclass whose forward calls the parent's got the bk layer under it, which
    book-keeps the parent's Parameters only: its own logit_scale got an ordinary gradient,
    refused at the backward. It now takes the generic path; a subclass with nothing of its own
    keeps the fused layer."""
    torch.manual_seed(B)
    model = nn.Sequential(_OffsetEmbedding(9, 6), nn.Flatten(), _ScaledHead(18, 3)).to(DT)
    converted = bk.convert(copy.deepcopy(model))
    assert [t for _, t, _ in bk.generic_modules(converted)] == ["_ScaledHead"]
    assert isinstance(converted[0], bk.nn.BKLayer) and not bk.generic_modules(converted[:1])
    inputs = {"x": torch.randint(0, 8, (B, 3)), "y": torch.randint(0, 3, (B,))}
    check_model(model, classification_loss, inputs, style="all-layer", backend="cpu")


_TRANSPOSED = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


@pytest.mark.parametrize("mode", ["auto", "ghost", "direct"])
@pytest.mark.parametrize("n,shape", [(1, (5, 4, 7)), (2, (5, 4, 5, 6)), (3, (3, 4, 3, 4, 3)), (2, (1, 4, 3, 3))])
@pytest.mark.parametrize("config", [dict(stride=2, padding=1, output_padding=1, groups=2),
                                    dict(stride=1, padding=0),
                                    dict(stride=3, padding=2, dilation=2, output_padding=2, bias=False)])
def test_transposed_convolutions(n, shape, config, mode):
    """ConvTranspose1d/2d/3d on the BK path (session 13; the generic path before): example b's
    weight gradient is the weight gradient of the adjoint convolution conv(g_b, W) with output
    gradient x_b, so the convolution's norms and clipped sums serve with x and g swapped."""
    torch.manual_seed(n)
    model = nn.Sequential(_TRANSPOSED[n](4, 6, 3, **config), nn.Tanh(), nn.Flatten(), nn.LazyLinear(3)).to(DT)
    x = torch.randn(*shape, dtype=DT)
    model(x)
    assert bk.generic_modules(bk.convert(copy.deepcopy(model))) == []
    inputs = {"x": x, "y": torch.randint(0, 3, (shape[0],))}
    check_model(model, classification_loss, inputs, style="all-layer", backend="cpu", mode=mode)


def test_transposed_convolution_output_size_and_bias_only():
    """forward(x, output_size) picks the output padding (a U-Net's decoder matching its skip);
    with the weight frozen only the bias trains, and no input is kept for the weight."""
    torch.manual_seed(4)

    class Up(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.head = nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1).to(DT), nn.Linear(2 * 7 * 8, 3).to(DT)

        def forward(self, x):
            return self.head(torch.tanh(self.up(x, output_size=(7, 8))).flatten(1))

    inputs = {"x": torch.randn(4, 3, 4, 4, dtype=DT), "y": torch.randint(0, 3, (4,))}
    check_model(Up(), classification_loss, inputs, style="layer-wise", backend="cpu")
    frozen = Up()
    frozen.up.weight.requires_grad_(False)
    check_model(frozen, classification_loss, inputs, style="all-layer", backend="cpu")


def test_transposed_convolution_output_padding_not_below_the_stride_is_refused():
    """torch allows an output padding below the dilation instead: then the adjoint convolution
    would not have the input's size. Refused in the forward, before anything is recorded."""
    model = nn.Sequential(nn.ConvTranspose1d(2, 2, 3, stride=1, dilation=2, output_padding=1), nn.Flatten(),
                          nn.LazyLinear(2)).to(DT)
    x = torch.randn(3, 2, 5, dtype=DT)
    model(x)
    model = bk.convert(model)
    engine = bk.PrivacyEngine(model, batch_size=3, sample_size=30, noise_multiplier=1.0, max_grad_norm=1.0)
    with pytest.raises(bk.UnsupportedLayoutError, match="output_padding"):
        model(x)
    assert engine.steps == 0
