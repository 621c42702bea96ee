"""bk.nn.MultiheadAttention: torch.nn.MultiheadAttention with its projections on the BK path.

Same constructor, parameters and state_dict keys. The q/k/v projections use in_proj_weight
through the BK linear map (one use for self-attention; three uses of disjoint row blocks
when query, key and value differ), out_proj is a bk.nn.Linear, and the attention itself is
ordinary autograd (it has no parameters).
"""
import copy
import math
import re

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten

from ._core import BKLayer, folded_rows, in_plain_forward
from .families import GENERIC, register_layer
from .generic import GenericLayer, generic_class
from ._uses import DenseUse
from ._made import mixin_class, names_in_init as _names_in_init, source_of as _source, takes as _takes
from .layer_scale import class_tokens, positions, scale, shift
from .linear import linear_with
from ..ops._norm_common import accumulation_dtype


def attention_unsupported_reason(module):
    if not module._qkv_same_embed_dim:
        return "kdim/vdim different from embed_dim (separate q/k/v projection weights)"
    if module.bias_k is not None:
        return "add_bias_kv=True"
    if module.add_zero_attn:
        return "add_zero_attn=True"
    return None


def _float_mask(mask, dtype):
    if mask is None or mask.is_floating_point():
        return mask if mask is None else mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))


class MultiheadAttention(BKLayer, torch.nn.MultiheadAttention):
    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if in_plain_forward():
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)
        reason = attention_unsupported_reason(self)
        if reason:
            raise NotImplementedError(f"bk.nn.MultiheadAttention does not support {reason}")
        self_attention = query is key and key is value
        unbatched = query.dim() == 2
        if unbatched:  # [L, E] -> [1, L, E]
            to_examples_first = lambda t: t.unsqueeze(0)  # noqa: E731
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:  # [N, L, E] already
            to_examples_first = lambda t: t  # noqa: E731
        else:  # [L, N, E] -> [N, L, E]
            to_examples_first = lambda t: t.transpose(0, 1)  # noqa: E731
        # [N, L, E] checked against the batch (the module's own batch_first says where N is)
        to_examples = lambda t: self._bk_examples(to_examples_first(t), 0)  # noqa: E731
        E, H = self.embed_dim, self.num_heads
        W, b = self.in_proj_weight, self.in_proj_bias
        if self_attention:
            q, k, v = linear_with(self, to_examples(query), W, b).chunk(3, dim=-1)
        else:
            q = linear_with(self, to_examples(query), W, b, rows=slice(0, E))
            k = linear_with(self, to_examples(key), W, b, rows=slice(E, 2 * E))
            v = linear_with(self, to_examples(value), W, b, rows=slice(2 * E, 3 * E))
        N, L, S = q.shape[0], q.shape[1], k.shape[1]
        heads = lambda t, n: t.reshape(N, n, H, E // H).transpose(1, 2)  # noqa: E731
        q, k, v = heads(q, L), heads(k, S), heads(v, S)
        mask = _float_mask(attn_mask, q.dtype)
        if mask is not None:
            mask = mask.view(1, 1, L, S) if mask.dim() == 2 else mask.view(N, H, L, S)
        elif is_causal:
            mask = torch.full((L, S), float("-inf"), dtype=q.dtype, device=q.device).triu_(1).view(1, 1, L, S)
        kpm = _float_mask(key_padding_mask, q.dtype)
        if kpm is not None:
            kpm = kpm.view(N, 1, 1, S)
            mask = kpm if mask is None else mask + kpm
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(E // H)
        if mask is not None:
            scores = scores + mask
        weights = F.softmax(scores, dim=-1)
        attended = F.dropout(weights, p=self.dropout, training=self.training) @ v  # [N, H, L, Dh]
        # [N, L, E], examples on dim 0 whatever the engine's batch_first says of the model's layout
        attended = attended.transpose(1, 2).reshape(N, L, E)
        proj = self.out_proj
        out = linear_with(proj, attended, proj.weight, proj.bias) if isinstance(proj, BKLayer) else proj(attended)
        if unbatched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        if average_attn_weights:
            weights = weights.mean(1)
        return out, (weights.squeeze(0) if unbatched else weights)


class GenericMultiheadAttention(GenericLayer, torch.nn.MultiheadAttention):
    """nn.MultiheadAttention with what the fused path does not take (add_bias_kv, add_zero_attn,
    kdim/vdim different from embed_dim): torch's own forward on the generic exact path. torch
    hands out_proj's Parameters to F.multi_head_attention_forward, so they are this module's own
    here (out_proj stays an nn.Linear). Per-example gradients of every projection: B x (4 E^2)
    elements per backward."""

    _bk_absorb = ("out_proj",)

    def _bk_input_dim(self, t):
        return 1 if not self.batch_first and t.dim() == 3 else 0  # query/key/value [L, N, E]; masks [N, S]

    def _bk_output_dim(self, k, t):
        return 1 if k == 0 and not self.batch_first and t.dim() == 3 else 0  # attn weights are [N, ...]


# Options the fused path does not take run torch's own forward on the generic path.
register_layer(torch.nn.MultiheadAttention, lambda module: GenericMultiheadAttention
               if attention_unsupported_reason(module) else MultiheadAttention)


def _is_relative_bias_attention(cls):
    """T5's attention and the families copied from it (mT5, LongT5, UMT5, Switch, UDOP, ...),
    known by shape, without importing transformers: a compute_bias method feeding a
    relative_attention_bias Embedding (WavLM's attention has a compute_bias on a table of another
    name, and its own class: speech.py)."""
    return callable(getattr(cls, "compute_bias", None)) and cls.__name__.endswith("Attention") and \
        "relative_attention_bias" in _names_in_init(cls)


def _table_owner_class(module, table, mixin=GenericLayer):
    """A module owning a table looked up (or an MLP run) on values that hold no examples, whose
    output is broadcast over the batch: the module takes the generic path with the table
    absorbed (mixin: only the method that uses it, when the module has no Parameters of its
    own); without a trainable table, only its own Parameters (if any) take the generic path."""
    own = any(p.requires_grad for p in module.parameters(recurse=False))
    child = getattr(module, table, None)
    if isinstance(child, torch.nn.Module) and any(p.requires_grad for p in child.parameters()):
        # Parameters of its own would be used outside the method: then the whole forward
        return generic_class(type(module), absorb=(table,), mixin=GenericLayer if own else mixin)
    return generic_class(type(module)) if own else None


def _relative_bias_class(module):
    """The relative-bias attention that owns the bias table takes the generic path with the table
    absorbed: its lookup ids [q, k] hold no examples (the bias is broadcast over the batch after
    the lookup, so the embedding alone cannot tell examples apart), while the module's
    position_bias output, [1, H, q, k], is expanded to the batch by the generic path so that its
    gradient is per example. The q/k/v/o projections stay bk Linears. The other layers' copies
    (no table) are left alone: their children convert as usual."""
    return _table_owner_class(module, "relative_attention_bias")


register_layer(None, _relative_bias_class, matches=_is_relative_bias_attention)


class _FunnelRelAttention(GenericLayer):
    """transformers' FunnelRelMultiheadAttention (its r_w_bias, r_r_bias, r_kernel, seg_embed...:
    the generic path). Of its attention_inputs, the position embeddings and cls_mask ([T, T])
    hold no examples, token_type_mat and attention_mask ([B, T]) do: said here by identity, since
    after pooling T can equal B and the shapes alone then split a position table per example
    (with a padding mask the recompute could not run: refused at the backward)."""

    def forward(self, query, key, value, attention_inputs, output_attentions=False):
        position_embeds, _, _, cls_mask = attention_inputs
        shared = [t for t in tree_flatten((position_embeds, cls_mask))[0] if isinstance(t, torch.Tensor)]
        self.__dict__["_bk_shared_inputs"] = {id(t) for t in shared}
        try:
            return self._bk_generic_call("forward", query, key, value, attention_inputs, output_attentions)
        finally:
            self.__dict__["_bk_shared_inputs"] = set()

    def _bk_input_dim(self, t):
        return None if id(t) in self.__dict__.get("_bk_shared_inputs", ()) else 0


def _funnel_attention_class(module):
    if not any(p.requires_grad for p in module.parameters(recurse=False)):
        return None
    if not _takes(type(module), "forward", ["query", "key", "value", "attention_inputs", "output_attentions"]):
        return GENERIC
    return generic_class(type(module), mixin=_FunnelRelAttention)


register_layer(None, _funnel_attention_class,
               matches=lambda cls: (cls.__module__, cls.__name__) == ("transformers.models.funnel.modeling_funnel",
                                                                     "FunnelRelMultiheadAttention"))


class _OneMethodOnGenericPath(GenericLayer):
    """The module's forward runs as usual (its children are bk layers); a subclass routes the one
    method that uses the absorbed table through the generic path."""

    def forward(self, *args, **kwargs):
        return super(GenericLayer, self).forward(*args, **kwargs)


class _PositionBiasOwner(_OneMethodOnGenericPath):
    """MPNet's encoder (and copies of it): compute_position_bias(x) looks up a
    relative_attention_bias Embedding with [q, k] buckets that hold no examples, then expands
    the bias to the batch, [B, H, q, k]. Only that method takes the generic path, with the table
    absorbed: its input x and its output hold the examples, so the per-example recompute is one
    lookup per example, not the whole encoder."""

    def compute_position_bias(self, *args, **kwargs):
        return self._bk_generic_call("compute_position_bias", *args, **kwargs)


class _RelPosMlpOwner(_OneMethodOnGenericPath):
    """timm's RelPosMlp (vit_relpos_*, vit_srelpos_*): get_bias() runs a small MLP on a buffer of
    relative coordinates, [2g-1, 2g-1, 2], that holds no examples, and its [1, H, N, N] bias is
    added to every example's attention scores. get_bias takes the generic path with the MLP
    absorbed: its output is expanded to the batch, so its gradient, and the MLP's recomputed
    per-example gradients, are per example (one tiny MLP per example)."""

    def get_bias(self, *args, **kwargs):
        return self._bk_generic_call("get_bias", *args, **kwargs)


def _is_timm_rel_pos_mlp(cls):
    return cls.__name__ == "RelPosMlp" and cls.__module__.startswith("timm.")


register_layer(None, lambda module: _table_owner_class(module, "mlp", _RelPosMlpOwner), matches=_is_timm_rel_pos_mlp)


def _is_position_bias_owner(cls):
    return callable(getattr(cls, "compute_position_bias", None))


register_layer(None, lambda module: _table_owner_class(module, "relative_attention_bias", _PositionBiasOwner),
               matches=_is_position_bias_owner)


def _is_window_attention(cls):
    """Swin's window attention, called on [B * windows, N, C] windows: timm's (v1, v2, v2-cr) and
    transformers' (Swin, Swinv2 and their copies: Donut, MaskFormer, Swin2SR, CLAP's audio)."""
    if cls.__module__.startswith("timm.models.swin"):
        return cls.__name__ in ("WindowAttention", "WindowMultiHeadAttention")
    return cls.__module__.startswith("transformers.") and re.fullmatch(r"\w*Swin\w*Attention|ClapAudioAttention",
                                                                       cls.__name__) is not None


class _RelativeBiasFn(torch.autograd.Function):
    """scores [k*B, H, N, N] + table[index].view(N, N, H).permute(2, 0, 1), the same bias for
    every window of every example (Swin's relative position bias). Example b's gradient of the
    table gathers the gradients of b's k windows' scores by index: [B, rows, H], kept as it is."""

    @staticmethod
    def forward(ctx, scores, table, index, layer, k):
        ctx.layer, ctx.table, ctx.k = layer, table, k
        ctx.save_for_backward(index)
        ctx._bk_row_wise_input = (0, scores.numel())  # row r of the output is row r of scores plus a constant
        return scores + _gathered_bias(table, index, scores)

    @staticmethod
    def backward(ctx, g):
        (index,) = ctx.saved_tensors
        table, k = ctx.table, ctx.k
        acc = accumulation_dtype(g.dtype)
        heads = g.shape[1]
        per_example_bias = g.to(acc).view(-1, k, heads, g.shape[-2] * g.shape[-1]).sum(1).transpose(1, 2)
        per_example = per_example_bias.new_zeros(per_example_bias.shape[0], *table.shape)
        per_example.index_add_(1, index, per_example_bias)  # [B, rows, H]
        if ctx.layer._bk_hand_off([(table, DenseUse(per_example))]):
            return g, None, None, None, None
        return g, per_example.sum(0).to(table.dtype), None, None, None


def _gathered_bias(table, index, scores):
    """[heads, N, N] table[index] for scores [..., heads, N, N] (index: [N * N] rows of the table)."""
    N = scores.shape[-1]
    return table[index].view(N, N, -1).permute(2, 0, 1).to(scores.dtype)


def _add_relative_bias(layer, scores, table, index, windows):
    """scores + the relative position table's bias, book-kept per example (over its `windows`
    windows) where the table trains."""
    index = index.view(-1)
    if table.requires_grad:
        return _RelativeBiasFn.apply(scores, table, index, layer, windows)
    return scores + _gathered_bias(table, index, scores)


def _add_shift_mask(scores, mask):
    """Swin's shifted-window mask [windows, N, N] added to every example's windows' scores."""
    if mask is None:
        return scores
    heads, N = scores.shape[1], scores.shape[-1]
    return (scores.view(-1, mask.shape[0], heads, N, N) + mask.unsqueeze(1).unsqueeze(0)).view(-1, heads, N, N)


def _own(module):
    """The names of the module's own trained Parameters (not its children's)."""
    return {name for name, p in module.named_parameters(recurse=False) if p.requires_grad}


def _timm_block(model, block, *args, **kwargs):
    """block(*args, **kwargs), through timm's activation checkpointing where the timm model asks
    for it (as timm's forwards copied here do)."""
    if model.grad_checkpointing and not torch.jit.is_scripting():
        from timm.models._manipulate import checkpoint

        return checkpoint(block, *args, **kwargs)
    return block(*args, **kwargs)


def _timm_blocks(model, blocks, x):
    """blocks(x) for a Sequential of a timm model, checkpointed as timm's forward would."""
    if model.grad_checkpointing and not torch.jit.is_scripting():
        from timm.models._manipulate import checkpoint_seq

        return checkpoint_seq(blocks, x)
    return blocks(x)


def _active_layout(layer):
    """The engine's layout when layer's bk forward should run (under an engine, in a batched
    forward, with a trained Parameter in it or its children); None when the module's own forward
    runs."""
    layout = layer._bk_layout()
    if in_plain_forward() or layout is None or layout.batch is None or \
            not any(p.requires_grad for p in layer.parameters()):
        return None
    return layout


class _TimmWindowAttention(BKLayer):
    """timm's Swin (v1) WindowAttention: timm's non-fused forward, with the relative position
    bias added by _RelativeBiasFn (per-example table gradients) and qkv / proj as the bk Linear
    layers it holds, on the [B * windows, N, C] windows folded from the examples (the fold of its
    input proven by folded_rows; attention keeps windows apart, so its output is laid out from
    [B, windows, N, C] for proj)."""

    _bk_swap_without_parameters = True  # a frozen table: its qkv and proj are still bk layers

    def forward(self, x, mask=None):
        if (layout := _active_layout(self)) is None:
            return super().forward(x, mask)
        B_, N, C = x.shape
        windows = _windows_per_example(self, x, layout.batch)
        qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = _add_relative_bias(self, attn, self.relative_position_bias_table, self.relative_position_index, windows)
        x = self.attn_drop(self.softmax(_add_shift_mask(attn, mask))) @ v
        # each window's output is its own (x's fold is proven above): laid out [B, windows, N, C]
        # and viewed back, so proj reads the fold without a graph to follow (a frozen stage before)
        x = x.transpose(1, 2).reshape(B_ // windows, windows, N, -1).view(B_, N, -1)
        return self.proj_drop(self.proj(x))


class _AbsorbingAttention(BKLayer):
    """A bk attention that book-keeps the Parameters of the children named in _bk_absorb (a
    relative position table or MLP) as its own: they stay unconverted."""

    _bk_swap_without_parameters = True  # frozen own Parameters: its children's still book-kept here

    def _bk_absorbed_modules(self):
        return [m for m in (getattr(self, name) for name in self._bk_absorb) if m is not None]

    def _bk_owned_parameters(self):
        return list(self.parameters(recurse=False)) + [p for m in self._bk_absorbed_modules() for p in m.parameters()]


def _logit_scaled(layer, scores, logit_scale, windows):
    """Swin-V2's cosine scores times exp(min(logit_scale, log 100)), book-kept per example."""
    most = math.log(1.0 / 0.01)
    if logit_scale.requires_grad:
        return _LogitScaleFn.apply(scores, logit_scale, layer, windows, most)
    return scores * torch.clamp(logit_scale, max=most).exp().view(-1, 1, 1)


def _continuous_position_bias(mlp, coords_table, position_index, window_size, heads):
    """Swin-V2's bias: 16 * sigmoid of the MLP's table of relative coordinates, looked up by
    relative position, [heads, N, N] (timm's and transformers' code alike)."""
    N = window_size[0] * window_size[1]
    table = mlp(coords_table).view(-1, heads)
    return 16 * torch.sigmoid(table[position_index.view(-1)].view(N, N, -1).permute(2, 0, 1))


def _window_rows(layer, x):
    """(windows per example, x's [k*B, N, C] windows laid out [B, k * N, C]) for a bk window
    attention under an engine with a trained Parameter (the fold of x proven or refused); None
    otherwise, when the module's own forward runs."""
    if (layout := _active_layout(layer)) is None:
        return None
    B_, N, C = x.shape
    windows = _windows_per_example(layer, x, layout.batch)
    return windows, x.reshape(B_ // windows, windows * N, C)


class _TimmWindowAttentionV2(_AbsorbingAttention):
    """timm's Swin-V2 WindowAttention: cosine attention with a per-head logit scale (_LogitScaleFn)
    and a continuous position bias, an MLP on fixed coordinates (cpb_mlp, absorbed: _SharedBiasFn);
    q_bias / v_bias through shifts. The qkv and proj run as the bk Linear layers they are, on the
    windows laid out [B, windows * N, C] (their fold proven by folded_rows), so nothing is
    recomputed per example (before: the whole window attention took the generic path)."""

    _bk_absorb = ("cpb_mlp",)

    def _bk_position_bias(self, cpb_mlp):
        return _continuous_position_bias(cpb_mlp, self.relative_coords_table, self.relative_position_index,
                                         self.window_size, self.num_heads)

    def forward(self, x, mask=None):
        if (laid_out := _window_rows(self, x)) is None:
            return super().forward(x, mask)
        (B_, N, C), (windows, rows) = x.shape, laid_out
        qkv = self.qkv(rows) if self.q_bias is None else _qkv_with_biases(self, rows)
        q, k, v = qkv.reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = _logit_scaled(self, attn, self.logit_scale, windows)
        attn = _add_shared_bias(self, attn, self.cpb_mlp, windows, self._bk_position_bias)
        attn = self.attn_drop(self.softmax(_add_shift_mask(attn, mask)))
        out = (attn @ v).transpose(1, 2).reshape(B_ // windows, windows * N, C)
        return self.proj_drop(self.proj(out)).view(B_, N, -1)


class _HFSwinV2SelfAttention(_AbsorbingAttention):
    """transformers' Swinv2SelfAttention: the same cosine attention as timm's v2 (query/key/value
    Linears, logit scale, continuous position MLP absorbed), its forward written out with both
    Functions; its context laid out [B, windows, N, C] and viewed back, so the output Linear after
    it (Swinv2SelfOutput) reads the fold. transformers adds the shift mask twice; so does this."""

    _bk_absorb = ("continuous_position_bias_mlp",)

    def _bk_position_bias(self, mlp):
        return _continuous_position_bias(mlp, self.relative_coords_table, self.relative_position_index,
                                         self.window_size, self.num_attention_heads)

    def forward(self, hidden_states, attention_mask=None, output_attentions=False):
        if (laid_out := _window_rows(self, hidden_states)) is None:
            return super().forward(hidden_states, attention_mask, output_attentions)
        (B_, N, C), (windows, rows) = hidden_states.shape, laid_out
        shape = (B_, N, self.num_attention_heads, self.attention_head_size)
        q, k, v = (proj(rows).reshape(shape).transpose(1, 2) for proj in (self.query, self.key, self.value))
        scores = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        scores = _logit_scaled(self, scores, self.logit_scale, windows)
        scores = _add_shared_bias(self, scores, self.continuous_position_bias_mlp, windows, self._bk_position_bias)
        if attention_mask is not None:  # as transformers: the mask added twice
            mask = attention_mask.unsqueeze(1).unsqueeze(0)
            heads = self.num_attention_heads
            scores = (scores.view(B_ // attention_mask.shape[0], attention_mask.shape[0], heads, N, N) + mask + mask)
            scores = scores.view(-1, heads, N, N)
        probs = self.dropout(F.softmax(scores, dim=-1))
        context = (probs @ v).permute(0, 2, 1, 3).reshape(B_ // windows, windows, N, -1).view(B_, N, -1)
        return (context, probs) if output_attentions else (context,)


def _hf_swinv2_self_attention_class(module):
    if not _takes(type(module), "forward", ["hidden_states", "attention_mask", "output_attentions"]) or not all(
            hasattr(module, a) for a in ("query", "key", "value", "logit_scale", "continuous_position_bias_mlp",
                                         "relative_coords_table", "relative_position_index", "window_size",
                                         "num_attention_heads", "attention_head_size", "dropout")):
        return None
    return mixin_class(type(module), _HFSwinV2SelfAttention)


class _TimmWindowAttentionV2Cr(_AbsorbingAttention):
    """timm's Swin-V2-CR WindowMultiHeadAttention: cosine attention with a per-head logit scale
    ([H]) and a meta MLP on fixed log coordinates (absorbed; its dropout keeps the batch's mask),
    through the same Functions as timm's v2; qkv and proj as bk Linears on [B, windows * N, C]."""

    _bk_absorb = ("meta_mlp",)

    def _bk_position_bias(self, meta_mlp):
        area = self.window_size[0] * self.window_size[1]
        return meta_mlp(self.relative_coordinates_log).transpose(1, 0).reshape(self.num_heads, area, area)

    def forward(self, x, mask=None):
        if (laid_out := _window_rows(self, x)) is None:
            return super().forward(x, mask)
        (B_, N, C), (windows, rows) = x.shape, laid_out
        q, k, v = self.qkv(rows).view(B_, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        attn = _logit_scaled(self, F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1),
                             self.logit_scale, windows)
        attn = _add_shared_bias(self, attn, self.meta_mlp, windows, self._bk_position_bias)
        attn = self.attn_drop(_add_shift_mask(attn, mask).softmax(dim=-1))
        out = (attn @ v).transpose(1, 2).reshape(B_ // windows, windows * N, C)
        return self.proj_drop(self.proj(out)).view(B_, N, -1)


def _timm_window_attention_v2_cr_class(module):
    if not _takes(type(module), "forward", ["x", "mask"]) or not all(hasattr(module, a) for a in (
            "qkv", "proj", "logit_scale", "meta_mlp", "relative_coordinates_log", "window_size", "num_heads",
            "attn_drop", "proj_drop")):
        return None
    return mixin_class(type(module), _TimmWindowAttentionV2Cr)


def _timm_window_attention_v2_class(module):
    if not _takes(type(module), "forward", ["x", "mask"]) or not all(hasattr(module, a) for a in (
            "qkv", "q_bias", "k_bias", "v_bias", "logit_scale", "cpb_mlp", "relative_coords_table",
            "relative_position_index", "window_size", "num_heads", "proj", "softmax", "attn_drop", "proj_drop")):
        return None
    return mixin_class(type(module), _TimmWindowAttentionV2)


def _windows_per_example(layer, x, B):
    """k of x's [k*B, N, C] windows, proven folded from the examples (refused otherwise)."""
    if x.shape[0] != B and not (B and x.shape[0] % B == 0 and folded_rows(x, B)):
        raise layer._bk_layout_error(x, 0)
    return x.shape[0] // B if B else 1


class _HFSwinAttention(_AbsorbingAttention):
    """transformers' SwinAttention (transformers 5: q/k/v/o Linears and a SwinRelativePositionBias
    child owning the table): the eager attention written out, with the table's bias added by
    _RelativeBiasFn (the child absorbed: its table is book-kept here) and the output laid out
    [B, windows, N, C] for o_proj, as timm's."""

    _bk_absorb = ("relative_position_bias",)

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        if (layout := _active_layout(self)) is None:
            return super().forward(hidden_states, attention_mask, **kwargs)
        B_, N, C = hidden_states.shape
        windows = _windows_per_example(self, hidden_states, layout.batch)
        shape = (B_, N, -1, self.head_dim)
        q, k, v = (proj(hidden_states).view(shape).transpose(1, 2) for proj in (self.q_proj, self.k_proj, self.v_proj))
        scores = torch.matmul(q, k.transpose(2, 3)) * self.scaling
        bias = self.relative_position_bias
        scores = _add_relative_bias(self, scores, bias.relative_position_bias_table, bias.relative_position_index,
                                    windows)
        scores = _add_shift_mask(scores, attention_mask)  # [num_windows, N, N]
        # transformers' eager attention takes the softmax in float32; its sdpa (the default) in q's dtype
        eager = getattr(self.config, "_attn_implementation", None) == "eager"
        weights = F.softmax(scores, dim=-1, dtype=torch.float32 if eager else None).to(q.dtype)
        weights = F.dropout(weights, p=self.attention_dropout, training=self.training)
        out = torch.matmul(weights, v).transpose(1, 2).reshape(B_ // windows, windows, N, -1).view(B_, N, -1)
        return self.o_proj(out), weights


def _hf_swin_attention_class(module):
    bias = getattr(module, "relative_position_bias", None)
    if not _takes(type(module), "forward", ["hidden_states", "attention_mask", "kwargs"]) or not all(
            hasattr(module, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "scaling", "head_dim")) or \
            type(bias).__name__ != "SwinRelativePositionBias":
        return None
    return mixin_class(type(module), _HFSwinAttention)


def _timm_window_attention_class(module):
    """bk's WindowAttention where timm's forward and attributes are the ones read here, else None."""
    if not _takes(type(module), "forward", ["x", "mask"]) or not all(hasattr(module, a) for a in (
            "relative_position_bias_table", "relative_position_index", "qkv", "proj", "softmax")):
        return None
    return mixin_class(type(module), _TimmWindowAttention)


# (module, class) -> the maker of bk's own window attention for it (None where the forward or
# the attributes are not the ones its mixin read)
_OWN_WINDOW_ATTENTION = {
    ("timm.models.swin_transformer", "WindowAttention"): _timm_window_attention_class,
    ("timm.models.swin_transformer_v2", "WindowAttention"): _timm_window_attention_v2_class,
    ("timm.models.swin_transformer_v2_cr", "WindowMultiHeadAttention"): _timm_window_attention_v2_cr_class,
    ("transformers.models.swin.modeling_swin", "SwinAttention"): _hf_swin_attention_class,
    ("transformers.models.swinv2.modeling_swinv2", "Swinv2SelfAttention"): _hf_swinv2_self_attention_class,
}


def _window_attention_class(module):
    """bk's own window attention (timm's Swin v1, v2, v2-cr; transformers' Swin and Swin-V2)
    where its maker accepts the module; else the generic path with the trained children absorbed
    (qkv, proj, a position MLP): the windows are rows folded from the examples (proven through the
    partition's permute and roll), which the recompute splits per example, but the softmax over
    each window's positions would need a proof through attention that the Linear layers inside
    cannot give; absorbed, they are recomputed per example with the attention (the copies in
    Donut, MaskFormer, Swin2SR, CLAP)."""
    key = (type(module).__module__, type(module).__name__)
    own = _OWN_WINDOW_ATTENTION[key](module) if key in _OWN_WINDOW_ATTENTION else None
    if own is not None:
        return own
    if key == ("transformers.models.swinv2.modeling_swinv2", "Swinv2Attention") and \
            _hf_swinv2_self_attention_class(module.self) is not None and \
            not any(p.requires_grad for p in module.parameters(recurse=False)):
        return None  # its children convert as usual: the self-attention above, the output Linear
    trained = tuple(name for name, child in module.named_children()
                    if any(p.requires_grad for p in child.parameters()))
    own = any(p.requires_grad for p in module.parameters(recurse=False))
    return generic_class(type(module), absorb=trained) if own or trained else None


register_layer(None, _window_attention_class, matches=_is_window_attention)


def _qkv_with_biases(attention, x):
    """timm's F.linear(x, qkv.weight, cat(q_bias, k_bias, v_bias)) (EVA, BEiT): the qkv as the
    bk Linear it is (no bias of its own), then q's and v's biases through shift (k's: a zero buffer)."""
    q, k, v = attention.qkv(x).chunk(3, dim=-1)
    heads = (1,) * (q.dim() - 1) + (-1,)
    return torch.cat((shift(attention, q, attention.q_bias, heads), k + attention.k_bias,
                      shift(attention, v, attention.v_bias, heads)), -1)


class _TimmEvaAttention(BKLayer):
    """timm's EvaAttention (EVA-02, and the ViTs built on eva.py) with a fused qkv and its own
    q_bias / v_bias: timm's forward, with the qkv projection run by the bk Linear it holds and the
    two biases added through shift (k's is a zero buffer). It was recomputed per example: its
    F.linear(x, qkv.weight, cat(q_bias, k_bias, v_bias)) reads the child's weight itself."""

    _bk_swap_without_parameters = True  # frozen biases: still swapped, or the qkv weight's use goes unseen

    def forward(self, x, rope=None, attn_mask=None, is_causal=False):
        if in_plain_forward() or self._bk_layout() is None or self.q_bias is None:
            return super().forward(x, rope=rope, attn_mask=attn_mask, is_causal=is_causal)
        from timm.models import eva

        B, N, C = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        # from here on timm's forward (timm 1.0)
        qkv = _qkv_with_biases(self, x).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            npt, half = self.num_prefix_tokens, getattr(self, "rotate_half", False)
            q = torch.cat([q[:, :, :npt, :], eva.apply_rot_embed_cat(q[:, :, npt:, :], rope, half=half)], dim=2).type_as(v)
            k = torch.cat([k[:, :, :npt, :], eva.apply_rot_embed_cat(k[:, :, npt:, :], rope, half=half)], dim=2).type_as(v)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                               dropout_p=self.attn_drop.p if self.training else 0.0, is_causal=is_causal)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            attn = eva.maybe_add_mask(attn, eva.resolve_self_attn_mask(N, attn, attn_mask, is_causal=is_causal))
            x = self.attn_drop(attn.softmax(dim=-1)) @ v
        x = self.norm(x.transpose(1, 2).reshape(B, N, C))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


class _TimmEvaBlock(BKLayer):
    """timm's EvaBlock with layer scales: its forward, with the inline gamma_1 / gamma_2 products
    book-kept by bk.nn.scale (its attention, norms and MLP are bk layers of their own)."""

    def forward(self, x, rope=None, attn_mask=None, is_causal=False):
        if self._bk_bypassed():
            return super().forward(x, rope=rope, attn_mask=attn_mask, is_causal=is_causal)
        x_attn = self.attn(self.norm1(x), rope=rope, attn_mask=attn_mask, is_causal=is_causal)
        x = x + self.drop_path1(x_attn if self.gamma_1 is None else scale(self, x_attn, self.gamma_1, -1))
        x_mlp = self.mlp(self.norm2(x))
        return x + self.drop_path2(x_mlp if self.gamma_2 is None else scale(self, x_mlp, self.gamma_2, -1))


_EVA_FORWARD = ["x", "rope", "attn_mask", "is_causal"]


def _timm_eva_block_class(module):
    if not _takes(type(module), "forward", _EVA_FORWARD) or not hasattr(module, "gamma_1"):
        return GENERIC
    return mixin_class(type(module), _TimmEvaBlock)


def _timm_eva_attention_class(module):
    """bk's EvaAttention where it has a fused qkv with q/v biases and timm's forward as read
    here; else the generic path (any other own Parameter)."""
    from timm.models import eva

    if getattr(module, "qkv", None) is None or getattr(module, "q_bias", None) is None or \
            not _takes(type(module), "forward", _EVA_FORWARD) or \
            not all(hasattr(eva, f) for f in ("apply_rot_embed_cat", "maybe_add_mask", "resolve_self_attn_mask")):
        return GENERIC
    return mixin_class(type(module), _TimmEvaAttention)


class _TimmBeitAttention(BKLayer):
    """timm's BEiT Attention (BEiT, BEiT-v2): timm's non-fused forward with the qkv as the bk
    Linear, q/v biases through shift and its relative position bias (one window: the whole
    image, plus the class token's rows) added by _RelativeBiasFn; a shared bias from the parent
    is added as given (its owner book-keeps it)."""

    _bk_swap_without_parameters = True

    def forward(self, x, shared_rel_pos_bias=None):
        if in_plain_forward() or self._bk_layout() is None or not any(p.requires_grad for p in self.parameters()):
            return super().forward(x, shared_rel_pos_bias=shared_rel_pos_bias)
        B, N, C = x.shape
        qkv = self.qkv(x) if self.q_bias is None else _qkv_with_biases(self, x)
        q, k, v = qkv.reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if self.relative_position_bias_table is not None:  # one window: the whole image
            attn = _add_relative_bias(self, attn, self.relative_position_bias_table, self.relative_position_index, 1)
        if shared_rel_pos_bias is not None:
            attn = attn + shared_rel_pos_bias
        x = self.attn_drop(attn.softmax(dim=-1)) @ v
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))


class _TimmBeitBlock(BKLayer):
    """timm's BEiT Block with layer scales: the inline gamma_1 / gamma_2 through bk.nn.scale."""

    def forward(self, x, shared_rel_pos_bias=None):
        if self._bk_bypassed():
            return super().forward(x, shared_rel_pos_bias=shared_rel_pos_bias)
        x_attn = self.attn(self.norm1(x), shared_rel_pos_bias=shared_rel_pos_bias)
        x = x + self.drop_path1(scale(self, x_attn, self.gamma_1, -1))
        return x + self.drop_path2(scale(self, self.mlp(self.norm2(x)), self.gamma_2, -1))


class _TimmBeitRoot(BKLayer):
    """timm's Beit model: it owns cls_token and pos_embed and uses them inline in
    forward_features, so it took the generic path, a recompute of the whole model per example.
    forward_features is timm's with the class token made per example by a shift of zeros and the
    positions added by a shift: [B, 1, C] and [B, N + 1, C] per-example gradients, no recompute."""

    def forward_features(self, x):
        if self._bk_bypassed():
            return super().forward_features(x)
        x = self.patch_embed(x)
        x = torch.cat((class_tokens(self, x, self.cls_token), x), dim=1)
        if self.pos_embed is not None:
            x = positions(self, x, self.pos_embed)
        x = self.pos_drop(x)
        # from here on timm's forward_features (timm 1.0)
        rel_pos_bias = self.rel_pos_bias() if self.rel_pos_bias is not None else None
        for blk in self.blocks:
            x = _timm_block(self, blk, x, shared_rel_pos_bias=rel_pos_bias)
        return self.norm(x)


def _timm_beit_class(module):
    """bk's BEiT model / Attention / Block where timm's forward is the one read here, else the
    generic path."""
    if type(module).__name__ == "Beit":
        fits = _takes(type(module), "forward_features", ["x"]) and \
            _own(module) <= {"cls_token", "pos_embed"} and getattr(module, "cls_token", None) is not None
        return mixin_class(type(module), _TimmBeitRoot) if fits else GENERIC
    if not _takes(type(module), "forward", ["x", "shared_rel_pos_bias"]):
        return GENERIC
    if type(module).__name__ == "Block":
        return mixin_class(type(module), _TimmBeitBlock) if getattr(module, "gamma_1", None) is not None else GENERIC
    if not all(hasattr(module, a) for a in ("qkv", "q_bias", "relative_position_bias_table", "proj", "scale")):
        return GENERIC
    return mixin_class(type(module), _TimmBeitAttention)


register_layer(None, _timm_beit_class,
               matches=lambda cls: cls.__name__ in ("Attention", "Block", "Beit") and cls.__module__ == "timm.models.beit")


def _is_timm_eva_attention(cls):
    return cls.__name__ == "EvaAttention" and cls.__module__ == "timm.models.eva"


register_layer(None, _timm_eva_attention_class, matches=_is_timm_eva_attention)
register_layer(None, _timm_eva_block_class,
               matches=lambda cls: cls.__name__ == "EvaBlock" and cls.__module__ == "timm.models.eva")


class _PosEmbedOwner(_OneMethodOnGenericPath):
    """timm's ViT family (VisionTransformer, DeiT's distilled one, ...): the root model owns
    cls_token, reg_token, pos_embed (dist_token) and uses them only in _pos_embed(x), which
    prepends the tokens and adds the positions to the patch embeddings. Only that method takes the
    generic path: its input and output hold the examples, so the per-example recompute is one
    concatenation and add per example, not the whole model."""

    def _pos_embed(self, *args, **kwargs):
        return self._bk_generic_call("_pos_embed", *args, **kwargs)

    def _bk_passed_through(self, method, out_leaves):
        # EVA's _pos_embed also returns its rotary embedding, [N, d] from the rope module's buffers
        # (no Parameter): at N == B it would read as a batch. Outputs after the first that need no
        # gradient are passed through; the own Parameters are used only for the first.
        return {i for i, t in enumerate(out_leaves) if i > 0 and isinstance(t, torch.Tensor) and not t.requires_grad}


def _is_timm_pos_embed_owner(cls):
    return cls.__module__.startswith("timm.") and callable(getattr(cls, "_pos_embed", None))


def _pos_embed_owner_class(module):
    """_PosEmbedOwner when every trained Parameter of the module's own is read (as self.<name>) in
    _pos_embed and in none of the methods its forward runs besides; else the whole forward on the
    generic path, as for any module."""
    own = [name for name, p in module.named_parameters(recurse=False) if p.requires_grad]
    if not own:
        return None
    cls = type(module)
    pos_embed_source = _source(cls._pos_embed)
    others = "".join(_source(getattr(cls, m)) for m in ("forward", "forward_features", "forward_head")
                     if callable(getattr(cls, m, None)))
    if all(f"self.{n}" in pos_embed_source and not re.search(rf"self\.{n}\b", others) for n in own):
        return generic_class(cls, mixin=_PosEmbedOwner)
    return generic_class(cls)


register_layer(None, _pos_embed_owner_class, matches=_is_timm_pos_embed_owner)


class _BiasOf(torch.nn.Module):
    """make_bias(owner) as a forward, for torch.func.functional_call with the owner's Parameters."""

    def __init__(self, owner, make_bias):
        super().__init__()
        self.owner, self.make_bias = owner, make_bias

    def forward(self):
        return self.make_bias(self.owner)


class _SharedBiasFn(torch.autograd.Function):
    """scores [k*B, H, N, N] + make_bias(owner), a bias made from owner's Parameters alone (timm's
    RelPosBias, RelPosBiasTf, RelPosMlp: a table lookup, an einsum of one-hot lookups, an MLP on
    fixed coordinates; Swin-V2's continuous position MLP), the same for every window of every
    example. Example b's gradients of those Parameters: the vector-Jacobian product of the bias
    at the sum of b's k windows' score gradients, batched over the examples through the bias's
    own graph, kept from the forward (so a dropout inside, RelPosMlp's, keeps its mask; nothing
    of the attention is recomputed)."""

    @staticmethod
    def forward(ctx, scores, layer, bias_of, names, k, *params):
        ctx.layer, ctx.k, ctx.params = layer, k, params  # the Parameters themselves, for the engine
        ctx._bk_row_wise_input = (0, scores.numel())  # row r of the output is row r of scores plus a constant
        with torch.enable_grad():
            leaves = [p.detach().requires_grad_() for p in params]
            bias = torch.func.functional_call(bias_of, {"owner." + n: t for n, t in zip(names, leaves)}, ())
        ctx.graph = (bias, leaves)
        return scores + bias.detach().to(scores.dtype)

    @staticmethod
    def backward(ctx, g):
        bias, leaves = ctx.graph
        del ctx.graph
        summed = g.view(-1, ctx.k, *g.shape[1:]).sum(1)  # [B, H, N, N]: each example's windows
        per_bias = summed.reshape(summed.shape[0], *bias.shape).to(bias.dtype)
        if per_bias.shape[0]:
            with torch.enable_grad():
                per_example = torch.autograd.grad(bias, leaves, per_bias, is_grads_batched=True, allow_unused=True)
        else:  # no examples: nothing to book-keep
            per_example = [None] * len(leaves)
        per_example = [torch.zeros(per_bias.shape[0], *p.shape, dtype=p.dtype, device=p.device) if grads is None else
                       grads for p, grads in zip(leaves, per_example)]
        uses = [(p, DenseUse(grads)) for p, grads in zip(ctx.params, per_example)]
        if ctx.layer._bk_hand_off(uses):
            return (g, None, None, None, None) + (None,) * len(leaves)
        return (g, None, None, None, None) + tuple(grads.sum(0) for grads in per_example)


def _add_shared_bias(layer, scores, owner, windows, make_bias=lambda owner: owner.get_bias()):
    """scores + make_bias(owner), the owner's trained Parameters book-kept per example."""
    trained = [(n, p) for n, p in owner.named_parameters() if p.requires_grad]
    if not trained:
        return scores + make_bias(owner).to(scores.dtype)
    names, params = zip(*trained)
    return _SharedBiasFn.apply(scores, layer, _BiasOf(owner, make_bias), names, windows, *params)


class _LogitScaleFn(torch.autograd.Function):
    """scores [k*B, H, N, N] * exp(min(logit_scale, most)), logit_scale [H, 1, 1] or [H] (Swin-V2's
    cosine attention, timm's v2 and v2-cr). Example b's gradient: the sum over its k windows and the N x N scores of
    g * scores, per head, times the scale's derivative (zero where clamped, as torch.clamp's)."""

    @staticmethod
    def forward(ctx, scores, logit_scale, layer, k, most):
        ctx.layer, ctx.k, ctx.most, ctx.logit_scale = layer, k, most, logit_scale
        ctx.save_for_backward(scores)
        ctx._bk_row_wise_input = (0, scores.numel())  # row r of the output is row r of scores, scaled
        return scores * torch.clamp(logit_scale, max=most).exp().to(scores.dtype).view(-1, 1, 1)

    @staticmethod
    def backward(ctx, g):
        (scores,) = ctx.saved_tensors
        logit_scale = ctx.logit_scale
        factor = torch.clamp(logit_scale, max=ctx.most).exp()
        acc = accumulation_dtype(g.dtype)
        per_head = (g.to(acc) * scores.to(acc)).view(-1, ctx.k, *g.shape[1:]).sum((1, 3, 4))  # [B, H]
        derivative = (factor * (logit_scale <= ctx.most)).to(acc).view(1, -1)
        per_example = (per_head * derivative).view(per_head.shape[0], *logit_scale.shape)
        grad_scores = g * factor.to(g.dtype).view(-1, 1, 1)
        if ctx.layer._bk_hand_off([(logit_scale, DenseUse(per_example))]):
            return grad_scores, None, None, None, None
        return grad_scores, per_example.sum(0).to(logit_scale.dtype), None, None, None


class _TimmMaxxvitAttention(_AbsorbingAttention):
    """timm's MaxViT / CoAtNet attention (maxxvit.py: AttentionCl on [B * windows, ..., C] window
    or grid partitions, Attention2d on [B, C, H, W]): timm's non-fused forward, with the relative
    position bias (rel_pos: a table, TF's einsum lookups or an MLP, absorbed) added by
    _SharedBiasFn. timm's fused path reads rel_pos.get_bias() outside any module's forward (an
    ordinary gradient) and its proj could not prove the fold through the attention; here the
    output is laid out [B, windows * N, C] for proj."""

    _bk_absorb = ("rel_pos",)

    def forward(self, x, shared_rel_pos=None):
        if (layout := _active_layout(self)) is None:
            return super().forward(x, shared_rel_pos)
        channels_last = type(self).__name__ == "AttentionCl"
        B_ = x.shape[0]
        windows = _windows_per_example(self, x, layout.batch) if channels_last else 1
        if channels_last:  # timm's AttentionCl, non-fused
            restore_shape = x.shape[:-1]
            if self.head_first:
                q, k, v = self.qkv(x).view(B_, -1, self.num_heads, self.dim_head * 3).transpose(1, 2).chunk(3, dim=3)
            else:
                q, k, v = self.qkv(x).reshape(B_, -1, 3, self.num_heads, self.dim_head).transpose(1, 3).unbind(2)
            attn = (q * self.scale) @ k.transpose(-2, -1)
        else:  # timm's Attention2d, non-fused
            _, _, H, W = x.shape
            if self.head_first:
                q, k, v = self.qkv(x).view(B_, self.num_heads, self.dim_head * 3, -1).chunk(3, dim=2)
            else:
                q, k, v = self.qkv(x).reshape(B_, 3, self.num_heads, self.dim_head, -1).unbind(1)
            attn = (q * self.scale).transpose(-2, -1) @ k
        if self.rel_pos is not None:
            attn = _add_shared_bias(self, attn, self.rel_pos, windows)
        elif shared_rel_pos is not None:
            attn = attn + shared_rel_pos
        attn = self.attn_drop(attn.softmax(dim=-1))
        if channels_last:
            # each window's output is its own (x's fold is proven above): laid out [B, windows * N, C]
            out = (attn @ v).transpose(1, 2).reshape(B_ // windows, -1, self.num_heads * self.dim_head)
            return self.proj_drop(self.proj(out)).reshape(restore_shape + (-1,))
        return self.proj_drop(self.proj((v @ attn.transpose(-2, -1)).view(B_, -1, H, W)))


def _timm_maxxvit_attention_class(module):
    if not _takes(type(module), "forward", ["x", "shared_rel_pos"]) or not all(hasattr(module, a) for a in (
            "qkv", "proj", "rel_pos", "head_first", "num_heads", "dim_head", "scale", "attn_drop", "proj_drop")) or \
            (module.rel_pos is not None and not callable(getattr(module.rel_pos, "get_bias", None))):
        return None
    return mixin_class(type(module), _TimmMaxxvitAttention)


register_layer(None, _timm_maxxvit_attention_class,
               matches=lambda cls: cls.__module__ == "timm.models.maxxvit" and cls.__name__ in ("AttentionCl",
                                                                                                   "Attention2d"))


_PROBING = []  # set while a probe's own bk.verify converts the module under test


def _exact_per_example(module, shape, B=3):
    """Whether bk's per-example gradients of module, on a random [B, *shape] input and a
    squared random functional of its output, match one backward per example (bk.verify on a
    copy, run once at conversion). Values alone do not show a module that mixes the examples'
    gradients while its outputs stay apart."""
    if _PROBING:
        return True
    from ..verify import verify

    _PROBING.append(module)
    try:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(B, *shape, generator=generator, dtype=torch.float64)
        weights = torch.randn(math.prod(shape), generator=generator, dtype=torch.float64)
        copied = copy.deepcopy(module).to("cpu")
        return verify(copied, lambda m, b: (m(b).flatten(1) @ weights).square().mean(), x).ok
    finally:
        _PROBING.pop()


def _csatv2_spatial_reason(module):
    # timm's CSATv2 SpatialTransformerBlock (timm 1.0.x) unbinds q, k, v as [B, N] and takes
    # q @ k^T: a [B, B] product over the batch, so every example's output depends on every row
    if not _exact_per_example(module, (1, 7, 7)):
        return ("its spatial attention mixes the examples of the batch (q and k are [B, N], so q @ k^T is a [B, B] "
                "product over the batch; bk.verify of this block on a probe did not match one backward per "
                "example): no per-example gradient exists, so it cannot be trained with DP-SGD. Freeze its "
                "Parameters and the layers before it, or fix its attention to [B, N, N]")
    return None


register_layer(None, None, unsupported_reason=_csatv2_spatial_reason,
               matches=lambda cls: cls.__module__ == "timm.models.csatv2" and cls.__name__ == "SpatialTransformerBlock")
