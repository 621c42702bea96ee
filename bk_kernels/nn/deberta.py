"""DeBERTa-v2/v3's relative attention (transformers' DebertaV2Encoder and DisentangledSelfAttention).

The encoder owns a table of relative-position embeddings ([2k, d], layer-normed) that every
layer's attention projects with its query/key projections and then repeats to the batch. The
repeat sums the examples' gradients, so neither the projections' nor the table's per-example
gradients survive it. Here the table is made per example where it is read: the encoder's
get_rel_embedding takes the generic path with the table (and its LayerNorm) absorbed, so its
output is the table expanded to [B, 2k, d] (a broadcast: no copy) with per-example gradients;
each attention projects that per-example table with its bk Linear layers (a second use of the
same weights, with its cross term) and uses the [B*H, 2k, hd] result where the original repeats.
The attention scores are the same values; only the gradients stay apart.
"""
import sys

import torch

from ._core import BKLayer
from ._made import made_class
from .families import register_layer
from .generic import generic_class
from .attention import _OneMethodOnGenericPath


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
            relative_pos = helpers.build_relative_position(query_layer, key_layer, bucket_size=self.position_buckets,
                                                           max_position=self.max_relative_positions)
        if relative_pos.dim() == 2:
            relative_pos = relative_pos.unsqueeze(0).unsqueeze(0)
        elif relative_pos.dim() == 3:
            relative_pos = relative_pos.unsqueeze(1)
        elif relative_pos.dim() != 4:
            raise ValueError(f"Relative position ids must be of dim 2 or 3 or 4. {relative_pos.dim()}")
        span = self.pos_ebd_size
        relative_pos = relative_pos.to(device=query_layer.device, dtype=torch.long)
        table = rel_embeddings[:, : span * 2]  # [B, 2k, d]: each example's own (equal) table

        def heads(projection):  # [B * heads, 2k, head_dim]: the original's repeat, example by example
            return self.transpose_for_scores(projection(table), self.num_attention_heads)

        score = 0
        if "c2p" in self.pos_att_type:
            pos_key = heads(self.key_proj if self.share_att_key else self.pos_key_proj)
            scale = helpers.scaled_size_sqrt(pos_key, scale_factor)
            c2p = torch.bmm(query_layer, pos_key.transpose(-1, -2))
            c2p_pos = torch.clamp(relative_pos + span, 0, span * 2 - 1)
            c2p = torch.gather(c2p, dim=-1, index=c2p_pos.squeeze(0).expand(
                [query_layer.size(0), query_layer.size(1), relative_pos.size(-1)]))
            score += c2p / scale.to(dtype=c2p.dtype)
        if "p2c" in self.pos_att_type:
            pos_query = heads(self.query_proj if self.share_att_key else self.pos_query_proj)
            scale = helpers.scaled_size_sqrt(pos_query, scale_factor)
            # the argument order of transformers' own call (its build_rpos names them the other way)
            r_pos = helpers.build_rpos(query_layer, key_layer, relative_pos, self.max_relative_positions,
                                       self.position_buckets)
            p2c_pos = torch.clamp(-r_pos + span, 0, span * 2 - 1)
            p2c = torch.bmm(key_layer, pos_query.transpose(-1, -2))
            p2c = torch.gather(p2c, dim=-1, index=p2c_pos.squeeze(0).expand(
                [query_layer.size(0), key_layer.size(-2), key_layer.size(-2)])).transpose(-1, -2)
            score += p2c / scale.to(dtype=p2c.dtype)
        return score


def _is_deberta_v2_encoder(cls):
    return cls.__module__.startswith("transformers.models.deberta_v2.") and callable(
        getattr(cls, "get_rel_embedding", None))


def _rel_embedding_owner_class(module):
    if not getattr(module, "relative_attention", False):
        return None
    tables = ("rel_embeddings", "LayerNorm") if "layer_norm" in getattr(module, "norm_rel_ebd", []) else \
        ("rel_embeddings",)
    trained = tuple(name for name in tables if any(p.requires_grad for p in getattr(module, name).parameters()))
    return generic_class(type(module), absorb=trained, mixin=_RelEmbeddingOwner) if trained else None


def _is_deberta_v2_attention(cls):
    return cls.__name__ == "DisentangledSelfAttention" and cls.__module__.startswith("transformers.models.deberta_v2.")


def per_example_table_class(cls):
    return made_class(per_example_table_class, (cls,), cls.__name__, (_PerExampleTableAttention, cls),
                      {"__module__": __name__, "__qualname__": "PerExampleTable_" + cls.__name__,
                       "_bk_transformers_module": cls.__module__})


register_layer(None, _rel_embedding_owner_class, matches=_is_deberta_v2_encoder)
register_layer(None, lambda module: per_example_table_class(type(module))
               if getattr(module, "relative_attention", False) else None, matches=_is_deberta_v2_attention)
