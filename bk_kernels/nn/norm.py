"""bk.nn LayerNorm, RMSNorm, GroupNorm and InstanceNorm1d/2d/3d (affine).

Their per-example parameter gradients are small ([B, C]): the backward forms them in one pass
(ops.norm_layer_grads: sum_t xhat*g and sum_t g) and keeps only those, not xhat or g.
Normalisation is computed in float32 for 16-bit inputs (as torch does) and float64 for float64.
"""
import functools
import math
import warnings

import torch

from .. import ops
from ..ops._norm_common import accumulation_dtype
from ._core import BKLayer, examples_first, in_plain_forward
from ._uses import DenseUse
from .families import register_layer


class _AffineNormFn(torch.autograd.Function):
    """y = xhat * weight + bias, xhat = layer._bk_normalize(x)."""

    @staticmethod
    def forward(ctx, x, weight, bias, layer, batch_dim=0):
        ctx.layer, ctx.weight, ctx.bias, ctx.batch_dim = layer, weight, bias, batch_dim
        # row r of the output (dim 0) is a function of row r of x alone: a fold of rows stays one (folded_rows)
        ctx._bk_row_wise_input = (0, x.numel())
        xa = x.to(accumulation_dtype(x.dtype))
        cast = lambda t: t.to(xa.dtype) if t is not None else None  # noqa: E731
        y, stats = layer._bk_normalize(xa, cast(weight), cast(bias))  # the affine map fused in where torch has it
        ctx.save_for_backward(xa, *stats)  # the input and its statistics; xhat is rebuilt in the backward
        ctx.in_dtype, ctx.x_shape = x.dtype, x.shape
        y = y.to(x.dtype)
        # A view (InstanceNorm's output, reshaped from its [1, N*C, *] group norm) returned by a
        # custom Function cannot be modified in place, and the next layer's ReLU(inplace=True)
        # does exactly that: a copy of its own.
        return y.clone() if y._base is not None else y

    @staticmethod
    def backward(ctx, g):
        xa, *stats = ctx.saved_tensors
        layer, weight, bias = ctx.layer, ctx.weight, ctx.bias
        g = g.to(xa.dtype)
        xhat = functools.cache(lambda: layer._bk_xhat(xa, stats))  # rebuilt at most once, where needed
        grad_x = None
        if ctx.needs_input_grad[0]:
            w = weight.to(xa.dtype) if weight is not None else None
            grad_x = layer._bk_grad_input(g, xa, xhat, stats, w).to(ctx.in_dtype).reshape(ctx.x_shape)
        trainable_w = weight is not None and weight.requires_grad
        trainable_b = bias is not None and bias.requires_grad
        if not (trainable_w or trainable_b):
            return grad_x, None, None, None, None
        gw, gb = layer._bk_param_grads(g, xa, xhat, stats, trainable_b, ctx.batch_dim,
                                       backend=layer._bk_engine.backend if layer._bk_engine else "auto")
        uses = []
        if trainable_w:
            uses.append((weight, DenseUse(gw.view(-1, *weight.shape))))
        if trainable_b:
            uses.append((bias, DenseUse(gb.view(-1, *bias.shape))))
        if layer._bk_hand_off(uses):
            return grad_x, None, None, None, None
        grad_w = gw.sum(0).view(weight.shape).to(weight.dtype) if trainable_w else None
        grad_b = gb.sum(0).view(bias.shape).to(bias.dtype) if trainable_b else None
        return grad_x, grad_w, grad_b, None, None


def _rms_backward(xhat, rstd, g_xhat, dims):
    """d loss / d x for xhat = x * rstd, rstd = 1 / rms(x) over `dims` (RMSNorm; the centered
    norms use torch's fused backward)."""
    return rstd * (g_xhat - xhat * (g_xhat * xhat).mean(dims, keepdim=True))


class _LastDimsNorm(BKLayer):
    """Normalises over the trailing `normalized_shape` dims (LayerNorm, RMSNorm)."""

    _bk_centered = True
    _bk_token_features = 1  # normalises each token over its trailing dims

    def _bk_dims(self, x):
        return tuple(range(x.dim() - len(self.normalized_shape), x.dim()))

    def _bk_eps(self, x):
        return self.eps

    def _bk_normalize(self, x, weight, bias):
        """(y, stats): torch's fused layer norm (affine included) for LayerNorm; RMSNorm in plain ops."""
        if self._bk_centered:
            y, mean, rstd = torch.native_layer_norm(x, self.normalized_shape, weight, bias, self._bk_eps(x))
            return y, (mean, rstd)
        rstd = torch.rsqrt(x.square().mean(self._bk_dims(x), keepdim=True) + self._bk_eps(x))
        y = x * rstd
        return (y * weight if weight is not None else y), (rstd,)

    def _bk_xhat(self, x, stats):
        return (x - stats[0]) * stats[1] if self._bk_centered else x * stats[0]

    def _bk_grad_input(self, g, x, xhat, stats, weight):
        if self._bk_centered:
            return torch.ops.aten.native_layer_norm_backward(g, x, self.normalized_shape, stats[0], stats[1], weight,
                                                             None, [True, False, False])[0]
        g_xhat = g * weight if weight is not None else g
        return _rms_backward(xhat(), stats[0], g_xhat, self._bk_dims(x))

    def _bk_param_grads(self, g, x, xhat, stats, bias, batch_dim, backend):
        """Per-example (gw, gb) [B, C]: sum_t xhat * g and sum_t g over each example's rows
        (the statistics vary from row to row, so xhat is needed)."""
        cl = lambda t: examples_first(t, len(self.normalized_shape), batch_dim)  # noqa: E731
        gw, gb, _ = ops.norm_layer_grads(cl(xhat()), cl(g), bias, backend=backend)
        return gw, gb

    def _bk_forward(self, x, bias):
        bdim = self._bk_batch_dim(x, len(self.normalized_shape))
        return self._bk_row_wise(x, bdim, lambda xe: _AffineNormFn.apply(xe, self.weight, bias, self, bdim))


class LayerNorm(_LastDimsNorm, torch.nn.LayerNorm):
    def forward(self, x):
        if in_plain_forward():
            return super().forward(x)
        return self._bk_forward(x, self.bias)


class RMSNorm(_LastDimsNorm, torch.nn.RMSNorm):
    _bk_centered = False

    def _bk_eps(self, x):
        return self.eps if self.eps is not None else torch.finfo(x.dtype).eps

    def forward(self, x):
        if in_plain_forward():
            return super().forward(x)
        return self._bk_forward(x, None)


class _ChannelGroupNorm(BKLayer):
    """Normalises [N, C, *] over groups of channels and all positions (GroupNorm, InstanceNorm)."""

    def _bk_groups(self):
        return self.num_groups

    def _bk_batched(self, x):
        return x

    def _bk_sizes(self, x):
        return x.shape[0], x.shape[1], math.prod(x.shape[2:]), self._bk_groups()

    def _bk_normalize(self, x, weight, bias):
        """(y, (mean, rstd) [N, G]) by torch's fused group norm, affine included."""
        bx = self._bk_batched(x)
        sizes = self._bk_sizes(bx)
        if sizes[0] and sizes[1] // sizes[3] * sizes[2] == 1 and "_bk_warned_one_value" not in self.__dict__:
            self.__dict__["_bk_warned_one_value"] = True
            warnings.warn(
                f"bk: {type(self).__name__} normalizes one value per group (input {tuple(x.shape)}, {sizes[3]} groups): its "
                "output is its bias, whatever the input. A BatchNorm on pooled [B, C, 1, 1] features (a squeeze-and-"
                "excitation gate) swapped by bk.replace_batchnorm does this; replace it by hand (or pass a smaller "
                "groups=) to keep what it did, or freeze the model's BatchNorms instead (bk.freeze_batchnorm)",
                stacklevel=2)
        y, mean, rstd = torch.native_group_norm(bx, weight, bias, *sizes, self.eps)
        return (y if y.shape == x.shape else y.view(x.shape)), (mean, rstd)

    def _bk_grad_input(self, g, x, xhat, stats, weight):
        x, g = self._bk_batched(x), self._bk_batched(g)
        return torch.ops.aten.native_group_norm_backward(g.contiguous(), x, *stats, weight, *self._bk_sizes(x),
                                                         [True, False, False])[0]

    def _bk_param_grads(self, g, x, xhat, stats, bias, batch_dim, backend):
        """Per-example (gw, gb) [N, C] without rebuilding xhat: the statistics are constant over a
        channel's positions, so sum_t xhat*g = rstd * (sum_t x*g - mean * sum_t g), the formula of
        torch's own group norm backward."""
        x, g = self._bk_batched(x), self._bk_batched(g)
        cl = lambda t: t.reshape(t.shape[0], t.shape[1], math.prod(t.shape[2:])).transpose(1, 2)  # noqa: E731
        xg, gb, _ = ops.norm_layer_grads(cl(x), cl(g), True, backend=backend)  # [N, positions, C] views
        per_group = x.shape[1] // self._bk_groups()
        mean, rstd = (s.repeat_interleave(per_group, dim=1) for s in stats)  # [N, G] -> [N, C]
        return (xg - gb * mean) * rstd, (gb if bias else gb[:, :0])


class GroupNorm(_ChannelGroupNorm, torch.nn.GroupNorm):
    def forward(self, x):
        if in_plain_forward():
            return super().forward(x)
        return _AffineNormFn.apply(self._bk_examples(x, 0), self.weight, self.bias, self)


class _InstanceNormMixin(_ChannelGroupNorm):
    """InstanceNorm = GroupNorm with one channel per group (affine).

    With track_running_stats, training mode normalises by each example's own statistics (so the
    affine gradients are per example) and updates the running buffers exactly as torch does;
    eval mode normalises by the running buffers, constants of the forward."""

    def _bk_groups(self):
        return self.num_features

    def _bk_batched(self, x):
        return x.unsqueeze(0) if x.dim() == self._get_no_batch_dim() else x

    def _bk_running(self):
        return self.track_running_stats and not self.training  # torch: use_input_stats otherwise

    def _bk_channel_view(self, t, x):
        return t.reshape(t.shape[0], t.shape[1], *([1] * (x.dim() - 2)))

    def _bk_normalize(self, x, weight, bias):
        if not self._bk_running():
            return super()._bk_normalize(x, weight, bias)
        N, C = x.shape[:2]
        mean = self.running_mean.to(x.dtype).expand(N, C)
        rstd = torch.rsqrt(self.running_var.to(x.dtype) + self.eps).expand(N, C)
        y = (x - self._bk_channel_view(mean, x)) * self._bk_channel_view(rstd, x)
        if weight is not None:
            y = y * self._bk_channel_view(weight.expand(1, C), x)
        if bias is not None:
            y = y + self._bk_channel_view(bias.expand(1, C), x)
        return y, (mean, rstd)

    def _bk_grad_input(self, g, x, xhat, stats, weight):
        if not self._bk_running():
            return super()._bk_grad_input(g, x, xhat, stats, weight)
        scale = stats[1] if weight is None else stats[1] * weight  # constant statistics: a per-channel scale
        return g * self._bk_channel_view(scale, x)

    def forward(self, x):
        if in_plain_forward():
            return super().forward(x)
        unbatched = x.dim() == self._get_no_batch_dim()
        xb = self._bk_examples(x.unsqueeze(0) if unbatched else x, 0)
        if self.track_running_stats and self.training:  # the buffers, as torch updates them
            with torch.no_grad():
                torch.nn.functional.instance_norm(xb.detach(), self.running_mean, self.running_var, None, None, True,
                                                  self.momentum if self.momentum is not None else 0.0, self.eps)
        y = _AffineNormFn.apply(xb, self.weight, self.bias, self)
        return y.squeeze(0) if unbatched and y.shape[0] == 1 else y


class InstanceNorm1d(_InstanceNormMixin, torch.nn.InstanceNorm1d):
    pass


class InstanceNorm2d(_InstanceNormMixin, torch.nn.InstanceNorm2d):
    pass


class InstanceNorm3d(_InstanceNormMixin, torch.nn.InstanceNorm3d):
    pass


for _torch_class, _bk_class in ((torch.nn.LayerNorm, LayerNorm), (torch.nn.RMSNorm, RMSNorm),
                                (torch.nn.GroupNorm, GroupNorm), (torch.nn.InstanceNorm1d, InstanceNorm1d),
                                (torch.nn.InstanceNorm2d, InstanceNorm2d), (torch.nn.InstanceNorm3d, InstanceNorm3d)):
    register_layer(_torch_class, _bk_class)
register_layer(torch.nn.modules.batchnorm._BatchNorm, None, unsupported_reason=lambda module: (
    "BatchNorm mixes the examples of a batch, so per-example gradients do not exist: use GroupNorm "
    "(bk.replace_batchnorm(model) swaps every BatchNorm for one) or LayerNorm instead, or, to fine-tune a "
    "pretrained network, bk.freeze_batchnorm(model) (its running statistics in train mode too)"))

