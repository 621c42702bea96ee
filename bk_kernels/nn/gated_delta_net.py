"""transformers' gated delta nets (Qwen3-Next; Qwen 3.5 and its MoE, Lara-mini, Qwen4-exp; OLMo-hybrid):
the linear-attention layers of those hybrid models, book-kept.

The layer owns A_log and dt_bias (per value head), used inline in its decay
g = -exp(A_log) * softplus(a + dt_bias), and hands conv1d.weight to its causal convolution
itself. Left alone it took the generic path with conv1d absorbed: the whole layer (its
projections, convolution and chunked delta rule) recomputed per example. Here its forward is
transformers' (5.24) with conv1d called as the bk Conv1d it is and per-example copies of A_log
and dt_bias ([B, 1, H], shifts of zeros: broadcast against [B, T, H] as transformers' [H] are);
the delta rule is transformers' own torch function. Its gated RMSNorm is a module of its own, on
folded rows (hf_rmsnorm.py). As for the Mamba mixers (mamba.py): a prefill into an empty cache is
book-kept, generation from cached states, packed sequences and a plain forward run
transformers' forward.
"""
import inspect

import torch

from ._core import BKLayer
from ._made import library_module, mixin_class, source_of
from .families import GENERIC, register_layer
from .layer_scale import per_example
from .mamba import _bypassed, _causal_conv1d, _copies_forward, _fill_conv_cache, _masked


class _HFGatedDeltaNet(BKLayer):
    """Qwen3NextGatedDeltaNet.forward (fused qkvz / ba projections), Qwen3_5GatedDeltaNet.forward
    (separate qkv, z, b, a projections) and OlmoHybridGatedDeltaNet.forward (q, k, v, b, a, g
    projections, o_norm, o_proj), book-kept (module docstring)."""

    _bk_swap_without_parameters = True  # A_log, dt_bias frozen: conv1d still needs this forward

    def forward(self, hidden_states, cache=None, attention_mask=None, **kwargs):
        if _bypassed(self, cache, kwargs):
            return super().forward(hidden_states, cache=cache, attention_mask=attention_mask, **kwargs)
        hidden_states = _masked(hidden_states, attention_mask)
        batch, seq_len, _ = hidden_states.shape
        k_heads, v_heads = self.key_dim // self.head_k_dim, self.value_dim // self.head_v_dim  # named: B may be 0
        olmo = hasattr(self, "o_norm")  # OLMo-hybrid: separate q/k/v/b/a/g projections, o_norm, o_proj
        if olmo:
            mixed = torch.cat([self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)],
                              dim=-1)
            b, a = self.b_proj(hidden_states), self.a_proj(hidden_states)
        elif hasattr(self, "in_proj_qkvz"):  # Qwen3-Next
            query, key, value, z, b, a = self.fix_query_key_value_ordering(self.in_proj_qkvz(hidden_states),
                                                                          self.in_proj_ba(hidden_states))
            mixed = torch.cat([t.flatten(2) for t in (query, key, value)], dim=-1)
        else:  # Qwen 3.5
            mixed = self.in_proj_qkv(hidden_states)
            z = self.in_proj_z(hidden_states).reshape(batch, seq_len, v_heads, self.head_v_dim)
            b, a = self.in_proj_b(hidden_states), self.in_proj_a(hidden_states)
        mixed = mixed.transpose(1, 2)
        _fill_conv_cache(self, cache, mixed)
        mixed = _causal_conv1d(self, mixed).transpose(1, 2)
        query, key, value = torch.split(mixed, [self.key_dim, self.key_dim, self.value_dim], dim=-1)
        query = query.reshape(batch, seq_len, k_heads, self.head_k_dim)
        key = key.reshape(batch, seq_len, k_heads, self.head_k_dim)
        value = value.reshape(batch, seq_len, v_heads, self.head_v_dim)
        beta = b.sigmoid()
        if olmo and self.allow_neg_eigval:
            beta = beta * 2.0
        A_log = per_example(self, self.A_log, batch)[:, None]
        dt_bias = per_example(self, self.dt_bias, batch)[:, None]
        g = -A_log.float().exp() * torch.nn.functional.softplus(a.float() + dt_bias)
        delta_rule = inspect.unwrap(library_module(type(self)).torch_chunk_gated_delta_rule)  # its torch path
        out, last_state = delta_rule(query, key, value, g=g, beta=beta, initial_state=None,
                                     output_final_state=cache is not None, use_qk_l2norm_in_kernel=True,
                                     cu_seqlens=kwargs.pop("cu_seq_lens_q", None), **kwargs)
        if cache is not None:
            cache.update_recurrent_state(last_state, self.layer_idx)
        if olmo:
            gate = self.g_proj(hidden_states)
            out = self.o_norm(out.reshape(-1, self.head_v_dim), gate.reshape(-1, self.head_v_dim))
            return self.o_proj(out.reshape(batch, seq_len, self.value_dim))
        out = self.norm(out.reshape(-1, self.head_v_dim), z.reshape(-1, self.head_v_dim))
        return self.out_proj(out.reshape(batch, seq_len, self.value_dim))


# What the copy above relies on in transformers' forward (per layout) and its delta rule
_READS = ("causal_conv1d_fn(", "torch_chunk_gated_delta_rule(", "use_qk_l2norm_in_kernel=True")
_QWEN_READS = ("g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)", "beta = b.sigmoid()",
               "core_attn_out = self.norm(core_attn_out, z)", "output = self.out_proj(core_attn_out)")
_LAYOUTS = {  # layout: (statements its forward has, children it calls)
    "qwen3_next": (_QWEN_READS + ("self.fix_query_key_value_ordering(",), ("in_proj_qkvz", "in_proj_ba", "norm",
                                                                         "out_proj")),
    "qwen3_5": (_QWEN_READS + ("z = self.in_proj_z(hidden_states)",), ("in_proj_qkv", "in_proj_z", "in_proj_b",
                                                                      "in_proj_a", "norm", "out_proj")),
    "olmo_hybrid": (("g = -self.A_log.float().exp() * F.softplus(self.a_proj(hidden_states).float() + self.dt_bias)",
                     "beta = self.b_proj(hidden_states).sigmoid()", "if self.allow_neg_eigval:", "beta = beta * 2.0",
                     "gate = self.g_proj(hidden_states)", "output = self.o_norm(output, gate)",
                     "output = self.o_proj(output)"),
                    ("q_proj", "k_proj", "v_proj", "b_proj", "a_proj", "g_proj", "o_norm", "o_proj")),
}


def _gated_delta_net_class(module):
    """_HFGatedDeltaNet where the forward reads what the copy reads for one of its projection
    layouts, with A_log and dt_bias the only own Parameters; else the generic path."""
    source = source_of(type(module).forward)
    rule = getattr(library_module(type(module)), "torch_chunk_gated_delta_rule", None)
    layout = next((name for name, (reads, _) in _LAYOUTS.items() if all(r in source for r in reads)), None)
    fits = (layout is not None and callable(rule) and "g: torch.Tensor" in source_of(inspect.unwrap(rule))
            and _copies_forward(module, _READS, {"A_log", "dt_bias"}, ("conv1d",) + _LAYOUTS[layout][1]))
    if fits:
        return mixin_class(type(module), _HFGatedDeltaNet)
    return GENERIC if any(True for _ in module.parameters(recurse=False)) else None


register_layer(None, _gated_delta_net_class,
               matches=lambda cls: cls.__name__.endswith("GatedDeltaNet") and cls.__module__.startswith("transformers.models."))
