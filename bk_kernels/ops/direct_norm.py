"""direct_norm: every example's squared weight-gradient norm by forming the gradient.

For a linear layer with input a:[B,T,d] and output gradient g:[B,T,p], example b's weight
gradient is the d x p matrix a_b^T g_b: cost 2BTdp, cheaper than the ghost norm when
T(d+p) > dp. The fused kernels (cpu, cuda, triton) form it tile by tile and square-sum each
tile at once, so the B*d*p per-example gradients never reach memory.
"""
import torch

from . import _backend
from ._norm_common import accumulation_dtype, check_norm_inputs, example_chunks, norm_dtype


def direct_norm(a, g, *, backend="auto"):
    """[B] squared Frobenius norms ||a_b^T g_b||^2 by forming a_b^T g_b tile by tile.

    a: [B, T, d] (or [B, d]), g: [B, T, p] (or [B, p]), one dtype and device.
    Returns float64 for float64 inputs, float32 otherwise (bf16/fp16 accumulate in float32).
    """
    a, g = check_norm_inputs(a, g, "direct_norm")
    return direct_norm_3d(a, g, _backend.resolve(backend, a.device, "direct_norm"))


def direct_norm_3d(a, g, backend):
    """direct_norm of inputs already checked (3-D) on a resolved backend: the engine's path,
    whose layers made a and g (the checks cost about as much as a small layer's kernel)."""
    if backend in ("cpu", "cuda"):
        return torch.ops.bk.direct_norm(a, g)
    if backend == "triton":
        from . import triton_norms  # noqa: F401  (registers torch.ops.bk.direct_norm_triton)

        return torch.ops.bk.direct_norm_triton(a, g)
    return _direct_norm_torch(a, g)


def _direct_norm_torch(a, g):
    """Pure PyTorch, in chunks of examples so the per-example gradients fit a memory budget."""
    B, d, p = a.shape[0], a.shape[2], g.shape[2]
    acc = accumulation_dtype(a.dtype)
    out = torch.empty(B, dtype=norm_dtype(a.dtype), device=a.device)
    for lo, hi in example_chunks(B, d * p):
        grads = a[lo:hi].to(acc).mT @ g[lo:hi].to(acc)
        out[lo:hi] = grads.square().sum((1, 2))
    return out


@torch.library.register_fake("bk::direct_norm")
def _direct_norm_fake(a, g):
    torch._check(a.dim() == 3 and g.dim() == 3, lambda: "direct_norm: a and g must be 3-D")
    return a.new_empty((a.shape[0],), dtype=norm_dtype(a.dtype))


def direct_norm_ref(a, g):
    """Reference: the per-example gradients a_b^T g_b, squared and summed, in float64.

    a: [B, T, d], g: [B, T, p] -> [B] float64.
    """
    grads = torch.einsum("btd,btp->bdp", a.double(), g.double())
    return grads.square().sum((1, 2))
