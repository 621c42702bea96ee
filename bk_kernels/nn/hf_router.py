"""transformers' MoE top-k routers (MixtralTopKRouter and its copies: Qwen2/3-MoE, OLMoE, ...)
book-kept as the linear map they are, instead of recomputed per example on the generic path.

The router's one use of its Parameter is `F.linear(hidden_states, self.weight)` on the tokens'
rows ([B*T, d] folded example-major, or a packed forward's token rows); the softmax, top-k and
renormalisation after it act on each row alone. Here the forward is transformers' own, statement
for statement (the forms below), with that linear map through bk.nn.linear: its per-example
gradient is each example's sum of g_t x_t^T, and a packed forward's tokens are rows of their own.
Made only for a class whose forward is one of the forms and which owns only a 2-D `weight`;
otherwise the generic path as before.
"""
import functools

import torch

from ._core import in_plain_forward
from ._made import library_class, takes
from .families import GENERIC, register_layer
from .generic import GenericLayer, generic_class
from .hf_rmsnorm import _statements
from .linear import linear

_LINEAR = ["hidden_states = hidden_states.reshape(-1, self.hidden_dim)",
           "router_logits = F.linear(hidden_states, self.weight)"]
_FORMS = {
    # Mixtral: softmax of the float32 logits, the top-k renormalised, the scores kept in float32
    "mixtral": _LINEAR + [
        "router_probs = torch.nn.functional.softmax(router_logits.float(), dim=-1)",
        "router_top_value, router_indices = torch.topk(router_probs, self.top_k, dim=-1)",
        "router_top_value /= router_top_value.sum(dim=-1, keepdim=True)",
        "router_scores = router_top_value",
        "return router_logits, router_scores, router_indices"],
    # Qwen2/3-MoE, OLMoE: renormalised when the config says so, cast back to the logits' dtype
    "qwen": _LINEAR + [
        "router_probs = torch.nn.functional.softmax(router_logits, dtype=torch.float, dim=-1)",
        "router_top_value, router_indices = torch.topk(router_probs, self.top_k, dim=-1)",
        "if self.norm_topk_prob:", "router_top_value /= router_top_value.sum(dim=-1, keepdim=True)",
        "router_top_value = router_top_value.to(router_logits.dtype)", "router_scores = router_top_value",
        "return router_logits, router_scores, router_indices"],
}


@functools.lru_cache(maxsize=None)
def _form(cls):
    return next((name for name, body in _FORMS.items()
                 if _statements(cls.forward) == body and takes(cls, "forward", ["hidden_states"])), None)


class _HFTopKRouter(GenericLayer):
    """transformers' top-k router forwards (_FORMS) with the weight's linear map book-kept; the
    generic path outside private training and for a frozen weight."""

    _bk_generic_only_as_fallback = True
    _bk_token_features = 1  # routes each token on its own

    def forward(self, hidden_states):
        if in_plain_forward() or self._bk_layout() is None or not self.weight.requires_grad:
            return self._bk_generic_call("forward", hidden_states)
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        router_logits = linear(self, hidden_states, self.weight)
        if _form(library_class(type(self))) == "mixtral":
            router_probs = torch.nn.functional.softmax(router_logits.float(), dim=-1)
            router_top_value, router_indices = torch.topk(router_probs, self.top_k, dim=-1)
            router_top_value = router_top_value / router_top_value.sum(dim=-1, keepdim=True)
            return router_logits, router_top_value, router_indices
        router_probs = torch.nn.functional.softmax(router_logits, dtype=torch.float, dim=-1)
        router_top_value, router_indices = torch.topk(router_probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            router_top_value = router_top_value / router_top_value.sum(dim=-1, keepdim=True)
        return router_logits, router_top_value.to(router_logits.dtype), router_indices


def _router_class(module):
    cls = type(module)
    own = dict(module.named_parameters(recurse=False))
    if not any(p.requires_grad for p in own.values()):
        return None
    if set(own) != {"weight"} or own["weight"].dim() != 2:
        return GENERIC
    return generic_class(cls, mixin=_HFTopKRouter)


# Only the forms: other routers (PhiMoE's, an nn.Linear subclass; DeepSeek's) keep their family
register_layer(None, _router_class,
               matches=lambda cls: cls.__name__.endswith(("TopKRouter", "TopkRouter"))
               and cls.__module__.startswith("transformers.models.") and _form(cls) is not None)
