"""transformers' RMSNorm classes (LlamaRMSNorm and its copies, Gemma's, the gated norms of the
Mamba-2 and gated-delta-net layers: 177 classes in transformers 5.24) book-kept instead of
recomputed per example.

Each LLM family has its own RMSNorm class (normalise in float32, then weight * h), which took the
generic path: a vmap recompute of the norm per module and step (4% of a Llama step on the CPU).
Here its forward is transformers' own arithmetic with the weight multiplied through bk.nn.scale
(per-example gradient: each example's sum of g * h); Gemma's (1 + weight, in float32) multiplies
by per-example copies of the weight instead ([B, d], a shift of zeros), cast as Gemma casts them.
Made only for a class whose forward is one of the forms below, statement for statement. Inputs
are taken as bk's LayerNorm takes them: examples on dim 0, rows folded example-major ([B * T, d]),
or on dim 1 in a sequence-first scope (which the generic path refused).
"""
import functools

import torch

from ._core import in_plain_forward
from ._made import library_class, source_of, takes
from .families import GENERIC, register_layer
from .generic import GenericLayer, generic_class
from .layer_scale import per_example, scale

_NORMALISE = ["input_dtype = hidden_states.dtype", "hidden_states = hidden_states.to(torch.float32)",
              "variance = hidden_states.pow(2).mean(-1, keepdim=True)",
              "hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)"]
# form -> (the forward's arguments, its statements), transformers 5.24
_FORMS = {
    # the weight times the normalised input cast back (Llama), or the product cast back (OLMo 2, GPT-OSS...)
    "cast first": (["hidden_states"], _NORMALISE + ["return self.weight * hidden_states.to(input_dtype)"]),
    "cast last": (["hidden_states"], _NORMALISE + ["return (self.weight * hidden_states).to(input_dtype)"]),
    # Gemma's: normalise in float32 (its _norm, checked apart), times 1 + weight in float32, cast back
    "gemma": (["x"], ["output = self._norm(x.float())", "output = output * (1.0 + self.weight.float())",
                      "return output.type_as(x)"]),
    # after a Mamba-2 scan: gate, normalise in groups, weight
    "gate first": (["hidden_states", "gate"], [
        "input_dtype = hidden_states.dtype", "hidden_states = hidden_states.to(torch.float32)", "if gate is not None:",
        "hidden_states = hidden_states * nn.functional.silu(gate.to(torch.float32))",
        "*prefix_dims, last_dim = hidden_states.shape", "group_count = last_dim // self.group_size",
        "hidden_states_group = hidden_states.view(*prefix_dims, group_count, self.group_size)",
        "variance = hidden_states_group.pow(2).mean(-1, keepdim=True)",
        "hidden_states_group = hidden_states_group * torch.rsqrt(variance + self.variance_epsilon)",
        "hidden_states = hidden_states_group.view(*prefix_dims, group_count * self.group_size)",
        "return self.weight * hidden_states.to(input_dtype)"]),
    # after a gated delta rule: normalise, weight, gate
    "norm first": (["hidden_states", "gate"], _NORMALISE + [
        "hidden_states = self.weight * hidden_states.to(input_dtype)",
        "hidden_states = hidden_states * ACT2FN[self.activation](gate.to(torch.float32))",
        "return hidden_states.to(input_dtype)"]),
}
_GEMMA_NORM = "return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)"
# the attributes each form's forward reads besides its weight
_READS = {"gemma": ("eps",), "gate first": ("variance_epsilon", "group_size"),
          "norm first": ("variance_epsilon", "activation")}


def _statements(fn):
    """The body of fn without its def line, comments and blank lines, each line stripped."""
    lines = [line.split("  #")[0].strip() for line in source_of(fn).split("\n")[1:]]
    return [line for line in lines if line and not line.startswith("#")]


@functools.lru_cache(maxsize=None)
def _form(cls):
    """Which of _FORMS cls.forward is (None: none of them)."""
    form = next((name for name, (args, body) in _FORMS.items()
                 if _statements(cls.forward) == body and takes(cls, "forward", args)), None)
    if form == "gemma" and _statements(getattr(cls, "_norm", None)) != [_GEMMA_NORM]:
        return None
    return form


class _HFRMSNorm(GenericLayer):
    """transformers' RMSNorm forwards (_FORMS) with the weight book-kept (module docstring); the
    generic path outside private training and for a frozen weight."""

    _bk_generic_only_as_fallback = True  # bk.generic_modules leaves it out: the usual call is fused
    _bk_token_features = 1  # normalises each token over its last dim

    def forward(self, hidden_states, gate=None):
        if in_plain_forward() or self._bk_layout() is None or not self.weight.requires_grad:
            return self._bk_generic_call("forward", hidden_states, *([] if gate is None else [gate]))
        form = _form(library_class(type(self)))
        input_dtype = hidden_states.dtype
        if form == "gemma":
            return self._bk_weighted(self._norm(hidden_states.float()), hidden_states).type_as(hidden_states)
        h = hidden_states.to(torch.float32)
        if form == "gate first":
            if gate is not None:
                h = h * torch.nn.functional.silu(gate.to(torch.float32))
            *prefix, last = h.shape
            groups = h.view(*prefix, last // self.group_size, self.group_size)
            groups = groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
            return self._bk_weighted(groups.view(*prefix, last).to(input_dtype), hidden_states)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        if form == "cast last":
            return self._bk_weighted(h, hidden_states).to(input_dtype)
        h = self._bk_weighted(h.to(input_dtype), hidden_states)
        if form == "norm first":
            from transformers.activations import ACT2FN

            return (h * ACT2FN[self.activation](gate.to(torch.float32))).to(input_dtype)
        return h

    def _bk_weighted(self, h, hidden_states):
        """h times the weight (Gemma: times 1 + each example's copy of it), h laid out as the input
        hidden_states: examples on its batch dim, or its rows folded example-major."""
        bdim = self._bk_batch_dim(hidden_states)  # 1 in a sequence-first scope
        gemma = _form(library_class(type(self))) == "gemma"

        def weighted(he):  # he: the examples on bdim (folded rows: [B, k, d])
            he = he.transpose(0, bdim)
            if gemma:
                copies = per_example(self, self.weight, he.shape[0]).float()
                out = he * (1.0 + copies).view(he.shape[0], *[1] * (he.dim() - 2), self.weight.numel())
            else:
                out = scale(self, he, self.weight, dim=-1)
            return out.transpose(0, bdim)

        return self._bk_row_wise(h, bdim, weighted)


def _hf_rmsnorm_class(module):
    """_HFRMSNorm for a class whose forward is one of _FORMS, owning only a 1-d `weight` and the
    attributes its form reads; else the generic path where it owns a trained Parameter."""
    cls = type(module)
    own = {name: p for name, p in module.named_parameters(recurse=False)}
    if not any(p.requires_grad for p in own.values()):
        return None
    form = _form(cls)
    reads = _READS.get(form, ("variance_epsilon",))
    if form is None or set(own) != {"weight"} or own["weight"].dim() != 1 or \
            not isinstance(getattr(module, reads[0], None), float) or not all(hasattr(module, a) for a in reads):
        return GENERIC
    return generic_class(cls, mixin=_HFRMSNorm)


register_layer(None, _hf_rmsnorm_class,
               matches=lambda cls: cls.__name__.endswith(("RMSNorm", "RMSNormGated"))
               and cls.__module__.startswith("transformers.models."))
