"""bk.nn.FrozenBatchNorm: a BatchNorm that always normalises with its running statistics, with
its affine weight and bias trainable privately (bk.freeze_batchnorm swaps a model's BatchNorms
for it).

A BatchNorm in train mode normalises each example with the whole batch's statistics, so no example
has a gradient of its own. With its statistics frozen (those of the checkpoint: public data) it is
a per-channel affine map of each example alone, y = xhat * weight + bias, xhat = (x - mean) /
sqrt(var + eps): the weight's per-example gradient is bk.nn.scale's (sum over positions of
xhat * g), the bias's bk.nn.shift's. The running statistics are never updated: an update from the
private batch would be a release outside the DP guarantee.
"""
import torch

from ._core import BKLayer, in_plain_forward
from .layer_scale import scale, shift


class FrozenBatchNorm(BKLayer, torch.nn.Module):
    """y = (x - running_mean) / sqrt(running_var + eps) * weight + bias over dim 1 of x
    ([B, C] or [B, C, *spatial]) in train and eval mode alike. Its state_dict has a BatchNorm's
    keys, so a BatchNorm checkpoint loads into it."""

    def __init__(self, num_features, eps=1e-5, affine=True, device=None, dtype=None):
        super().__init__()
        self.num_features, self.eps, self.affine = num_features, eps, affine
        factory = dict(device=device, dtype=dtype)
        self.weight = torch.nn.Parameter(torch.ones(num_features, **factory)) if affine else None
        self.bias = torch.nn.Parameter(torch.zeros(num_features, **factory)) if affine else None
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))

    @classmethod
    def from_batchnorm(cls, bn):
        """The frozen twin of `bn`: its eps, its own weight and bias Parameter objects (an optimizer
        made before, and requires_grad, carry over) and its running statistics (the same tensors)."""
        frozen = cls.__new__(cls)
        torch.nn.Module.__init__(frozen)
        frozen.num_features, frozen.eps, frozen.affine = bn.num_features, bn.eps, bn.affine
        frozen.weight, frozen.bias = (bn.weight, bn.bias) if bn.affine else (None, None)
        frozen.register_buffer("running_mean", bn.running_mean)
        frozen.register_buffer("running_var", bn.running_var)
        frozen.register_buffer("num_batches_tracked", bn.num_batches_tracked)
        frozen.train(bn.training)
        return frozen

    def extra_repr(self):
        return f"{self.num_features}, eps={self.eps}, affine={self.affine}"

    def _check_input_dim(self, x):
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(f"{type(self).__name__}: expected an input [B, {self.num_features}, ...], got "
                             f"{tuple(x.shape)}")

    def forward(self, x):
        # Elementwise ops, not F.batch_norm: torch 2.14's CPU batch_norm backward in eval mode
        # returns a wrong input gradient for one example whose output gradient is laid out channels
        # last ([1, C, H, W], strides (C, 1, W*C, C): what a mean over positions after
        # flatten(2).transpose(1, 2) sends back; XCiT's and iFormer's heads do). The per-example
        # reference, one example at a time, hit it (bk.verify: a false mismatch of 10x).
        self._check_input_dim(x)
        channels = (1, self.num_features) + (1,) * (x.dim() - 2)
        rstd = (self.running_var + self.eps).rsqrt()
        trained = self.affine and (self.weight.requires_grad or self.bias.requires_grad)
        if in_plain_forward() or self._bk_layout() is None or not trained:
            factor = rstd * self.weight if self.affine else rstd
            offset = -self.running_mean * factor + (self.bias if self.affine else 0)
            return (x * factor.view(channels) + offset.view(channels)).to(x.dtype)
        xhat = (x - self.running_mean.view(channels)) * rstd.view(channels)
        return shift(self, scale(self, xhat, self.weight, 1), self.bias, channels).to(x.dtype)


class FrozenBatchNormAct(FrozenBatchNorm):
    """timm's BatchNormAct2d frozen: the normalisation, then its own drop and act modules."""

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))
