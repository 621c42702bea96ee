"""bk.register_layer: a user's own layer family, the README's worked example, exact; and the
registration's checks."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bk_kernels as bk
from python_tests.test_models import check_model

DT = torch.float64


class ScaledLinear(nn.Module):
    """A user's layer: y = (x W^T) * scale + shift, W trainable, scale a fixed number, shift a
    trainable vector used directly in the forward."""

    def __init__(self, d, p, scale):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(p, d) / d ** 0.5)
        self.shift = nn.Parameter(torch.zeros(p))
        self.scale = scale

    def forward(self, x):
        return F.linear(x, self.weight) * self.scale + self.shift


class BKScaledLinear(bk.nn.BKLayer, ScaledLinear):
    """Its bk family: the weight as one book-kept linear map (bk.nn.linear), the shift as its
    bias (x W^T * scale + shift = x (scale W)^T + shift: a linear map of x with weight scale*W
    would change the Parameter, so the scale is applied to the input instead)."""

    def forward(self, x):
        return bk.nn.linear(self, x * self.scale, self.weight, self.shift)


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.scaled, self.head = ScaledLinear(4, 6, 0.5), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.scaled(x)).mean(1))


def loss(model, batch):
    return F.cross_entropy(model(batch["x"]), batch["y"], reduction="none")


@pytest.fixture
def registered():
    from bk_kernels.nn import families
    saved = dict(families._BY_CLASS)
    yield bk.register_layer(ScaledLinear, BKScaledLinear)
    families._BY_CLASS.clear()
    families._BY_CLASS.update(saved)


def test_without_registration_the_generic_path_is_exact():
    torch.manual_seed(0)
    inputs = {"x": torch.randn(5, 3, 4, dtype=DT), "y": torch.randint(0, 3, (5,))}
    check_model(Model().to(DT), loss, inputs, style="layer-wise", backend="cpu", R=0.3)
    assert [t for _, t, _ in bk.generic_modules(bk.convert(Model()))] == ["ScaledLinear"]


def test_a_registered_family_is_exact_and_fused(registered):
    torch.manual_seed(0)
    inputs = {"x": torch.randn(5, 3, 4, dtype=DT), "y": torch.randint(0, 3, (5,))}
    for mode in ("ghost", "direct"):
        check_model(Model().to(DT), loss, inputs, style="layer-wise", backend="cpu", R=0.3, mode=mode)
    model = bk.convert(Model())
    assert isinstance(model.scaled, BKScaledLinear) and not bk.generic_modules(model)


def test_a_refusal_names_the_module(registered):
    bk.register_layer(ScaledLinear, BKScaledLinear,
                      unsupported_reason=lambda m: "scale 0 loses the input" if m.scale == 0 else None)
    model = nn.Sequential(ScaledLinear(4, 6, 0.0))
    with pytest.raises(bk.UnsupportedModuleError, match=r"0 \(ScaledLinear\): scale 0 loses the input"):
        bk.convert(model)


def test_registration_checks_its_arguments():
    with pytest.raises(TypeError, match="must subclass bk.nn.BKLayer"):
        bk.register_layer(ScaledLinear, ScaledLinear)
    with pytest.raises(TypeError, match="must subclass ScaledLinear"):
        bk.register_layer(ScaledLinear, bk.nn.Linear)
    with pytest.raises(TypeError, match="not a torch.nn.Module class"):
        bk.register_layer(int, None)
    with pytest.raises(ValueError, match="give a module class, or matches="):
        bk.register_layer(None, None)
