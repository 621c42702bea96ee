"""transformers modules that own learned tokens used inline: SigLIP's attention-pooling head,
ViT's embeddings (ViT, ViT-MSN), Perceiver's latents and learned positions.

SiglipMultiheadAttentionPoolingHead repeats its probe ([1, 1, d]) to the batch, attends from it
over the image tokens with an nn.MultiheadAttention (bk's), then a LayerNorm and an MLP. Left
alone, the whole head took the generic path (its attention and MLP recomputed per example, for
the probe's d numbers). Here transformers' forward runs with the probe made per example by a
shift of zeros (example b's gradient: its own query's), so every layer in the head stays on the
fused path. A head whose forward takes other arguments (SigLIP-2's attention mask) keeps the
generic path (exact, slower).

ViTEmbeddings prepends its cls_token (expanded to the batch) to the patch embeddings and adds its
position_embeddings: the module took the generic path, its patch convolution recomputed per
example. Here its forward runs with the class token made per example and the positions added by
bk.nn.shift, the patch convolution a bk Conv2d. A call with bool_masked_pos (the mask token) or
interpolate_pos_encoding takes the generic path, as before.
"""
import functools

import torch

from ._core import BKLayer, in_plain_forward
from ._made import mixin_class, source_of, takes
from .families import GENERIC, register_layer
from .generic import GenericLayer, generic_class
from .layer_scale import class_tokens, per_example, positions


class _ProbePoolingHead(BKLayer):
    """transformers 5's SiglipMultiheadAttentionPoolingHead.forward, the probe per example."""

    def forward(self, hidden_state):
        probe = self.probe
        if in_plain_forward() or self._bk_layout() is None or not probe.requires_grad:
            return super().forward(hidden_state)
        hidden_state = self.attention(class_tokens(self, hidden_state, probe), hidden_state, hidden_state)[0]
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


class _ViTEmbeddings(GenericLayer):
    """transformers 5's ViTEmbeddings.forward, its tokens book-kept by shifts."""

    _bk_generic_only_as_fallback = True  # bk.generic_modules leaves it out: the usual call is fused

    def forward(self, pixel_values, bool_masked_pos=None, interpolate_pos_encoding=False):
        if in_plain_forward() or self._bk_layout() is None or bool_masked_pos is not None or interpolate_pos_encoding:
            return self._bk_generic_call("forward", pixel_values, bool_masked_pos, interpolate_pos_encoding)
        _, _, height, width = pixel_values.shape
        if height != self.image_size[0] or width != self.image_size[1]:
            raise ValueError(f"Input image size ({height}*{width}) doesn't match model"
                             f" ({self.image_size[0]}*{self.image_size[1]}).")
        embeddings = self.patch_embeddings(pixel_values)
        embeddings = torch.cat((class_tokens(self, embeddings, self.cls_token), embeddings), dim=1)
        return self.dropout(positions(self, embeddings, self.position_embeddings))


@functools.lru_cache(maxsize=None)
def _vit_forward_source():
    from transformers.models.vit.modeling_vit import ViTEmbeddings
    return source_of(ViTEmbeddings.forward)


def _vit_embeddings_class(module):
    """_ViTEmbeddings for a class whose forward is ViTEmbeddings' own (ViT-MSN copies it), with
    its own Parameters among cls_token, position_embeddings and mask_token; else the generic path."""
    cls = type(module)
    if not any(p.requires_grad for p in module.parameters(recurse=False)):
        return None
    source = source_of(cls.forward)
    same = bool(source) and source == _vit_forward_source()
    own = {n for n, _ in module.named_parameters(recurse=False)}
    if same and own <= {"cls_token", "position_embeddings", "mask_token"} and \
            {"cls_token", "position_embeddings"} <= own:
        return generic_class(cls, mixin=_ViTEmbeddings)
    return GENERIC


register_layer(None, _vit_embeddings_class,
               matches=lambda cls: cls.__name__ in ("ViTEmbeddings", "ViTMSNEmbeddings")
               and cls.__module__.startswith("transformers.models."))


class _PerBatchExpand(BKLayer):
    """transformers' Perceiver modules that expand one Parameter to the batch from the batch size
    alone: PerceiverEmbeddings' latents, PerceiverTrainablePositionEncoding's positions
    (`forward(batch_size)`). On the generic path each example's recompute returned all B rows
    ([B, B, N, d], a shape error downstream); here the rows are made per example by a shift of
    zeros (example b's gradient: its own row's). A call that interpolates the positions, or for
    another batch size, runs transformers' forward (its expand: ordinary gradients, refused by the
    engine's guard if they reach the Parameter)."""

    def forward(self, batch_size, *args, **kwargs):
        (param,) = self._parameters.values()  # latents or position_embeddings (_per_batch_expand_class)
        layout = self._bk_layout()
        interpolate = kwargs.get("interpolate_pos_encoding", args[0] if args else False)
        if in_plain_forward() or layout is None or not param.requires_grad or batch_size != layout.batch or \
                interpolate:
            return super().forward(batch_size, *args, **kwargs)
        return per_example(self, param, batch_size)


def _per_batch_expand_class(module):
    own = [name for name, p in module.named_parameters(recurse=False)]
    name = {"PerceiverEmbeddings": "latents", "PerceiverTrainablePositionEncoding": "position_embeddings"}.get(
        type(module).__name__)
    if own != [name] or not takes(type(module), "forward", ["batch_size"] if name == "latents" else
                                  ["batch_size", "interpolate_pos_encoding", "input_size"]):
        return GENERIC if own else None
    return mixin_class(type(module), _PerBatchExpand)


register_layer(None, _per_batch_expand_class,
               matches=lambda cls: cls.__name__ in ("PerceiverEmbeddings", "PerceiverTrainablePositionEncoding")
               and cls.__module__.startswith("transformers.models."))
