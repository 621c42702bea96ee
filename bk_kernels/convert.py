"""bk.convert(model): swap the supported layers of a model for their bk.nn equivalents in place.

The swap changes each module's class (module.__class__), so the module objects, their
Parameter objects (and so any optimizer state), hooks and state_dict keys all stay as they
were. Every trainable module that cannot be privatized is named in ONE error, before
anything is changed.
"""
import functools
import inspect
import re

import torch

from . import _fsdp
from . import nn as bknn
from .nn import families
from .nn.generic import ParametrizedGeneric, generic_class, is_generic


class UnsupportedModuleError(ValueError):
    """A trainable module has no private (per-example clipped) implementation."""


def _owns_trainable(module):
    return any(p.requires_grad for p in module.parameters(recurse=False))


def _trainable_parametrization(module):
    """A module with a torch.nn.utils.parametrize parametrization whose originals train."""
    return torch.nn.utils.parametrize.is_parametrized(module) and any(
        p.requires_grad for p in module.parametrizations.parameters())


def _parameter_containers(module):
    """Names of the module's ParameterDict/ParameterList children holding trainable Parameters."""
    return tuple(n for n, c in module._modules.items()
                 if isinstance(c, (torch.nn.ParameterDict, torch.nn.ParameterList))
                 and any(p.requires_grad for p in c.parameters()))


# self.<child>.weight / .bias used as a value (not only its dtype, device or shape)
_DIRECT_USE = re.compile(r"self\.(\w+)\.(?:weight|bias)\b(?!\s*\.\s*(?:dtype|device|shape|size|ndim|dim|numel|"
                         r"requires_grad|is_\w+|stride|element_size|data_ptr)\b)")


def _children_used_directly(module):
    """Children whose Parameters a module on the generic path reads in its own forward
    (timm's EVA/BEiT/Swin-V2 attention: F.linear(x, self.qkv.weight, qkv_bias), its own q/v
    biases in qkv_bias): they are absorbed, their Parameters recomputed per example with the
    module's own, instead of reaching the layer as an ordinary gradient. Read from the source of
    the forward; a forward without source absorbs nothing."""
    return tuple(n for n in _names_used_directly(type(module)) if isinstance(module._modules.get(n), torch.nn.Module)
                 and any(p.requires_grad for p in module._modules[n].parameters()))


def _children_only_read(module):
    """Of _children_used_directly, those its class never calls (`self.<child>(` nowhere in the
    source of its own methods): torch's TransformerEncoderLayer names its children's weights in
    its fast-path checks but computes through the children, which stay bk layers."""
    called = _names_called(type(module))
    if called is None:  # a class without source: nothing is known to be only read
        return ()
    return tuple(n for n in _children_used_directly(module) if n not in called)


@functools.lru_cache(maxsize=None)
def _names_called(cls):
    names = set()
    for klass in cls.__mro__:
        if klass in (torch.nn.Module, object):
            break
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            return None  # unknown: treat every child as called
        names.update(re.findall(r"self\.(\w+)\s*\(", source))
    return names


@functools.lru_cache(maxsize=None)
def _names_used_directly(cls):
    """The children named as self.<child>.weight/.bias in cls.forward and, where that forward
    calls super(), in the forwards it may reach up the MRO (a user's subclass wrapping a
    library forward that reads its children's weights)."""
    names = []
    for klass in cls.__mro__:
        if klass in (torch.nn.Module, object) or "forward" not in vars(klass):
            continue
        try:
            source = inspect.getsource(vars(klass)["forward"])
        except (OSError, TypeError):
            break
        names.extend(m.group(1) for m in _DIRECT_USE.finditer(source))
        if "super(" not in source:
            break
    return tuple(dict.fromkeys(names))


_PROMPT_REPEATED = {"PROMPT_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING"}


def _peft_prompt_owner(module):
    """A PEFT model (found by shape, without importing peft) whose active adapter is prompt
    tuning or P-tuning with a trainable prompt encoder."""
    encoders = getattr(module, "prompt_encoder", None)
    config = getattr(module, "active_peft_config", None) if callable(getattr(module, "get_prompt", None)) else None
    kind = getattr(getattr(config, "peft_type", None), "value", None)
    return (kind in _PROMPT_REPEATED and isinstance(encoders, torch.nn.ModuleDict)
            and any(p.requires_grad for p in encoders.parameters()))


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
        if _peft_prompt_owner(module):
            # PEFT prompt tuning / P-tuning: the prompts are looked up once for the batch and
            # repeated to it (prompts.repeat(B, 1, 1)), so their per-example gradients exist only
            # after the repeat: the PEFT model is recomputed per example with the prompt encoder
            # as its own (the base model is frozen: one more forward and backward of it)
            outcome = generic_class(type(module), absorb=("prompt_encoder",))
        elif _trainable_parametrization(module):
            # weight_norm, spectral_norm, orthogonal...: the weight is a function of other
            # Parameters; the whole layer is recomputed per example with them as its own
            outcome = generic_class(type(module), absorb=("parametrizations",), mixin=ParametrizedGeneric)
        elif outcome == families.GENERIC and (containers := _parameter_containers(module)):
            # a ParameterDict/ParameterList cannot be called: its parent uses its Parameters (PEFT's
            # IA3, LoHa, LoKr, VeRA, BOFT, AdaLoRA layers, LoRA on embeddings): the parent takes the
            # generic path with the containers (and any child it reads directly) absorbed
            outcome = generic_class(type(module), absorb=tuple(dict.fromkeys(
                containers + _children_used_directly(module))))
        refused = isinstance(outcome, str) and outcome != families.GENERIC
        if refused and any(p.requires_grad for p in module.parameters()):  # itself or a child trains
            problems.append((path or "<model>", type(module).__name__, outcome))
            continue
        if outcome == families.GENERIC and not _owns_trainable(module) and \
                (direct := _children_only_read(module)):
            # no Parameters of its own, but it reads a child's itself and never calls the child (a
            # short convolution calling F.conv1d on self.conv1d.weight): that child's Parameters
            # would get an ordinary gradient; the module takes the generic path with it absorbed
            outcome = generic_class(type(module), absorb=direct)
        if not _owns_trainable(module) and not getattr(outcome, "_bk_absorb", ()) and \
                not getattr(outcome, "_bk_swap_without_parameters", False):
            continue  # frozen, or no parameters of its own, and no child's to absorb (T5's bias table)
        if outcome == families.GENERIC:  # any other module owning trainable Parameters: exact, by torch.func
            outcome = generic_class(type(module), absorb=_children_used_directly(module))
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
    of one more forward and backward of the module and B x that many elements per backward.
    Modules that take that path only for rarer calls (HF ViT's embeddings with a mask or
    interpolated positions) are left out."""
    return [(path or "<model>", type(m).__name__, sum(p.numel() for _, p in m._bk_own_trainable()))
            for path, m in model.named_modules()
            if is_generic(m) and not getattr(m, "_bk_generic_only_as_fallback", False)]


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
