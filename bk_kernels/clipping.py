"""The one clipping rule (docs/DESIGN.md), for the engine and for users of the ops.

C_i from example i's gradient norm ||g_i|| over its clipping unit and the unit's threshold R:
  abadi:      C_i = min(1, R / (||g_i|| + 1e-6))
  automatic:  C_i = R / (||g_i|| + gamma)          (AUTO-S, Bu et al. 2022)
  normalized: C_i = R / (||g_i|| + 1e-6)
The kernel is the C++ composite op bk::clip_factors (csrc/composite.cpp), so it runs on any
device and torch.compile sees it; clip_factors_ref is the same rule in plain PyTorch.
"""
import math

import torch

CLIPPING_FNS = ("abadi", "automatic", "normalized")


def clip_factors(sq_norms, max_grad_norm, clipping_fn="abadi", gamma=0.01):
    """[B] clip factors from [B] squared per-example norms (any float dtype; the result has it)."""
    _check(sq_norms, max_grad_norm, clipping_fn, gamma)
    return torch.ops.bk.clip_factors(sq_norms, float(max_grad_norm), clipping_fn, float(gamma))


def clip_factors_ref(sq_norms, max_grad_norm, clipping_fn="abadi", gamma=0.01):
    """clip_factors in plain PyTorch. sq_norms: [B] -> [B]."""
    _check(sq_norms, max_grad_norm, clipping_fn, gamma)
    norms = sq_norms.clamp_min(0).sqrt()
    if clipping_fn == "abadi":
        return (max_grad_norm / (norms + 1e-6)).clamp_max(1.0)
    if clipping_fn == "automatic":
        return max_grad_norm / (norms + gamma)
    return max_grad_norm / (norms + 1e-6)


def _check(sq_norms, max_grad_norm, clipping_fn, gamma):
    if not isinstance(sq_norms, torch.Tensor) or sq_norms.dim() != 1 or not sq_norms.is_floating_point():
        raise ValueError("clip_factors: sq_norms must be a 1-d floating-point tensor of squared norms")
    if not (isinstance(max_grad_norm, (int, float)) and math.isfinite(max_grad_norm) and max_grad_norm > 0):
        raise ValueError(f"clip_factors: max_grad_norm must be a positive number, got {max_grad_norm!r}")
    if clipping_fn not in CLIPPING_FNS:
        raise ValueError(f"clip_factors: clipping_fn must be one of {CLIPPING_FNS}, got {clipping_fn!r}")
    if clipping_fn == "automatic" and not gamma > 0:
        raise ValueError(f"clip_factors: automatic clipping needs gamma > 0, got {gamma!r}")
