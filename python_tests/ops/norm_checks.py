"""Inputs and the accuracy check shared by the norm-op tests."""

import torch

from bk_kernels import ops
from python_tests.tolerances import FLOOR_LOWP, LOW_PRECISION, RATIO_LOWP, REL_TOL

LAYOUTS = ["contiguous", "transposed", "sliced", "feature_major", "expanded"]


def make_operand(B, T, n, dtype, device, layout):
    """A [B, T, n] tensor in the given memory layout."""
    if layout == "contiguous":
        return torch.randn(B, T, n, device=device).to(dtype)
    if layout == "transposed":  # batch is not the outer dimension
        return torch.randn(T, B, n, device=device).to(dtype).transpose(0, 1)
    if layout == "sliced":  # rows padded and the last dimension strided
        return torch.randn(B, T, 2 * n + 3, device=device).to(dtype)[..., 1 : 2 * n + 1 : 2]
    if layout == "feature_major":  # [B, n, T] seen as [B, T, n]: positions are contiguous
        return torch.randn(B, n, T, device=device).to(dtype).transpose(1, 2)
    if layout == "expanded":  # one example broadcast over the batch (batch stride 0)
        return torch.randn(1, T, n, device=device).to(dtype).expand(B, T, n)
    raise ValueError(layout)


def eager_norm(name, a, g):
    """What eager PyTorch computes in the inputs' own dtype (for the low-precision rule)."""
    if name == "ghost_norm":
        return ((a @ a.mT) * (g @ g.mT)).sum((1, 2))
    return (a.mT @ g).square().sum((1, 2))


def assert_norms_close(name, out, a, g):
    ref = ops.direct_norm_ref(a, g)  # per-example gradients from the same (rounded) inputs
    assert out.shape == ref.shape
    assert out.dtype == (torch.float64 if a.dtype == torch.float64 else torch.float32)
    err = (out.double() - ref).abs()
    if a.dtype == torch.float64:
        bound = REL_TOL[a.dtype] * ref
    else:
        eager_err = (eager_norm(name, a, g).double() - ref).abs()
        if a.dtype in LOW_PRECISION:
            bound = RATIO_LOWP * eager_err + FLOOR_LOWP * ref
        else:  # float32; sums that cancel: no worse than eager float32
            bound = torch.maximum(REL_TOL[a.dtype] * ref, RATIO_LOWP * eager_err)
    assert (err <= bound).all(), f"error {err.tolist()} above {bound.tolist()} (reference {ref.tolist()})"
