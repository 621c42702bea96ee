"""Layers of a peer's per-sample-gradient test grids (Opacus' grad_samples tests) that bk used to
refuse: MultiheadAttention with add_bias_kv / add_zero_attn / kdim, vdim, InstanceNorm with
running statistics, in both layouts; float64 against one backward per example, B in {1, 3}."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bk_kernels as bk
from python_tests.test_models import BACKENDS, check_model

DT = torch.float64


class Attention(nn.Module):
    def __init__(self, batch_first, **options):
        super().__init__()
        kdim, vdim = options.get("kdim") or 8, options.get("vdim") or 8
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first, **options)
        self.key, self.value = nn.Linear(3, kdim), nn.Linear(3, vdim)
        self.head = nn.Linear(8, 3)
        self.batch_first = batch_first

    def forward(self, x, memory):
        k, v = self.key(memory), self.value(memory)
        if not self.batch_first:  # the model is batch-first; the attention sequence-first
            x, k, v = x.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
        out, _ = self.attn(x, k, v)
        return self.head(out.mean(1 if self.batch_first else 0))


OPTIONS = [dict(add_bias_kv=True), dict(add_zero_attn=True), dict(kdim=5, vdim=6),
           dict(add_bias_kv=True, add_zero_attn=True, kdim=5, vdim=6, bias=False)]


@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(o))
def test_multihead_attention_options_are_exact(options, batch_first, B):
    torch.manual_seed(B)
    model = Attention(batch_first, **options).to(DT)
    inputs = {"x": torch.randn(B, 4, 8, dtype=DT), "memory": torch.randn(B, 5, 3, dtype=DT),
              "y": torch.randint(0, 3, (B,))}
    loss = lambda m, b: F.cross_entropy(m(b["x"], b["memory"]), b["y"], reduction="none")  # noqa: E731
    # Layer-wise units: the attention (out_proj included: it is the attention's own here), key, value, head.
    names = [n for n, _ in model.named_parameters()]
    units = [[n for n in names if n.startswith(prefix + ".")] for prefix in ("attn", "key", "value", "head")]
    check_model(model, loss, inputs, style="layer-wise", backend="cpu", R=0.1, units=units)
    converted = bk.convert(model)
    assert isinstance(converted.attn, bk.nn.GenericMultiheadAttention)
    assert type(converted.attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear  # its own, unconverted
    listed = dict((path, n) for path, _, n in bk.generic_modules(converted))
    assert listed["attn"] == sum(p.numel() for p in converted.attn.parameters())  # out_proj's counted too


def test_multihead_attention_options_under_batch_first_false_engine():
    """A sequence-first model end to end: the engine's batch_first=False and the module's own."""
    class SeqFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, add_bias_kv=True)
            self.norm, self.head = nn.LayerNorm(8), nn.Linear(8, 3)

        def forward(self, x):  # [T, B, 8]
            out, _ = self.attn(x, x, x)
            return self.head(self.norm(out).mean(0))

    torch.manual_seed(5)
    inputs = {"x": torch.randn(4, 4, 8, dtype=DT), "y": torch.randint(0, 3, (4,))}
    loss = lambda m, b: F.cross_entropy(m(b["x"]), b["y"], reduction="none")  # noqa: E731
    check_model(SeqFirst().to(DT), loss, inputs, style="all-layer", backend="cpu", batch_dims={"x": 1},
                batch_first=False, R=0.2)


class Instance(nn.Module):
    def __init__(self, dims):
        super().__init__()
        cls = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[dims]
        self.conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims](2, 4, 1)
        self.norm = cls(4, affine=True, track_running_stats=True, momentum=0.3)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.norm(self.conv(x))).flatten(2).mean(2))


@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("training", [True, False])
def test_instance_norm_with_running_stats_is_exact(dims, training, B):
    torch.manual_seed(dims)
    model = Instance(dims).to(DT)
    with torch.no_grad():  # running statistics that differ from any batch's
        model.norm.running_mean.uniform_(-1, 1)
        model.norm.running_var.uniform_(0.5, 2)
    model.train(training)
    inputs = {"x": torch.randn(B, 2, *([3] * dims), dtype=DT), "y": torch.randint(0, 3, (B,))}
    loss = lambda m, b: F.cross_entropy(m(b["x"]), b["y"], reduction="none")  # noqa: E731
    check_model(model, loss, inputs, style="all-layer", backend="cpu", R=0.2)


def test_instance_norm_running_stats_are_updated_as_torch_does():
    torch.manual_seed(0)
    ours, theirs = bk.convert(Instance(2).to(DT)), Instance(2).to(DT)
    theirs.load_state_dict(ours.state_dict())
    bk.PrivacyEngine(ours, batch_size=4, sample_size=40, noise_multiplier=1.0)
    x = torch.randn(4, 2, 5, 5, dtype=DT)
    ours(x), theirs(x)
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(ours.norm, name), getattr(theirs.norm, name), rtol=1e-12, atol=1e-12)


class Bags(nn.Module):
    """Padded ids [B, L] and lengths [B] in, bags built inside (1-D ids with offsets, or 2-D)."""

    def __init__(self, mode, weighted, flat, padding_idx=None):
        super().__init__()
        self.bag = nn.EmbeddingBag(13, 5, mode=mode, padding_idx=padding_idx)
        self.head = nn.Linear(5, 3)
        self.weighted, self.flat = weighted, flat

    def forward(self, ids, lengths, weights):
        psw = weights if self.weighted else None
        if self.flat:  # the torchtext layout: one stream of ids and the offset of each bag
            keep = torch.arange(ids.shape[1])[None, :] < lengths[:, None]
            offsets = torch.cumsum(lengths, 0) - lengths
            out = self.bag(ids[keep], offsets, psw[keep] if psw is not None else None)
        else:
            out = self.bag(ids, per_sample_weights=psw)
        return self.head(torch.tanh(out))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B", [1, 4])
@pytest.mark.parametrize("flat", [True, False])
@pytest.mark.parametrize("mode,weighted", [("sum", False), ("sum", True), ("mean", False)])
def test_embedding_bag_is_exact(mode, weighted, flat, B, backend):
    torch.manual_seed(B)
    model = Bags(mode, weighted, flat, padding_idx=2 if mode == "mean" else None).to(DT)
    lengths = torch.randint(1, 6, (B,)) if flat else torch.full((B,), 5)
    inputs = {"ids": torch.randint(0, 13, (B, 5)), "lengths": lengths,
              "weights": torch.rand(B, 5, dtype=DT) + 0.5, "y": torch.randint(0, 3, (B,))}
    loss = lambda m, b: F.cross_entropy(m(b["ids"], b["lengths"], b["weights"]), b["y"], reduction="none")  # noqa
    check_model(model, loss, inputs, style="all-layer", backend=backend, R=0.1)


def test_embedding_bag_sets_the_batch_of_a_model_called_with_a_flat_stream():
    """model(text, offsets): the first input is the 1-D stream; the bags are the examples."""
    class TextClassifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.bag, self.head = nn.EmbeddingBag(13, 5), nn.Linear(5, 3)

        def forward(self, text, offsets):
            return self.head(self.bag(text, offsets))

    torch.manual_seed(0)
    reference = TextClassifier().to(DT)
    text, offsets, y = torch.randint(0, 13, (9,)), torch.tensor([0, 2, 7]), torch.tensor([0, 2, 1])
    bounds = [0, 2, 7, 9]
    per_example = []
    for b in range(3):  # one backward per bag
        reference.zero_grad()
        F.cross_entropy(reference(text[bounds[b]:bounds[b + 1]], torch.tensor([0])), y[b:b + 1]).backward()
        per_example.append({n: p.grad.clone() for n, p in reference.named_parameters()})
    from python_tests.model_reference import expected_update
    want = expected_update(per_example, [[n for n, _ in reference.named_parameters()]], 0.05, "abadi", 3)
    model = bk.convert(copy.deepcopy(reference))
    engine = bk.PrivacyEngine(model, batch_size=3, sample_size=30, noise_multiplier=0.0, max_grad_norm=0.05)
    opt = engine.attach(torch.optim.SGD(model.parameters(), lr=1.0))
    F.cross_entropy(model(text, offsets), y).backward()
    opt.step()
    for n, p in model.named_parameters():
        torch.testing.assert_close(-p.grad, want[n], rtol=1e-9, atol=1e-15, msg=n)


def test_embedding_bag_max_mode_is_refused():
    with pytest.raises(bk.UnsupportedModuleError, match="mode='max'"):
        bk.convert(nn.Sequential(nn.EmbeddingBag(5, 3, mode="max")))


class Recurrent(nn.Module):
    def __init__(self, kind, batch_first, packed, **options):
        super().__init__()
        self.rnn = getattr(nn, kind)(3, 4, batch_first=batch_first, **options)
        width = 4 * (2 if options.get("bidirectional") else 1)
        self.head = nn.Linear(width, 2)
        self.batch_first, self.packed = batch_first, packed

    def forward(self, x, lengths):  # x [B, T, 3] (the model is batch-first; the layer either)
        seq = x if self.batch_first else x.transpose(0, 1)
        if self.packed:
            seq = nn.utils.rnn.pack_padded_sequence(seq, lengths, batch_first=self.batch_first, enforce_sorted=False)
        out, hidden = self.rnn(seq)
        h = hidden[0] if isinstance(hidden, tuple) else hidden
        if self.packed:
            out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return self.head(torch.tanh(out).sum(1)) + h.sum(0)[:, :2]


RECURRENT = [("RNN", {}), ("RNN", dict(nonlinearity="relu", num_layers=2)), ("GRU", dict(bidirectional=True)),
             ("LSTM", dict(num_layers=2, bidirectional=True)), ("LSTM", dict(bias=False))]


@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kind,options", RECURRENT, ids=lambda v: v if isinstance(v, str) else ",".join(map(str, v)))
def test_recurrent_layers_are_exact(kind, options, batch_first, packed, B):
    torch.manual_seed(B)
    model = Recurrent(kind, batch_first, packed, **options).to(DT)
    lengths = torch.tensor([5, 2, 4][:B]) if packed else torch.full((B,), 5)
    inputs = {"x": torch.randn(B, 5, 3, dtype=DT), "lengths": lengths, "y": torch.randint(0, 2, (B,))}
    loss = lambda m, b: F.cross_entropy(m(b["x"], b["lengths"]), b["y"], reduction="none")  # noqa: E731
    check_model(model, loss, inputs, style="layer-wise", backend="cpu", R=0.2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_recurrent_layers_on_every_backend(backend):
    torch.manual_seed(7)
    model = Recurrent("LSTM", False, True, num_layers=2, bidirectional=True).to(DT)
    inputs = {"x": torch.randn(3, 5, 3, dtype=DT), "lengths": torch.tensor([5, 2, 4]), "y": torch.randint(0, 2, (3,))}
    loss = lambda m, b: F.cross_entropy(m(b["x"], b["lengths"]), b["y"], reduction="none")  # noqa: E731
    check_model(model, loss, inputs, style="all-layer", backend=backend, R=0.2)


def test_recurrent_forward_matches_torch():
    """The written-out recurrence gives torch's outputs (packed, bidirectional, two layers, h0/c0)."""
    torch.manual_seed(0)
    theirs = nn.LSTM(3, 4, num_layers=2, bidirectional=True).to(DT)
    ours = bk.convert(copy.deepcopy(theirs))
    bk.PrivacyEngine(ours, batch_size=3, sample_size=30, noise_multiplier=1.0, batch_first=False)
    x = torch.randn(5, 3, 3, dtype=DT)
    packed = nn.utils.rnn.pack_padded_sequence(x, torch.tensor([5, 2, 4]), enforce_sorted=False)
    h0, c0 = torch.randn(4, 3, 4, dtype=DT), torch.randn(4, 3, 4, dtype=DT)
    for args in ((x,), (x, (h0, c0)), (packed,), (packed, (h0, c0))):
        (out1, (h1, c1)), (out2, (h2, c2)) = ours(*args), theirs(*args)
        out1 = out1.data if isinstance(out1, nn.utils.rnn.PackedSequence) else out1
        out2 = out2.data if isinstance(out2, nn.utils.rnn.PackedSequence) else out2
        for a, b in ((out1, out2), (h1, h2), (c1, c2)):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_projected_lstm_is_refused():
    with pytest.raises(bk.UnsupportedModuleError, match="proj_size"):
        bk.convert(nn.Sequential(nn.LSTM(3, 4, proj_size=2)))


def test_an_empty_batch_through_the_new_layers_is_a_noise_only_step():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.bag = nn.EmbeddingBag(13, 3)
            self.rnn = nn.GRU(3, 4, batch_first=True, bidirectional=True)
            self.attn = nn.MultiheadAttention(8, 2, add_bias_kv=True, batch_first=True)
            self.norm = nn.InstanceNorm1d(8, affine=True, track_running_stats=True)
            self.scale = nn.Parameter(torch.ones(8))  # the model itself takes the generic path
            self.head = nn.Linear(8, 2)

        def forward(self, ids, x):
            h, _ = self.rnn(x + self.bag(ids)[:, None, :])
            h, _ = self.attn(h, h, h)
            h = self.norm(h.transpose(1, 2)).transpose(1, 2) * self.scale
            return self.head(h.mean(1))

    model = bk.convert(Mixed().to(DT))
    engine = bk.PrivacyEngine(model, batch_size=4, sample_size=40, noise_multiplier=1.0, seed=3)
    opt = engine.attach(torch.optim.SGD(model.parameters(), lr=1.0))
    before = [p.detach().clone() for p in model.parameters()]
    ids, x, y = torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 5, 3, dtype=DT), torch.zeros(0, dtype=torch.long)
    F.cross_entropy(model(ids, x), y).backward()
    opt.step()
    assert engine.steps == 1
    for p, b in zip(model.parameters(), before):
        moved = p.detach() - b
        assert torch.isfinite(moved).all() and (moved != 0).all()  # noise, and nothing else
