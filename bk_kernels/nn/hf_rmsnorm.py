"""transformers' RMSNorm classes (LlamaRMSNorm and its copies, Gemma's: 166 classes in transformers 5.24)
book-kept instead of recomputed per example.

Each LLM family has its own RMSNorm class (normalise in float32, then weight * h), which took the
generic path: a vmap recompute of the norm per module and step (4% of a Llama step on the CPU).
Here its forward is transformers' own arithmetic with the weight multiplied through bk.nn.scale
(per-example gradient: each example's sum of g * h). Made only for a class whose forward is one
of the arithmetic forms below, word for word; Gemma's (1 + weight, in float32) multiplies by
per-example copies of the weight (a shift of zeros, [B, d]) instead, cast as Gemma casts them. Inputs are taken as bk's LayerNorm takes them:
examples on dim 0, rows folded example-major ([B * T, d]), or on dim 1 in a sequence-first scope
(which the generic path refused).
"""
import functools

import torch

from ._core import in_plain_forward
from ._made import source_of
from .families import GENERIC, register_layer
from .generic import GenericLayer, generic_class
from .layer_scale import scale, shift

_NORMALISE = """
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
"""
# the weight times the normalised input cast back (Llama), or the product cast back (Olmo, Bamba...)
_FORMS = {"        return self.weight * hidden_states.to(input_dtype)\n": "cast first",
          "        return (self.weight * hidden_states).to(input_dtype)\n": "cast last"}


# Gemma's: normalise in float32 (its _norm), multiply by 1 + weight in float32, cast back
_GEMMA_NORM = "        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)\n"
_GEMMA_FORWARD = ["output = self._norm(x.float())", "output = output * (1.0 + self.weight.float())",
                  "return output.type_as(x)"]


def _statements(fn):
    """The body of fn without its def line, comments and blank lines, each line stripped."""
    lines = source_of(fn).split("\n")[1:]
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


@functools.lru_cache(maxsize=None)
def _form(cls):
    """"cast first", "cast last", "gemma" or None: which of the forms cls.forward is."""
    source = source_of(cls.forward)
    head, _, body = source.partition("\n")
    if head.strip().startswith("def forward(self, x)") and _statements(cls.forward) == _GEMMA_FORWARD and \
            source_of(getattr(cls, "_norm", None)).endswith(_GEMMA_NORM):
        return "gemma"
    if not head.strip().startswith("def forward(self, hidden_states") or not body.startswith(_NORMALISE.lstrip("\n")):
        return None
    last = body[len(_NORMALISE.lstrip("\n")):]
    last = last.split("  #")[0].rstrip() + "\n" if "  #" in last else last.rstrip() + "\n"
    return _FORMS.get(last)


def _library_class(cls):
    return next(c for c in cls.__mro__ if c.__module__.startswith("transformers.models."))


class _HFRMSNorm(GenericLayer):
    """transformers' RMSNorm forward with its weight through bk.nn.scale (module docstring)."""

    _bk_generic_only_as_fallback = True  # bk.generic_modules leaves it out: the usual call is fused

    def forward(self, hidden_states):
        if in_plain_forward() or self._bk_layout() is None or not self.weight.requires_grad:
            return self._bk_generic_call("forward", hidden_states)
        form = _form(_library_class(type(self)))
        bdim = self._bk_batch_dim(hidden_states)  # 1 in a sequence-first scope
        if form == "gemma":
            h = self._norm(hidden_states.float())

            def gemma_scaled(he):  # (1 + weight) from per-example copies, cast as Gemma casts
                he = he.transpose(0, bdim)
                weights = shift(self, self.weight.new_zeros(he.shape[0], *self.weight.shape), self.weight,
                                (1, *self.weight.shape))
                return (he * (1.0 + weights.float()).view(he.shape[0], *[1] * (he.dim() - 2), -1)).transpose(0, bdim)

            return self._bk_row_wise(h, bdim, gemma_scaled).type_as(hidden_states)
        input_dtype = hidden_states.dtype
        h = hidden_states.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)

        def scaled(he):  # he: the examples on bdim (rows folded example-major: [B, k, d])
            return scale(self, he.transpose(0, bdim), self.weight, dim=-1).transpose(0, bdim)

        if form == "cast first":
            return self._bk_row_wise(h.to(input_dtype), bdim, scaled)
        return self._bk_row_wise(h, bdim, scaled).to(input_dtype)


def _hf_rmsnorm_class(module):
    """_HFRMSNorm for a class whose forward is one of the forms above, owning only `weight` (1-d)
    and `variance_epsilon`; else the generic path where it owns a trained Parameter."""
    cls = type(module)
    own = {name: p for name, p in module.named_parameters(recurse=False)}
    if not any(p.requires_grad for p in own.values()):
        return None
    form = _form(cls)
    eps = getattr(module, "eps" if form == "gemma" else "variance_epsilon", None)
    if form is None or set(own) != {"weight"} or own["weight"].dim() != 1 or not isinstance(eps, float):
        return GENERIC
    return generic_class(cls, mixin=_HFRMSNorm)


register_layer(None, _hf_rmsnorm_class,
               matches=lambda cls: cls.__name__.endswith("RMSNorm") and cls.__module__.startswith("transformers.models."))


# The gated RMSNorms after a Mamba-2 scan (gate first, normalised in groups) and after a gated
# delta rule (normalise, weight, then gate), statement for statement (transformers 5.24)
_GATE_FIRST = [
    "input_dtype = hidden_states.dtype", "hidden_states = hidden_states.to(torch.float32)", "if gate is not None:",
    "hidden_states = hidden_states * nn.functional.silu(gate.to(torch.float32))",
    "*prefix_dims, last_dim = hidden_states.shape", "group_count = last_dim // self.group_size",
    "hidden_states_group = hidden_states.view(*prefix_dims, group_count, self.group_size)",
    "variance = hidden_states_group.pow(2).mean(-1, keepdim=True)",
    "hidden_states_group = hidden_states_group * torch.rsqrt(variance + self.variance_epsilon)",
    "hidden_states = hidden_states_group.view(*prefix_dims, group_count * self.group_size)",
    "return self.weight * hidden_states.to(input_dtype)"]
_NORM_FIRST = [
    "input_dtype = hidden_states.dtype", "hidden_states = hidden_states.to(torch.float32)",
    "variance = hidden_states.pow(2).mean(-1, keepdim=True)",
    "hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)",
    "hidden_states = self.weight * hidden_states.to(input_dtype)",
    "hidden_states = hidden_states * ACT2FN[self.activation](gate.to(torch.float32))",
    "return hidden_states.to(input_dtype)"]


@functools.lru_cache(maxsize=None)
def _gated_form(cls):
    statements = _statements(cls.forward)
    return {tuple(_GATE_FIRST): "gate first", tuple(_NORM_FIRST): "norm first"}.get(tuple(statements))


class _HFRMSNormGated(GenericLayer):
    """transformers' gated RMSNorms (the forms above) with the weight through bk.nn.scale."""

    _bk_generic_only_as_fallback = True

    def forward(self, hidden_states, gate=None):
        if in_plain_forward() or self._bk_layout() is None or not self.weight.requires_grad:
            return self._bk_generic_call("forward", hidden_states, gate)
        input_dtype = hidden_states.dtype
        bdim = self._bk_batch_dim(hidden_states)

        def scaled(he):
            return scale(self, he.transpose(0, bdim), self.weight, dim=-1).transpose(0, bdim)

        h = hidden_states.to(torch.float32)
        if _gated_form(_library_class(type(self))) == "gate first":
            if gate is not None:
                h = h * torch.nn.functional.silu(gate.to(torch.float32))
            *prefix, last = h.shape
            groups = h.view(*prefix, last // self.group_size, self.group_size)
            groups = groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
            return self._bk_row_wise(groups.view(*prefix, last).to(input_dtype), bdim, scaled)
        from transformers.activations import ACT2FN

        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        h = self._bk_row_wise(h.to(input_dtype), bdim, scaled)
        return (h * ACT2FN[self.activation](gate.to(torch.float32))).to(input_dtype)


def _hf_rmsnorm_gated_class(module):
    cls = type(module)
    own = {name: p for name, p in module.named_parameters(recurse=False)}
    if not any(p.requires_grad for p in own.values()):
        return None
    form = _gated_form(cls)
    needs = {"gate first": "group_size", "norm first": "activation"}.get(form)
    if form is None or set(own) != {"weight"} or own["weight"].dim() != 1 or \
            not isinstance(getattr(module, "variance_epsilon", None), float) or not hasattr(module, needs):
        return GENERIC
    return generic_class(cls, mixin=_HFRMSNormGated)


register_layer(None, _hf_rmsnorm_gated_class,
               matches=lambda cls: cls.__name__.endswith("RMSNormGated") and cls.__module__.startswith("transformers.models."))
