"""transformers modules that own a learned query token used inline: SigLIP's attention-pooling head.

SiglipMultiheadAttentionPoolingHead repeats its probe ([1, 1, d]) to the batch, attends from it
over the image tokens with an nn.MultiheadAttention (bk's), then a LayerNorm and an MLP. Left
alone, the whole head took the generic path (its attention and MLP recomputed per example, for
the probe's d numbers). Here transformers' forward runs with the probe made per example by a
shift of zeros (example b's gradient: its own query's), so every layer in the head stays on the
fused path. A head whose forward takes other arguments (SigLIP-2's attention mask) keeps the
generic path (exact, slower).
"""
from ._core import BKLayer, in_plain_forward
from ._made import mixin_class, takes
from .families import GENERIC, register_layer
from .layer_scale import shift


class _ProbePoolingHead(BKLayer):
    """transformers 5's SiglipMultiheadAttentionPoolingHead.forward, the probe per example."""

    def forward(self, hidden_state):
        probe = self.probe
        if in_plain_forward() or self._bk_layout() is None or not probe.requires_grad:
            return super().forward(hidden_state)
        batch_size = hidden_state.shape[0]
        probe = shift(self, hidden_state.new_zeros(batch_size, *probe.shape[1:], dtype=probe.dtype), probe,
                      (1, *probe.shape[1:]))
        hidden_state = self.attention(probe, hidden_state, hidden_state)[0]
        residual = hidden_state
        hidden_state = self.layernorm(hidden_state)
        hidden_state = residual + self.mlp(hidden_state)
        return hidden_state[:, 0]


def _probe_pooling_head_class(module):
    own = [name for name, p in module.named_parameters(recurse=False) if p.requires_grad]
    if own == ["probe"] and takes(type(module), "forward", ["hidden_state"]):
        return mixin_class(type(module), _ProbePoolingHead)
    return GENERIC if own else None


register_layer(None, _probe_pooling_head_class,
               matches=lambda cls: cls.__name__ == "SiglipMultiheadAttentionPoolingHead"
               and cls.__module__.startswith("transformers.models."))
