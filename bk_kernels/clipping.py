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


def unit_clip_factors_ref(terms, sq_scale, max_grad_norm, clipping_fn="abadi", gamma=0.01, out_scale=1.0):
    """torch.ops.bk.unit_clip_factors in plain PyTorch, float64: a clipping unit's [B] squared-norm
    terms -> (sq_scale * their sum, clip_factors of that * out_scale, whether every norm is finite)."""
    sq_norms = sum(t.double() for t in terms) * sq_scale
    return sq_norms, clip_factors_ref(sq_norms, max_grad_norm, clipping_fn, gamma) * out_scale, \
        bool(torch.isfinite(sq_norms).all())


def _check(sq_norms, max_grad_norm, clipping_fn, gamma):
    if not isinstance(sq_norms, torch.Tensor) or sq_norms.dim() != 1 or not sq_norms.is_floating_point():
        raise ValueError("clip_factors: sq_norms must be a 1-d floating-point tensor of squared norms")
    if not (isinstance(max_grad_norm, (int, float)) and math.isfinite(max_grad_norm) and max_grad_norm > 0):
        raise ValueError(f"clip_factors: max_grad_norm must be a positive number, got {max_grad_norm!r}")
    if clipping_fn not in CLIPPING_FNS:
        raise ValueError(f"clip_factors: clipping_fn must be one of {CLIPPING_FNS}, got {clipping_fn!r}")
    if clipping_fn == "automatic" and not gamma > 0:
        raise ValueError(f"clip_factors: automatic clipping needs gamma > 0, got {gamma!r}")


def clipping_units(style, params, names, owners):
    """The clipping units: lists of parameters. style: "all-layer" (one unit), "layer-wise" (each
    bk module owning parameters, modules that share a parameter merged) or a list of groups of
    parameter names (a partition of the trainable parameters). names: {id(p): name};
    owners: {id(p): [bk modules owning p]}."""
    if style == "all-layer":
        return [list(params)]
    if style == "layer-wise":
        # Each bk module with trainable parameters is a unit; modules sharing a parameter merge.
        unit_id = {}
        groups = []
        for p in params:
            mods = owners[id(p)]
            found = {unit_id[id(m)] for m in mods if id(m) in unit_id}
            if not found:
                groups.append({"params": [], "modules": set()})
                found = {len(groups) - 1}
            target = min(found)
            for other in sorted(found - {target}):  # merge units joined by this parameter
                groups[target]["params"] += groups[other]["params"]
                groups[target]["modules"] |= groups[other]["modules"]
                for m in groups[other]["modules"]:
                    unit_id[m] = target
                groups[other] = None
            groups[target]["params"].append(p)
            for m in mods:
                groups[target]["modules"].add(id(m))
                unit_id[id(m)] = target
        return [g["params"] for g in groups if g is not None]
    if isinstance(style, (list, tuple)) and style and all(isinstance(g, (list, tuple)) for g in style):
        by_name = {names[id(p)]: p for p in params}
        seen, units = set(), []
        for group in style:
            unit = []
            for name in group:
                if name not in by_name:
                    raise ValueError(f"PrivacyEngine: clipping group names {name!r}, which is not a trainable "
                                     f"parameter (tied parameters go by their first name)")
                if name in seen:
                    raise ValueError(f"PrivacyEngine: parameter {name!r} is in more than one clipping group")
                seen.add(name)
                unit.append(by_name[name])
            if not unit:
                raise ValueError("PrivacyEngine: a clipping group is empty")
            units.append(unit)
        missing = [n for n in by_name if n not in seen]
        if missing:
            raise ValueError(f"PrivacyEngine: clipping groups must cover every trainable parameter; missing {missing}")
        return units
    raise ValueError("PrivacyEngine: clipping_style must be 'all-layer', 'layer-wise' or a list of groups of "
                     f"parameter names, got {style!r}")
