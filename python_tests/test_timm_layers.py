"""timm's own layer classes that bk puts on its fused paths (not the generic path): Conv2dSame
(TensorFlow "SAME" padding computed per input size), FastViT's LayerScale2d, GroupNorm and
GroupNorm1, the weight-standardized convolutions (StdConv2d, ScaledStdConv2d and their SAME
variants), each against the per-example loop."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bk_kernels as bk
from python_tests.model_reference import assert_updates_close, expected_update, per_example_grads, private_update

timm = pytest.importorskip("timm")
DT = torch.float64


def assert_exact_on_the_fused_path(model, x):
    """One private step (R = 0.1, all-layer, B = len(x)) against the per-example loop in float64,
    with no module left on the generic path; returns the converted model."""
    B = len(x)
    inputs = {"x": x, "y": torch.randint(0, 3, (B,))}
    loss = lambda m, b, r="mean": F.cross_entropy(m(b["x"]), b["y"], reduction=r)  # noqa: E731
    grads = per_example_grads(model, lambda m, one: loss(m, one, "sum"), inputs)
    want = expected_update(grads, [[n for n, p in model.named_parameters() if p.requires_grad]], 0.1, "abadi", B)
    got, engine = private_update(model, loss, inputs, B, max_grad_norm=0.1)
    assert_updates_close(got, want)
    assert bk.generic_modules(engine.model) == []
    return engine.model


@pytest.mark.parametrize("size", [9, 16])
def test_conv2d_same_is_exact_on_the_fused_path(size):
    from timm.layers import Conv2dSame

    torch.manual_seed(0)
    model = nn.Sequential(Conv2dSame(3, 4, 3, stride=2), nn.ReLU(), Conv2dSame(4, 4, 5, dilation=2, groups=2),
                          nn.Flatten(), nn.LazyLinear(3)).to(DT)
    x = torch.randn(4, 3, size, size, dtype=DT)
    model(x)  # materialise the lazy head
    assert isinstance(assert_exact_on_the_fused_path(model, x)[0], bk.nn.Conv2d)


def test_fastvit_layer_scale_with_a_gamma_of_shape_c_1_1_is_exact():
    """timm FastViT's own LayerScale2d keeps gamma as [C, 1, 1] (timm.layers' as [C]): the
    per-example gradients came back [B, C] and the step failed to assign a [C] gradient to it."""
    from timm.models.fastvit import LayerScale2d

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), LayerScale2d(4, init_values=0.5), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    assert_exact_on_the_fused_path(model.to(DT), torch.randn(4, 3, 8, 8, dtype=DT))


def test_timm_group_norms_are_exact_on_the_fused_path():
    """timm's GroupNorm (channels first in its __init__) and GroupNorm1 compute F.group_norm of
    torch's attributes: bk's fused GroupNorm in front of them (they were the generic path)."""
    from timm.layers import GroupNorm, GroupNorm1

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), GroupNorm(4, num_groups=2), nn.ReLU(inplace=True), nn.Conv2d(4, 4, 1),
                          GroupNorm1(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).to(DT)
    with torch.no_grad():
        for m in (model[1], model[4]):
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.5, 0.5)
    converted = assert_exact_on_the_fused_path(model, torch.randn(4, 3, 8, 8, dtype=DT))
    assert isinstance(converted[1], bk.nn.GroupNorm) and isinstance(converted[4], bk.nn.GroupNorm)


def _std_conv_net(name, size):
    """Two of timm's weight-standardized convolutions (the second grouped), a random gain."""
    import timm.layers as layers

    cls = getattr(layers, name)
    extra = {"padding": "SAME"} if name.endswith("Same") else {}
    model = nn.Sequential(cls(3, 4, 3, stride=2, **extra), nn.ReLU(), cls(4, 6, 3, groups=2, **extra), nn.Flatten(),
                          nn.LazyLinear(3)).to(DT)
    x = torch.randn(4, 3, size, size, dtype=DT)
    model(x)  # materialise the lazy head
    with torch.no_grad():
        for conv in (model[0], model[2]):
            if hasattr(conv, "gain"):
                conv.gain.uniform_(0.5, 1.5)
    return model, x


STD_CONVS = ["StdConv2d", "StdConv2dSame", "ScaledStdConv2d", "ScaledStdConv2dSame"]


@pytest.mark.parametrize("name", STD_CONVS)
@pytest.mark.parametrize("chunked", [False, True])
def test_weight_standardized_convolutions_are_exact_on_the_fused_path(name, chunked, monkeypatch):
    """Example b's gradients of the weight (and gain) are the standardization's Jacobian applied
    to its gradient of the applied weight; chunked: over chunks of one example, never all kept."""
    from bk_kernels.nn import _uses

    if chunked:
        monkeypatch.setattr(_uses, "DENSE_DIRECT_BUDGET", 0)
        monkeypatch.setattr(_uses, "example_chunks", lambda B, width: [(b, b + 1) for b in range(B)])
    torch.manual_seed(0)
    model, x = _std_conv_net(name, 9)
    converted = assert_exact_on_the_fused_path(model, x)
    assert type(converted[0]).__name__ == name and isinstance(converted[0], bk.nn.Conv2d)


@pytest.mark.parametrize("frozen", ["weight", "gain"])
def test_scaled_std_conv_with_its_weight_or_its_gain_frozen_is_exact(frozen):
    torch.manual_seed(1)
    model, x = _std_conv_net("ScaledStdConv2d", 8)
    for conv in (model[0], model[2]):
        getattr(conv, frozen).requires_grad_(False)
    assert_exact_on_the_fused_path(model, x)
    assert_exact_on_the_fused_path(model, x[:1])  # B = 1


@pytest.mark.parametrize("name", STD_CONVS)
def test_weight_standardized_convolutions_give_timms_gradients_outside_private_training(name):
    torch.manual_seed(2)
    model, x = _std_conv_net(name, 9)
    converted = bk.convert(__import__("copy").deepcopy(model))
    for m in (model, converted):
        m(x).square().sum().backward()
    for (n, p), q in zip(model.named_parameters(), converted.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-12, atol=1e-12, msg=n)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("name", ["StdConv2d", "ScaledStdConv2dSame"])
def test_weight_standardized_norms_without_per_example_gradients_are_exact(name, backend):
    """In ghost mode the convolution keeps no per-example gradients: the norms of V's and gain's
    come from the conv norm of (x, g * kappa) less the channels' mean and normalized-row terms."""
    from bk_kernels.nn import std_conv

    torch.manual_seed(3)
    model, x = _std_conv_net(name, 9)
    calls = []
    original = std_conv._Standardization.sq_norms

    def counted(self, *args):
        out = original(self, *args)
        calls.append(out is not None)
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(std_conv._Standardization, "sq_norms", counted)
        B = len(x)
        inputs = {"x": x, "y": torch.randint(0, 3, (B,))}
        loss = lambda m, b, r="mean": F.cross_entropy(m(b["x"]), b["y"], reduction=r)  # noqa: E731
        grads = per_example_grads(model, lambda m, one: loss(m, one, "sum"), inputs)
        want = expected_update(grads, [[n for n, _ in model.named_parameters()]], 0.1, "abadi", B)
        got, _ = private_update(model, loss, inputs, B, max_grad_norm=0.1, clipping_mode="ghost", backend=backend)
    assert_updates_close(got, want)
    assert calls == [True, True]  # both convolutions, by the formula


class _HoldsNet(nn.Module):
    """Three weight-standardized convolutions whose outputs the norms read three ways: conv1's is
    kept by the GroupNorm after it (its input), so the norms read it; conv2's goes into a residual
    add that keeps nothing, so the engine drops it in the forward; conv3's is changed in place by
    a ReLU, so the backward finds its version moved. The last two recompute it."""

    def __init__(self, name, bias):
        super().__init__()
        import timm.layers as layers

        cls = getattr(layers, name)
        self.conv1, self.norm = cls(3, 4, 3, padding=1, bias=bias), nn.GroupNorm(2, 4)
        self.conv2, self.conv3 = cls(4, 4, 1, bias=bias), cls(4, 4, 3, padding=1, bias=bias)
        self.head = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        h = self.norm(self.conv1(x))
        h = self.conv2(h) + h
        return self.head(torch.relu_(self.conv3(h)).flatten(1))


def _norm_paths(model, x, **engine_kwargs):
    """One private step in ghost mode against the per-example loop; returns, per convolution's
    weight shape, whether its norms read the held output (True) or recomputed it (False)."""
    from bk_kernels.nn import std_conv

    paths = {}
    read, recompute = std_conv._Standardization._normalized_conv, std_conv._Standardization._conv

    def noted_read(self, use):
        paths[tuple(self.weight_shape)] = True
        return read(self, use)

    def noted_recompute(self, *args):
        paths[tuple(self.weight_shape)] = False
        return recompute(self, *args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(std_conv._Standardization, "_normalized_conv", noted_read)
        mp.setattr(std_conv._Standardization, "_conv", noted_recompute)
        B = len(x)
        inputs = {"x": x, "y": torch.randint(0, 3, (B,))}
        loss = lambda m, b, r="mean": F.cross_entropy(m(b["x"]), b["y"], reduction=r)  # noqa: E731
        grads = per_example_grads(model, lambda m, one: loss(m, one, "sum"), inputs)
        want = expected_update(grads, [[n for n, p in model.named_parameters() if p.requires_grad]], 0.1, "abadi", B)
        got, _ = private_update(model, loss, inputs, B, max_grad_norm=0.1, clipping_mode="ghost", **engine_kwargs)
    assert_updates_close(got, want)
    return paths


@pytest.mark.parametrize("name,bias", [("StdConv2d", False), ("StdConv2d", True), ("ScaledStdConv2d", True)])
def test_weight_standardized_norms_read_the_forward_output_only_where_it_is_kept_unchanged(name, bias):
    torch.manual_seed(6)
    model = _HoldsNet(name, bias).to(DT)
    with torch.no_grad():
        for conv in (model.conv1, model.conv2, model.conv3):
            if hasattr(conv, "gain"):
                conv.gain.uniform_(0.5, 1.5)
    paths = _norm_paths(model, torch.randn(4, 3, 6, 6, dtype=DT))
    assert paths == {(4, 3, 3, 3): True, (4, 4, 1, 1): False, (4, 4, 3, 3): False}


def test_weight_standardized_norms_recompute_where_a_gain_is_zero():
    """The held output is s * conv(x, normalized): with a zero in the gain s it cannot be divided back."""
    torch.manual_seed(7)
    model = _HoldsNet("ScaledStdConv2d", False).to(DT)
    with torch.no_grad():
        model.conv1.gain.uniform_(0.5, 1.5)
        model.conv1.gain[1] = 0.0
    assert _norm_paths(model, torch.randn(4, 3, 6, 6, dtype=DT))[(4, 3, 3, 3)] is False


def test_held_outputs_do_not_outlive_the_backward_or_a_forward_without_one():
    """The holds are the layers' outputs: none may stay alive past its layer's backward while the
    graph (and its nodes' attributes) lives on, nor be taken in a forward under no_grad."""
    import gc
    import weakref

    from bk_kernels.nn import held_output

    torch.manual_seed(8)
    model = bk.convert(_HoldsNet("StdConv2d", False).to(DT))
    engine = bk.PrivacyEngine(model, batch_size=4, sample_size=40, noise_multiplier=0.0, max_grad_norm=1.0,
                              clipping_mode="ghost")
    optimizer = engine.attach(torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = torch.randn(4, 3, 6, 6, dtype=DT), torch.randint(0, 3, (4,))
    aliases = []
    original = held_output.OutputHolds.hold

    def noted(self, out):
        held = original(self, out)
        aliases.append(weakref.ref(held.tensor))
        return held

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(held_output.OutputHolds, "hold", noted)
        with torch.no_grad():
            model(x)
        assert aliases == []
        loss = F.cross_entropy(model(x), y)
        assert len(aliases) == 3 and engine._output_holds.live == []
        assert aliases[0]() is not None  # conv1's, kept by the GroupNorm's saved input
        loss.backward()
        gc.collect()
        assert [a() for a in aliases] == [None, None, None]  # loss, and so the graph, still alive
    optimizer.step()


def test_weight_standardized_norms_fall_back_to_per_example_gradients_where_the_formula_cancels():
    """Inputs equal across channels make each example's gradient of the applied 1x1 weight a
    multiple of the ones vector, which the standardization removes: V's gradient is 0 and the
    formula's difference is all rounding. It must not be trusted: the gradients are formed."""
    from timm.layers import StdConv2d
    from bk_kernels.nn import std_conv

    torch.manual_seed(4)
    model = nn.Sequential(StdConv2d(4, 3, 1), nn.Flatten(), nn.Linear(3 * 5 * 5, 3)).to(DT)
    x = torch.randn(4, 1, 5, 5, dtype=DT).expand(4, 4, 5, 5).contiguous()
    results = []
    original = std_conv._Standardization.sq_norms
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(std_conv._Standardization, "sq_norms",
                   lambda self, *a: results.append(original(self, *a)) or results[-1])
        B = len(x)
        inputs = {"x": x, "y": torch.randint(0, 3, (B,))}
        loss = lambda m, b, r="mean": F.cross_entropy(m(b["x"]), b["y"], reduction=r)  # noqa: E731
        grads = per_example_grads(model, lambda m, one: loss(m, one, "sum"), inputs)
        assert all(g["0.weight"].abs().max() < 1e-12 for g in grads)
        want = expected_update(grads, [[n for n, _ in model.named_parameters()]], 0.1, "abadi", B)
        got, _ = private_update(model, loss, inputs, B, max_grad_norm=0.1, clipping_mode="ghost")
    assert results == [None]
    assert_updates_close(got, want)


@pytest.mark.parametrize("channels_last", [True, False])
def test_global_response_norm_is_exact_on_the_fused_path(channels_last):
    """ConvNeXt-V2's GRN in both of timm's layouts, its weight and bias trained or one frozen."""
    from timm.layers.grn import GlobalResponseNorm

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.grn, self.head = nn.Conv2d(3, 4, 3), GlobalResponseNorm(4, channels_last=channels_last), \
                nn.Linear(4 * 6 * 6, 3)

        def forward(self, x):
            h = self.conv(x)
            h = self.grn(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) if channels_last else self.grn(h)
            return self.head(h.flatten(1))

    torch.manual_seed(5)
    model = Net().to(DT)
    with torch.no_grad():
        model.grn.weight.uniform_(-1, 1)
        model.grn.bias.uniform_(-1, 1)
    x = torch.randn(4, 3, 8, 8, dtype=DT)
    assert isinstance(assert_exact_on_the_fused_path(model, x).grn, bk.nn.BKLayer)
    for frozen in ("weight", "bias"):
        getattr(model.grn, frozen).requires_grad_(False)
        assert_exact_on_the_fused_path(model, x)
        getattr(model.grn, frozen).requires_grad_(True)


def _metaformer_net(use_nchw):
    from timm.models.metaformer import GroupNorm1NoBias, LayerNorm2dNoBias, Scale, StarReLU

    class Net(nn.Module):
        """Conv, MetaFormer's bias-free norms, its Scale and StarReLU (one-number scale and bias)."""

        def __init__(self):
            super().__init__()
            self.conv, self.head = nn.Conv2d(3, 4, 3), nn.Linear(4 * 6 * 6, 3)
            self.norm1, self.norm2 = GroupNorm1NoBias(4), LayerNorm2dNoBias(4)
            self.scale, self.act = Scale(4, init_value=0.7, use_nchw=use_nchw), StarReLU(scale_value=0.9, bias_value=0.1)

        def forward(self, x):
            h = self.act(self.norm2(self.norm1(self.conv(x))))  # the bias would vanish in a norm after it
            h = self.scale(h) if use_nchw else self.scale(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            return self.head(h.flatten(1))

    return Net().to(DT)


@pytest.mark.parametrize("use_nchw", [True, False])
def test_metaformer_scale_star_relu_and_bias_free_norms_are_exact_on_the_fused_path(use_nchw):
    """PoolFormer / ConvFormer / CAFormer's own layers: each was recomputed per example before.
    StarReLU's scale and bias are one number each: summed over every channel and position."""
    torch.manual_seed(6)
    model = _metaformer_net(use_nchw)
    with torch.no_grad():
        model.scale.scale.uniform_(0.5, 1.5)
    x = torch.randn(4, 3, 8, 8, dtype=DT)
    converted = assert_exact_on_the_fused_path(model, x)
    assert isinstance(converted.norm1, bk.nn.GroupNorm) and isinstance(converted.norm2, bk.nn.LayerNorm)
    model.act.bias.requires_grad_(False)  # StarReLU's bias_learnable=False
    assert_exact_on_the_fused_path(model, x[:1])


def test_resmlp_affine_and_block_and_hgnet_learnable_affine_are_exact_on_the_fused_path():
    from timm.models.hgnet import LearnableAffineBlock
    from timm.models.mlp_mixer import ResBlock

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(3, 8)
            self.block = ResBlock(8, seq_len=5, mlp_ratio=2, init_values=0.5)
            self.affine, self.head = LearnableAffineBlock(0.8, 0.2), nn.Linear(8, 3)

        def forward(self, x):  # x: [B, 5 tokens, 3]
            return self.head(self.affine(self.block(self.embed(x))).mean(1))

    torch.manual_seed(7)
    model = Net().to(DT)
    with torch.no_grad():
        for p in (model.block.norm1.alpha, model.block.norm2.beta, model.block.ls1):
            p.uniform_(-1, 1)
    converted = assert_exact_on_the_fused_path(model, torch.randn(4, 5, 3, dtype=DT))
    assert isinstance(converted.block, bk.nn.BKLayer) and isinstance(converted.block.norm1, bk.nn.BKLayer)


def test_csatv2_spatial_attention_mixing_the_examples_is_refused():
    """timm's CSATv2 (1.0.x) unbinds its spatial attention's q, k, v as [B, N] and takes q @ k^T: a
    [B, B] product over the batch. Its outputs stay apart (the block's LayerNorm(1) makes q, k, v
    constants) but its gradients do not: bk.verify found per-example norms 13 off. bk.convert now
    probes the block with bk.verify once and refuses it, naming the cause; nothing changes."""
    from timm.models.csatv2 import SpatialTransformerBlock
    from bk_kernels.nn.attention import _exact_per_example

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), SpatialTransformerBlock())
    with pytest.raises(bk.UnsupportedModuleError, match="mixes the examples"):
        bk.convert(model)
    assert type(model[0]) is nn.Conv2d and type(model[1]) is SpatialTransformerBlock
    assert not _exact_per_example(SpatialTransformerBlock(), (1, 7, 7))
    assert _exact_per_example(nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.GELU(), nn.Conv2d(2, 1, 1)), (1, 7, 7))


def test_maxvit_bias_mlp_dropout_keeps_the_batch_mask():
    """MaxViT-rmlp's relative position MLP has dropout (timm: 0.125). The bias is made once per
    forward for the whole batch; its per-example gradients come from that forward's own graph,
    so with nothing clipped and no noise the update is the plain model's gradient under the same
    random draws (a recompute of the bias would draw another mask)."""
    model = timm.create_model("maxvit_rmlp_pico_rw_256", pretrained=False, num_classes=3, img_size=64)
    model = bk.replace_batchnorm(model).to(torch.float64).train()
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False  # timm's own non-fused path draws as bk's does
    assert any(type(m).__name__ == "RelPosMlp" and m.mlp.drop1.p > 0 for m in model.modules())
    x, y = torch.randn(2, 3, 64, 64, dtype=torch.float64), torch.tensor([0, 2])
    plain = copy.deepcopy(model)
    torch.manual_seed(7)
    F.cross_entropy(plain(x), y).backward()
    private = bk.convert(model)
    engine = bk.PrivacyEngine(private, batch_size=2, sample_size=20, noise_multiplier=0.0, max_grad_norm=1e9)
    torch.manual_seed(7)
    F.cross_entropy(private(x), y).backward()
    for (name, p), q in zip(private.named_parameters(), plain.parameters()):
        # p.grad holds the sum of the (unclipped) per-example gradients until the step divides by B
        assert torch.allclose(p.grad, 2 * q.grad, rtol=1e-9, atol=1e-12), name
