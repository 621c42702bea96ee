"""bk.nn LayerNorm, RMSNorm, GroupNorm and InstanceNorm1d/2d/3d (affine).

Their per-example parameter gradients are small ([B, C]): the backward forms them in one pass
(ops.norm_layer_grads: sum_t xhat*g and sum_t g) and keeps only those, not xhat or g.
Normalisation is computed in float32 for 16-bit inputs (as torch does) and float64 for float64.
"""
import math

import torch

from .. import ops
from ..ops._norm_common import accumulation_dtype
from ._core import BKLayer, examples_first
from ._uses import DenseUse


class _AffineNormFn(torch.autograd.Function):
    """y = xhat * weight + bias, xhat = layer._bk_normalize(x)."""

    @staticmethod
    def forward(ctx, x, weight, bias, layer):
        ctx.layer, ctx.weight, ctx.bias = layer, weight, bias
        xa = x.to(accumulation_dtype(x.dtype))
        xhat, stats = layer._bk_normalize(xa)
        ctx.save_for_backward(xa, *stats)  # the input and its statistics; xhat is rebuilt in the backward
        y = xhat * layer._bk_broadcast(weight, x) if weight is not None else xhat
        if bias is not None:
            y = y + layer._bk_broadcast(bias, x)
        ctx.in_dtype, ctx.x_shape = x.dtype, x.shape
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        xa, *stats = ctx.saved_tensors
        layer, weight, bias = ctx.layer, ctx.weight, ctx.bias
        g = g.to(xa.dtype)
        xhat = layer._bk_xhat(xa, stats)
        grad_x = None
        if ctx.needs_input_grad[0]:
            w = weight.to(xa.dtype) if weight is not None else None
            grad_x = layer._bk_grad_input(g, xa, xhat, stats, w).to(ctx.in_dtype).reshape(ctx.x_shape)
        trainable_w = weight is not None and weight.requires_grad
        trainable_b = bias is not None and bias.requires_grad
        if not (trainable_w or trainable_b):
            return grad_x, None, None, None
        gw, gb, _ = ops.norm_layer_grads(layer._bk_channels_last(xhat), layer._bk_channels_last(g), trainable_b,
                                         backend=layer._bk_engine.backend if layer._bk_engine else "auto")
        uses = []
        if trainable_w:
            uses.append((weight, DenseUse(gw.view(-1, *weight.shape))))
        if trainable_b:
            uses.append((bias, DenseUse(gb.view(-1, *bias.shape))))
        if layer._bk_hand_off(uses):
            return grad_x, None, None, None
        grad_w = gw.sum(0).view(weight.shape).to(weight.dtype) if trainable_w else None
        grad_b = gb.sum(0).view(bias.shape).to(bias.dtype) if trainable_b else None
        return grad_x, grad_w, grad_b, None


def _rms_backward(xhat, rstd, g_xhat, dims):
    """d loss / d x for xhat = x * rstd, rstd = 1 / rms(x) over `dims` (RMSNorm; the centered
    norms use torch's fused backward)."""
    return rstd * (g_xhat - xhat * (g_xhat * xhat).mean(dims, keepdim=True))


class _LastDimsNorm(BKLayer):
    """Normalises over the trailing `normalized_shape` dims (LayerNorm, RMSNorm)."""

    _bk_centered = True

    def _bk_dims(self, x):
        return tuple(range(x.dim() - len(self.normalized_shape), x.dim()))

    def _bk_eps(self, x):
        return self.eps

    def _bk_normalize(self, x):
        """(xhat, stats): torch's fused layer norm for LayerNorm; RMSNorm in plain ops."""
        if self._bk_centered:
            xhat, mean, rstd = torch.native_layer_norm(x, self.normalized_shape, None, None, self._bk_eps(x))
            return xhat, (mean, rstd)
        rstd = torch.rsqrt(x.square().mean(self._bk_dims(x), keepdim=True) + self._bk_eps(x))
        return x * rstd, (rstd,)

    def _bk_xhat(self, x, stats):
        return (x - stats[0]) * stats[1] if self._bk_centered else x * stats[0]

    def _bk_grad_input(self, g, x, xhat, stats, weight):
        if self._bk_centered:
            return torch.ops.aten.native_layer_norm_backward(g, x, self.normalized_shape, stats[0], stats[1], weight,
                                                             None, [True, False, False])[0]
        g_xhat = g * weight if weight is not None else g
        return _rms_backward(xhat, stats[0], g_xhat, self._bk_dims(xhat))

    def _bk_broadcast(self, param, x):
        return param.to(x.dtype) if x.is_floating_point() else param

    def _bk_channels_last(self, t):
        return examples_first(t, features_dims=len(self.normalized_shape))


class LayerNorm(_LastDimsNorm, torch.nn.LayerNorm):
    def forward(self, x):
        return _AffineNormFn.apply(x, self.weight, self.bias, self)


class RMSNorm(_LastDimsNorm, torch.nn.RMSNorm):
    _bk_centered = False

    def _bk_eps(self, x):
        return self.eps if self.eps is not None else torch.finfo(x.dtype).eps

    def forward(self, x):
        return _AffineNormFn.apply(x, self.weight, None, self)


class _ChannelGroupNorm(BKLayer):
    """Normalises [N, C, *] over groups of channels and all positions (GroupNorm, InstanceNorm)."""

    def _bk_groups(self):
        return self.num_groups

    def _bk_batched(self, x):
        return x

    def _bk_sizes(self, x):
        return x.shape[0], x.shape[1], math.prod(x.shape[2:]), self._bk_groups()

    def _bk_normalize(self, x):
        """(xhat, (mean, rstd) [N, G]) by torch's fused group norm."""
        x = self._bk_batched(x)
        xhat, mean, rstd = torch.native_group_norm(x, None, None, *self._bk_sizes(x), self.eps)
        return xhat, (mean, rstd)

    def _bk_xhat(self, x, stats):
        x = self._bk_batched(x)
        mean, rstd = stats
        return ((self._bk_grouped(x) - mean[..., None]) * rstd[..., None]).view(x.shape)

    def _bk_grad_input(self, g, x, xhat, stats, weight):
        x, g = self._bk_batched(x), self._bk_batched(g)
        return torch.ops.aten.native_group_norm_backward(g.contiguous(), x, *stats, weight, *self._bk_sizes(x),
                                                         [True, False, False])[0]

    def _bk_grouped(self, t):
        # [N, G, C/G * positions]; sizes spelled out (no -1) so that a batch of 0 examples reshapes too
        G = self._bk_groups()
        return t.reshape(t.shape[0], G, t.shape[1] // G * math.prod(t.shape[2:]))

    def _bk_broadcast(self, param, x):
        x = self._bk_batched(x)
        return param.to(x.dtype).view(1, -1, *([1] * (x.dim() - 2)))

    def _bk_channels_last(self, t):
        t = self._bk_batched(t)
        return t.reshape(t.shape[0], t.shape[1], math.prod(t.shape[2:])).transpose(1, 2)  # [N, positions, C], a view


class GroupNorm(_ChannelGroupNorm, torch.nn.GroupNorm):
    def forward(self, x):
        return _AffineNormFn.apply(x, self.weight, self.bias, self)


class _InstanceNormMixin(_ChannelGroupNorm):
    """InstanceNorm = GroupNorm with one channel per group (affine, no running statistics)."""

    def _bk_groups(self):
        return self.num_features

    def _bk_batched(self, x):
        return x.unsqueeze(0) if x.dim() == self._get_no_batch_dim() else x

    def forward(self, x):
        y = _AffineNormFn.apply(x, self.weight, self.bias, self)
        return y.squeeze(0) if x.dim() == self._get_no_batch_dim() else y


class InstanceNorm1d(_InstanceNormMixin, torch.nn.InstanceNorm1d):
    pass


class InstanceNorm2d(_InstanceNormMixin, torch.nn.InstanceNorm2d):
    pass


class InstanceNorm3d(_InstanceNormMixin, torch.nn.InstanceNorm3d):
    pass


def instance_norm_unsupported_reason(module):
    if module.track_running_stats:
        return ("track_running_stats=True keeps batch statistics across examples; use "
                "track_running_stats=False (the default) or GroupNorm")
    return None
