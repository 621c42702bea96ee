"""Triton kernel for the clipped weighted gradient sum of a linear layer.

With activations ``a: [B, T, d]``, output gradients ``g: [B, T, p]`` and clip factors
``c: [B]``::

    grad_weight [p, d] = sum_b c_b g_b^T a_b      grad_bias [p] = sum_b c_b sum_t g_b,t

``grad_weight`` is one GEMM ``G^T diag(c) A`` over the ``B*T`` rows (``G: [B*T, p]``,
``A: [B*T, d]``, row ``r = b*T + t``), computed by ``tl.dot`` tiles. The per-example factor
``c_b`` multiplies the loaded tile of ``g`` in registers (in the accumulation dtype), so no
scaled copy of ``g`` is ever written. The programs of the first d-tile also sum the scaled
``g`` tile over its rows into ``grad_bias``, in the same pass.

Split-K: the rows are cut into chunks (a second grid axis) so that a small ``p*d`` still
fills the GPU; every program stores its partial tile into its chunk's own slice of a
``[chunks, p, d]`` buffer, summed over the chunks in a fixed order afterwards, so the result
is bitwise reproducible run to run (no atomics). Chunks are only made while ``p*d`` has few
tiles (about 2 programs per SM in all), so the buffer stays near 2 * SMs * one tile.

Precision: accumulation in float32 (float64 for float64 inputs), outputs in that dtype.
fp32/fp64 dots use ``input_precision="ieee"`` (no TF32); fp16/bf16 dots run on tensor cores
with fp32 accumulation, the scaled tile ``c_b * g`` being rounded once to the input dtype
(what eager PyTorch does when it forms ``c * g`` in that dtype). The bias sum uses the
unrounded fp32 products. Under the Triton interpreter (CPU tensors, ``TRITON_INTERPRET=1``)
fp16/bf16 tiles are upcast to fp32 before ``tl.dot`` instead (low-precision dots are wrong
there).

Importing this module registers ``bk::clipped_sum_triton(Tensor a, Tensor g, Tensor c, bool
bias) -> (Tensor, Tensor)``: a ``triton_op`` for compiled kernels, an opaque ``custom_op``
with a fake kernel in interpreter mode (see ``triton_norms``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import (
    MIN_BLOCK,
    SUPPORTED_DTYPES,
    TRITON_PTR_TYPE,
    as_jit_function,
    check_grid,
    check_launchable,
    check_linear_inputs,
    clamp_block,
    dtype_tag,
    is_interpreter,
    kernels_interpreted,
    on_device,
    out_dtype,
)

__all__ = ["clipped_sum_triton", "aot_compile_specs"]

_OP = "bk::clipped_sum_triton"
_SCHEMA = "(Tensor a, Tensor g, Tensor c, bool bias) -> (Tensor, Tensor)"


@triton.jit
def _clipped_sum_kernel(
    a_ptr,
    g_ptr,
    c_ptr,
    gw_ptr,
    gb_ptr,
    T,
    D,
    P,
    ROWS,
    ROWS_PER_SPLIT,
    stride_ab,
    stride_at,
    stride_ad,
    stride_gb,
    stride_gt,
    stride_gp,
    stride_c,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Grid (cdiv(P, BLOCK_P) * cdiv(D, BLOCK_D), n_splits); axis 0 is (p-block, d-block)
    with the d-block fastest, axis 1 the chunk of ROWS_PER_SPLIT rows (a multiple of
    BLOCK_K). tile[p, d] += sum_r c_b(r) g[r, p] a[r, d] over the chunk, stored into the
    chunk's own slice of the output (no atomics)."""
    acc_ty = gw_ptr.dtype.element_ty
    in_ty = a_ptr.dtype.element_ty
    num_db = tl.cdiv(D, BLOCK_D)
    pid = tl.program_id(0)
    pb = pid // num_db
    db = pid - pb * num_db
    split = tl.program_id(1)

    offs_p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_d = db * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_p = offs_p < P
    mask_d = offs_d < D
    p64 = offs_p.to(tl.int64)
    d64 = offs_d.to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)

    # This split's rows [row_lo, row_hi), without an int32 sum past 2^31: near the row limit
    # split * ROWS_PER_SPLIT and row_lo + ROWS_PER_SPLIT can pass it (the last chunk was skipped).
    row_lo = tl.minimum(split.to(tl.int64) * ROWS_PER_SPLIT, ROWS).to(tl.int32)
    row_hi = row_lo + tl.minimum(ROWS - row_lo, ROWS_PER_SPLIT)

    acc = tl.zeros((BLOCK_P, BLOCK_D), dtype=acc_ty)
    bacc = tl.zeros((BLOCK_P,), dtype=acc_ty)
    for r0 in range(row_lo, row_hi, BLOCK_K):
        rows = r0 + offs_k
        mask_r = rows < row_hi
        b = rows // T  # ROWS < 2^31: int32 division
        t = rows - b * T
        b64 = b.to(tl.int64)
        t64 = t.to(tl.int64)
        cb = tl.load(c_ptr + b64 * stride_c, mask=mask_r, other=0.0).to(acc_ty)
        gt = tl.load(  # g^T chunk: [BLOCK_P, BLOCK_K]
            g_ptr + b64[None, :] * stride_gb + t64[None, :] * stride_gt + p64[:, None] * stride_gp,
            mask=mask_p[:, None] & mask_r[None, :],
            other=0.0,
        )
        x = tl.load(  # a chunk: [BLOCK_K, BLOCK_D]
            a_ptr + b64[:, None] * stride_ab + t64[:, None] * stride_at + d64[None, :] * stride_ad,
            mask=mask_r[:, None] & mask_d[None, :],
            other=0.0,
        )
        gs = gt.to(acc_ty) * cb[None, :]  # the per-example scale, in registers
        if HAS_BIAS:
            bacc += tl.sum(gs, axis=1)
        if UPCAST:
            x = x.to(acc_ty)
        else:
            gs = gs.to(in_ty)  # fp32/fp64: no-op; fp16/bf16: back to tensor-core inputs
        acc = tl.dot(gs, x, acc, input_precision="ieee", out_dtype=acc_ty)

    # This split's own slice of the [splits, P, D] / [splits, P] outputs: summed over the
    # splits in a fixed order by the launcher, so the result is bitwise reproducible.
    split64 = split.to(tl.int64)
    out = gw_ptr + split64 * P * D + p64[:, None] * D + d64[None, :]
    tl.store(out, acc.to(gw_ptr.dtype.element_ty), mask=mask_p[:, None] & mask_d[None, :])
    if HAS_BIAS:
        # Every d-block computed the same bias partial; the first one publishes it.
        tl.store(gb_ptr + split64 * P + p64, bacc, mask=mask_p & (db == 0))


# ---------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------

# GPU (H100, sm_90) tiles at num_warps=4. Registers per thread from ptxas for sm_90 (triton
# 3.8), with/without bias; test_triton_aot.py asserts that no spec spills:
#   fp32 64/64/32: 224/212   fp16/bf16 64/64/32: 168/156   fp64 32/64/16: 156/96
# (fp16/bf16 at 64/128/32 or 64/64/64 hit 255 registers and spill: the scaled g tile passes
# through registers.) fp32 runs IEEE dots on the FMA pipe, fp64 on DMMA (mma.sync), fp16/bf16
# on wgmma (mma.sync for BLOCK_P < 64).
_GPU = {"BLOCK_P": 64, "BLOCK_D": 64, "BLOCK_K": 32}
_GPU_LOWP = {"BLOCK_P": 64, "BLOCK_D": 64, "BLOCK_K": 32}
_GPU_FP64 = {"BLOCK_P": 32, "BLOCK_D": 64, "BLOCK_K": 16}
_GPU_NUM_WARPS = 4
# Split-K: aim for this many programs per SM, but give every program at least this many
# rows so that its atomics stay a small fraction of its work.
_PROGRAMS_PER_SM = 2
_MIN_ROWS_PER_SPLIT = 256
# The interpreter pays per program and per op, not per FLOP: big tiles, one chunk.
_CPU = {"BLOCK_P": 128, "BLOCK_D": 128, "BLOCK_K": 128}

_MAX_ROWS = 2**31 - 1 - 4096  # row indices (plus a block) stay in int32


def _gpu_caps(dtype: torch.dtype) -> dict:
    if dtype == torch.float64:
        return _GPU_FP64
    if dtype in (torch.float16, torch.bfloat16):
        return _GPU_LOWP
    return _GPU


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _config(a: torch.Tensor, rows: int, D: int, P: int) -> dict:
    interp = is_interpreter(a.device)
    caps = _CPU if interp else _gpu_caps(a.dtype)
    cfg = {
        "BLOCK_P": clamp_block(P, caps["BLOCK_P"]),
        "BLOCK_D": clamp_block(D, caps["BLOCK_D"]),
        "BLOCK_K": clamp_block(rows, caps["BLOCK_K"]),
    }
    splits = 1
    if not interp:
        tiles = triton.cdiv(P, cfg["BLOCK_P"]) * triton.cdiv(D, cfg["BLOCK_D"])
        want = triton.cdiv(_PROGRAMS_PER_SM * _sm_count(a.device), tiles)
        splits = max(1, min(want, rows // _MIN_ROWS_PER_SPLIT, 65535))
    cfg["ROWS_PER_SPLIT"] = triton.cdiv(triton.cdiv(rows, splits), cfg["BLOCK_K"]) * cfg["BLOCK_K"]
    return cfg


# ---------------------------------------------------------------------------
# Checks and launcher
# ---------------------------------------------------------------------------


def _check_c(op: str, a: torch.Tensor, c: torch.Tensor) -> None:
    if not isinstance(c, torch.Tensor):
        raise ValueError(f"{op}: c must be a tensor")
    if c.dim() != 1 or c.shape[0] != a.shape[0]:
        raise ValueError(
            f"{op}: c must have shape [B] = [{a.shape[0]}] (one clip factor per example), "
            f"got c.shape={tuple(c.shape)}"
        )
    if not c.is_floating_point():
        raise ValueError(f"{op}: c must be a floating-point tensor, got {c.dtype}")
    if c.device != a.device:
        raise ValueError(f"{op}: c must be on the same device as a, got {c.device} and {a.device}")


def _launch(a, g, c, bias: bool, config: dict | None = None):
    B, T, D = a.shape
    P = g.shape[2]
    acc = out_dtype(a.dtype)
    rows = B * T
    if rows == 0 or D == 0 or P == 0:
        return torch.zeros(P, D, dtype=acc, device=a.device), torch.zeros(P if bias else 0, dtype=acc, device=a.device)
    if rows > _MAX_ROWS:
        raise ValueError(f"{_OP}: B*T = {rows} rows is too many for one launch; split the batch")
    cfg = dict(config) if config is not None else _config(a, rows, D, P)
    rps = cfg["ROWS_PER_SPLIT"]
    if rps <= 0 or rps % cfg["BLOCK_K"]:
        raise ValueError(f"{_OP}: ROWS_PER_SPLIT must be a positive multiple of BLOCK_K, got {cfg}")
    grid = (triton.cdiv(P, cfg["BLOCK_P"]) * triton.cdiv(D, cfg["BLOCK_D"]), triton.cdiv(rows, rps))
    check_grid(_OP, grid[0])
    splits = grid[1]
    gw = torch.empty(splits, P, D, dtype=acc, device=a.device)
    gb = torch.empty(splits, P if bias else 0, dtype=acc, device=a.device)
    if c.dtype == torch.float64 and acc != torch.float64:
        c = c.to(acc)  # load the factors in the accumulation dtype (fp32 kernels keep no fp64)
    with on_device(a):  # Triton launches on the current device and stream
        torch.library.wrap_triton(_clipped_sum_kernel)[grid](
            a, g, c, gw, gb,
            T, D, P, rows, rps,
            a.stride(0), a.stride(1), a.stride(2),
            g.stride(0), g.stride(1), g.stride(2),
            c.stride(0),
            BLOCK_P=cfg["BLOCK_P"],
            BLOCK_D=cfg["BLOCK_D"],
            BLOCK_K=cfg["BLOCK_K"],
            HAS_BIAS=bias,
            UPCAST=is_interpreter(a.device),
            num_warps=_GPU_NUM_WARPS,
        )
    if splits == 1:
        return gw[0], gb[0]
    return gw.sum(0), gb.sum(0)


# ---------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------


def _check_all(a, g, c) -> None:
    check_linear_inputs(_OP, a, g)
    _check_c(_OP, a, c)


def _clipped_sum_impl(
    a: torch.Tensor, g: torch.Tensor, c: torch.Tensor, bias: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_weight [p, d] = sum_b c_b g_b^T a_b, grad_bias [p] = sum_b c_b sum_t g_b,t or [0])."""
    _check_all(a, g, c)
    if a.numel() and g.numel():
        check_launchable(_OP, a)
    return _launch(a, g, c, bias)


def _register():
    if not kernels_interpreted():
        return torch.library.triton_op(_OP, _clipped_sum_impl, mutates_args=(), schema=_SCHEMA)
    # Interpreter: an opaque custom op with a fake kernel (see triton_norms._register).
    op = torch.library.custom_op(_OP, _clipped_sum_impl, mutates_args=(), schema=_SCHEMA)

    @op.register_fake
    def _fake(a, g, c, bias):
        _check_all(a, g, c)
        acc = out_dtype(a.dtype)
        p = g.shape[2]
        return a.new_empty((p, a.shape[2]), dtype=acc), a.new_empty((p if bias else 0,), dtype=acc)

    return op


clipped_sum_triton = _register()


# ---------------------------------------------------------------------------
# Ahead-of-time compile specs
# ---------------------------------------------------------------------------

_SCALARS = {"T": "i32", "D": "i32", "P": "i32", "ROWS": "i32", "ROWS_PER_SPLIT": "i32"}
_STRIDES = ("stride_ab", "stride_at", "stride_ad", "stride_gb", "stride_gt", "stride_gp", "stride_c")


def aot_compile_specs() -> list[tuple[str, object, dict, dict]]:
    """``(name, kernel, signature, constexprs)`` for every dtype, with and without bias, at
    the default GPU tiles and at the smallest 16-wide ones (``UPCAST=False``); see
    ``triton_norms.aot_compile_specs``. The clip factors are fp32 (fp64 for fp64)."""
    kernel = as_jit_function(_clipped_sum_kernel)
    specs = []
    for dtype in SUPPORTED_DTYPES:
        ptr = TRITON_PTR_TYPE[dtype]
        out_ptr = TRITON_PTR_TYPE[out_dtype(dtype)]
        cfgs = {
            "default": dict(_gpu_caps(dtype)),
            "small": {"BLOCK_P": MIN_BLOCK, "BLOCK_D": MIN_BLOCK, "BLOCK_K": MIN_BLOCK},
        }
        for cname, cfg in cfgs.items():
            for bias in (True, False):
                constexprs = dict(cfg, HAS_BIAS=bias, UPCAST=False)
                sig = {"a_ptr": ptr, "g_ptr": ptr, "c_ptr": out_ptr, "gw_ptr": out_ptr,
                       "gb_ptr": out_ptr}
                sig.update(_SCALARS)
                sig.update({s: "i64" for s in _STRIDES})
                sig.update({k: "constexpr" for k in constexprs})
                sig = {k: sig[k] for k in kernel.arg_names}
                tag = f"clipped_sum_{dtype_tag(dtype)}_{cname}_{'bias' if bias else 'nobias'}"
                specs.append((tag, kernel, sig, constexprs))
    return specs
