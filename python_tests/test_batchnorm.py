"""BatchNorm: a frozen one that would normalise with the batch's statistics is refused in the
forward (it mixes the examples: found silently training with wrong clip factors before), one in
eval mode is exact, and bk.replace_batchnorm swaps BatchNorm for GroupNorm."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bk_kernels as bk
from python_tests.model_reference import assert_updates_close, expected_update, per_example_grads, private_update
from python_tests.zoo import with_batchnorm_statistics

DT = torch.float64


def conv_net(norm=nn.BatchNorm2d):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), norm(8), nn.ReLU(), nn.Conv2d(8, 6, 3), nn.Flatten(),
                         nn.Linear(6 * 4 * 4, 5)).to(DT)


def batch(B=5):
    gen = torch.Generator().manual_seed(1)
    return {"x": torch.randn(B, 3, 8, 8, generator=gen, dtype=DT), "y": torch.randint(0, 5, (B,), generator=gen)}


def loss(model, inputs, reduction="mean"):
    return F.cross_entropy(model(inputs["x"]), inputs["y"], reduction=reduction)


def assert_exact(model, inputs):
    """One private step (R = 0.1, all-layer) against the per-example loop, in float64."""
    grads = per_example_grads(model, lambda m, one: loss(m, one, "sum"), inputs)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    want = expected_update(grads, [names], 0.1, "abadi", len(inputs["y"]))
    got, _ = private_update(model, loss, inputs, len(inputs["y"]), max_grad_norm=0.1)
    assert_updates_close(got, want)


def engine_for(model):
    engine = bk.PrivacyEngine(model, batch_size=5, sample_size=50, noise_multiplier=0.0, max_grad_norm=0.1)
    return engine, engine.attach(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0))


@pytest.mark.parametrize("how", ["train mode", "no running statistics"])
def test_frozen_batchnorm_using_batch_statistics_is_refused_and_changes_nothing(how):
    model = conv_net()
    model[1].requires_grad_(False)
    if how == "no running statistics":
        model[1] = nn.BatchNorm2d(8, track_running_stats=False).to(DT).requires_grad_(False).eval()
    bk.convert(model)
    engine, optimizer = engine_for(model)
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(bk.UnsupportedModuleError, match=r"BatchNorm2d \(1\) normalises with the statistics of the "
                                                         r"whole batch.*replace_batchnorm"):
        loss(model, batch()).backward()
    with pytest.raises(RuntimeError, match="without a backward"):
        optimizer.step()
    for name, value in model.state_dict().items():  # running statistics and parameters alike
        assert torch.equal(value, state[name]), name
    assert engine.steps == 0 and engine.epsilon(1e-5) == 0


def test_frozen_batchnorm_in_eval_mode_is_exact():
    """In eval mode BatchNorm is a per-example map (its running statistics): allowed and exact."""
    model = conv_net()
    with torch.no_grad():  # running statistics other than 0 / 1
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    model[1].requires_grad_(False).eval()
    assert_exact(model, batch())


def test_trainable_batchnorm_points_to_replace_batchnorm():
    with pytest.raises(bk.UnsupportedModuleError, match=r"1 \(BatchNorm2d\).*bk.replace_batchnorm"):
        bk.convert(conv_net())


def test_replace_batchnorm_then_train_exactly():
    model = conv_net()
    weight, bias = model[1].weight, model[1].bias
    with torch.no_grad():
        weight.uniform_(0.5, 1.5)
        bias.uniform_(-0.5, 0.5)
    assert bk.replace_batchnorm(model, groups=4) is model
    gn = model[1]
    assert type(gn) is nn.GroupNorm and gn.num_groups == 4 and gn.num_channels == 8 and gn.eps == 1e-5
    assert gn.weight is weight and gn.bias is bias  # the same Parameters: an optimizer made before still holds them
    assert set(model.state_dict()) == {n for n, _ in model.named_parameters()}  # running statistics gone
    assert_exact(model, batch())


def test_replace_batchnorm_groups_divide_the_channels():
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm1d(48), nn.BatchNorm2d(7), nn.BatchNorm3d(64, affine=False, eps=1e-3),
                          nn.SyncBatchNorm(20))
    model[1].requires_grad_(False)
    bk.replace_batchnorm(model)
    assert [(m.num_groups, m.num_channels, m.affine) for m in model] == [(24, 48, True), (7, 7, True),
                                                                          (32, 64, False), (20, 20, True)]
    assert model[2].eps == 1e-3 and not model[1].weight.requires_grad and model[0].weight.requires_grad
    assert isinstance(bk.replace_batchnorm(nn.BatchNorm2d(16), groups=8), nn.GroupNorm)


def test_replace_batchnorm_keeps_mode_and_shared_modules():
    bn = nn.BatchNorm1d(8).eval()
    model = nn.Sequential(nn.Linear(8, 8), bn, nn.Linear(8, 8), bn)
    bk.replace_batchnorm(model)
    assert model[1] is model[3] and type(model[1]) is nn.GroupNorm and not model[1].training


def test_replace_batchnorm_refuses_what_it_cannot_swap_and_changes_nothing():
    class BatchNormAct(nn.BatchNorm2d):  # timm's BatchNormAct2d: an activation inside the forward
        def forward(self, x):
            return F.relu(super().forward(x))

    model = nn.Sequential(nn.BatchNorm2d(4), BatchNormAct(4), nn.LazyBatchNorm1d())
    with pytest.raises(bk.UnsupportedModuleError) as err:
        bk.replace_batchnorm(model)
    text = str(err.value)
    assert "1 (BatchNormAct): BatchNormAct has a forward of its own" in text and "2 (LazyBatchNorm1d)" in text
    assert "0 (" not in text
    assert type(model[0]) is nn.BatchNorm2d  # nothing swapped
    for groups in (0, 2.0, True):
        with pytest.raises(ValueError, match="groups must be a positive int"):
            bk.replace_batchnorm(nn.Sequential(nn.BatchNorm1d(4)), groups=groups)


@pytest.mark.parametrize("norm", [lambda c: nn.GroupNorm(2, c), lambda c: nn.InstanceNorm2d(c, affine=True),
                                  lambda c: nn.LayerNorm([c, 6, 6]), lambda c: nn.RMSNorm([c, 6, 6])],
                         ids=["GroupNorm", "InstanceNorm2d", "LayerNorm", "RMSNorm"])
def test_norm_layers_feed_an_inplace_relu(norm):
    """A norm layer then ReLU(inplace=True), as in timm's and torchvision's ResNets: bk's GroupNorm
    and InstanceNorm returned a view made inside their autograd Function, which may not be
    modified in place (a RuntimeError in every such model's forward, found with timm's ResNet
    after replace_batchnorm)."""
    model = conv_net(norm)
    model[2] = nn.ReLU(inplace=True)
    assert_exact(model, batch())


def test_a_group_norm_of_one_value_per_group_warns_once():
    """A BatchNorm on pooled [B, C, 1, 1] features (ResNeSt's, ReXNet's, SK-ResNet's gates) swapped
    by replace_batchnorm normalizes one value per group: its output is its bias whatever the input.
    bk's GroupNorm says so once (the model trains, but not as it did with the BatchNorm)."""
    model = bk.convert(bk.replace_batchnorm(nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8, 2))))
    bk.PrivacyEngine(model, batch_size=2, sample_size=20, noise_multiplier=0.0, max_grad_norm=1.0)
    with pytest.warns(UserWarning, match="one value per group") as record:
        model(torch.randn(2, 3, 6, 6))
        model(torch.randn(2, 3, 6, 6))
    assert len([w for w in record if "one value per group" in str(w.message)]) == 1
    spatial = bk.convert(bk.replace_batchnorm(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))))
    bk.PrivacyEngine(spatial, batch_size=2, sample_size=20, noise_multiplier=0.0, max_grad_norm=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spatial(torch.randn(2, 3, 6, 6))


# ---------------------------------------------------------------- bk.freeze_batchnorm

@pytest.mark.parametrize("frozen_affine", [None, "weight", "bias", "both"])
def test_freeze_batchnorm_keeps_the_eval_function_and_trains_exactly(frozen_affine):
    """The frozen model computes in train mode what the BatchNorm model computed in eval mode (to
    float64 rounding: x * scale + shift, as torchvision's FrozenBatchNorm2d, not F.batch_norm),
    holds the same Parameter objects and a state_dict with the BatchNorm's keys; its private
    step is exact with the affine Parameters trained, partly frozen or frozen."""
    model = with_batchnorm_statistics(conv_net())
    inputs = batch()
    want = model.eval()(inputs["x"])
    state = copy.deepcopy(model.state_dict())
    weight, bias = model[1].weight, model[1].bias
    assert bk.freeze_batchnorm(model) is model
    frozen = model[1]
    assert type(frozen) is bk.nn.FrozenBatchNorm and frozen.weight is weight and frozen.bias is bias
    assert set(model.state_dict()) == set(state)
    model.train()
    torch.testing.assert_close(model(inputs["x"]), want, rtol=1e-13, atol=1e-13)  # x * scale + shift: rounding
    model.load_state_dict(state)  # a BatchNorm checkpoint loads as it is
    for name in {"weight": ["weight"], "bias": ["bias"], "both": ["weight", "bias"]}.get(frozen_affine, []):
        getattr(frozen, name).requires_grad_(False)
    assert_exact(model, inputs)


def test_freeze_batchnorm_never_updates_the_statistics():
    """Private steps move the trained Parameters and leave the running statistics as they were."""
    model = bk.convert(bk.freeze_batchnorm(with_batchnorm_statistics(conv_net())))
    statistics = {n: b.clone() for n, b in model.named_buffers()}
    engine, optimizer = engine_for(model)
    before = model[1].weight.detach().clone()
    for _ in range(2):
        loss(model, batch()).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert engine.steps == 2 and not torch.equal(model[1].weight, before)
    for name, value in model.named_buffers():
        assert torch.equal(value, statistics[name]), name


def test_freeze_batchnorm_of_a_pretrained_style_network_is_exact():
    """torchvision's resnet18 (in-place ReLU after each norm), timm's EfficientNet (BatchNormAct2d:
    the drop and act kept) and an MLP's BatchNorm1d on [B, C], at B = 1 and 3, under bk.verify."""
    tv = pytest.importorskip("torchvision")
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).to(DT)
    models = {"resnet18": (tv.models.resnet18(num_classes=3).to(DT), (3, 16, 16)),
              "efficientnet": (timm.create_model("efficientnet_b0", num_classes=3).to(DT), (3, 32, 32)),
              "mlp": (mlp, (6,))}
    for name, (model, shape) in models.items():
        model = bk.freeze_batchnorm(with_batchnorm_statistics(model))
        assert not [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        acts = [m for m in model.modules() if isinstance(m, bk.nn.frozen_batchnorm.FrozenBatchNormAct)]
        assert (name == "efficientnet") == bool(acts) and all(hasattr(m, "act") for m in acts)
        assert bk.generic_modules(bk.convert(copy.deepcopy(model))) == []
        for B in (1, 3):
            x = torch.randn(B, *shape, dtype=DT)
            report = bk.verify(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), (x, torch.randint(0, 3, (B,))))
            assert report.ok, f"{name} B={B}: {report}"


def test_freeze_batchnorm_refuses_what_it_cannot_freeze_and_changes_nothing():
    model = conv_net()
    model.add_module("no_stats", nn.BatchNorm2d(8, track_running_stats=False))
    before = list(model.children())
    with pytest.raises(bk.UnsupportedModuleError, match=r"(?s)freeze_batchnorm.*no_stats \(BatchNorm2d\).*"
                                                        r"track_running_stats=False"):
        bk.freeze_batchnorm(model)
    assert list(model.children()) == before


def test_frozen_batchnorm_before_a_channels_last_gradient_is_exact():
    """A mean over positions after flatten(2).transpose(1, 2) (XCiT's and iFormer's heads) sends
    back a channels-last output gradient; for one example, torch's CPU batch_norm backward in eval
    mode then returns a wrong input gradient, which the one-example-at-a-time reference hit (a
    10x false mismatch with F.batch_norm inside FrozenBatchNorm). Its elementwise form is exact."""

    class TokenMean(nn.Module):
        def forward(self, x):
            return x.flatten(2).transpose(1, 2).mean(1)

    torch.manual_seed(0)
    model = with_batchnorm_statistics(nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), TokenMean(),
                                           nn.Linear(8, 3)).to(DT))
    model = bk.freeze_batchnorm(model)
    x = torch.randn(4, 3, 16, 16, dtype=DT)
    report = bk.verify(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), (x, torch.randint(0, 3, (4,))), rtol=1e-9)
    assert report.ok, str(report)
