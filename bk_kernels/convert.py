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
from .nn.linear import gpt2_conv1d_class, is_gpt2_conv1d
from .nn.norm import instance_norm_unsupported_reason


class UnsupportedModuleError(ValueError):
    """A trainable module has no private (per-example clipped) implementation."""


SWAPS = {
    nn.Linear: bknn.Linear,
    nn.modules.linear.NonDynamicallyQuantizableLinear: bknn.Linear,  # nn.MultiheadAttention.out_proj
    nn.Embedding: bknn.Embedding,
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
}

_REASONS = {
    nn.Embedding: embedding_unsupported_reason,
    nn.InstanceNorm1d: instance_norm_unsupported_reason,
    nn.InstanceNorm2d: instance_norm_unsupported_reason,
    nn.InstanceNorm3d: instance_norm_unsupported_reason,
    nn.MultiheadAttention: attention_unsupported_reason,
}

_ADVICE = {
    nn.modules.batchnorm._BatchNorm: "BatchNorm mixes the examples of a batch, so per-example gradients "
                                     "do not exist: use GroupNorm (or LayerNorm) instead",
    nn.RNNBase: "recurrent layers are not supported yet: freeze them or replace them",
    nn.ConvTranspose1d: "transposed convolutions are not supported yet: freeze them or replace them",
    nn.ConvTranspose2d: "transposed convolutions are not supported yet: freeze them or replace them",
    nn.ConvTranspose3d: "transposed convolutions are not supported yet: freeze them or replace them",
}


def _advice(module):
    for cls, text in _ADVICE.items():
        if isinstance(module, cls):
            return text
    return ("no bk equivalent: freeze its parameters (requires_grad_(False)) or replace it with "
            "supported layers (Linear, Conv1d/2d/3d, Embedding, LayerNorm, GroupNorm, InstanceNorm, RMSNorm, "
            "MultiheadAttention)")


def _owns_trainable(module):
    return any(p.requires_grad for p in module.parameters(recurse=False))


def _plan(model):
    """[(module, new class)] and [(path, type name, why)] for the whole model."""
    swaps, problems = [], []
    for path, module in model.named_modules():
        if isinstance(module, bknn.BKLayer) or not _owns_trainable(module):
            continue  # already converted (convert is idempotent), or frozen / no parameters
        cls = type(module)
        if cls in SWAPS:
            reason = _REASONS.get(cls, lambda m: None)(module)
            if reason:
                problems.append((path or "<model>", cls.__name__, f"{reason} has no private equivalent"))
            else:
                swaps.append((module, SWAPS[cls]))
        elif is_gpt2_conv1d(module):
            swaps.append((module, gpt2_conv1d_class(cls)))
        else:
            problems.append((path or "<model>", cls.__name__, _advice(module)))
    return swaps, problems


def convert(model):
    """Swaps the supported layers of `model` for bk.nn layers IN PLACE and returns `model`.

    Keeps every Parameter object and state_dict key; idempotent; frozen modules are left
    alone. Raises UnsupportedModuleError naming every trainable module it cannot privatize
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
