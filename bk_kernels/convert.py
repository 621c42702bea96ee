"""bk.convert(model): swap the supported layers of a model for their bk.nn equivalents in place.

The swap changes each module's class (module.__class__), so the module objects, their
Parameter objects (and so any optimizer state), hooks and state_dict keys all stay as they
were. Every trainable module that cannot be privatized is named in ONE error, before
anything is changed.
"""
import torch

from . import _fsdp
from . import nn as bknn
from .nn import families
from .nn.generic import generic_class, is_generic


class UnsupportedModuleError(ValueError):
    """A trainable module has no private (per-example clipped) implementation."""


def _owns_trainable(module):
    return any(p.requires_grad for p in module.parameters(recurse=False))


def _plan(model):
    """[(module, new class)] and [(path, type name, why)] for the whole model."""
    swaps, problems = [], []
    absorbed = set()  # children whose Parameters a generic parent book-keeps (left unconverted)
    for path, module in model.named_modules():
        if id(module) in absorbed:
            continue
        if isinstance(module, bknn.BKLayer):  # already converted (convert is idempotent)
            absorbed.update(id(m) for c in module._bk_absorbed_modules() for m in c.modules())
            continue
        family, exact = families.lookup(type(module))
        outcome = family.plan(module, exact) if family is not None else families.GENERIC
        if not _owns_trainable(module) and not getattr(outcome, "_bk_absorb", ()):
            continue  # frozen, or no parameters of its own, and no child's to absorb (T5's bias table)
        if outcome == families.GENERIC:  # any other module owning trainable Parameters: exact, by torch.func
            outcome = generic_class(type(module))
        if isinstance(outcome, str):
            problems.append((path or "<model>", type(module).__name__, outcome))
            continue
        swaps.append((module, outcome))
        absorbed.update(id(m) for name in getattr(outcome, "_bk_absorb", ()) for m in getattr(module, name).modules())
    return swaps, problems


def generic_modules(model):
    """[(path, type name, number of own trainable parameter elements)] of the modules of a
    converted model that take the generic path (nn/generic.py): per-example gradients of their
    own Parameters (absorbed children's included) by a recompute under torch.func, at the cost
    of one more forward and backward of the module and B x that many elements per backward."""
    return [(path or "<model>", type(m).__name__, sum(p.numel() for _, p in m._bk_own_trainable()))
            for path, m in model.named_modules() if is_generic(m)]


def convert(model):
    """Swaps the supported layers of `model` for bk.nn layers IN PLACE and returns `model`.

    Keeps every Parameter object and state_dict key; idempotent; frozen modules are left
    alone. Modules that own trainable Parameters and have no fused family (a cls token used in
    a forward, an LLM's own RMSNorm class, a subclass with its own forward) take the generic
    exact path; `generic_modules(model)` lists them. bk.register_layer adds families. Raises
    UnsupportedModuleError naming every trainable module it cannot privatize (by path and type),
    changing nothing.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"bk.convert: expected a torch.nn.Module, got {type(model).__name__}")
    if _fsdp.is_fsdp2(model):  # fully_shard swapped the classes already, and the parameters are shards
        raise TypeError("bk.convert: the model is already sharded by fully_shard; call bk.convert(model) first, then "
                        "fully_shard, then bk.distributed.DistributedPrivacyEngine")
    swaps, problems = _plan(model)
    if problems:
        lines = "\n".join(f"  {path} ({type_name}): {why}" for path, type_name, why in problems)
        raise UnsupportedModuleError(
            f"bk.convert: {len(problems)} trainable module(s) cannot be trained privately; nothing was changed:\n"
            f"{lines}")
    for module, new_cls in swaps:
        module.__class__ = new_cls
    return model
