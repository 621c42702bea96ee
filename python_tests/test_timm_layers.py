"""timm's own layer classes that bk puts on its fused paths (not the generic path): Conv2dSame
(TensorFlow "SAME" padding computed per input size), against the per-example loop."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bk_kernels as bk
from python_tests.model_reference import assert_updates_close, expected_update, per_example_grads, private_update

timm = pytest.importorskip("timm")
DT = torch.float64


@pytest.mark.parametrize("size", [9, 16])
def test_conv2d_same_is_exact_on_the_fused_path(size):
    from timm.layers import Conv2dSame

    torch.manual_seed(0)
    model = nn.Sequential(Conv2dSame(3, 4, 3, stride=2), nn.ReLU(), Conv2dSame(4, 4, 5, dilation=2, groups=2),
                          nn.Flatten(), nn.LazyLinear(3)).to(DT)
    x = torch.randn(4, 3, size, size, dtype=DT)
    model(x)  # materialise the lazy head
    inputs = {"x": x, "y": torch.randint(0, 3, (4,))}
    loss = lambda m, b, r="mean": F.cross_entropy(m(b["x"]), b["y"], reduction=r)  # noqa: E731
    grads = per_example_grads(model, lambda m, one: loss(m, one, "sum"), inputs)
    names = [n for n, _ in model.named_parameters()]
    want = expected_update(grads, [names], 0.1, "abadi", 4)
    got, engine = private_update(model, loss, inputs, 4, max_grad_norm=0.1)
    assert_updates_close(got, want)
    assert isinstance(engine.model[0], bk.nn.Conv2d) and bk.generic_modules(engine.model) == []


def test_fastvit_layer_scale_with_a_gamma_of_shape_c_1_1_is_exact():
    """timm FastViT's own LayerScale2d keeps gamma as [C, 1, 1] (timm.layers' as [C]): the
    per-example gradients came back [B, C] and the step failed to assign a [C] gradient to it."""
    from timm.models.fastvit import LayerScale2d

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), LayerScale2d(4, init_values=0.5), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    model = model.to(DT)
    inputs = {"x": torch.randn(4, 3, 8, 8, dtype=DT), "y": torch.randint(0, 3, (4,))}
    loss = lambda m, b, r="mean": F.cross_entropy(m(b["x"]), b["y"], reduction=r)  # noqa: E731
    grads = per_example_grads(model, lambda m, one: loss(m, one, "sum"), inputs)
    want = expected_update(grads, [[n for n, _ in model.named_parameters()]], 0.1, "abadi", 4)
    got, engine = private_update(model, loss, inputs, 4, max_grad_norm=0.1)
    assert_updates_close(got, want)
    assert bk.generic_modules(engine.model) == []
