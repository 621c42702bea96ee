"""transformers' speech encoders: the SpecAugment mask embedding of wav2vec2 and its copies
(HuBERT, WavLM, UniSpeech, SEW, Data2Vec-audio, wav2vec2-conformer/-bert), WavLM's attention and
the conformers' relative positions.

SpecAugment: the model root owns masked_spec_embed, written into the time steps that
_mask_hidden_states draws at random in training (`hidden_states[mask] = masked_spec_embed`, with
numpy's generator) when config.mask_time_prob > 0, as in the pretrained checkpoints. Left alone
the root took the generic path: the WHOLE model recomputed per example, and refused, since the
recompute draws other masks. Here only that method is rewritten, out of place and with the same
draws: each example's masked rows take the vector through bk.nn.shift (example b's gradient: its
output gradient summed over its masked rows), the feature mask zeroes columns as before.

WavLMAttention: its forward gates a relative position bias per head and per position
(gru_rel_pos_linear on the hidden states, its own gru_rel_pos_const scaling one gate), then
hands its q/k/v/out_proj weights to F.multi_head_attention_forward itself. The first layer looks the bias up in its
rel_attn_embed table with [T, T] buckets that hold no examples and repeats it to the batch; the
later layers get that [B * H, T, T] bias passed down.

Left alone the module took the generic path without its projections (it reads their weights
in a helper method, not in forward): refused at the backward. Here the forward is
transformers' arithmetic with every Parameter book-kept: the projections called as bk
Linears on [B, T, d] (F.multi_head_attention_forward's order of operations, batch first), the
table looked up with the buckets expanded to the batch ([B, T, T] ids: each example's lookup
its own, no copy), gru_rel_pos_const through bk.nn.scale. No per-example recompute.
"""

import torch
import torch.nn.functional as F

from ._core import BKLayer, in_plain_forward
from ._made import library_module, mixin_class, source_of
from .families import GENERIC, register_layer
from .layer_scale import per_example, scale


class _SpecAugmentOwner(BKLayer):
    """A speech model root whose own Parameter masked_spec_embed is used only in
    _mask_hidden_states: that method (transformers 5's, copied in every family) book-kept."""

    def _mask_hidden_states(self, hidden_states, mask_time_indices=None, attention_mask=None):
        embed = self.masked_spec_embed
        if in_plain_forward() or self._bk_layout() is None or not embed.requires_grad:
            return super()._mask_hidden_states(hidden_states, mask_time_indices, attention_mask)
        config = self.config
        if not getattr(config, "apply_spec_augment", True):
            return hidden_states
        batch_size, sequence_length, hidden_size = hidden_states.size()
        draw = library_module(type(self))._compute_mask_indices  # numpy's draws, as transformers makes them
        if mask_time_indices is None and config.mask_time_prob > 0 and self.training:
            mask_time_indices = torch.tensor(draw((batch_size, sequence_length), mask_prob=config.mask_time_prob,
                                                  mask_length=config.mask_time_length, attention_mask=attention_mask,
                                                  min_masks=config.mask_time_min_masks),
                                             device=hidden_states.device, dtype=torch.bool)
        if mask_time_indices is not None:
            copies = per_example(self, embed, batch_size)[:, None].to(hidden_states.dtype)  # [B, 1, C]
            hidden_states = torch.where(mask_time_indices.bool()[..., None], copies, hidden_states)
        if config.mask_feature_prob > 0 and self.training:
            mask_feature_indices = torch.tensor(draw((batch_size, hidden_size), mask_prob=config.mask_feature_prob,
                                                     mask_length=config.mask_feature_length,
                                                     min_masks=config.mask_feature_min_masks),
                                                device=hidden_states.device, dtype=torch.bool)
            hidden_states = hidden_states.masked_fill(mask_feature_indices[:, None], 0)
        return hidden_states


def _is_spec_augment_owner(cls):
    return cls.__module__.startswith("transformers.models.") and callable(getattr(cls, "_mask_hidden_states", None))


def _spec_augment_owner_class(module):
    """_SpecAugmentOwner when masked_spec_embed is the module's only trained Parameter of its own and
    its class reads it in _mask_hidden_states as transformers 5 does, and nowhere else; else the
    generic path, as for any module owning a Parameter."""
    own = [name for name, p in module.named_parameters(recurse=False) if p.requires_grad]
    if not own:
        return None
    cls = type(module)
    method = source_of(cls._mask_hidden_states)
    others = "".join(source_of(fn) for name, fn in vars(cls).items() if callable(fn) and name != "_mask_hidden_states")
    if own == ["masked_spec_embed"] and "hidden_states[mask_time_indices] = self.masked_spec_embed" in method and \
            "masked_spec_embed" not in others.replace("self.masked_spec_embed = nn.Parameter", ""):
        return mixin_class(cls, _SpecAugmentOwner)
    return GENERIC


class _WavLMAttention(BKLayer):

    _bk_swap_without_parameters = True  # gru_rel_pos_const frozen: its projections still need this forward

    def forward(self, hidden_states, attention_mask=None, position_bias=None, index=0, **kwargs):
        if in_plain_forward() or self._bk_layout() is None:
            return super().forward(hidden_states, attention_mask, position_bias, index, **kwargs)
        bsz, length, _ = hidden_states.size()
        heads, head_dim = self.num_heads, self.head_dim
        if position_bias is None:  # transformers' compute_bias, each example's lookup its own
            positions = torch.arange(length, dtype=torch.long, device=self.rel_attn_embed.weight.device)
            buckets = self._relative_positions_bucket(positions[None, :] - positions[:, None])
            values = self.rel_attn_embed(buckets.expand(bsz, length, length))  # [B, T, T, H]
            position_bias = values.permute(0, 3, 1, 2).reshape(bsz * heads, length, length)
        gated_hidden_states = hidden_states.view(bsz, length, heads, -1).permute(0, 2, 1, 3)
        relative_position_proj = self.gru_rel_pos_linear(gated_hidden_states)
        relative_position_proj = relative_position_proj.view(gated_hidden_states.shape[:-1] + (2, 4)).sum(-1)
        gate_a, gate_b = torch.sigmoid(relative_position_proj).chunk(2, dim=-1)
        gate_output = gate_a * (scale(self, gate_b, self.gru_rel_pos_const, dim=1) - 1.0) + 2.0
        gated_position_bias = (gate_output.view(bsz * heads, -1, 1) * position_bias).view(-1, length, length)

        def split(projection):  # [B * H, T, head_dim], row b * H + h as F.multi_head_attention_forward's
            return projection(hidden_states).view(bsz, length, heads, head_dim).transpose(1, 2).reshape(
                bsz * heads, length, head_dim)

        q, k, v = split(self.q_proj), split(self.k_proj), split(self.v_proj)
        mask = gated_position_bias
        if attention_mask is not None:  # key_padding_mask: padded keys to -inf
            padded = attention_mask.ne(1)[:, None, None, :]
            mask = mask.view(bsz, heads, length, length).masked_fill(padded, float("-inf")).view(
                bsz * heads, length, length)
        weights = torch.baddbmm(mask, q * (1.0 / head_dim) ** 0.5, k.transpose(-2, -1))
        weights = F.dropout(torch.softmax(weights, dim=-1), p=self.dropout, training=self.training)
        out = torch.bmm(weights, v).view(bsz, heads, length, head_dim).transpose(1, 2).reshape(bsz, length, -1)
        out = self.out_proj(out)
        attn_weights = weights.view(bsz, heads, length, length).mean(dim=1)[:, None].broadcast_to(
            bsz, heads, length, length)  # averaged over the heads, as transformers returns them
        return out, attn_weights, position_bias


class _PerExampleRelativePositions(BKLayer):
    """The conformers' relative positional embedding (wav2vec2-conformer, w2v-BERT, SeamlessM4T):
    its [1, 2T-1, d] slice of a sinusoid table goes to every attention's linear_pos, whose output
    is then viewed with the table's own leading dims. bk's Linear expands a batch-1 input to the
    batch, which broke that view; here the table is expanded to [B, 2T-1, d] first (a
    broadcast, no copy), so the projections and their per-example gradients are each example's."""

    _bk_swap_without_parameters = True

    def forward(self, hidden_states):
        positions = super().forward(hidden_states)
        if in_plain_forward() or self._bk_layout() is None or positions.dim() != 3 or positions.shape[0] != 1:
            return positions
        return positions.expand(hidden_states.shape[0], -1, -1)


def _is_conformer_relative_positions(cls):
    return cls.__name__.endswith("RelPositionalEmbedding") and cls.__module__.startswith("transformers.models.") \
        and any(part in cls.__module__ for part in ("wav2vec2_conformer", "wav2vec2_bert", "seamless_m4t"))


def _is_wavlm_attention(cls):
    return cls.__name__ == "WavLMAttention" and cls.__module__.startswith("transformers.models.")


register_layer(None, lambda module: mixin_class(type(module), _WavLMAttention), matches=_is_wavlm_attention)
register_layer(None, _spec_augment_owner_class, matches=_is_spec_augment_owner)
register_layer(None, lambda module: mixin_class(type(module), _PerExampleRelativePositions),
               matches=_is_conformer_relative_positions)
