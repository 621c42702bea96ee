"""norm_layer_grads: per-example affine gradients of a norm layer and their squared norms.

A norm layer (LayerNorm, GroupNorm, InstanceNorm, ...) with per-channel weight and bias
computes y = xhat * weight + bias from its normalised input xhat. With g = dL/dy arranged as
[B, T, C] (T: every position that shares a channel's weight), example b's gradients are
gw_b = sum_t xhat_b,t * g_b,t and gb_b = sum_t g_b,t: [B, C] each, small enough to form, and
their squared norms come out of the same pass. LayerNorm passes [B, positions, C]
(contiguous); GroupNorm / InstanceNorm pass [B, C, S].transpose(1, 2), channel-major: the
kernels read both layouts (any strides) without a copy.
"""
import torch

from . import _backend
from ._norm_common import NORM_DTYPES, accumulation_dtype, example_chunks, norm_dtype


def _check_xhat_g(xhat, g, op):
    """xhat, g: one shape [B, T, C] (or [B, C]: T = 1), dtype and device; returns them 3-D."""
    if not isinstance(xhat, torch.Tensor) or not isinstance(g, torch.Tensor):
        raise TypeError(f"{op}: xhat and g must be tensors, got {type(xhat).__name__} and {type(g).__name__}")
    if xhat.dim() == 2 and g.dim() == 2:
        xhat, g = xhat.unsqueeze(1), g.unsqueeze(1)
    if xhat.dim() != 3 or g.dim() != 3:
        raise ValueError(
            f"{op}: expected xhat:[B,T,C] and g:[B,T,C] (or both 2-D), got shapes "
            f"{tuple(xhat.shape)} and {tuple(g.shape)}"
        )
    if xhat.shape != g.shape:
        raise ValueError(f"{op}: xhat and g must have one shape, got {tuple(xhat.shape)} and {tuple(g.shape)}")
    if xhat.dtype != g.dtype:
        raise ValueError(f"{op}: xhat and g must have one dtype, got {xhat.dtype} and {g.dtype}")
    if xhat.dtype not in NORM_DTYPES:
        raise ValueError(f"{op}: unsupported dtype {xhat.dtype}; supported: {NORM_DTYPES}")
    if xhat.device != g.device:
        raise ValueError(f"{op}: xhat and g must be on one device, got {xhat.device} and {g.device}")
    return xhat, g


def norm_layer_grads(xhat, g, bias=True, *, backend="auto"):
    """(gw [B, C], gb [B, C], sq_norms [B]) of a norm layer's affine parameters, per example.

    xhat: the normalised input, g: the gradient of the layer's output, both [B, T, C] with
    any strides (or [B, C]). gw = sum_t xhat * g, gb = sum_t g ([B, 0] when bias=False),
    sq_norms = ||gw_b||^2 + ||gb_b||^2. float64 for float64 inputs, float32 otherwise.
    """
    xhat, g = _check_xhat_g(xhat, g, "norm_layer_grads")
    backend = _backend.resolve(backend, xhat.device, "norm_layer_grads")
    if backend in ("cpu", "cuda"):
        return tuple(torch.ops.bk.norm_layer_grads(xhat, g, bool(bias)))
    if backend == "triton":
        from . import triton_norm_layer  # noqa: F401  (registers torch.ops.bk.norm_layer_grads_triton)

        return tuple(torch.ops.bk.norm_layer_grads_triton(xhat, g, bool(bias)))
    return _norm_layer_grads_torch(xhat, g, bool(bias))


def _norm_layer_grads_torch(xhat, g, bias):
    """Pure PyTorch, in chunks of examples so the xhat * g product stays within a budget."""
    B, T, C = xhat.shape
    acc = accumulation_dtype(xhat.dtype)
    gw = torch.empty(B, C, dtype=acc, device=xhat.device)
    gb = torch.empty(B, C if bias else 0, dtype=acc, device=xhat.device)
    for lo, hi in example_chunks(B, T * C):
        gc = g[lo:hi].to(acc)
        gw[lo:hi] = (xhat[lo:hi].to(acc) * gc).sum(1)
        if bias:
            gb[lo:hi] = gc.sum(1)
    return gw, gb, gw.square().sum(1) + gb.square().sum(1)


@torch.library.register_fake("bk::norm_layer_grads")
def _norm_layer_grads_fake(xhat, g, bias):
    torch._check(xhat.dim() == 3 and g.dim() == 3, lambda: "norm_layer_grads: xhat and g must be 3-D")
    B, _, C = xhat.shape
    dtype = norm_dtype(xhat.dtype)
    return (xhat.new_empty((B, C), dtype=dtype), xhat.new_empty((B, C if bias else 0), dtype=dtype),
            xhat.new_empty((B,), dtype=dtype))


def norm_layer_grads_ref(xhat, g, bias=True):
    """Reference in float64: (gw [B, C], gb [B, C] or [B, 0], sq_norms [B])."""
    xhat, g = _check_xhat_g(xhat, g, "norm_layer_grads_ref")
    xhat, g = xhat.double(), g.double()
    gw = (xhat * g).sum(1)
    gb = g.sum(1) if bias else g.new_zeros(g.shape[0], 0)
    return gw, gb, gw.square().sum(1) + gb.square().sum(1)
