"""torchvision's models whose modules use their own Parameters inline (bk_kernels/nn/torchvision_models.py):
ViT's class token and positions, Swin's window attention (v1 and v2), ConvNeXt's layer scale and
LayerNorm2d, MaxViT's relative position tables, the video Swin's 3-d windows. Each runs on bk's fused layers (no module on the
generic path) and takes the exact step of one backward per example (bk.verify, float64), at B = 1,
an odd B, and B equal to a count the layouts could confuse with the examples (ViT's 17 positions,
Swin's 16 windows of its first stage), with the inline Parameters trained or frozen.

The zoo rows (python_tests/zoo.py: tv_*) run the full and frozen-base steps of test_models_zoo.py.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

import bk_kernels as bk
from python_tests import zoo

pytest.importorskip("torchvision")

# zoo row -> (a batch size the layouts could take for the examples, the inline Parameters)
CASES = {
    "tv_vit": (17, ("class_token", "pos_embedding")),
    "tv_swin": (16, ("relative_position_bias_table",)),
    "tv_swinv2": (16, ("logit_scale", "cpb_mlp")),
    "tv_swin3d": (16, ("relative_position_bias_table",)),
    "tv_convnext": (5, ("layer_scale",)),
    "tv_maxvit": (4, ("relative_position_bias_table",)),
}


def _model(name, frozen=()):
    build, _, make_batch = zoo.ZOO[name]
    torch.manual_seed(1)
    model = build()
    for param_name, p in model.named_parameters():
        if any(part in param_name.split(".") for part in frozen):
            p.requires_grad_(False)
    return model, make_batch


def _verify(model, inputs):
    return bk.verify(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), (inputs["x"], inputs["y"]), rtol=1e-9)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("frozen", [False, True])
def test_runs_fused_and_exact(name, frozen):
    confusable, inline = CASES[name]
    model, make_batch = _model(name, inline if frozen else ())
    assert bk.generic_modules(bk.convert(copy.deepcopy(model))) == []
    for B in (1, 3, confusable):
        report = _verify(model, make_batch(B))
        assert report.ok, f"B={B}: {report}"


@pytest.mark.parametrize("name", list(CASES))
def test_private_forward_is_torchvision_forward(name):
    """Under an engine, the converted model's logits are torchvision's (the mixins copy its forwards)."""
    model, make_batch = _model(name)
    x = make_batch(3)["x"]
    want = model(x)
    converted = bk.convert(copy.deepcopy(model))
    bk.PrivacyEngine(converted, batch_size=3, sample_size=30, noise_multiplier=0.0, max_grad_norm=1.0)
    torch.testing.assert_close(converted(x), want, rtol=1e-12, atol=1e-12)


def test_swin_v2_key_bias_block_gets_no_gradient():
    """torchvision's v2 zeroes the key block of qkv.bias in every forward: that block's gradient
    is zero, private or not (bk computes the key block without a bias)."""
    model, make_batch = _model("tv_swinv2")
    model = bk.convert(model)
    inputs = make_batch(3)
    engine = bk.PrivacyEngine(model, batch_size=3, sample_size=30, noise_multiplier=0.0, max_grad_norm=1e6)
    F.cross_entropy(model(inputs["x"]), inputs["y"]).backward()
    engine._noise_and_scale(add_noise=False)
    for module in model.modules():
        if type(module).__name__ == "ShiftedWindowAttentionV2":
            C = module.qkv.bias.shape[0] // 3
            grad = module.qkv.bias.grad
            assert torch.count_nonzero(grad[C:2 * C]) == 0 and torch.count_nonzero(grad[:C]) > 0


def test_subclass_with_its_own_forward_keeps_the_generic_path():
    """A subclass whose forward differs from torchvision's is not given the copied forward: the
    generic path, still exact."""
    from torchvision.models.vision_transformer import Encoder

    class ScaledEncoder(Encoder):
        def forward(self, input):
            return self.ln(self.layers(self.dropout(input + 0.5 * self.pos_embedding)))

    model, make_batch = _model("tv_vit")
    old = model.encoder
    model.encoder = ScaledEncoder(17, 2, 2, 8, 16, 0.0, 0.0).double()
    model.encoder.load_state_dict(old.state_dict())
    assert [t for _, t, _ in bk.generic_modules(bk.convert(copy.deepcopy(model)))] == ["ScaledEncoder"]
    report = _verify(model, make_batch(3))
    assert report.ok, str(report)


def test_empty_batch_takes_a_noise_only_step():
    """Poisson sampling's empty batch: torchvision's ViT and Swin run it, and the step adds only noise;
    so does the ResNet at 32 x 32, whose last stage has one output position (the CPU clipped sum's
    matmul path, which failed on B = 0 at first)."""
    for name in ("tv_vit", "tv_swinv2", "tv_swin3d", "tv_resnet_frozen_bn"):
        model, make_batch = _model(name)
        model = bk.convert(model)
        inputs = make_batch(0)
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        engine = bk.PrivacyEngine(model, batch_size=4, sample_size=40, noise_multiplier=1.0, max_grad_norm=1.0,
                                  seed=0)
        engine.attach(optimizer)
        before = [p.detach().clone() for p in model.parameters()]
        F.cross_entropy(model(inputs["x"]), inputs["y"], reduction="sum").backward()
        optimizer.step()
        assert engine.steps == 1
        assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
