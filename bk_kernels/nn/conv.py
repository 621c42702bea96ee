"""bk.nn Conv1d, Conv2d, Conv3d (stride, padding and its modes, dilation, groups)."""
import torch
import torch.nn.functional as F

from ..ops._norm_common import accumulation_dtype
from ._core import BKLayer, autocast_input, in_plain_forward
from ._made import made_class
from ..ops.conv import CONVS, conv_per_example_grads
from ._uses import ConvUse, DenseUse
from .families import register_layer



class _ConvFn(torch.autograd.Function):
    """y = conv(x, W, bias) with zero padding `padding` (x already padded for other modes), W =
    weight or a map of weight and gain made by the layer (timm's weight standardization: std_conv.py)."""

    @staticmethod
    def forward(ctx, x, weight, bias, layer, fold, gain, padding):
        ctx.layer, ctx.weight, ctx.bias, ctx.gain = layer, weight, bias, gain  # the Parameters' identities
        ctx.fold = fold  # inputs per example, folded example-major on dim 0 (a video's frames)
        ctx.padding = padding
        x = autocast_input(x)
        trained = ctx.needs_input_grad[1] or ctx.needs_input_grad[5]
        effective, ctx.weight_stats = layer._bk_applied_weight(weight, gain)
        ctx.save_for_backward(x if trained else None, effective)  # no x for frozen weights
        ctx.x_shape = x.shape
        n = x.dim() - 2
        y = CONVS[n](x, effective, bias, layer.stride, padding, layer.dilation, layer.groups)
        ctx.held = layer._bk_hold_output(y) if trained and layer._bk_reads_output else None
        return y

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        layer, param, bias, padding = ctx.layer, ctx.weight, ctx.bias, ctx.padding
        # taken off the node: its attributes, unlike its saved tensors, live as long as the graph
        held, ctx.held = ctx.held, None
        stats, ctx.weight_stats = ctx.weight_stats, None
        n = g.dim() - 2
        # convolution_backward reads only the shape of x when it need not form grad_weight.
        x_or_shape = x if x is not None else g.new_empty(()).expand(ctx.x_shape)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                g, x_or_shape, weight.to(g.dtype), None, list(layer.stride), list(padding), list(layer.dilation),
                False, [0] * n, layer.groups, [True, False, False])[0]
        uses, fold = [], ctx.fold
        if x is not None and fold > 1:  # each example's gradient sums its fold's: kept per example
            uses += layer._bk_weight_uses(DenseUse(conv_per_example_grads(
                x, g, weight_shape=tuple(weight.shape), stride=layer.stride, padding=padding,
                dilation=layer.dilation, groups=layer.groups, fold=fold)), param, ctx.gain, weight, stats)
        elif x is not None:
            use = ConvUse(x, g, tuple(weight.shape), layer.stride, padding, layer.dilation, layer.groups)
            use.output = held.output() if held is not None else None
            uses += layer._bk_weight_uses(use, param, ctx.gain, weight, stats)
        if bias is not None and bias.requires_grad:
            per_input = g.sum(tuple(range(2, g.dim())), dtype=accumulation_dtype(g.dtype))
            uses.append((bias, DenseUse(per_input.view(-1, fold, per_input.shape[1]).sum(1))))
        if layer._bk_hand_off(uses):
            return grad_x, None, None, None, None, None, None
        _, grad_w, grad_b = torch.ops.aten.convolution_backward(
            g, x_or_shape, weight.to(g.dtype), [weight.shape[0]] if bias is not None else None, list(layer.stride),
            list(padding), list(layer.dilation), False, [0] * n, layer.groups,
            [False, x is not None, bias is not None and ctx.needs_input_grad[2]])
        grad_w, grad_gain = layer._bk_weight_grads(grad_w, param, ctx.gain, weight, stats) if x is not None else \
            (None, None)
        return (grad_x, grad_w if ctx.needs_input_grad[1] else None, grad_b, None, None,
                grad_gain if ctx.needs_input_grad[5] else None, None)


class _ConvMixin(BKLayer):
    _bk_gain = None  # a second Parameter the weight is made from (std_conv.py)
    _bk_reads_output = False  # whether its norms read the forward's output (std_conv.py)

    def _bk_applied_weight(self, weight, gain):
        """(The weight the convolution applies, statistics of it that its backward reuses, or
        None): weight itself here."""
        return weight, None

    def _bk_weight_uses(self, use, weight, gain, applied, stats):
        """[(Parameter, use)] from the use of the applied weight."""
        return [(weight, use)]

    def _bk_weight_grads(self, grad, weight, gain, applied, stats):
        """(weight's, gain's) gradients from the applied weight's (outside private training)."""
        return grad, None

    def _bk_pre_padded(self, x):
        """x with a padding computed from its size applied (TensorFlow's "SAME": subclasses)."""
        return x

    def _bk_input_and_padding(self, x):
        """(the input, the zero padding the convolution applies). Zero padding of ints is the
        convolution's own: mkldnn and cuDNN pad inside their kernels, while an explicitly padded
        input made a 3x3 convolution on a 1x1 map (ResNet's last stage at CIFAR's 32 x 32) 3.3x
        slower forward and 4x in its input gradient (2-core AMD EPYC), and was kept for the
        backward. Other modes ('reflect', ..., 'same') are applied to the input here."""
        x = self._bk_pre_padded(x)
        n = len(self.kernel_size)
        if self.padding_mode == "zeros" and not isinstance(self.padding, str):
            return x, tuple(self.padding)
        mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
        return F.pad(x, self._reversed_padding_repeated_twice, mode=mode), (0,) * n

    def forward(self, x):
        if in_plain_forward():
            return super().forward(x)
        unbatched = x.dim() == len(self.kernel_size) + 1
        if unbatched:
            x = x.unsqueeze(0)
        # [N, C, *]: the examples are on dim 0 in either layout, or folded example-major there
        # ([B * k, C, *]: k frames of each example's video, proven by folded_rows)
        xe = self._bk_examples(x, 0, fold_rows=True)
        fold = xe.shape[1] if xe.dim() > x.dim() else 1
        x_in, padding = self._bk_input_and_padding(x if fold > 1 else xe)
        y = _ConvFn.apply(x_in, self.weight, self.bias, self, fold, self._bk_gain, padding)
        return y.squeeze(0) if unbatched else y


class Conv1d(_ConvMixin, torch.nn.Conv1d):
    pass


class Conv2d(_ConvMixin, torch.nn.Conv2d):
    pass


class Conv3d(_ConvMixin, torch.nn.Conv3d):
    pass


class _TimmConv2dSame(Conv2d):
    """timm's Conv2dSame (TensorFlow's "SAME" padding, computed from each input's size: the
    EfficientNet ports tf_*): bk's convolution with timm's pad_same as its padding (the plain
    forward is timm's)."""

    def _bk_pre_padded(self, x):
        from timm.layers.padding import pad_same

        return pad_same(x, self.weight.shape[-2:], self.stride, self.dilation)


def _timm_conv2d_same_class(cls):
    return made_class(_timm_conv2d_same_class, (cls,), cls.__name__, (_TimmConv2dSame, cls), {"__module__": __name__})


for _torch_class, _bk_class in ((torch.nn.Conv1d, Conv1d), (torch.nn.Conv2d, Conv2d), (torch.nn.Conv3d, Conv3d)):
    register_layer(_torch_class, _bk_class)
register_layer(None, lambda module: _timm_conv2d_same_class(type(module)),
               matches=lambda cls: cls.__name__ == "Conv2dSame" and cls.__module__.startswith("timm."))


# Transposed convolutions. y = conv_transpose(x, W) is the adjoint of conv(., W) in its input, so
# example b's weight gradient is the weight gradient of conv(g_b, W) with output gradient x_b:
# the convolution's use with x and g swapped (W [C_in, C_out / groups, *k] is that convolution's
# [out, in / groups, *k]). With output_padding below the stride, conv(g) has x's spatial size.
_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


class _ConvTransposeFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, layer, output_padding):
        ctx.layer, ctx.weight, ctx.bias, ctx.output_padding = layer, weight, bias, output_padding
        x = autocast_input(x)
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight)
        ctx.x_shape = x.shape
        return _CONV_TRANSPOSE[x.dim() - 2](x, weight, bias, layer.stride, layer.padding, output_padding,
                                            layer.groups, layer.dilation)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        layer, param, bias = ctx.layer, ctx.weight, ctx.bias
        x_or_shape = x if x is not None else g.new_empty(()).expand(ctx.x_shape)
        conv_args = (list(layer.stride), list(layer.padding), list(layer.dilation), True, list(ctx.output_padding),
                     layer.groups)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(g, x_or_shape, weight.to(g.dtype), None, *conv_args,
                                                         [True, False, False])[0]
        uses = []
        if x is not None:  # the adjoint convolution's use: its input g, its output gradient x
            uses.append((param, ConvUse(g, x, tuple(weight.shape), layer.stride, layer.padding, layer.dilation,
                                        layer.groups)))
        if bias is not None and bias.requires_grad:
            uses.append((bias, DenseUse(g.sum(tuple(range(2, g.dim())), dtype=accumulation_dtype(g.dtype)))))
        if layer._bk_hand_off(uses):
            return grad_x, None, None, None, None
        _, grad_w, grad_b = torch.ops.aten.convolution_backward(
            g, x_or_shape, weight.to(g.dtype), [bias.shape[0]] if bias is not None else None, *conv_args,
            [False, x is not None, bias is not None and ctx.needs_input_grad[2]])
        return grad_x, grad_w if ctx.needs_input_grad[1] else None, grad_b, None, None


class _ConvTransposeMixin(BKLayer):
    def forward(self, x, output_size=None):
        if in_plain_forward():
            return super().forward(x, output_size)
        n = len(self.kernel_size)
        unbatched = x.dim() == n + 1
        if unbatched:
            x = x.unsqueeze(0)
        output_padding = self._output_padding(x, output_size, self.stride, self.padding, self.kernel_size, n,
                                              self.dilation)
        if any(p >= s for p, s in zip(output_padding, self.stride)):
            raise self._bk_layout_error(x, 0, why=(
                f"its output_padding {tuple(output_padding)} is not below its stride {self.stride}: the adjoint "
                "convolution that gives its per-example gradients would not have its input's size; nothing was "
                "recorded and no budget was spent"))
        y = _ConvTransposeFn.apply(self._bk_examples(x, 0), self.weight, self.bias, self, tuple(output_padding))
        return y.squeeze(0) if unbatched else y


class ConvTranspose1d(_ConvTransposeMixin, torch.nn.ConvTranspose1d):
    pass


class ConvTranspose2d(_ConvTransposeMixin, torch.nn.ConvTranspose2d):
    pass


class ConvTranspose3d(_ConvTransposeMixin, torch.nn.ConvTranspose3d):
    pass


for _torch_class, _bk_class in ((torch.nn.ConvTranspose1d, ConvTranspose1d), (torch.nn.ConvTranspose2d, ConvTranspose2d),
                                (torch.nn.ConvTranspose3d, ConvTranspose3d)):
    register_layer(_torch_class, _bk_class, unsupported_reason=lambda m: (
        f"padding_mode {m.padding_mode!r} (only 'zeros')" if m.padding_mode != "zeros" else None))
