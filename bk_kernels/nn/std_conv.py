"""timm's weight-standardized convolutions on bk's fused convolution: StdConv2d and
StdConv2dSame (BiT ResNet-V2, hybrid ViTs), ScaledStdConv2d and ScaledStdConv2dSame (NF-ResNet,
NFNet: with a trained per-channel gain). The DP image classifiers of De et al. (2022) are built
from these.

The convolution applies W = s * (V - mean) / sqrt(var + eps), per output channel over its
in_channels/groups * kernel entries (timm's F.batch_norm on V viewed [1, C_out, -1]), with s =
gain * gamma / sqrt(fan_in) or 1. Example b's gradients of V and gain are J^T G_b, G_b its
gradient of W (the convolution's own use), J the standardization's Jacobian, which depends on V
and gain only: the clipped sum is one map of the convolution's clipped sum, and the norms come
from a formula on the convolution's use (_Standardization.sq_norms), or, where rounding could
spoil it, from the per-example J^T G_b over chunks of examples (WeightTransform in _uses.py).
"""
import torch
import torch.nn.functional as F

from .. import ops
from ..ops._norm_common import accumulation_dtype
from ._made import mixin_class
from ._uses import ConvUse, TransformedUse, WeightTransform
from .conv import Conv2d
from .families import register_layer

_TIMM_CLASSES = ("StdConv2d", "StdConv2dSame", "ScaledStdConv2d", "ScaledStdConv2dSame")


class _Standardization:
    """The map of cotangents on W to per-example gradients of V (and gain), in the
    accumulation dtype: batch norm's backward over each channel's entries."""

    def __init__(self, weight, gain, scale, eps, want_weight, want_gain, bias=None, applied=None, rstd=None):
        acc = accumulation_dtype(weight.dtype)
        if applied is not None and rstd is not None and gain is None and weight.dtype == acc:
            # the forward's batch norm (_bk_applied_weight): its output is the normalized weight
            normalized = applied.detach().reshape(1, weight.shape[0], -1)
        else:
            v = weight.detach().reshape(1, weight.shape[0], -1).to(acc)
            # batch norm's own statistics (torch.var is several times slower on the CPU)
            normalized, _, rstd = torch.native_batch_norm(v, None, None, None, None, True, 0.0, eps)
        self.rstd, self.normalized = rstd.view(-1, 1).to(acc), normalized[0]  # [C_out, 1], [C_out, n]
        self.eps = eps
        self.s = None if gain is None else gain.detach().reshape(-1, 1).to(acc) * scale
        self.scale, self.acc = scale, acc
        self.bias = bias
        self.weight_shape, self.gain_shape = weight.shape, None if gain is None else gain.shape
        self.want_weight, self.want_gain = want_weight, want_gain

    def sq_norms(self, use, mode, backend):
        """[B] squared norms of V's (and gain's) per-example gradients, as wanted, from the
        convolution's ConvUse without forming them; None where rounding could spoil them.
        Per output channel o, with u = V's gradient / kappa_o (kappa = rstd * s), m = mean(G_o)
        and q = mean(G_o * normalized_o), rho = mean(normalized_o^2):
            ||u||^2 = ||G_o||^2 - n m^2 - n (2 - rho) q^2
        (the normalized row has mean 0 and norm^2 n rho). sum_o kappa_o^2 ||G_o||^2 is the fused
        conv norm of (x, g * kappa); m and q are sums over positions of g times a convolution of
        x with ones and with the normalized weight (the forward's output, where the layer held
        it); gain's gradient is scale * n * q."""
        x, g, args = use.x, use.g, use.args
        B, C_out, groups = g.shape[0], g.shape[1], args["groups"]
        n = self.normalized.shape[1]
        gf = g.flatten(2).to(self.acc)
        q = torch.linalg.vecdot(gf, self._normalized_conv(use)) / n  # [B, C_out]
        use.output = None  # read once: not kept to the backward's end with the use
        out = []
        if self.want_weight:
            patch_sums = self._patch_sums(x, args)  # [B, groups, positions]: each patch's sum
            m = torch.matmul(gf.view(B, groups, C_out // groups, -1), patch_sums.unsqueeze(-1)).view(B, C_out) / n
            kappa = self.rstd.view(-1) * (1.0 if self.s is None else self.s.view(-1))
            whole = ops.conv_norm(x, g * kappa.view(1, -1, *[1] * (g.dim() - 2)).to(g.dtype),
                                  kernel_size=self.weight_shape[2:], mode=mode, backend=backend, **args).to(self.acc)
            # mean(normalized^2) = var / (var + eps) = 1 - eps rstd^2: batch norm's statistics, no
            # pass over the weight
            rho = 1.0 - self.eps * self.rstd.view(-1).square()
            norms = whole - (kappa.square() * n * (m.square() + (2 - rho) * q.square())).sum(1)
            # the difference of two rounded sums: kept where it is at least 1/64 of them (its
            # relative error then at most 64x theirs), else the per-example gradients are formed
            if bool((norms < whole / 64).any()):
                return None
            out.append(norms)
        if self.want_gain:
            out.append((q * (n * self.scale)).square().sum(1))
        return out

    def _conv(self, x, weight, args):
        return F.conv2d(x, weight.to(x.dtype), None, args["stride"], args["padding"], args["dilation"], args["groups"])

    def _normalized_conv(self, use):
        """[B, C_out, positions] the convolution of x with the normalized weight, in the
        accumulation dtype: the forward's output less its bias, over s (the applied weight is s *
        normalized), where the layer held it unchanged and no s is 0; else a convolution like
        the forward's (40% of these norms' time on timm's BiT ResNet-V2)."""
        if use.output is not None and (self.s is None or bool((self.s != 0).all())):
            y = use.output.flatten(2).to(self.acc)
            if self.bias is not None:
                y = y - self.bias.detach().to(self.acc).view(1, -1, 1)
            return y if self.s is None else y / self.s.view(1, -1, 1)
        return self._conv(use.x, self.normalized.view(self.weight_shape), use.args).flatten(2).to(self.acc)

    def _patch_sums(self, x, args):
        """[B, groups, positions] the sum of each patch of each group's input channels: their
        sum over the channels first, then a convolution with ones of one channel per group (a
        convolution of all of x with ones did k times the work)."""
        groups = args["groups"]
        B, C = x.shape[:2]
        channel_sums = x.view(B, groups, C // groups, *x.shape[2:]).sum(2, dtype=self.acc)
        ones = channel_sums.new_ones(groups, 1, *self.weight_shape[2:])
        return F.conv2d(channel_sums, ones, None, args["stride"], args["padding"], args["dilation"], groups).flatten(2)

    def __call__(self, cotangents):
        """[b, *W.shape] -> [V's [b, *V.shape] if wanted, gain's [b, *gain.shape] if wanted]."""
        b = cotangents.shape[0]
        G = cotangents.reshape(b, *self.normalized.shape).to(self.acc)
        n = self.normalized.shape[1]
        out = []
        if self.want_weight:
            # rstd * (H - mean(H) - normalized * mean(H * normalized)) with one weight-sized
            # temporary, the rest in place: 5.8 -> 2.3 ms on a [512, 4608] weight (an out-of-place
            # addcmul broadcasting [C_out, 1] factors took 1.3 ms alone; 2-core AMD EPYC)
            H = G if self.s is None else G * self.s
            mean, proj = H.mean(-1, keepdim=True), torch.linalg.vecdot(H, self.normalized).unsqueeze(-1) / n
            grad = (H - mean).mul_(self.rstd).addcmul_(self.normalized, -(proj * self.rstd))
            out.append(grad.view(b, *self.weight_shape))
        if self.want_gain:
            out.append((torch.linalg.vecdot(G, self.normalized) * self.scale).view(b, *self.gain_shape))
        return out


class _TimmStdConv(Conv2d):
    """bk's Conv2d applying timm's standardized weight (the plain forward is timm's)."""

    _bk_reads_output = True  # its norms read the forward's output, where it is kept anyway

    @property
    def _bk_gain(self):
        return getattr(self, "gain", None)

    def _bk_applied_weight(self, weight, gain):
        # timm's own F.batch_norm (ScaledStdConv2d's gain only when it has one), called as the
        # kernel it runs (the same rounding) for the statistics, which the backward reuses
        applied, _, rstd = torch.native_batch_norm(
            weight.reshape(1, self.out_channels, -1), None if gain is None else (gain * self.scale).view(-1), None,
            None, None, True, 0.0, self.eps)
        return applied.reshape_as(weight), rstd

    def _bk_standardization(self, weight, gain, want_weight, want_gain, applied=None, rstd=None):
        return _Standardization(weight, gain, self.scale if gain is not None else 1.0, self.eps, want_weight,
                                want_gain, self.bias, applied, rstd)

    def _bk_weight_uses(self, use, weight, gain, applied, rstd):
        sources = [p for p in (weight, gain) if p is not None and self._bk_trainable(p)]
        if not sources:
            return []
        vjp = self._bk_standardization(weight, gain, self._bk_trainable(weight),
                                       gain is not None and self._bk_trainable(gain), applied, rstd)
        transform = WeightTransform(use, vjp, [p.numel() for p in sources], weight.numel(),
                                    vjp.sq_norms if isinstance(use, ConvUse) else None)
        return [(p, TransformedUse(transform, i)) for i, p in enumerate(sources)]

    def _bk_weight_grads(self, grad, weight, gain, applied, rstd):
        want_gain = gain is not None and gain.requires_grad
        grads = self._bk_standardization(weight, gain, weight.requires_grad, want_gain, applied, rstd)(grad[None])
        grad_weight = grads.pop(0)[0].to(weight.dtype) if weight.requires_grad else None
        return grad_weight, grads[0][0].to(gain.dtype) if want_gain else None

    def _bk_pre_padded(self, x):
        if getattr(self, "same_pad", False):  # TensorFlow's "SAME", from each input's size
            from timm.layers.padding import pad_same

            return pad_same(x, self.kernel_size, self.stride, self.dilation)
        return x


register_layer(None, lambda module: mixin_class(type(module), _TimmStdConv),
               matches=lambda cls: cls.__name__ in _TIMM_CLASSES and cls.__module__.startswith("timm."))


class _HFStdConv(_TimmStdConv):
    """transformers' WeightStandardizedConv2d (BiT, ViT-hybrid, DPT-hybrid): timm's StdConv2d
    arithmetic (the weight standardized by F.batch_norm over each output channel); its dynamic
    TensorFlow "SAME" padding module, when it has one, is applied first."""

    def _bk_pre_padded(self, x):
        if getattr(self, "pad", None) is not None:
            x = self.pad(x)
        return super()._bk_pre_padded(x)


register_layer(None, lambda module: mixin_class(type(module), _HFStdConv),
               matches=lambda cls: cls.__name__ == "WeightStandardizedConv2d" and cls.__module__.startswith(
                   "transformers.models."))
