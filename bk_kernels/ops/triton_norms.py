"""Triton kernels for per-example gradient norms (book-keeping / ghost clipping).

For a linear layer with activations ``a: [B, T, d]`` and output gradients
``g: [B, T, p]`` the per-example weight gradient is ``G_b = a_b^T g_b`` (``[d, p]``)
and its squared Frobenius norm can be computed in two ways:

* ghost norm   ``sum_{s,t} (a_s . a_t)(g_s . g_t)``      -- O(T^2 (d + p)) per example
* direct norm  ``sum_{j,k} (sum_t a[t,j] g[t,k])^2``      -- O(T d p) per example

Both kernels here are tiled so that neither the ``[B, T, T]`` Gram matrices nor the
``[B, d, p]`` per-example gradients are ever materialised; every program reduces
its tile to a scalar and stores it as its share of ``out[b]``; the shares are summed in a
fixed order afterwards (``torch.sum`` over ``[B, programs per example]``), so the result is
bitwise reproducible run to run on a GPU (no float atomics).

Accumulation is fp32 for fp32/fp16/bf16 inputs (output float32) and fp64 for fp64
inputs (output float64). fp32/fp64 dots use ``input_precision="ieee"`` (no TF32);
fp16/bf16 dots run natively on tensor cores with fp32 accumulation on a GPU, and are
upcast to fp32 before ``tl.dot`` under the Triton interpreter (CPU tensors,
``TRITON_INTERPRET=1``), where low-precision dots are not reliable.

This module is self-contained (torch + triton only) and is imported lazily by the
Triton backend. Importing it registers ``bk::ghost_norm_triton`` and
``bk::direct_norm_triton`` (``(Tensor a, Tensor g) -> Tensor``, shape [B]): with
``torch.library.triton_op`` for compiled kernels, and as an opaque
``torch.library.custom_op`` with a fake kernel when triton is in interpreter mode
(wrap_triton cannot capture interpreted kernels). Whether the interpreter is used is
decided when this module is imported: TRITON_INTERPRET=1 must be set by then.
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
    example_and_pair,
    gram_tile,
    is_interpreter,
    kernels_interpreted,
    on_device,
    out_dtype,
    shares_summed,
)

__all__ = [
    "ghost_norm_triton",
    "direct_norm_triton",
    "aot_compile_specs",
    "SUPPORTED_DTYPES",
]



# ---------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------


@triton.jit
def _ghost_norm_kernel(
    a_ptr,
    g_ptr,
    out_ptr,
    T,
    D,
    P,
    stride_ab,
    stride_at,
    stride_ad,
    stride_gb,
    stride_gt,
    stride_gp,
    BLOCK_T: tl.constexpr,
    BLOCK_KA: tl.constexpr,
    BLOCK_KG: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """One program per (upper-triangular T-block pair (sb <= tb), example b).

    Flattened 1-D grid of size B * NT * (NT + 1) / 2, NT = cdiv(T, BLOCK_T), b-major.
    Computes the [BLOCK_T, BLOCK_T] Gram tiles A_s A_t^T (reduced over d) and
    G_s G_t^T (reduced over p), sums their elementwise product, doubles it for
    off-diagonal pairs and stores it as this program's share of out[b] (shares[pid]).
    """
    acc_ty = out_ptr.dtype.element_ty
    b, sb, tb = example_and_pair(T, BLOCK_T)

    b64 = b.to(tl.int64)
    a_base = a_ptr + b64 * stride_ab
    g_base = g_ptr + b64 * stride_gb

    offs_t = tl.arange(0, BLOCK_T)
    rows_s = sb * BLOCK_T + offs_t
    rows_t = tb * BLOCK_T + offs_t
    mask_s = rows_s < T
    mask_t = rows_t < T
    rs64 = rows_s.to(tl.int64)
    rt64 = rows_t.to(tl.int64)

    # Gram tiles [BLOCK_T, BLOCK_T] of a (over d) and of g (over p).
    gram_a = gram_tile(a_base, rs64, rt64, mask_s, mask_t, D, stride_at, stride_ad,
                        tl.zeros((BLOCK_T, BLOCK_T), dtype=acc_ty), BLOCK_KA, UPCAST)
    gram_g = gram_tile(g_base, rs64, rt64, mask_s, mask_t, P, stride_gt, stride_gp,
                        tl.zeros((BLOCK_T, BLOCK_T), dtype=acc_ty), BLOCK_KG, UPCAST)

    val = tl.sum(tl.sum(gram_a * gram_g, axis=1), axis=0)
    # Off-diagonal block pairs stand for both (S, T) and (T, S).
    factor = tl.where(sb == tb, 1.0, 2.0).to(acc_ty)
    tl.store(out_ptr + tl.program_id(0).to(tl.int64), val * factor)  # this program's share


@triton.jit
def _direct_norm_kernel(
    a_ptr,
    g_ptr,
    out_ptr,
    T,
    D,
    P,
    stride_ab,
    stride_at,
    stride_ad,
    stride_gb,
    stride_gt,
    stride_gp,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_P: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """One program per (d-block, p-block, example b).

    Flattened 1-D grid of size B * cdiv(D, BLOCK_D) * cdiv(P, BLOCK_P), ordered
    (b, d-block, p-block) with the p-block fastest. Reduces over t in BLOCK_T chunks:
    tile += A[t, dblk]^T @ G[t, pblk], then stores sum(tile^2) as its share (shares[pid]).
    """
    acc_ty = out_ptr.dtype.element_ty
    num_db = tl.cdiv(D, BLOCK_D)
    num_pb = tl.cdiv(P, BLOCK_P)
    tiles = num_db * num_pb

    pid = tl.program_id(0)
    b = pid // tiles
    r = pid - b * tiles
    db = r // num_pb
    pb = r - db * num_pb

    b64 = b.to(tl.int64)
    a_base = a_ptr + b64 * stride_ab
    g_base = g_ptr + b64 * stride_gb

    offs_d = db * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_d = offs_d < D
    mask_p = offs_p < P
    d64 = offs_d.to(tl.int64)
    p64 = offs_p.to(tl.int64)
    offs_t = tl.arange(0, BLOCK_T)

    acc = tl.zeros((BLOCK_D, BLOCK_P), dtype=acc_ty)
    for t0 in range(0, T, BLOCK_T):
        rows = t0 + offs_t
        mask_t = rows < T
        r64 = rows.to(tl.int64)
        x = tl.load(  # a^T chunk: [BLOCK_D, BLOCK_T]
            a_base + d64[:, None] * stride_ad + r64[None, :] * stride_at,
            mask=mask_d[:, None] & mask_t[None, :],
            other=0.0,
        )
        y = tl.load(  # g chunk: [BLOCK_T, BLOCK_P]
            g_base + r64[:, None] * stride_gt + p64[None, :] * stride_gp,
            mask=mask_t[:, None] & mask_p[None, :],
            other=0.0,
        )
        if UPCAST:
            x = x.to(acc_ty)
            y = y.to(acc_ty)
        acc = tl.dot(x, y, acc, input_precision="ieee", out_dtype=acc_ty)

    val = tl.sum(tl.sum(acc * acc, axis=1), axis=0)
    tl.store(out_ptr + pid.to(tl.int64), val)  # this program's share


# ---------------------------------------------------------------------------
# Block-size selection
# ---------------------------------------------------------------------------

# GPU (H100, sm_90) defaults, all at num_warps=4 (triton's default compile option, so
# the AOT specs below compile exactly what is launched). Register use per thread as
# reported by ptxas for sm_90 (triton 3.8), no spills:
#   ghost  fp32 64/32: 186   bf16/fp16 64/32: 128   fp64 32/32: 128
#   direct fp32 32/64/64: 159   bf16/fp16 32/64/64: 128   fp64 16/64/64: 140
# (ghost with BLOCK_K=64 hits 255 registers for fp32/bf16, and BLOCK_T=64 for fp64
# spills.) fp32/fp64 use IEEE dots: fp32 runs on the FMA pipe, fp64 on DMMA
# (mma.sync), fp16/bf16 on wgmma.
_GPU_GHOST = {"BLOCK_T": 64, "BLOCK_K": 32}
_GPU_GHOST_FP64 = {"BLOCK_T": 32, "BLOCK_K": 32}
_GPU_DIRECT = {"BLOCK_T": 32, "BLOCK_D": 64, "BLOCK_P": 64}
_GPU_DIRECT_FP64 = {"BLOCK_T": 16, "BLOCK_D": 64, "BLOCK_P": 64}
_GPU_NUM_WARPS = 4
# The interpreter pays per program and per op, not per FLOP: use bigger tiles.
_CPU_GHOST = {"BLOCK_T": 128, "BLOCK_K": 128}
_CPU_DIRECT = {"BLOCK_T": 128, "BLOCK_D": 128, "BLOCK_P": 128}


def _ghost_config(a: torch.Tensor, T: int, D: int, P: int) -> dict:
    if is_interpreter(a.device):
        caps = _CPU_GHOST
    else:
        caps = _GPU_GHOST_FP64 if a.dtype == torch.float64 else _GPU_GHOST
    return {
        "BLOCK_T": clamp_block(T, caps["BLOCK_T"]),
        "BLOCK_KA": clamp_block(D, caps["BLOCK_K"]),
        "BLOCK_KG": clamp_block(P, caps["BLOCK_K"]),
    }


def _direct_config(a: torch.Tensor, T: int, D: int, P: int) -> dict:
    if is_interpreter(a.device):
        caps = _CPU_DIRECT
    else:
        caps = _GPU_DIRECT_FP64 if a.dtype == torch.float64 else _GPU_DIRECT
    return {
        "BLOCK_T": clamp_block(T, caps["BLOCK_T"]),
        "BLOCK_D": clamp_block(D, caps["BLOCK_D"]),
        "BLOCK_P": clamp_block(P, caps["BLOCK_P"]),
    }


# ---------------------------------------------------------------------------
# Input checking and launchers
# ---------------------------------------------------------------------------


def _launch_ghost(a: torch.Tensor, g: torch.Tensor, config: dict | None = None) -> torch.Tensor:
    B, T, D = a.shape
    P = g.shape[2]
    if B == 0 or T == 0 or D == 0 or P == 0:
        return torch.zeros(B, dtype=out_dtype(a.dtype), device=a.device)
    cfg = dict(config) if config is not None else _ghost_config(a, T, D, P)
    nt = triton.cdiv(T, cfg["BLOCK_T"])
    check_grid("bk::ghost_norm_triton", B * (nt * (nt + 1) // 2))
    return shares_summed(a, g, nt * (nt + 1) // 2,
                         lambda a, g, out, grid: _launch_grid(_ghost_norm_kernel, a, g, out, grid, cfg))


def _launch_direct(a: torch.Tensor, g: torch.Tensor, config: dict | None = None) -> torch.Tensor:
    B, T, D = a.shape
    P = g.shape[2]
    if B == 0 or T == 0 or D == 0 or P == 0:
        return torch.zeros(B, dtype=out_dtype(a.dtype), device=a.device)
    cfg = dict(config) if config is not None else _direct_config(a, T, D, P)
    tiles = triton.cdiv(D, cfg["BLOCK_D"]) * triton.cdiv(P, cfg["BLOCK_P"])
    check_grid("bk::direct_norm_triton", B * tiles)
    return shares_summed(a, g, tiles, lambda a, g, out, grid: _launch_grid(_direct_norm_kernel, a, g, out, grid, cfg))


def _launch_grid(kernel, a, g, out, grid, blocks):
    """One launch of a norm kernel (same arguments for both; `blocks` its BLOCK_* sizes)."""
    with on_device(a):  # Triton launches on the current device and stream
        torch.library.wrap_triton(kernel)[grid](
            a, g, out,
            a.shape[1], a.shape[2], g.shape[2],
            a.stride(0), a.stride(1), a.stride(2),
            g.stride(0), g.stride(1), g.stride(2),
            **blocks,
            UPCAST=is_interpreter(a.device),
            num_warps=_GPU_NUM_WARPS,
        )


# ---------------------------------------------------------------------------
# torch.library registration
# ---------------------------------------------------------------------------


def _ghost_norm_impl(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """out[b] = sum_{s,t} (a[b,s] . a[b,t]) (g[b,s] . g[b,t]) = ||a[b]^T g[b]||_F^2."""
    check_linear_inputs("bk::ghost_norm_triton", a, g)
    if a.numel() == 0 or g.numel() == 0:  # B == 0, T == 0, d == 0 or p == 0
        return torch.zeros(a.shape[0], dtype=out_dtype(a.dtype), device=a.device)
    check_launchable("bk::ghost_norm_triton", a)
    return _launch_ghost(a, g)


def _direct_norm_impl(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """out[b] = sum_{j,k} (sum_t a[b,t,j] g[b,t,k])^2 = ||a[b]^T g[b]||_F^2."""
    check_linear_inputs("bk::direct_norm_triton", a, g)
    if a.numel() == 0 or g.numel() == 0:  # B == 0, T == 0, d == 0 or p == 0
        return torch.zeros(a.shape[0], dtype=out_dtype(a.dtype), device=a.device)
    check_launchable("bk::direct_norm_triton", a)
    return _launch_direct(a, g)


def _register(name: str, impl):
    if not kernels_interpreted():
        # Compiled kernels: triton_op makes them visible to torch.compile / export
        # (the fake kernel is `impl` itself, traced through wrap_triton).
        return torch.library.triton_op(name, impl, mutates_args=())

    # TRITON_INTERPRET=1: InterpretedFunction kernels cannot be captured by
    # wrap_triton (it hands back the raw kernel), so under triton_op the fake /
    # functionalization tracing would run the interpreter on fake tensors (and a
    # decomposed graph would lose the kernel). Register an opaque custom op with an
    # explicit fake kernel instead; eager behaviour and the schema are identical.
    op = torch.library.custom_op(name, impl, mutates_args=())

    @op.register_fake
    def _fake(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        check_linear_inputs(name, a, g)
        return a.new_empty((a.shape[0],), dtype=out_dtype(a.dtype))

    return op


ghost_norm_triton = _register("bk::ghost_norm_triton", _ghost_norm_impl)
direct_norm_triton = _register("bk::direct_norm_triton", _direct_norm_impl)


# ---------------------------------------------------------------------------
# Ahead-of-time compile specs (compile checks without a GPU)
# ---------------------------------------------------------------------------

_SCALAR_SIG = {
    "T": "i32",
    "D": "i32",
    "P": "i32",
    "stride_ab": "i64",
    "stride_at": "i64",
    "stride_ad": "i64",
    "stride_gb": "i64",
    "stride_gt": "i64",
    "stride_gp": "i64",
}


def aot_compile_specs() -> list[tuple[str, object, dict, dict]]:
    """``(name, kernel, signature, constexprs)`` for every kernel x supported dtype.

    ``kernel`` is always a ``triton.runtime.jit.JITFunction``, also when this module was
    imported with TRITON_INTERPRET=1 (but compile in a process without it; see
    ``as_jit_function``).

    Each spec uses the GPU launch configuration (default H100 tiles, and the smallest
    16-wide tiles the launcher picks for tiny T/d/p, and 32-wide ones for sizes 17..32;
    ``UPCAST=False``) and can be fed to
    ``triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
    target=GPUTarget("cuda", 90, 32))`` without a GPU. Launches use num_warps=4, which
    is triton's default compile option.
    """
    specs = []
    for dtype in SUPPORTED_DTYPES:
        ptr = TRITON_PTR_TYPE[dtype]
        out_ptr = TRITON_PTR_TYPE[out_dtype(dtype)]
        tag = dtype_tag(dtype)

        g_caps = _GPU_GHOST_FP64 if dtype == torch.float64 else _GPU_GHOST
        ghost_cfgs = {
            "default": {"BLOCK_T": g_caps["BLOCK_T"], "BLOCK_KA": g_caps["BLOCK_K"],
                        "BLOCK_KG": g_caps["BLOCK_K"]},
            "small": {"BLOCK_T": MIN_BLOCK, "BLOCK_KA": MIN_BLOCK, "BLOCK_KG": MIN_BLOCK},
            # T, d or p in 17..32: the 32-wide dot tiles the launcher picks in between
            "mid": {"BLOCK_T": 32, "BLOCK_KA": 32, "BLOCK_KG": MIN_BLOCK},
        }
        d_caps = _GPU_DIRECT_FP64 if dtype == torch.float64 else _GPU_DIRECT
        direct_cfgs = {
            "default": dict(d_caps),
            "small": {"BLOCK_T": MIN_BLOCK, "BLOCK_D": MIN_BLOCK, "BLOCK_P": MIN_BLOCK},
            "mid": {"BLOCK_T": 32, "BLOCK_D": 32, "BLOCK_P": MIN_BLOCK},
        }
        for kname, kernel, cfgs in (
            ("ghost_norm", as_jit_function(_ghost_norm_kernel), ghost_cfgs),
            ("direct_norm", as_jit_function(_direct_norm_kernel), direct_cfgs),
        ):
            for cname, cfg in cfgs.items():
                constexprs = dict(cfg)
                constexprs["UPCAST"] = False
                signature = {"a_ptr": ptr, "g_ptr": ptr, "out_ptr": out_ptr}
                signature.update(_SCALAR_SIG)
                signature.update({k: "constexpr" for k in constexprs})
                # keep the signature in the kernel's argument order
                signature = {k: signature[k] for k in kernel.arg_names}
                specs.append((f"{kname}_{tag}_{cname}", kernel, signature, constexprs))
    return specs
