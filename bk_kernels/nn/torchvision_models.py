"""torchvision's classification models whose modules use their own Parameters inline.

Left alone, each of these took the generic path (a recompute per example) or was refused:
- VisionTransformer owns class_token and its Encoder pos_embedding: both roots took the generic
  path, which recomputed THE WHOLE MODEL per example. Here the class token is made per example
  and the positions added by bk.nn.shift; every block stays on the fused path.
- Swin's ShiftedWindowAttention (v1, v2) hands qkv.weight and proj.weight to the functional
  shifted_window_attention: v1 took the generic path (its attention recomputed per example),
  v2 was refused (its cpb_mlp runs on a buffer of coordinates). Here that function is written out
  with qkv and proj as the bk Linear layers they are, on the windows laid out [B, windows * N, C],
  the relative position table (v1) or the absorbed cpb_mlp and the logit scale (v2) through
  attention.py's Functions, as timm's Swin.
- ConvNeXt's CNBlock multiplies by its layer_scale inline (bk.nn.scale here), and its
  LayerNorm2d permutes around F.layer_norm (bk's fused LayerNorm here).
- MaxViT's RelativePositionalMultiHeadAttention adds its relative position table inline
  (_RelativeBiasFn here, one window per grid group).

Each forward is torchvision's (0.29) with only those uses changed; a module whose attributes or
forward signature differ from what is read here keeps the generic path (exact, slower).
"""
import functools
import itertools
import math

import torch
import torch.nn.functional as F

from ._core import BKLayer
from ._made import mixin_class, source_of
from .attention import (_AbsorbingAttention, _active_layout, _add_relative_bias, _add_shared_bias,
                        _add_shift_mask, _continuous_position_bias, _logit_scaled)
from .families import GENERIC, register_layer
from .layer_scale import _TimmLayerNorm2d, class_tokens, positions, scale
from .linear import linear_with


class _VisionTransformer(BKLayer):
    """VisionTransformer.forward with the class token made per example (a shift of zeros)."""

    def forward(self, x):
        if self._bk_bypassed():
            return super().forward(x)
        x = self._process_input(x)
        x = torch.cat((class_tokens(self, x, self.class_token), x), dim=1)
        return self.heads(self.encoder(x)[:, 0])


class _VitEncoder(BKLayer):
    """Encoder.forward with pos_embedding added by a shift."""

    def forward(self, input):
        if self._bk_bypassed():
            return super().forward(input)
        torch._assert(input.dim() == 3, f"Expected (batch_size, seq_length, hidden_dim) got {input.shape}")
        return self.ln(self.layers(self.dropout(positions(self, input, self.pos_embedding))))


class _CNBlock(BKLayer):
    """CNBlock.forward with layer_scale ([C, 1, 1] on NCHW) through bk.nn.scale."""

    def forward(self, input):
        if self._bk_bypassed():
            return super().forward(input)
        return self.stochastic_depth(scale(self, self.block(input), self.layer_scale, 1)) + input



def _shift_mask(x, window_size, shift_size, windows):
    """torchvision's mask of the shifted windows [windows, N, N] for x [B, *padded, C]: -100 between
    positions that the roll brought from different regions (its construction, in 2 or 3 dims)."""
    padded = x.shape[1:-1]
    mask = x.new_zeros(padded)
    slices = [((0, -w), (-w, -s), (-s, None)) for w, s in zip(window_size, shift_size)]
    for count, region in enumerate(itertools.product(*slices)):
        mask[tuple(slice(a, b) for a, b in region)] = count
    mask = mask.view(*(d for p, w in zip(padded, window_size) for d in (p // w, w)))
    dims = len(padded)
    mask = mask.permute(*range(0, 2 * dims, 2), *range(1, 2 * dims, 2)).reshape(windows, -1)
    mask = mask.unsqueeze(1) - mask.unsqueeze(2)
    return mask.masked_fill(mask != 0, float(-100.0)).masked_fill(mask == 0, float(0.0))


def _shifted_window_attention(layer, x, window_size, shift_size, attend):
    """torchvision's shifted_window_attention (2-d) and shifted_window_attention_3d around
    attend(rows, windows, mask), which maps the windows laid out per example, rows
    [B, windows * N, C], to the projected output in the same layout: pad, roll, partition, and
    back. The partition is made here, so each example's windows are its own rows."""
    x = layer._bk_examples(x, 0)
    B, size, C = x.shape[0], x.shape[1:-1], x.shape[-1]
    dims = len(size)
    pads = [(w - s % w) % w for s, w in zip(size, window_size)]
    x = F.pad(x, [0, 0] + [v for pad in reversed(pads) for v in (0, pad)])
    padded = x.shape[1:-1]
    shift_size = [0 if w >= p else s for w, p, s in zip(window_size, padded, shift_size)]
    shifted = sum(shift_size) > 0
    if shifted:
        x = torch.roll(x, shifts=[-s for s in shift_size], dims=tuple(range(1, dims + 1)))
    grid = [p // w for p, w in zip(padded, window_size)]
    windows = math.prod(grid)
    rows = x.view(B, *(d for g, w in zip(grid, window_size) for d in (g, w)), C)
    rows = rows.permute(0, *range(1, 2 * dims, 2), *range(2, 2 * dims + 1, 2), 2 * dims + 1)
    rows = rows.reshape(B, windows * math.prod(window_size), C)
    mask = _shift_mask(x, window_size, shift_size, windows) if shifted else None
    out = attend(rows, windows, mask).view(B, *grid, *window_size, C)
    out = out.permute(0, *(d for i in range(dims) for d in (1 + i, 1 + dims + i)), 2 * dims + 1)
    out = out.reshape(B, *padded, C)
    if shifted:
        out = torch.roll(out, shifts=shift_size, dims=tuple(range(1, dims + 1)))
    return out[(slice(None), *(slice(0, s) for s in size))].contiguous()


class _ShiftedWindowAttention(_AbsorbingAttention):
    """Swin's ShiftedWindowAttention (v1), ShiftedWindowAttentionV2 and ShiftedWindowAttention3d
    (video): torchvision's functional attention written out with qkv and proj as the bk Linears
    they are, on each example's windows [B, windows * N, C]. v2's qkv bias has its key block
    zeroed in every forward (torchvision clones and zeroes it): its key block is computed without
    a bias, so that block of the bias gets the zero gradient it gets in torchvision."""

    _bk_absorb = ()

    def forward(self, x):
        if _active_layout(self) is None:
            return super().forward(x)
        return _shifted_window_attention(self, x, self.window_size, self.shift_size, self._attend)

    def _attend(self, rows, windows, mask):
        B, C, heads = rows.shape[0], rows.shape[-1], self.num_heads
        N = rows.shape[1] // windows
        v2 = hasattr(self, "logit_scale")
        qkv = self._qkv(rows, v2).reshape(B * windows, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if v2:
            attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
            attn = _logit_scaled(self, attn, self.logit_scale, windows)
            attn = _add_shared_bias(self, attn, self.cpb_mlp, windows, self._bk_position_bias)
        else:
            attn = (q * (C // heads) ** -0.5).matmul(k.transpose(-2, -1))
            attn = _add_relative_bias(self, attn, self.relative_position_bias_table, self._bk_position_index(N),
                                      windows)
        if mask is not None:
            attn = _add_shift_mask(attn, mask.to(attn.dtype))
        attn = F.dropout(F.softmax(attn, dim=-1), p=self.attention_dropout, training=self.training)
        out = attn.matmul(v).transpose(1, 2).reshape(B, windows * N, C)
        return F.dropout(self.proj(out), p=self.dropout, training=self.training)

    def _bk_position_index(self, N):
        return self.relative_position_index

    def _qkv(self, rows, v2):
        qkv = self.qkv
        if not v2 or qkv.bias is None:
            return qkv(rows)
        C = qkv.weight.shape[0] // 3  # v2: the key block without its (zeroed) bias
        return torch.cat([linear_with(qkv, rows, qkv.weight, bias, slice(i * C, (i + 1) * C))
                          for i, bias in enumerate((qkv.bias, None, qkv.bias))], dim=-1)

    def _bk_position_bias(self, cpb_mlp):
        return _continuous_position_bias(cpb_mlp, self.relative_coords_table, self.relative_position_index,
                                         self.window_size, self.num_heads)


class _ShiftedWindowAttentionV2(_ShiftedWindowAttention):
    _bk_absorb = ("cpb_mlp",)


class _ShiftedWindowAttention3d(_ShiftedWindowAttention):
    """The video Swin's: a window as large as the input where the input is smaller (torchvision's
    _get_window_and_shift_size), the table's index cut to that window's volume."""

    def forward(self, x):
        if _active_layout(self) is None:
            return super().forward(x)
        window_size, shift_size = list(self.window_size), list(self.shift_size)
        for i, size in enumerate(x.shape[1:4]):
            if size <= window_size[i]:
                window_size[i], shift_size[i] = size, 0
        return _shifted_window_attention(self, x, window_size, shift_size, self._attend)

    def _bk_position_index(self, N):
        return self.relative_position_index[:N, :N].flatten()


class _RelativePositionalMultiHeadAttention(BKLayer):
    """MaxViT's attention on [B, G, P, D] (G windows or grid groups of P positions per example):
    its forward with the relative position table's bias added by _RelativeBiasFn."""

    _bk_swap_without_parameters = True  # a frozen table: to_qkv and merge are still bk layers

    def forward(self, x):
        if _active_layout(self) is None:
            return super().forward(x)
        x = self._bk_examples(x, 0)
        B, G, P, D = x.shape
        H, DH = self.n_heads, self.head_dim
        q, k, v = (t.reshape(B, G, P, H, DH).permute(0, 1, 3, 2, 4) for t in torch.chunk(self.to_qkv(x), 3, dim=-1))
        dot_prod = torch.einsum("B G H I D, B G H J D -> B G H I J", q, k * self.scale_factor)
        dot_prod = _add_relative_bias(self, dot_prod.reshape(B * G, H, P, P), self.relative_position_bias_table,
                                      self.relative_position_index, G)
        dot_prod = F.softmax(dot_prod.view(B, G, H, P, P), dim=-1)
        out = torch.einsum("B G H I J, B G H J D -> B G H I D", dot_prod, v)
        return self.merge(out.permute(0, 1, 3, 2, 4).reshape(B, G, P, D))


@functools.lru_cache(maxsize=None)
def _torchvision_forward_sources():
    """The torchvision (0.29) forwards the mixins above copy, by (module, class)."""
    from torchvision.models import convnext, maxvit, swin_transformer, vision_transformer
    from torchvision.models.video import swin_transformer as video_swin

    classes = (vision_transformer.VisionTransformer, vision_transformer.Encoder, convnext.CNBlock,
               convnext.LayerNorm2d, swin_transformer.ShiftedWindowAttention, swin_transformer.ShiftedWindowAttentionV2,
               video_swin.ShiftedWindowAttention3d, maxvit.RelativePositionalMultiHeadAttention)
    return {(c.__module__, c.__name__): source_of(c.forward) for c in classes}


# (module, class) -> (bk's mixin, the attributes its forward reads, the own Parameters it book-keeps)
_MIXINS = {
    ("torchvision.models.vision_transformer", "VisionTransformer"):
        (_VisionTransformer, ("_process_input", "encoder", "heads"), {"class_token"}),
    ("torchvision.models.vision_transformer", "Encoder"):
        (_VitEncoder, ("layers", "ln", "dropout"), {"pos_embedding"}),
    ("torchvision.models.convnext", "CNBlock"): (_CNBlock, ("block", "stochastic_depth"), {"layer_scale"}),
    ("torchvision.models.convnext", "LayerNorm2d"): (_TimmLayerNorm2d, (), {"weight", "bias"}),
    ("torchvision.models.swin_transformer", "ShiftedWindowAttention"):
        (_ShiftedWindowAttention, ("qkv", "proj", "relative_position_index", "window_size", "shift_size",
                                   "num_heads", "attention_dropout", "dropout"), {"relative_position_bias_table"}),
    ("torchvision.models.swin_transformer", "ShiftedWindowAttentionV2"):
        (_ShiftedWindowAttentionV2, ("qkv", "proj", "cpb_mlp", "relative_coords_table", "relative_position_index",
                                     "window_size", "shift_size", "num_heads", "attention_dropout", "dropout"),
         {"logit_scale"}),
    ("torchvision.models.video.swin_transformer", "ShiftedWindowAttention3d"):
        (_ShiftedWindowAttention3d, ("qkv", "proj", "relative_position_index", "window_size", "shift_size",
                                     "num_heads", "attention_dropout", "dropout"), {"relative_position_bias_table"}),
    ("torchvision.models.maxvit", "RelativePositionalMultiHeadAttention"):
        (_RelativePositionalMultiHeadAttention, ("to_qkv", "merge", "relative_position_index", "n_heads",
                                                 "head_dim", "scale_factor"), {"relative_position_bias_table"}),
}


def _torchvision_class(module):
    """bk's mixin for a torchvision class whose forward is the one its mixin copies (a subclass
    with a forward of its own keeps the generic path), with the attributes read there and no
    other own Parameters; else the generic path where it owns a trained Parameter."""
    cls = type(module)
    key = next(((c.__module__, c.__name__) for c in cls.__mro__ if (c.__module__, c.__name__) in _MIXINS), None)
    mixin, attributes, params = _MIXINS[key]
    own = {name for name, p in module.named_parameters(recurse=False)}
    same_forward = source_of(cls.forward) == _torchvision_forward_sources()[key]
    if same_forward and own <= params and all(hasattr(module, a) for a in attributes):
        return mixin_class(cls, mixin)
    return GENERIC if any(p.requires_grad for p in module.parameters(recurse=False)) else None


register_layer(None, _torchvision_class,
               matches=lambda cls: any((c.__module__, c.__name__) in _MIXINS for c in cls.__mro__))
