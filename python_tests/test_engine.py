"""PrivacyEngine and bk.convert: arguments, bad input (clear errors, nothing changed), noise,
accumulation over several backwards, and the plumbing around the optimizer."""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bk_kernels as bk
from python_tests.test_models import check_model, classification_loss

DT = torch.float64


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).to(DT)


def make(model=None, **kwargs):
    model = bk.convert(model or mlp())
    args = dict(batch_size=4, sample_size=100, noise_multiplier=0.0, max_grad_norm=1.0)
    args.update(kwargs)
    engine = bk.PrivacyEngine(model, **args)
    return model, engine, engine.attach(torch.optim.SGD(model.parameters(), lr=1.0))


def data(B=4):
    return torch.randn(B, 4, dtype=DT), torch.randint(0, 3, (B,))


def test_convert_names_every_unsupported_module_and_changes_nothing():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.EmbeddingBag(4, 4, mode="max"), nn.Linear(4, 2))
    with pytest.raises(bk.UnsupportedModuleError) as err:
        bk.convert(model)
    text = str(err.value)
    assert "1 (BatchNorm1d)" in text and "GroupNorm" in text and "2 (EmbeddingBag): mode='max'" in text
    assert type(model[0]) is nn.Linear and type(model[3]) is nn.Linear  # nothing swapped


def test_frozen_unsupported_modules_are_left_alone():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4).requires_grad_(False), nn.Linear(4, 2))
    bk.convert(model)
    assert isinstance(model[0], bk.nn.Linear) and type(model[1]) is nn.BatchNorm1d


def test_parameters_used_directly_in_a_forward_take_the_generic_path():
    class Raw(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.scale = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return self.lin(x) * self.scale

    model = bk.convert(Raw())
    assert isinstance(model, bk.nn.GenericLayer) and isinstance(model.lin, bk.nn.Linear)
    assert bk.generic_modules(model) == [("<model>", "Raw", 3)]


def test_a_child_read_by_a_parent_without_parameters_is_absorbed_into_its_generic_path():
    """A module that owns no Parameters but calls F.conv1d on its child's weight itself (a short
    convolution, as transformers' InklingShortConvolution): the parent takes the generic path
    with the child absorbed. Before, the module was skipped (nothing of its own to train) and the
    child's weight got an ordinary gradient, refused at the backward."""
    class ShortConv(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1d = nn.Conv1d(4, 4, 3, groups=4, padding=2, bias=True)

        def forward(self, x):  # [B, T, C]
            y = F.conv1d(x.transpose(1, 2), self.conv1d.weight, self.conv1d.bias, padding=2, groups=4)
            return y[..., : x.shape[1]].transpose(1, 2)

    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(3, 4), ShortConv(), nn.Flatten(), nn.Linear(20, 2)).to(DT)
    assert [t for _, t, _ in bk.generic_modules(bk.convert(copy.deepcopy(model)))] == ["ShortConv"]
    inputs = {"x": torch.randn(5, 5, 3, dtype=DT), "y": torch.randint(0, 2, (5,))}
    check_model(model, classification_loss, inputs, style="all-layer", backend="cpu")


def _peek(layer, x):
    """Reads layer.weight where no module's forward source shows it."""
    return x[:, :3] @ layer.weight[:, :3].T


def test_a_parameter_used_outside_every_module_that_owns_it_is_refused_at_the_backward():
    """The parent reads its child's weight through a helper: no module owning it sees that use,
    so the parameter gets an ordinary gradient, which the engine refuses; the next forward
    starts clean."""
    class Peeking(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            return self.lin(x) + _peek(self.lin, x)

    model, engine, opt = make(Peeking().to(DT))
    x = torch.randn(4, 4, dtype=DT)
    with pytest.raises(RuntimeError, match="ordinary"):
        model(x).sum().backward()
    with pytest.raises(RuntimeError, match="without a backward"):
        opt.step()
    assert engine.steps == 0
    model(x)  # the next forward drops what the failed backward had recorded
    assert not engine._uses and not engine._callback_queued


@pytest.mark.parametrize("kwargs,match", [
    (dict(noise_multiplier=None), "exactly one of target_epsilon and noise_multiplier"),
    (dict(target_epsilon=3.0), "exactly one of"),
    (dict(max_grad_norm=0.0), "max_grad_norm must be a positive"),
    (dict(clipping_fn="soft"), "clipping_fn must be one of"),
    (dict(clipping_style="per-sample"), "clipping_style must be"),
    (dict(clipping_style=[["0.weight"]]), "must cover every trainable parameter"),
    (dict(clipping_style=[["0.weight", "nope"]]), "not a trainable parameter"),
    (dict(clipping_mode="fast"), "clipping_mode must be one of"),
    (dict(backend="gpu"), "backend must be one of"),
    (dict(loss_reduction="none"), "loss_reduction must be one of"),
    (dict(batch_size=0), "batch_size must be a positive int"),
    (dict(batch_size=200), "exceeds sample_size"),
    (dict(noise_multiplier=-1.0), "noise_multiplier must be >= 0"),
])
def test_bad_engine_arguments(kwargs, match):
    model = bk.convert(mlp())
    args = dict(batch_size=4, sample_size=100, noise_multiplier=0.0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        bk.PrivacyEngine(model, **args)


def test_engine_refuses_an_unconverted_model():
    with pytest.raises(bk.UnsupportedModuleError, match="bk.convert"):
        bk.PrivacyEngine(mlp(), batch_size=4, sample_size=100, noise_multiplier=1.0)


def test_step_without_backward_moves_nothing():
    model, engine, opt = make()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="without a backward"):
        opt.step()
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert engine.steps == 0


def test_checkpoint_state_init_step_passes_through_unspent():
    """torch.distributed.checkpoint's get_state_dict makes a fresh optimizer's state by one step
    on zero gradients at learning rate 0: it passes, creates the state, moves nothing and spends
    nothing. Any other step without a backward is still refused."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, engine, _ = make()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    engine.detach()
    opt = engine.attach(opt)
    before = [p.detach().clone() for p in model.parameters()]
    _, optim_state = get_state_dict(model, opt)
    assert optim_state["state"] and all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert engine.steps == 0 and engine.epsilon() == 0.0
    for p in model.parameters():  # zero gradients at a non-zero learning rate: refused
        p.grad = torch.zeros_like(p)
    with pytest.raises(RuntimeError, match="without a backward"):
        opt.step()


def test_non_finite_norms_refused_before_anything_moves():
    model, engine, opt = make()
    x, y = data()
    x[1, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="non-finite"):
        F.cross_entropy(model(x), y).backward()
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(RuntimeError, match="without a backward"):
        opt.step()


def test_ordinary_gradient_to_a_bk_parameter_is_refused():
    model, engine, opt = make()
    x, y = data()
    loss = F.cross_entropy(model(x), y) + model[0].weight.sum()  # the weight used outside its layer
    with pytest.raises(RuntimeError, match="non-private"):
        loss.backward()


def test_noise_has_the_promised_scale():
    model = bk.convert(nn.Sequential(nn.Linear(300, 400)).to(DT))
    engine = bk.PrivacyEngine(model, batch_size=8, sample_size=800, noise_multiplier=1.3, max_grad_norm=0.5, seed=7)
    opt = engine.attach(torch.optim.SGD(model.parameters(), lr=1.0))
    x = torch.zeros(3, 300, dtype=DT)  # zero input and zero loss gradient: the step is pure noise
    before = model[0].weight.detach().clone()
    (model(x).sum() * 0).backward()
    opt.step()
    moved = (model[0].weight.detach() - before).flatten()
    want_std = 1.3 * 0.5 / 8
    n = moved.numel()
    assert abs(moved.std().item() / want_std - 1) < 5 * math.sqrt(1 / (2 * n))
    assert abs(moved.mean().item()) < 5 * want_std / math.sqrt(n)


def test_seeded_noise_reproduces_and_differs_across_steps():
    def run(seed):
        torch.manual_seed(0)
        model, engine, opt = make(mlp(), noise_multiplier=1.0, seed=seed)
        steps = []
        for _ in range(2):
            before = [p.detach().clone() for p in model.parameters()]
            x, y = data()
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            steps.append([p.detach() - b for p, b in zip(model.parameters(), before)])
        return steps

    a, b = run(11), run(11)
    assert all(torch.equal(u, v) for s, t in zip(a, b) for u, v in zip(s, t))
    c = run(12)
    assert not torch.equal(a[0][0], c[0][0])


def test_two_backwards_accumulate_before_one_step():
    torch.manual_seed(1)
    x, y = data(6)
    model_a, _, opt_a = make(mlp(), batch_size=6, loss_reduction="sum")
    opt_a.zero_grad()
    F.cross_entropy(model_a(x[:3]), y[:3], reduction="sum").backward()
    F.cross_entropy(model_a(x[3:]), y[3:], reduction="sum").backward()
    model_b, _, opt_b = make(mlp(), batch_size=6, loss_reduction="sum")
    opt_b.zero_grad()
    F.cross_entropy(model_b(x), y, reduction="sum").backward()
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("how", ["autograd.grad", "backward(inputs=)"])
def test_an_input_gradient_leaves_the_parameters_alone(how):
    """An adversarial example or a saliency map takes the loss's gradient with respect to the
    INPUT only. Before, the bk layers book-kept their weights in that backward too: p.grad got a
    clipped sum that the training backward's was then added to (each example counted twice, no
    zero_grad in between). Now nothing is recorded; the step after the training backward is
    exactly the step of the training backward alone."""
    torch.manual_seed(2)
    x, y = data()
    model, engine, opt = make(mlp(), noise_multiplier=1.0, seed=4)
    reference, _, ref_opt = make(mlp(), noise_multiplier=1.0, seed=4)
    x = x.requires_grad_(True)
    loss = F.cross_entropy(model(x), y)
    if how == "autograd.grad":
        (grad_x,) = torch.autograd.grad(loss, x)
    else:
        loss.backward(inputs=[x])
        grad_x = x.grad
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(RuntimeError, match="without a backward"):
        opt.step()  # nothing to step on yet
    adversarial = (x + 0.1 * grad_x.sign()).detach()
    F.cross_entropy(model(adversarial), y).backward()
    opt.step()
    F.cross_entropy(reference(adversarial), y).backward()
    ref_opt.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p, q)


def test_a_second_backward_through_one_forward_is_refused():
    """Two losses of one forward backpropagated one at a time (or backward(retain_graph=True)
    twice) would clip and add every example's gradient twice: bounded by 2R, not R."""
    x, y = data()
    model, engine, opt = make()
    out = model(x)
    F.cross_entropy(out, y).backward(retain_graph=True)
    first = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="second backward through the same forward"):
        out.square().mean().backward(retain_graph=True)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), first))  # the first stands
    opt.zero_grad()  # drops the first: the same forward's backward is the step's only sum again
    out.square().mean().backward()
    opt.step()
    assert engine.steps == 1


def test_detach_restores_ordinary_training():
    model, engine, opt = make()
    engine.detach()
    x, y = data()
    F.cross_entropy(model(x), y).backward()
    assert all(p.grad is not None for p in model.parameters())
    opt.step()  # the optimizer's own step again
    assert "step" not in vars(opt)


def test_zero_grad_discards_a_pending_backward():
    model, engine, opt = make()
    x, y = data()
    F.cross_entropy(model(x), y).backward()
    opt.zero_grad()
    with pytest.raises(RuntimeError, match="without a backward"):
        opt.step()


@pytest.mark.parametrize("clip_fn", bk.clipping.CLIPPING_FNS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B", [0, 1, 7])
def test_clipping_rule_matches_its_reference(clip_fn, dtype, B):
    sq = (torch.rand(B, dtype=dtype) * 4) ** 2
    if B:
        sq[0] = 0.0  # a zero gradient: abadi keeps it, the others scale it by R / (eps or gamma)
    got = bk.clipping.clip_factors(sq, 0.7, clip_fn, 0.05)
    want = bk.clipping.clip_factors_ref(sq.double(), 0.7, clip_fn, 0.05)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=0)


def test_clipping_rule_refuses_bad_arguments():
    with pytest.raises(ValueError, match="clipping_fn must be one of"):
        bk.clipping.clip_factors(torch.ones(2), 1.0, "soft")
    with pytest.raises(ValueError, match="max_grad_norm must be a positive"):
        bk.clipping.clip_factors(torch.ones(2), -1.0)
    with pytest.raises(ValueError, match="1-d floating-point"):
        bk.clipping.clip_factors(torch.ones(2, 2), 1.0)
