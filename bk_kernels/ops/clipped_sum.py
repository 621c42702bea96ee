"""clipped_sum: the clipped weight gradient of a linear layer as ONE weighted matmul.

Once every example's clip factor c_b is known, the clipped, summed weight gradient of a layer
with input a:[B,T,d] and output gradient g:[B,T,p] is sum_b c_b g_b^T a_b = g^T diag(c) a over
the B*T rows. The fused kernels apply c_b while loading the operand (no scaled copy of a or
g) and take the bias sum sum_b c_b sum_t g_b,t in the same pass.
"""
import torch

from . import _backend
from ._norm_common import accumulation_dtype, check_norm_inputs, example_chunks


def clipped_sum(a, g, c, *, bias=False, out=None, backend="auto"):
    """(grad_weight [p, d], grad_bias [p] or None) = (sum_b c_b g_b^T a_b, sum_b c_b sum_t g_b,t).

    a: [B, T, d] (or [B, d]), g: [B, T, p] (or [B, p]), c: [B].
    Sums are float64 for float64 inputs, float32 otherwise. With `out` (grad_weight, or a
    (grad_weight, grad_bias) pair), the sums are ADDED into those buffers, which are returned:
    gradient accumulation over micro-batches.
    """
    a, g = check_norm_inputs(a, g, "clipped_sum")
    if not isinstance(c, torch.Tensor) or c.shape != (a.shape[0],):
        raise ValueError(f"clipped_sum: c must be a tensor of shape [B] = [{a.shape[0]}], got "
                         f"{tuple(c.shape) if isinstance(c, torch.Tensor) else type(c).__name__}")
    out_w, out_b = (out if isinstance(out, (tuple, list)) else (out, None))
    if out_b is not None and not bias:
        raise ValueError("clipped_sum: an out grad_bias was given but bias=False")
    if out_w is not None and out_w.shape != (g.shape[2], a.shape[2]):
        raise ValueError(f"clipped_sum: out grad_weight must have shape [p, d] = "
                         f"{[g.shape[2], a.shape[2]]}, got {list(out_w.shape)}")
    if bias and out_w is not None and out_b is None:
        raise ValueError("clipped_sum: with bias=True, out must be a (grad_weight, grad_bias) pair")
    return clipped_sum_3d(a, g, c, bias, out_w, out_b, _backend.resolve(backend, a.device, "clipped_sum"))


def clipped_sum_3d(a, g, c, bias, out_w, out_b, backend):
    """clipped_sum of inputs already checked (a, g 3-D; c [B]; out_w/out_b None or of the right
    shapes) on a resolved backend: the engine's path, whose layers made a and g."""
    if backend in ("cpu", "cuda"):
        if out_w is None:
            w, b = torch.ops.bk.clipped_sum(a, g, c, bias)
            return w, (b if bias else None)
        torch.ops.bk.clipped_sum_(out_w, out_b, a, g, c)
        return out_w, out_b
    if backend == "triton":
        from . import triton_clipped_sum  # noqa: F401  (registers torch.ops.bk.clipped_sum_triton)

        w, b = torch.ops.bk.clipped_sum_triton(a, g, c, bias)
    else:
        w, b = _clipped_sum_torch(a, g, c, bias)
    return _accumulate(w, b if bias else None, out_w, out_b, bias)


def _accumulate(w, b, out_w, out_b, bias):
    if out_w is None:
        return w, b
    out_w.add_(w)
    if bias:
        out_b.add_(b)
    return out_w, out_b


def _clipped_sum_torch(a, g, c, bias):
    """Pure PyTorch: a scaled copy of a bounded chunk of examples at a time."""
    B, T, d = a.shape
    p = g.shape[2]
    acc = accumulation_dtype(a.dtype)
    c = c.to(acc)
    w = torch.zeros(p, d, dtype=acc, device=a.device)
    b = torch.zeros(p if bias else 0, dtype=acc, device=a.device)
    for lo, hi in example_chunks(B, T * (d + p)):
        gc = g[lo:hi].to(acc) * c[lo:hi, None, None]
        w.addmm_(gc.flatten(0, 1).T, a[lo:hi].to(acc).flatten(0, 1))
        if bias:
            b += gc.sum((0, 1))
    return w, b


@torch.library.register_fake("bk::clipped_sum")
def _clipped_sum_fake(a, g, c, bias):
    acc = accumulation_dtype(a.dtype)
    return (a.new_empty((g.shape[2], a.shape[2]), dtype=acc),
            a.new_empty((g.shape[2] if bias else 0,), dtype=acc))


@torch.library.register_fake("bk::clipped_sum_")
def _clipped_sum__fake(grad_weight, grad_bias, a, g, c):
    return None


def clipped_sum_ref(a, g, c, bias=False):
    """Reference from per-example gradients, in float64.

    a: [B, T, d], g: [B, T, p], c: [B] -> (grad_weight [p, d], grad_bias [p] or None).
    """
    per_example = torch.einsum("btp,btd->bpd", g.double(), a.double())
    w = (c.double()[:, None, None] * per_example).sum(0)
    b = (c.double()[:, None] * g.double().sum(1)).sum(0) if bias else None
    return w, b
