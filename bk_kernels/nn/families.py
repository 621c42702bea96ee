"""The layer families: which module classes bk takes, and how (what bk.convert sees).

Each family file (linear.py, embedding.py, ...) registers the torch classes it takes with
register_layer at its end: the bk class to swap in, and the reasons a configuration has no
private equivalent. bk.convert knows families only through lookup() and plan(). Users add their
own with bk.register_layer (README: "Your own layers").

What a module of class C becomes:
  C registered (or matched by a registered predicate)  -> its family's bk class, or its refusal;
  C a subclass of a registered class whose forward is the parent's or calls super().forward,
    and that names no trainable Parameter of its own that the parent's forward does not use
                                                       -> C with the bk class under it;
  anything else that owns trainable Parameters         -> the generic exact path (generic.py).
"""
import functools
import re
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ._core import BKLayer, in_plain_forward
from ._made import made_class, source_of

GENERIC = "generic"  # plan()'s answer for the generic exact path


@dataclass
class LayerFamily:
    module_class: Optional[type]    # the class it takes (None for a predicate family)
    bk_class: object                # a class, a function module -> class, or None (refuse / generic)
    unsupported_reason: Optional[Callable] = None   # module -> why it cannot be exact, or None
    matches: Optional[Callable] = None              # class -> bool, for classes known by name only

    def plan(self, module, exact):
        """The class to swap in, a refusal (a str saying why), or GENERIC."""
        reason = self.unsupported_reason(module) if self.unsupported_reason else None
        if reason:
            return reason
        if self.bk_class is None:
            return GENERIC
        if exact:
            return self.bk_class if isinstance(self.bk_class, type) else self.bk_class(module)
        cls = type(module)
        if isinstance(self.bk_class, type) and _reaches_parent_forward(cls, self.module_class) and \
                not _extra_parameters(module, self.module_class):
            return subclass_adapter(cls, self.bk_class)
        return GENERIC


_BY_CLASS = {}
_BY_PREDICATE = []


def register_layer(module_class, bk_class=None, *, unsupported_reason=None, matches=None):
    """Says how bk.convert privatizes modules of `module_class` (and its subclasses).

    bk_class: a subclass of bk.nn.BKLayer and of module_class whose forward book-keeps (for a
        linear map, by calling bk.nn.linear; see the README's worked example), or a function
        module -> such a class. None: the generic exact path (per-example gradients of the
        module's own Parameters by torch.func), or, with unsupported_reason, a refusal.
    unsupported_reason: module -> a str saying why this configuration cannot be trained
        privately (bk.convert refuses it, naming the module), or None when it can.
    matches: instead of module_class, a predicate on classes (for classes that cannot be
        imported here, as transformers' GPT-2 Conv1D).
    A later registration of the same class replaces the earlier one. Returns the family.
    """
    if (module_class is None) == (matches is None):
        raise ValueError("bk.register_layer: give a module class, or matches= (a predicate on classes)")
    if module_class is not None and not (isinstance(module_class, type) and issubclass(module_class,
                                                                                       torch.nn.Module)):
        raise TypeError(f"bk.register_layer: {module_class!r} is not a torch.nn.Module class")
    if isinstance(bk_class, type) and not issubclass(bk_class, BKLayer):
        raise TypeError(f"bk.register_layer: {bk_class.__name__} must subclass bk.nn.BKLayer (its forward "
                        "book-keeps for the engine)")
    if isinstance(bk_class, type) and module_class is not None and not issubclass(bk_class, module_class):
        raise TypeError(f"bk.register_layer: {bk_class.__name__} must subclass {module_class.__name__}, so that the "
                        "swapped module keeps its Parameters, buffers and state_dict")
    family = LayerFamily(module_class, bk_class, unsupported_reason, matches)
    if module_class is not None:
        _BY_CLASS[module_class] = family
    else:
        _BY_PREDICATE.append(family)
    return family


def lookup(cls):
    """(family, exact) for a module class: its own registration, a predicate's, or the nearest
    registered class in its MRO (exact=False); (None, False) when none applies."""
    if cls in _BY_CLASS:
        return _BY_CLASS[cls], True
    for family in _BY_PREDICATE:
        if family.matches(cls):
            return family, True
    for base in cls.__mro__[1:]:
        if base in _BY_CLASS:
            return _BY_CLASS[base], False
    return None, False


def _extra_parameters(module, base):
    """The module's own trainable Parameters that its subclass's methods name (self.<name>) and
    the parent's forward does not (Dory's LM head, an nn.Linear whose forward multiplies the
    logits by its own `logit_scale`): the bk layer under the subclass book-keeps only the
    parent's, so such a module takes the generic path (else that Parameter would get an
    ordinary gradient, refused at the backward). Read from the source; none without it."""
    own = [n for n, p in module._parameters.items() if p is not None and p.requires_grad]
    if not own:
        return ()
    named, parents = _names_in_sources(type(module), base)
    return tuple(n for n in own if n in named and n not in parents)


@functools.lru_cache(maxsize=None)
def _names_in_sources(cls, base):
    """(the self.<name> names in the classes between cls and base, those in base.forward), read
    once per class (convert meets every instance); empty when any of those sources is missing."""
    sources = [source_of(k) for k in cls.__mro__ if issubclass(k, base) and k is not base and not issubclass(base, k)]
    parent = source_of(base.forward)
    if not parent or not all(sources):
        return frozenset(), frozenset()
    return frozenset(re.findall(r"self\.(\w+)", "".join(sources))), frozenset(re.findall(r"self\.(\w+)", parent))


def _reaches_parent_forward(cls, base):
    """Whether cls's forward is the parent's, or an override that calls super()."""
    forward = cls.forward
    if forward is base.forward:
        return True
    return "super" in getattr(forward, "__code__", compile("", "", "exec")).co_names


class _SubclassCheck(BKLayer):
    """In front of a subclass of a supported layer whose forward calls the parent's forward
    (HF's scaled word embeddings, OPT's offset positions): the subclass's forward runs, and its
    super().forward reaches the bk layer. Checks that it did, in every private forward."""

    def forward(self, *args, **kwargs):
        before = self._bk_calls
        out = super().forward(*args, **kwargs)
        if self._bk_calls == before and self._bk_engine is not None and torch.is_grad_enabled() and \
                not in_plain_forward() and any(p.requires_grad for p in self.parameters(recurse=False)):
            raise TypeError(f"bk: {type(self).__name__} overrides forward and did not call its torch parent's "
                            "forward in this call, so its parameters would get ordinary gradients")
        return out


def subclass_adapter(cls, bk_class):
    """cls with the bk layer under it: MRO cls -> bk layer -> torch layer."""
    return made_class(subclass_adapter, (cls, bk_class), cls.__name__, (_SubclassCheck, cls, bk_class),
                      {"__module__": cls.__module__, "__qualname__": cls.__qualname__})
