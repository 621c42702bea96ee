"""Convolutions (1d/2d/3d; stride, padding, dilation, groups, depthwise): per-example norms
and clipped sums of the weight (and bias) gradient.

A convolution is a linear layer on its input patches: example b's weight gradient for group r
is g_{b,r}^T a_{b,r} with a the unfolded patches [L, C_in/groups * prod(k)] and g the output
gradient [L, C_out/groups] over the L output positions.

- Norms: the patches of one chunk of examples at a time are unfolded (a strided view, copied
  to rows only for that chunk, so memory stays bounded whatever the batch) with the groups
  folded into the batch dimension, then the ghost or direct norm kernel of the chosen backend
  runs on them; ||G_b||^2 is the sum over groups.
- Clipped sums: the weight gradient is linear in g, so sum_b c_b G_b is ONE convolution
  weight-gradient call on c-scaled g (torch's own kernel: mkldnn/cuDNN), never per example.
"""
import math

import torch
import torch.nn.functional as F

from ._norm_common import accumulation_dtype, example_chunks
from .linear_norm import choose_mode, linear_norm


def _tuple(value, n, name):
    if isinstance(value, int):
        return (value,) * n
    value = tuple(value)
    if len(value) != n or not all(isinstance(v, int) for v in value):
        raise ValueError(f"conv: {name} must be an int or {n} ints, got {value}")
    return value


def _conv_args(x, g, kernel_size, stride, padding, dilation, groups):
    n = x.dim() - 2
    if n not in (1, 2, 3) or g.dim() != x.dim():
        raise ValueError(f"conv: expected x [B, C_in, *spatial] and g [B, C_out, *spatial] with 1-3 "
                         f"spatial dims, got {tuple(x.shape)} and {tuple(g.shape)}")
    if x.shape[0] != g.shape[0]:
        raise ValueError(f"conv: x and g must have one batch size, got {x.shape[0]} and {g.shape[0]}")
    if x.dtype != g.dtype or x.device != g.device:
        raise ValueError(f"conv: x and g must share dtype and device, got {x.dtype}/{x.device} and "
                         f"{g.dtype}/{g.device}")
    k, s, p, dl = (_tuple(v, n, name) for v, name in
                   ((kernel_size, "kernel_size"), (stride, "stride"), (padding, "padding"), (dilation, "dilation")))
    if x.shape[1] % groups or g.shape[1] % groups:
        raise ValueError(f"conv: channels {x.shape[1]} -> {g.shape[1]} are not divisible by groups={groups}")
    return k, s, p, dl


def conv_patches(x, kernel_size, stride, padding, dilation, first=2):
    """x [B, C, *S] -> a strided view [B, C, *O, *K] of every (zero-padded) patch. first=1: x is
    [B, *S, C] (channels last) and the view [B, *O, C, *K], over a channels-last copy of x."""
    if first == 1:  # the padded copy is made in x's order; without padding, a copy all the same
        x = F.pad(x, [0, 0, *[side for pad in reversed(padding) for side in (pad, pad)]]) if any(padding) else \
            x.contiguous()
    elif any(padding):
        x = F.pad(x, [side for pad in reversed(padding) for side in (pad, pad)])
    n = len(kernel_size)
    for i in range(n):
        span = dilation[i] * (kernel_size[i] - 1) + 1
        x = x.unfold(first + i, span, stride[i])
        if dilation[i] > 1:
            x = x[..., :: dilation[i]]
    return x


def _grouped_rows(x, g, groups, k, s, p, dl, any_column_order=False):
    """(a [B*groups, L, C_in/groups * K], g [B*groups, L, C_out/groups]) for a chunk. a's
    columns in the weight's order (channel, then kernel offset), or, with any_column_order (the
    norms: ||g_b^T a_b|| does not change when a's columns are permuted), in the order whose copy
    reads the longer contiguous runs: offset, then channel, from a channels-last copy of x (runs
    of K_last * C_in, or of C_in/groups with groups), where the weight's order copies runs of
    K_last (9x slower for 3x3 kernels on 2 to 16 wide maps, 2-core AMD EPYC, session 25)."""
    B, C = x.shape[:2]
    n = len(k)
    channels_run = C * k[-1] if groups == 1 else C // groups
    if any_column_order and math.prod(k) > 1 and channels_run > k[-1]:
        patches = conv_patches(x.movedim(1, -1), k, s, p, dl, first=1)  # [B, *O, C, *K]
        out_sizes = patches.shape[1 : 1 + n]
        patches = patches.reshape(B, *out_sizes, groups, C // groups, *k)
        order = [0, 1 + n, *range(1, 1 + n), *range(3 + n, 3 + 2 * n), 2 + n]  # [B, groups, *O, *K, C_g]
    else:
        patches = conv_patches(x, k, s, p, dl)  # [B, C, *O, *K]
        out_sizes = patches.shape[2 : 2 + n]
        patches = patches.reshape(B, groups, C // groups, *out_sizes, *k)
        order = [0, 1, *range(3, 3 + n), 2, *range(3 + n, 3 + 2 * n)]  # [B, groups, *O, C_g, *K]
    if tuple(out_sizes) != tuple(g.shape[2:]):
        raise ValueError(f"conv: g's spatial size {tuple(g.shape[2:])} does not match the output size "
                         f"{tuple(out_sizes)} of these convolution arguments")
    L = math.prod(out_sizes)
    # positions before the columns, then flatten; widths named, not -1: an empty batch (B = 0)
    # has no size to infer
    a_rows = patches.permute(order).reshape(B * groups, L, C // groups * math.prod(k))
    g_rows = g.reshape(B, groups, g.shape[1] // groups, L).transpose(2, 3).reshape(B * groups, L, g.shape[1] // groups)
    return a_rows, g_rows


def conv_norm(x, g, *, kernel_size, stride=1, padding=0, dilation=1, groups=1, bias=False,
              mode="auto", backend="auto"):
    """[B] squared norms of each example's weight (+ bias) gradient of a convolution.

    x: [B, C_in, *S] the layer input, g: [B, C_out, *O] its output gradient; the other
    arguments are the layer's (padding as ints: pad the input beforehand for other modes).
    """
    k, s, p, dl = _conv_args(x, g, kernel_size, stride, padding, dilation, groups)
    B = x.shape[0]
    L = math.prod(g.shape[2:])
    width = x.shape[1] // groups * math.prod(k)
    choose_mode(mode, L, width, g.shape[1] // groups)  # checks mode; linear_norm chooses per chunk
    out = torch.zeros(B, dtype=accumulation_dtype(x.dtype), device=x.device)
    for lo, hi in example_chunks(B, groups * L * (width + g.shape[1] // groups)):
        a_rows, g_rows = _grouped_rows(x[lo:hi], g[lo:hi], groups, k, s, p, dl, any_column_order=True)
        out[lo:hi] = linear_norm(a_rows, g_rows, mode=mode, backend=backend).view(hi - lo, groups).sum(1)
    if bias:
        out += g.sum(tuple(range(2, g.dim())), dtype=out.dtype).square().sum(1)
    return out


CONVS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}  # by the number of spatial dims
_WEIGHT_GRADS = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight, 3: torch.nn.grad.conv3d_weight}


def _weight_grad(n, x, *args):
    """torch's conv weight gradient in full float32 precision: on a GPU, cuDNN's TF32 (on by
    default on sm_80+) would round the inputs to 10-bit mantissas, as every Triton dot here
    avoids with input_precision="ieee". On the CPU, pointwise and depthwise convolutions take
    the faster forms of _cpu_weight_grad."""
    if x.device.type == "cpu":
        w = _cpu_weight_grad(n, x, *args)
        return w if w is not None else _WEIGHT_GRADS[n](x, *args)
    if x.device.type != "cuda":
        return _WEIGHT_GRADS[n](x, *args)
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        return _WEIGHT_GRADS[n](x, *args)
    finally:
        torch.backends.cudnn.allow_tf32 = saved


def _cpu_weight_grad(n, x, weight_shape, g, stride, padding, dilation, groups):
    """The weight gradient of a pointwise (1x1, no padding) or depthwise (one input channel per
    output channel) convolution in forms that torch's CPU kernels run far faster than mkldnn's
    weight-gradient call, which ran the per-example gradients (the batch folded into the
    groups, conv_per_example_grads) at 1-6 GFLOPS. `python bench/run.py --scenario conv` on a
    2-core AMD EPYC, B = 16, timm ConvNeXt-atto's layers at 64 x 64 (bench/conv.py):
      pointwise: one batched matmul per group, [C_out/g, N*L] x [N*L, C_in/g]; per-example
        gradients of 40 -> 160 channels on 16x16 0.70 ms -> 0.47 ms (320 -> 1280 on 2x2, timed
        beside it by a script: 24 ms -> 2.1 ms);
      depthwise: the forward convolution of x with g as its kernel (stride and dilation swapped,
        one group per example and channel), cropped to the kernel: per-example 7x7 gradients of
        40 channels on 16x16 3.0 ms -> 0.36 ms, their clipped sum 2.9 ms (torch's non-private
        weight gradient) -> 0.44 ms.
    None where neither applies (torch's own call then)."""
    N, C_in, C_out = x.shape[0], x.shape[1], g.shape[1]
    k = tuple(weight_shape[2:])
    out_sizes = tuple(g.shape[2:])
    if all(v == 1 for v in k) and not any(padding):
        xs = x[(slice(None), slice(None), *(slice(None, None, si) for si in stride))]  # the positions read
        if tuple(xs.shape[2:]) != out_sizes:
            return None
        G, L = groups, math.prod(out_sizes)
        gv, xv = g.reshape(N, G, C_out // G, L), xs.reshape(N, G, C_in // G, L)
        if N == 1:  # the per-example call: views, no copy
            return torch.bmm(gv[0], xv[0].transpose(1, 2)).reshape(weight_shape)
        # examples and positions side by side (copies of whole rows, no transpose), in chunks of
        # examples whose copies stay within example_chunks' bound
        w = None
        for lo, hi in example_chunks(N, L * (C_in + C_out)):
            gc, xc = (t[lo:hi].permute(1, 2, 0, 3).reshape(G, t.shape[2], (hi - lo) * L) for t in (gv, xv))
            w = torch.bmm(gc, xc.transpose(1, 2)) if w is None else w.baddbmm_(gc, xc.transpose(1, 2))
        return (w if w is not None else x.new_zeros(G, C_out // G, C_in // G)).reshape(weight_shape)
    if groups == C_in == C_out and weight_shape[1] == 1 and N > 0:
        # w[c, 0, r] = sum_{b, o} g[b, c, o] x_padded[b, c, o * stride + r * dilation]: per
        # example and channel one group (views of x and g), then the sum over the examples
        w = CONVS[n](x.reshape(1, N * C_in, *x.shape[2:]), g.reshape(N * C_out, 1, *out_sizes), None,
                      dilation, padding, stride, N * groups)
        w = w[(slice(None), slice(None), *(slice(0, v) for v in k))].reshape(N, *weight_shape)
        return w[0] if N == 1 else w.sum(0)
    return None


def _one_position_weight_grad(x, g, weight_shape, groups, k, s, p, dl):
    """The weight gradient of a convolution with one output position per example (ResNet's last
    stage at CIFAR's 32 x 32: a 3x3 kernel on a 1x1 map) as one matmul per group of the B patches.
    bench/conv.py's 1x1 row (512 -> 512 channels, B = 32, 2-core AMD EPYC, `python bench/run.py
    --scenario conv`): conv_clipped_sum 3.6 ms with this, against 9.8 ms for torch's own
    conv2d_weight (mkldnn), which the clipped sum called before."""
    a_rows, g_rows = _grouped_rows(x, g, groups, k, s, p, dl)  # [B*groups, 1, width], [B*groups, 1, C_out/groups]
    B = x.shape[0]  # sizes named, not -1 (B = 0: an empty Poisson batch)
    a_rows = a_rows.view(B, groups, a_rows.shape[-1]).transpose(0, 1)
    g_rows = g_rows.view(B, groups, g_rows.shape[-1]).transpose(0, 1)
    return torch.bmm(g_rows.transpose(1, 2), a_rows).reshape(weight_shape)


def conv_clipped_sum(x, g, c, *, weight_shape, stride=1, padding=0, dilation=1, groups=1, bias=False,
                     out=None):
    """(grad_weight [*weight_shape], grad_bias [C_out] or None) = sum_b c_b (G_b, gb_b), in the
    accumulation dtype; with `out` the sums are added into the given buffers and returned."""
    n = x.dim() - 2
    k, s, p, dl = _conv_args(x, g, weight_shape[2:], stride, padding, dilation, groups)
    if not isinstance(c, torch.Tensor) or c.shape != (x.shape[0],):
        raise ValueError(f"conv_clipped_sum: c must have shape [B] = [{x.shape[0]}]")
    acc = accumulation_dtype(x.dtype)
    scaled = g.to(acc) * c.to(acc).view(-1, *([1] * (g.dim() - 1)))
    if x.device.type == "cpu" and math.prod(g.shape[2:]) == 1:
        w = _one_position_weight_grad(x.to(acc), scaled, tuple(weight_shape), groups, k, s, p, dl)
    else:
        w = _weight_grad(n, x.to(acc), tuple(weight_shape), scaled, s, p, dl, groups)
    b = scaled.sum((0, *range(2, g.dim()))) if bias else None
    if out is None:
        return w, b
    out_w, out_b = out if isinstance(out, (tuple, list)) else (out, None)
    out_w.add_(w)
    if bias:
        out_b.add_(b)
    return out_w, out_b


def conv_per_example_grads(x, g, *, weight_shape, stride=1, padding=0, dilation=1, groups=1, fold=1):
    """[B, *weight_shape] every example's weight gradient, in the accumulation dtype, from ONE
    weight-gradient call with the batch folded into the groups (groups * B groups over a batch
    of one): no unfolded patches, torch's own kernel (mkldnn/cuDNN). For layers whose B
    per-example gradients are small: the engine then clips them by a weighted sum.

    fold: x and g hold `fold` inputs per example, folded example-major ([B * fold, C, *S]: a
    video's frames); example b's gradient sums its fold inputs' (they become the call's batch).
    """
    k, s, p, dl = _conv_args(x, g, weight_shape[2:], stride, padding, dilation, groups)
    B, n = x.shape[0] // fold, x.dim() - 2
    acc = accumulation_dtype(x.dtype)
    if B == 0:
        return torch.zeros((0, *weight_shape), dtype=acc, device=x.device)

    def batch_of_folds(t):  # [B * fold, C, *S] -> [fold, B * C, *S]
        t = t.to(acc).reshape(B, fold, *t.shape[1:])
        return t.transpose(0, 1).reshape(fold, B * t.shape[2], *t.shape[3:])

    x1, g1 = batch_of_folds(x), batch_of_folds(g)
    stacked = (B * weight_shape[0], *weight_shape[1:])
    w = _weight_grad(n, x1, stacked, g1, s, p, dl, groups * B)
    return w.view(B, *weight_shape)


def conv_per_example_grads_ref(x, g, *, weight_shape, stride=1, padding=0, dilation=1, groups=1):
    """Reference: each example's weight gradient from its own backward, in float64.

    x: [B, C_in, *S], g: [B, C_out, *O] -> [B, *weight_shape].
    """
    n = x.dim() - 2
    k, s, p, dl = _conv_args(x, g, weight_shape[2:], stride, padding, dilation, groups)
    grads = []
    for b in range(x.shape[0]):
        weight = torch.zeros(weight_shape, dtype=torch.float64, requires_grad=True)
        y = CONVS[n](x[b : b + 1].double(), weight, None, s, p, dl, groups)
        (grad,) = torch.autograd.grad(y, weight, g[b : b + 1].double())
        grads.append(grad)
    return torch.stack(grads) if grads else torch.zeros((0, *weight_shape), dtype=torch.float64)
