"""timm's own layer classes that bk puts on its fused paths (not the generic path): Conv2dSame
(TensorFlow "SAME" padding computed per input size), FastViT's LayerScale2d, GroupNorm and
GroupNorm1, each against the per-example loop."""
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
    want = expected_update(grads, [[n for n, _ in model.named_parameters()]], 0.1, "abadi", B)
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
