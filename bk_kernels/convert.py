"""bk.convert(model): swap the supported layers of a model for their bk.nn equivalents in place.

The swap changes each module's class (module.__class__), so the module objects, their
Parameter objects (and so any optimizer state), hooks and state_dict keys all stay as they
were. Every trainable module that cannot be privatized is named in ONE error, before
anything is changed.
"""
import torch
from torch import nn

from . import nn as bknn
from .nn.attention import attention_unsupported_reason
from .nn.embedding import embedding_unsupported_reason
from .nn.embedding_bag import embedding_bag_unsupported_reason
from .nn.recurrent import recurrent_unsupported_reason
from .nn.generic import generic_class, is_generic
from .nn.linear import gpt2_conv1d_class, is_gpt2_conv1d
from .nn.norm import instance_norm_unsupported_reason


class UnsupportedModuleError(ValueError):
    """A trainable module has no private (per-example clipped) implementation."""


SWAPS = {
    nn.Linear: bknn.Linear,
    nn.modules.linear.NonDynamicallyQuantizableLinear: bknn.Linear,  # nn.MultiheadAttention.out_proj
    nn.Embedding: bknn.Embedding,
    nn.EmbeddingBag: bknn.EmbeddingBag,
    nn.Conv1d: bknn.Conv1d,
    nn.Conv2d: bknn.Conv2d,
    nn.Conv3d: bknn.Conv3d,
    nn.LayerNorm: bknn.LayerNorm,
    nn.RMSNorm: bknn.RMSNorm,
    nn.GroupNorm: bknn.GroupNorm,
    nn.InstanceNorm1d: bknn.InstanceNorm1d,
    nn.InstanceNorm2d: bknn.InstanceNorm2d,
    nn.InstanceNorm3d: bknn.InstanceNorm3d,
    nn.MultiheadAttention: bknn.MultiheadAttention,
    nn.RNN: bknn.RNN,
    nn.GRU: bknn.GRU,
    nn.LSTM: bknn.LSTM,
}

_REASONS = {
    nn.Embedding: embedding_unsupported_reason,
    nn.EmbeddingBag: embedding_bag_unsupported_reason,
    nn.InstanceNorm1d: instance_norm_unsupported_reason,
    nn.InstanceNorm2d: instance_norm_unsupported_reason,
    nn.InstanceNorm3d: instance_norm_unsupported_reason,
    nn.MultiheadAttention: attention_unsupported_reason,
    nn.LSTM: recurrent_unsupported_reason,
}

# Modules whose own Parameters cannot be made exact by any path: refused with this advice.
_ADVICE = {
    nn.modules.batchnorm._BatchNorm: "BatchNorm mixes the examples of a batch, so per-example gradients "
                                     "do not exist: use GroupNorm (or LayerNorm) instead",
}


def _advice(module):
    for cls, text in _ADVICE.items():
        if isinstance(module, cls):
            return text
    return None


class _SubclassCheck(bknn.BKLayer):
    """In front of a subclass of a supported layer whose forward calls the parent's forward
    (HF's scaled word embeddings, OPT's offset positions): the subclass's forward runs, and its
    super().forward reaches the bk layer. Checks that it did, in every private forward."""

    def forward(self, *args, **kwargs):
        before = self._bk_calls
        out = super().forward(*args, **kwargs)
        if self._bk_calls == before and self._bk_engine is not None and torch.is_grad_enabled() and \
                not bknn.in_plain_forward() and _owns_trainable(self):
            raise UnsupportedModuleError(
                f"bk: {type(self).__name__} overrides forward and did not call its torch parent's forward in this "
                "call, so its parameters would get ordinary gradients")
        return out


_SUBCLASSES = {}


def _subclass_adapter(cls, bk_cls):
    """cls with the bk layer under it: MRO cls -> bk layer -> torch layer."""
    if cls not in _SUBCLASSES:
        _SUBCLASSES[cls] = type(cls.__name__, (_SubclassCheck, cls, bk_cls), {"__module__": cls.__module__,
                                                                              "__qualname__": cls.__qualname__})
    return _SUBCLASSES[cls]


def _supported_base(cls):
    """The supported torch layer that `cls` subclasses (the nearest in its MRO), or None."""
    return next((base for base in cls.__mro__[1:] if base in SWAPS), None)


def _reaches_parent_forward(cls, base):
    """Whether cls's forward is the parent's, or an override that calls super()."""
    forward = cls.forward
    if forward is base.forward:
        return True
    return "super" in getattr(forward, "__code__", compile("", "", "exec")).co_names


def _owns_trainable(module):
    return any(p.requires_grad for p in module.parameters(recurse=False))


def _plan(model):
    """[(module, new class)] and [(path, type name, why)] for the whole model."""
    swaps, problems = [], []
    absorbed = set()  # children whose Parameters a generic parent book-keeps (left unconverted)
    for path, module in model.named_modules():
        if id(module) in absorbed:
            absorbed.update(id(m) for m in module.modules())
            continue
        if isinstance(module, bknn.BKLayer):
            absorbed.update(id(m) for c in module._bk_absorbed_modules() for m in c.modules())
        if isinstance(module, bknn.BKLayer) or not _owns_trainable(module):
            continue  # already converted (convert is idempotent), or frozen / no parameters
        cls = type(module)
        base = cls if cls in SWAPS else _supported_base(cls)
        reason = _REASONS.get(base, lambda m: None)(module) if base is not None else None
        advice = _advice(module)
        if reason and cls is nn.MultiheadAttention:  # torch's own forward on the generic path
            swaps.append((module, bknn.GenericMultiheadAttention))
            absorbed.update(id(m) for m in module.out_proj.modules())
        elif reason:
            problems.append((path or "<model>", cls.__name__, f"{reason} has no private equivalent"))
        elif advice:
            problems.append((path or "<model>", cls.__name__, advice))
        elif cls in SWAPS:
            swaps.append((module, SWAPS[cls]))
        elif is_gpt2_conv1d(module):
            swaps.append((module, gpt2_conv1d_class(cls)))
        elif base is not None and _reaches_parent_forward(cls, base):
            swaps.append((module, _subclass_adapter(cls, SWAPS[base])))
        else:  # any other module owning trainable Parameters: the generic exact path
            swaps.append((module, generic_class(cls)))
    return swaps, problems


def generic_modules(model):
    """[(path, type name, number of own trainable parameter elements)] of the modules of a
    converted model that take the generic path (nn/generic.py): per-example gradients of their
    own Parameters by a recompute under torch.func, at the cost of one more forward and backward
    of the module and B x that many elements per backward."""
    return [(path or "<model>", type(m).__name__, sum(p.numel() for p in m.parameters(recurse=False)
                                                      if p.requires_grad))
            for path, m in model.named_modules() if is_generic(m)]


def convert(model):
    """Swaps the supported layers of `model` for bk.nn layers IN PLACE and returns `model`.

    Keeps every Parameter object and state_dict key; idempotent; frozen modules are left
    alone. Modules that own trainable Parameters and have no fused family (a cls token used in
    a forward, an LLM's own RMSNorm class, a subclass with its own forward) take the generic
    exact path; `generic_modules(model)` lists them. Raises UnsupportedModuleError naming every trainable module it cannot privatize
    (by path and type), changing nothing.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"bk.convert: expected a torch.nn.Module, got {type(model).__name__}")
    swaps, problems = _plan(model)
    if problems:
        lines = "\n".join(f"  {path} ({type_name}): {why}" for path, type_name, why in problems)
        raise UnsupportedModuleError(
            f"bk.convert: {len(problems)} trainable module(s) cannot be trained privately; nothing was changed:\n"
            f"{lines}")
    for module, new_cls in swaps:
        module.__class__ = new_cls
    return model
