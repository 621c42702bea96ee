"""ghost_norm: every example's squared weight-gradient norm from Gram matrices ("ghost norm").

For a linear layer with input a:[B,T,d] and output gradient g:[B,T,p], example b's weight
gradient is a_b^T g_b, and ||a_b^T g_b||_F^2 = <a_b a_b^T, g_b g_b^T>: cost 2BT^2(d+p), cheaper
than forming the gradient when T(d+p) < dp. The fused kernels (cpu, cuda, triton) sweep the
Gram matrices tile by tile, only the upper triangle (they are symmetric), and never hold the
B*T*T matrices in memory.
"""
import torch

from . import _backend
from ._norm_common import accumulation_dtype, check_norm_inputs, example_chunks, norm_dtype


def ghost_norm(a, g, *, backend="auto"):
    """[B] squared Frobenius norms ||a_b^T g_b||^2 via Gram matrices.

    a: [B, T, d] (or [B, d]), g: [B, T, p] (or [B, p]), one dtype and device.
    Returns float64 for float64 inputs, float32 otherwise (bf16/fp16 accumulate in float32).
    """
    a, g = check_norm_inputs(a, g, "ghost_norm")
    return ghost_norm_3d(a, g, _backend.resolve(backend, a.device, "ghost_norm"))


def ghost_norm_3d(a, g, backend):
    """ghost_norm of inputs already checked (3-D) on a resolved backend: the engine's path,
    whose layers made a and g (the checks cost about as much as a small layer's kernel)."""
    if backend in ("cpu", "cuda"):
        return torch.ops.bk.ghost_norm(a, g)
    if backend == "triton":
        from . import triton_norms  # noqa: F401  (registers torch.ops.bk.ghost_norm_triton)

        return torch.ops.bk.ghost_norm_triton(a, g)
    return _ghost_norm_torch(a, g)


def _ghost_norm_torch(a, g):
    """Pure PyTorch, in chunks of examples so the Gram matrices stay within a memory budget."""
    B, T = a.shape[:2]
    acc = accumulation_dtype(a.dtype)
    out = torch.empty(B, dtype=norm_dtype(a.dtype), device=a.device)
    for lo, hi in example_chunks(B, 2 * T * T):
        ac, gc = a[lo:hi].to(acc), g[lo:hi].to(acc)
        out[lo:hi] = ((ac @ ac.mT) * (gc @ gc.mT)).sum((1, 2))
    return out


@torch.library.register_fake("bk::ghost_norm")
def _ghost_norm_fake(a, g):
    torch._check(a.dim() == 3 and g.dim() == 3, lambda: "ghost_norm: a and g must be 3-D")
    return a.new_empty((a.shape[0],), dtype=norm_dtype(a.dtype))


def ghost_norm_ref(a, g):
    """Reference: <a_b a_b^T, g_b g_b^T> with the full Gram matrices, in float64.

    a: [B, T, d], g: [B, T, p] -> [B] float64.
    """
    a, g = a.double(), g.double()
    return ((a @ a.mT) * (g @ g.mT)).sum((1, 2))
