"""The ground truth for whole models: one backward per example, in float64.

expected_update() is what docs/DESIGN.md's contract says one private SGD(lr=1) step without noise
must do: move each parameter by -(1/batch_size) sum_i C_i g_i, with C_i from the example's
gradient norm over its clipping unit.
"""
import copy
import math

import torch

import bk_kernels as bk


def per_example_grads(model, example_loss, inputs, batch_dims=None):
    """[{name: grad}] for each example, from its own backward (reduction "sum" over 1 example).

    batch_dims: {input name: dim holding its examples} (default 0; 1 for sequence-first inputs)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    dims = {k: (batch_dims or {}).get(k, 0) for k in inputs}
    first = next(iter(inputs))
    B = inputs[first].shape[dims[first]]
    out = []
    for i in range(B):
        model.zero_grad(set_to_none=True)
        one = {k: v.narrow(dims[k], i, 1) for k, v in inputs.items()}
        example_loss(model, one).sum().backward()
        out.append({n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in params.items()})
    return out


def clip_factor(norm, R, clip_fn, gamma=0.01):
    if clip_fn == "abadi":
        return min(1.0, R / (norm + 1e-6))
    if clip_fn == "automatic":
        return R / (norm + gamma)
    return R / (norm + 1e-6)


def expected_update(grads, units, R, clip_fn, batch_size, gamma=0.01):
    """{name: delta} = -(1/batch_size) sum_i C_i g_i, C_i per unit (threshold R / sqrt(#units))."""
    names = list(grads[0]) if grads else []
    threshold = R / math.sqrt(len(units))
    total = {n: torch.zeros_like(g) for n, g in (grads[0].items() if grads else [])}
    for g in grads:
        for unit in units:
            norm = math.sqrt(sum(g[n].double().square().sum().item() for n in unit))
            c = clip_factor(norm, threshold, clip_fn, gamma)
            for n in unit:
                total[n] += c * g[n]
    return {n: -total[n] / batch_size for n in names}


def private_update(model, batch_loss, inputs, batch_size, **engine_kwargs):
    """{name: delta} of one bk step (SGD lr=1, no noise) on a converted copy of `model`."""
    model = bk.convert(copy.deepcopy(model))
    engine = bk.PrivacyEngine(model, batch_size=batch_size, sample_size=10 * batch_size, noise_multiplier=0.0,
                              **engine_kwargs)
    optimizer = engine.attach(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer.zero_grad()
    batch_loss(model, inputs).backward()
    optimizer.step()
    # The update is read from the gradient SGD(lr=1) stepped with: a difference of parameters
    # loses updates far smaller than the parameter itself (timm ConvNeXt's 1e-6 layer scales)
    # to rounding. The parameters did move by it, up to that rounding.
    moved = {n: p.detach() - before[n] for n, p in model.named_parameters() if p.requires_grad}
    update = {n: -p.grad.detach() for n, p in model.named_parameters() if p.requires_grad}
    for n in update:
        torch.testing.assert_close(moved[n], update[n].to(moved[n].dtype), rtol=0,
                                   atol=4 * torch.finfo(moved[n].dtype).eps * (before[n].abs().max().item() + 1))
    return update, engine


def assert_updates_close(got, want, rtol=1e-9):
    assert set(got) == set(want), (set(got) ^ set(want))
    overall = max(w.abs().max().item() for w in want.values())
    for name in want:
        scale = max(want[name].abs().max().item(), 1e-6 * overall)  # relative to the parameter's own update
        err = (got[name].double() - want[name].double()).abs().max().item()
        assert err <= rtol * scale, f"{name}: error {err:.3g} vs its update {scale:.3g}"
