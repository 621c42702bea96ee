"""DeBERTa's relative attention (transformers' DebertaV2Encoder/DebertaEncoder and their
DisentangledSelfAttention), v2/v3 and v1, and SEW-D's copy of v2's (SEWDTransformerEncoder).

The encoder owns a table of relative-position embeddings ([2k, d], layer-normed) that every
layer's attention projects with its query/key projections and then repeats to the batch. The
repeat sums the examples' gradients, so neither the projections' nor the table's per-example
gradients survive it. Here the table is made per example where it is read: the encoder's
get_rel_embedding takes the generic path with the table (and its LayerNorm) absorbed, so its
output is the table expanded to [B, 2k, d] (a broadcast: no copy) with per-example gradients;
each attention projects that per-example table with its bk Linear layers (a second use of the
same weights, with its cross term) and uses the [B*H, 2k, hd] result where the original repeats.
The attention scores are the same values; only the gradients stay apart.

DeBERTa (v1) is the same, with its own position projections (pos_proj, pos_q_proj) on the table
and two bias Parameters of its own (q_bias, v_bias) added to the query and value heads: its
forward is transformers' with those adds book-kept (example b's bias gradient sums its output
gradient over b's positions), so the attention needs no per-example recompute.
"""
import sys

import torch

from ._core import BKLayer, in_plain_forward
from .layer_scale import shift
from ._made import made_class
from .families import register_layer
from .generic import generic_class
from .attention import _OneMethodOnGenericPath


def _four_dims(relative_pos):
    """[q, k] or [B, q, k] relative positions as [B or 1, 1, q, k] (transformers' own check)."""
    if relative_pos.dim() == 2:
        return relative_pos.unsqueeze(0).unsqueeze(0)
    if relative_pos.dim() == 3:
        return relative_pos.unsqueeze(1)
    if relative_pos.dim() != 4:
        raise ValueError(f"Relative position ids must be of dim 2 or 3 or 4. {relative_pos.dim()}")
    return relative_pos


class _RelEmbeddingOwner(_OneMethodOnGenericPath):
    """DebertaV2Encoder: get_rel_embedding() reads its rel_embeddings table (and LayerNorm)."""

    def get_rel_embedding(self, *args, **kwargs):
        return self._bk_generic_call("get_rel_embedding", *args, **kwargs)

    def _bk_output_layout(self, t, dim, B, any_batched_input, fold_sizes=()):
        return "shared"  # made from no example: expanded to the batch, at B = 1 too


class _PerExampleTableAttention(BKLayer):
    """DisentangledSelfAttention whose relative-position table comes per example ([B, 2k, d])."""

    _bk_swap_without_parameters = True  # its Parameters are its children's (bk Linear layers)

    def disentangled_attention_bias(self, query_layer, key_layer, relative_pos, rel_embeddings, scale_factor):
        if rel_embeddings is not None and rel_embeddings.dim() == 2 and self._bk_layout() is not None:
            # a frozen table (the encoder's get_rel_embedding stays as it is): made per example here
            rel_embeddings = rel_embeddings.unsqueeze(0).expand(query_layer.size(0) // self.num_attention_heads,
                                                                -1, -1)
        if rel_embeddings is None or rel_embeddings.dim() != 3:  # plain forward: the shared table
            return super().disentangled_attention_bias(query_layer, key_layer, relative_pos, rel_embeddings,
                                                       scale_factor)
        helpers = sys.modules[self._bk_transformers_module]  # its relative-position functions
        if relative_pos is None:
            relative_pos = self._bk_relative_positions(helpers, query_layer, key_layer)
        relative_pos = _four_dims(relative_pos)
        span = self.pos_ebd_size
        relative_pos = relative_pos.to(device=query_layer.device, dtype=torch.long)
        table = rel_embeddings[:, : span * 2]  # [B, 2k, d]: each example's own (equal) table

        def heads(projection):  # [B * heads, 2k, head_dim]: the original's repeat, example by example
            return self.transpose_for_scores(projection(table), self.num_attention_heads)

        score = 0
        if "c2p" in self.pos_att_type:
            pos_key = heads(self.key_proj if self.share_att_key else self.pos_key_proj)
            scale = self._bk_scale(helpers, pos_key, scale_factor)
            c2p = torch.bmm(query_layer, pos_key.transpose(-1, -2))
            c2p_pos = torch.clamp(relative_pos + span, 0, span * 2 - 1)
            c2p = torch.gather(c2p, dim=-1, index=c2p_pos.squeeze(0).expand(
                [query_layer.size(0), query_layer.size(1), relative_pos.size(-1)]))
            score += c2p / scale.to(dtype=c2p.dtype)
        if "p2c" in self.pos_att_type:
            pos_query = heads(self.query_proj if self.share_att_key else self.pos_query_proj)
            scale = self._bk_scale(helpers, pos_query, scale_factor)
            r_pos = self._bk_key_relative_positions(helpers, query_layer, key_layer, relative_pos)
            p2c_pos = torch.clamp(-r_pos + span, 0, span * 2 - 1)
            p2c = torch.bmm(key_layer, pos_query.transpose(-1, -2))
            p2c = torch.gather(p2c, dim=-1, index=p2c_pos.squeeze(0).expand(
                [query_layer.size(0), key_layer.size(-2), key_layer.size(-2)])).transpose(-1, -2)
            score += p2c / scale.to(dtype=p2c.dtype)
        return score

    # transformers' helpers, as DebertaV2's DisentangledSelfAttention calls them
    def _bk_relative_positions(self, helpers, query_layer, key_layer):
        return helpers.build_relative_position(query_layer, key_layer, bucket_size=self.position_buckets,
                                               max_position=self.max_relative_positions)

    def _bk_scale(self, helpers, layer, scale_factor):
        return helpers.scaled_size_sqrt(layer, scale_factor)

    def _bk_key_relative_positions(self, helpers, query_layer, key_layer, relative_pos):
        # the argument order of transformers' own call (its build_rpos names them the other way)
        return helpers.build_rpos(query_layer, key_layer, relative_pos, self.max_relative_positions,
                                  self.position_buckets)


class _SEWDPerExampleTableAttention(_PerExampleTableAttention):
    """SEW-D's DisentangledSelfAttention: DeBERTa-v2's, from an older transformers (sizes, not
    layers, to build_relative_position; the scale computed inline; r_pos the query's unless the
    key is longer)."""

    def _bk_relative_positions(self, helpers, query_layer, key_layer):
        return helpers.build_relative_position(query_layer.size(-2), key_layer.size(-2),
                                               bucket_size=self.position_buckets,
                                               max_position=self.max_relative_positions, device=query_layer.device)

    def _bk_scale(self, helpers, layer, scale_factor):
        return torch.sqrt(torch.tensor(layer.size(-1), dtype=torch.float) * scale_factor)

    def _bk_key_relative_positions(self, helpers, query_layer, key_layer, relative_pos):
        if key_layer.size(-2) == query_layer.size(-2):
            return relative_pos
        return helpers.build_relative_position(key_layer.size(-2), key_layer.size(-2),
                                               bucket_size=self.position_buckets,
                                               max_position=self.max_relative_positions,
                                               device=query_layer.device).unsqueeze(0)


class _V1Attention(BKLayer):
    """DeBERTa (v1)'s DisentangledSelfAttention: transformers' forward, with q_bias and v_bias
    added by bk's shift and the position projections run on a per-example table."""

    def forward(self, hidden_states, attention_mask, output_attentions=False, query_states=None, relative_pos=None,
                rel_embeddings=None):
        if in_plain_forward() or self._bk_layout() is None:
            return super().forward(hidden_states, attention_mask, output_attentions, query_states, relative_pos,
                                   rel_embeddings)
        if query_states is not None:  # DeBERTa's z_steps > 1
            raise self._bk_layout_error(query_states, 0, why=(
                "query_states (config.z_steps > 1) multiplies by in_proj's weight read as a value, which bk cannot "
                "book-keep; not supported. Nothing was recorded and no budget was spent."))
        helpers = sys.modules[self._bk_transformers_module]
        query_layer, key_layer, value_layer = self.transpose_for_scores(self.in_proj(hidden_states)).chunk(3, dim=-1)
        query_layer = self._bk_add_bias(query_layer, self.q_bias)
        value_layer = self._bk_add_bias(value_layer, self.v_bias)
        scale_factor = 1 + len(self.pos_att_type)
        scale = helpers.scaled_size_sqrt(query_layer, scale_factor)
        query_layer = query_layer / scale.to(dtype=query_layer.dtype)
        attention_scores = torch.matmul(query_layer, key_layer.transpose(-1, -2))
        if self.relative_attention and rel_embeddings is not None and relative_pos is not None:
            if rel_embeddings.dim() == 2:  # a frozen table (get_rel_embedding stays as it is): per example here
                rel_embeddings = rel_embeddings.unsqueeze(0).expand(query_layer.shape[0], -1, -1)
            rel_embeddings = self.pos_dropout(rel_embeddings)
            attention_scores = attention_scores + self._bk_relative_scores(
                helpers, query_layer, key_layer, relative_pos, rel_embeddings, scale_factor)
        if self.head_logits_proj is not None:
            attention_scores = self.head_logits_proj(attention_scores.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        attention_scores = attention_scores.masked_fill(~attention_mask.bool(), torch.finfo(query_layer.dtype).min)
        attention_probs = self.dropout(torch.nn.functional.softmax(attention_scores, dim=-1))
        if self.head_weights_proj is not None:
            attention_probs = self.head_weights_proj(attention_probs.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        context_layer = torch.matmul(attention_probs, value_layer).permute(0, 2, 1, 3).contiguous()
        context_layer = context_layer.view(context_layer.size()[:-2] + (-1,))
        return (context_layer, attention_probs if output_attentions else None)

    def _bk_add_bias(self, heads, bias):
        """heads [B, H, T, hd] + bias [H * hd] (as transformers' transpose_for_scores lays it out)."""
        return shift(self, heads, bias, (1, self.num_attention_heads, 1, -1))

    def _bk_relative_scores(self, helpers, query_layer, key_layer, relative_pos, rel_embeddings, scale_factor):
        """transformers' disentangled_att_bias on the per-example table [B, 2k, d]."""
        relative_pos = _four_dims(relative_pos)
        span = helpers.compute_attention_span(query_layer, key_layer, self.max_relative_positions)
        relative_pos = relative_pos.long()
        table = rel_embeddings[:, self.max_relative_positions - span : self.max_relative_positions + span]
        score = 0
        if "c2p" in self.pos_att_type:
            pos_key = self.transpose_for_scores(self.pos_proj(table))  # [B, H, 2span, hd]
            c2p = torch.matmul(query_layer, pos_key.transpose(-1, -2))
            c2p_pos = torch.clamp(relative_pos + span, 0, span * 2 - 1)
            score += torch.gather(c2p, dim=-1, index=helpers.c2p_dynamic_expand(c2p_pos, query_layer, relative_pos))
        if "p2c" in self.pos_att_type:
            pos_query = self.transpose_for_scores(self.pos_q_proj(table))
            pos_query = pos_query / helpers.scaled_size_sqrt(pos_query, scale_factor)
            r_pos = helpers.build_rpos(query_layer, key_layer, relative_pos)
            p2c_pos = torch.clamp(-r_pos + span, 0, span * 2 - 1)
            p2c = torch.matmul(key_layer, pos_query.transpose(-1, -2).to(dtype=key_layer.dtype))
            p2c = torch.gather(p2c, dim=-1, index=helpers.p2c_dynamic_expand(p2c_pos, query_layer, key_layer))
            score += helpers.uneven_size_corrected(p2c.transpose(-1, -2), query_layer, key_layer, relative_pos)
        return score


def _is_attention_of(package):
    """transformers' DisentangledSelfAttention of deberta (v1) or deberta_v2, known by name."""
    return lambda cls: cls.__name__ == "DisentangledSelfAttention" and cls.__module__.startswith(
        f"transformers.models.{package}.")


def attention_class(cls, mixin):
    """cls with `mixin` before it: v2's per-example table, or v1's book-kept forward."""
    return made_class(attention_class, (cls, mixin), cls.__name__, (mixin, cls),
                      {"__module__": __name__, "__qualname__": f"{mixin.__name__.strip('_')}_{cls.__name__}",
                       "_bk_transformers_module": cls.__module__})


def _is_deberta_encoder(cls):
    """v2/v3's DebertaV2Encoder, v1's DebertaEncoder, SEW-D's SEWDTransformerEncoder."""
    return cls.__module__.startswith(("transformers.models.deberta_v2.", "transformers.models.deberta.",
                                      "transformers.models.sew_d.")) and \
        callable(getattr(cls, "get_rel_embedding", None))


def _rel_embedding_owner_class(module):
    if not getattr(module, "relative_attention", False):
        return None
    tables = ("rel_embeddings", "LayerNorm") if "layer_norm" in getattr(module, "norm_rel_ebd", []) else \
        ("rel_embeddings",)
    trained = tuple(name for name in tables if any(p.requires_grad for p in getattr(module, name).parameters()))
    return generic_class(type(module), absorb=trained, mixin=_RelEmbeddingOwner) if trained else None


register_layer(None, _rel_embedding_owner_class, matches=_is_deberta_encoder)
register_layer(None, lambda module: attention_class(type(module), _PerExampleTableAttention)
               if getattr(module, "relative_attention", False) else None, matches=_is_attention_of("deberta_v2"))
register_layer(None, lambda module: attention_class(type(module), _V1Attention), matches=_is_attention_of("deberta"))
register_layer(None, lambda module: attention_class(type(module), _SEWDPerExampleTableAttention)
               if getattr(module, "relative_attention", False) else None, matches=_is_attention_of("sew_d"))
