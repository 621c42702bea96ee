"""Mixture-of-experts layers as Hugging Face writes them (transformers' experts classes made with
@use_experts_implementation: Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3, GPT-OSS and ~60 more).

The experts' weights are 3-D Parameters: gate_up_proj [E, p, d] (or up_proj), down_proj, each
expert e a linear map applied to the rows routed to it. Example b's gradient of expert e's
weight is sum over its rows routed to e of g_r a_r^T, so the ghost norm applies per (expert,
example) group: the rows of one expert are padded into [B, L, d] (L the most rows any example
sends there, at most its tokens) and go through the same norm ops as a Linear layer; the clipped
sum is one matmul per expert with each row's gradient scaled by its example's clip factor.
Nothing of size B x E x p x d is ever formed (the generic path held B copies of all experts).

The forward follows transformers' experts interface (the contract its batched_mm and grouped_mm
implementations meet): every (token, top-k slot) pair goes through its expert's up projection,
the class's own gate (_apply_gate) or activation, the down projection, is weighted by its routing
weight and summed into its token. Rows are the tokens of [B*T, d] folded example-major (proven as
for any row-wise layer), so row r belongs to example r // T.
"""
import inspect

import torch

from ..ops._norm_common import accumulation_dtype
from ._core import BKLayer, autocast_input, in_plain_forward
from ._uses import DenseUse
from ._made import made_class, mixin_class
from .families import register_layer
from .. import ops

# Padded rows of one chunk of experts' norm call stay within this many elements.
_NORM_CHUNK_ELEMENTS = 1 << 24


class Routing:
    """Where the experts' rows come from. Rows are grouped by expert (counts[e] rows of expert e,
    in expert order), each expert's rows in example order; experts[r] and examples[r] say whose
    row r is; B examples in all."""

    def __init__(self, counts, experts, examples, B):
        self.counts, self.experts, self.examples, self.B = counts, experts, examples, B

    def by_expert(self, *tensors):
        """(e, each tensor's rows of expert e) for every expert that got rows."""
        parts = zip(*(t.split(self.counts) for t in tensors))
        return [(e, *rows) for e, (n, rows) in enumerate(zip(self.counts, parts)) if n]


class ExpertsUse:
    """G_b = sum over rows r of example b routed to expert e of g_r a_r^T, in block e of a
    stacked expert weight [E, p, d] ([E, d, p] when transposed). See the use protocol in
    _uses.py."""

    def __init__(self, a, g, routing, transposed):
        if a.dtype != g.dtype:  # under autocast, a bias added in float32 promotes g (GPT-OSS's experts)
            acc = accumulation_dtype(torch.promote_types(a.dtype, g.dtype))
            a, g = a.to(acc), g.to(acc)
        self.a, self.g, self.routing, self.transposed = a, g, routing, transposed
        self.counts, self.examples, self.B = routing.counts, routing.examples, routing.B

    @property
    def batch(self):
        return self.B

    def factors(self):
        return None  # a second use of the same experts in one forward is refused (cross term)

    def dense(self):
        return None

    def densify(self, mode):
        return self

    def regrouped(self, example, examples):
        """This use over `examples` examples, row r's example being example[r] (engine.example_rows)."""
        routing = Routing(self.counts, self.routing.experts, example.to(self.examples.device)[self.examples], examples)
        return ExpertsUse(self.a, self.g, routing, self.transposed)

    def sq_norm(self, mode, backend):
        acc = accumulation_dtype(self.a.dtype)
        total = torch.zeros(self.B, dtype=acc, device=self.a.device)
        if self.B == 0 or not self.a.shape[0]:
            return total
        padded = self._padded_positions()
        d, p = self.a.shape[1], self.g.shape[1]
        per_expert = self.B * padded["L"] * (d + p)
        step = max(1, _NORM_CHUNK_ELEMENTS // max(1, per_expert))
        hit = [e for e, n in enumerate(self.counts) if n]
        for lo in range(0, len(hit), step):
            chunk = hit[lo : lo + step]
            a_pad = self.a.new_zeros(len(chunk) * self.B, padded["L"], d)
            g_pad = self.g.new_zeros(len(chunk) * self.B, padded["L"], p)
            for i, e in enumerate(chunk):
                rows = slice(padded["starts"][e], padded["starts"][e] + self.counts[e])
                slot = i * self.B + self.examples[rows]
                a_pad[slot, padded["pos"][rows]] = self.a[rows]
                g_pad[slot, padded["pos"][rows]] = self.g[rows]
            total += ops.linear_norm(a_pad, g_pad, mode=mode, backend=backend).view(len(chunk), self.B).sum(0)
        return total

    def _padded_positions(self):
        """Each row's position among its example's rows of its expert, their most, and where each
        expert's rows start."""
        counts = torch.tensor(self.counts, device=self.a.device)
        starts = torch.cumsum(counts, 0) - counts
        group = self.routing.experts * self.B + self.examples  # (expert, example) of each row
        sizes = torch.bincount(group, minlength=len(self.counts) * self.B)
        first = torch.cumsum(sizes, 0) - sizes
        # ascending along the rows, unless examples were relabelled (engine.example_rows)
        order = torch.argsort(group, stable=True)
        pos = torch.empty_like(group)
        pos[order] = torch.arange(len(group), device=self.a.device) - first[group[order]]
        return dict(pos=pos, L=int(sizes.max()), starts=starts.tolist())

    def clipped(self, c, backend):
        return None  # added into zeros of the stacked weight's shape

    def add_clipped(self, grad, c, backend):
        acc = accumulation_dtype(self.a.dtype)
        c = c.to(device=self.g.device, dtype=acc)
        scaled = self.g.to(acc) * c[self.examples].unsqueeze(1)
        for e, ae, ge in self.routing.by_expert(self.a.to(acc), scaled):
            block = ae.T @ ge if self.transposed else ge.T @ ae
            grad[e].add_(block.to(grad.dtype))


class _ExpertsLinearFn(torch.autograd.Function):
    """y_r = x_r W[e]^T (+ b[e]) (x_r W[e] when transposed) for rows grouped by expert (a Routing)."""

    @staticmethod
    def forward(ctx, x, weight, bias, layer, routing, transposed):
        ctx.layer, ctx.weight, ctx.bias, ctx.routing, ctx.transposed = layer, weight, bias, routing, transposed
        x = autocast_input(x)  # what autocast's matmul reads; the backward runs outside autocast
        ctx.save_for_backward(x if weight.requires_grad else None, weight)
        outs = []
        for e, xe in routing.by_expert(x):
            y = xe @ (weight[e] if transposed else weight[e].T)
            outs.append(y + bias[e] if bias is not None else y)
        p = weight.shape[2] if transposed else weight.shape[1]
        return torch.cat(outs) if outs else x.new_zeros(0, p)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        routing, transposed, bias = ctx.routing, ctx.transposed, ctx.bias
        if weight.dtype != g.dtype:  # under autocast g is 16-bit while the weight is float32
            weight = weight.to(g.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            parts = [ge @ (weight[e].T if transposed else weight[e]) for e, ge in routing.by_expert(g)]
            grad_x = torch.cat(parts) if parts else g.new_zeros(0, weight.shape[1] if transposed else weight.shape[2])
        uses = []
        if x is not None:
            uses.append((ctx.weight, ExpertsUse(x, g, routing, transposed)))
        if bias is not None and bias.requires_grad:
            uses.append((bias, DenseUse(_per_example_bias_grads(g, routing, bias.shape))))
        if ctx.layer._bk_hand_off(uses):
            return grad_x, None, None, None, None, None
        # No engine: the ordinary gradients (in the weight's dtype).
        weight = ctx.weight
        grad_w = torch.zeros_like(weight) if x is not None else None
        grad_b = torch.zeros_like(bias) if bias is not None and bias.requires_grad else None
        for e, xe, ge in routing.by_expert(x, g) if grad_w is not None else ():
            grad_w[e] = (xe.T @ ge if transposed else ge.T @ xe).to(grad_w.dtype)
        for e, ge in routing.by_expert(g) if grad_b is not None else ():
            grad_b[e] = ge.sum(0).to(grad_b.dtype)
        return grad_x, grad_w, grad_b, None, None, None


def _per_example_bias_grads(g, routing, shape):
    """[B, E, p]: each example's summed output gradients per expert."""
    acc = accumulation_dtype(g.dtype)
    grads = torch.zeros(routing.B * shape[0], shape[1], dtype=acc, device=g.device)
    grads.index_add_(0, routing.examples * shape[0] + routing.experts, g.to(acc))
    return grads.view(routing.B, *shape)


class ExpertsMixin(BKLayer):
    """Put in front of a transformers experts class (see experts_class)."""

    _bk_token_features = 1  # each token routed on its own: packed sequences' token rows route as rows

    def forward(self, *args, **kwargs):
        if self._bk_bypassed():
            return super().forward(*args, **kwargs)
        bound = self._bk_signature.bind(*args, **kwargs)
        bound.apply_defaults()
        hidden_states, top_k_index, top_k_weights = list(bound.arguments.values())[:3]
        return self._bk_experts_forward(hidden_states, top_k_index, top_k_weights)

    def _bk_experts_forward(self, hidden_states, top_k_index, top_k_weights):
        N, K = top_k_index.shape
        rows = self._bk_examples(hidden_states, 0, fold_rows=True)  # [B, N/B, d] when folded
        B = rows.shape[0]
        per_example = rows.shape[1] if rows.dim() == 3 else 1
        if top_k_weights.requires_grad and rows.dim() == 3:
            rows_of_weights = self._bk_examples(top_k_weights, 0, fold_rows=True)
            if rows_of_weights.shape[:2] != rows.shape[:2]:
                raise self._bk_layout_error(top_k_weights, 0)
        # (token, slot) pairs, grouped by expert; within an expert, tokens (so examples) ascending
        expert_of_pair = top_k_index.reshape(-1)
        if expert_of_pair.numel() and int(expert_of_pair.max()) >= self.num_experts:
            raise RuntimeError(f"bk: {type(self).__name__}: expert ids beyond its {self.num_experts} experts "
                               "(expert parallelism is not supported)")
        order = torch.argsort(expert_of_pair, stable=True)
        token = order // K
        counts = torch.bincount(expert_of_pair, minlength=self.num_experts).tolist()
        routing = Routing(counts, expert_of_pair[order], token // per_example, B)
        x = hidden_states[token]
        up = "gate_up_proj" if self.has_gate else "up_proj"
        bias_of = lambda name: getattr(self, f"{name}_bias") if self.has_bias else None  # noqa: E731
        h = _ExpertsLinearFn.apply(x, getattr(self, up), bias_of(up), self, routing, self.is_transposed)
        h = self._apply_gate(h) if self.has_gate else self.act_fn(h)
        out = _ExpertsLinearFn.apply(h, self.down_proj, bias_of("down_proj"), self, routing, self.is_transposed)
        if getattr(self, "has_post_expert_norm", False):  # frozen (a trained one is refused by convert)
            out = self.post_expert_norm(out)
        out = out * top_k_weights.reshape(-1)[order].unsqueeze(-1)
        final = torch.zeros(N, out.shape[-1], dtype=out.dtype, device=out.device).index_add_(0, token, out)
        return final.to(hidden_states.dtype)


def is_hf_experts(cls):
    """transformers' experts classes (made with @use_experts_implementation), by what that
    decorator leaves on them, without importing transformers."""
    return (cls.__module__.startswith("transformers.") and "_apply_gate" in cls.__dict__
            and getattr(cls.forward, "__wrapped__", None) is not None)


def experts_class(cls):
    signature = inspect.signature(cls.forward.__wrapped__)
    return made_class(experts_class, (cls,), cls.__name__, (ExpertsMixin, cls), {
        "__module__": __name__, "__qualname__": "Experts_" + cls.__name__,
        "_bk_signature": signature.replace(parameters=list(signature.parameters.values())[1:])})


def experts_unsupported_reason(module):
    if getattr(module, "has_post_expert_norm", False) and any(
            p.requires_grad for p in module.post_expert_norm.parameters()):
        return "a trained norm after each expert (has_post_expert_norm) is not supported yet; freeze it"
    if getattr(module, "_is_expert_parallel", False):
        return "expert parallelism is not supported"
    return None


register_layer(None, lambda module: experts_class(type(module)), unsupported_reason=experts_unsupported_reason,
               matches=is_hf_experts)


# Llama 4's MoE (transformers' Llama4TextMoe): every token goes to every expert, its copy for
# expert e scaled by its router score (zero outside its top-k), the experts one bmm over
# [E, tokens, d] (Llama4TextExperts, weights [E, d, 2p] and [E, p, d]). The block's forward runs
# here with the experts on the path above: all of an example's tokens in each expert's group.

def _is_llama4(name):
    return lambda cls: cls.__name__ == name and cls.__module__.startswith("transformers.models.llama4.")


class Llama4ExpertsMixin(BKLayer):
    """Llama4TextExperts: computed by its MoE block through _bk_dense_forward, which knows where
    its rows come from; called otherwise under an engine, its [E * tokens, d] rows hold the
    examples in an order it cannot check, and it refuses."""

    def forward(self, hidden_states):
        if self._bk_bypassed():
            return super().forward(hidden_states)
        raise self._bk_layout_error(hidden_states, 0, why=(
            "Llama 4's experts take every token's copy for each expert ([experts * tokens, d]) and are "
            "book-kept only when their Llama4TextMoe block calls them; nothing was recorded and no budget spent"))

    def _bk_dense_forward(self, hidden, scores):
        """sum over experts e of experts_e(hidden * scores[:, e]): hidden [N, d] rows (checked
        against the batch), scores [N, E]."""
        rows = self._bk_examples(hidden, 0, fold_rows=True)  # [B, N/B, d] when folded
        B = rows.shape[0]
        if scores.requires_grad and rows.dim() == 3 and \
                self._bk_examples(scores, 0, fold_rows=True).shape[:2] != rows.shape[:2]:
            raise self._bk_layout_error(scores, 0)
        E, N = self.num_experts, hidden.shape[0]
        per_example = max(1, N // max(1, B))
        expert_of_row = torch.arange(E, device=hidden.device).repeat_interleave(N)
        example_of_row = (torch.arange(N, device=hidden.device) // per_example).repeat(E)
        routing = Routing([N] * E, expert_of_row, example_of_row, B)
        routed_in = hidden.repeat(E, 1) * scores.transpose(0, 1).reshape(-1, 1)  # as transformers' block
        gate, up = _ExpertsLinearFn.apply(routed_in, self.gate_up_proj, None, self, routing, True).chunk(2, dim=-1)
        out = _ExpertsLinearFn.apply(up * self.act_fn(gate), self.down_proj, None, self, routing, True)
        return out.view(E, N, -1).sum(0)


class Llama4MoeMixin(BKLayer):
    """Llama4TextMoe's forward (transformers 5), its routed experts through _bk_dense_forward."""

    _bk_swap_without_parameters = True  # its Parameters are its children's

    def forward(self, hidden_states):
        experts = self.experts
        if in_plain_forward() or not isinstance(experts, Llama4ExpertsMixin) or experts._bk_layout() is None or \
                not experts._bk_trains():
            return super().forward(hidden_states)
        hidden = hidden_states.reshape(-1, self.hidden_dim)
        router_scores, router_logits = self.router(hidden)
        out = self.shared_expert(hidden)
        out.add_(experts._bk_dense_forward(hidden, router_scores))
        return out, router_logits


register_layer(None, lambda module: mixin_class(type(module), Llama4ExpertsMixin),
               matches=_is_llama4("Llama4TextExperts"))
register_layer(None, lambda module: mixin_class(type(module), Llama4MoeMixin), matches=_is_llama4("Llama4TextMoe"))
