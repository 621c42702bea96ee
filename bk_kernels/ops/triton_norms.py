"""Triton kernels for per-example gradient norms (book-keeping / ghost clipping).

For a linear layer with activations ``a: [B, T, d]`` and output gradients
``g: [B, T, p]`` the per-example weight gradient is ``G_b = a_b^T g_b`` (``[d, p]``)
and its squared Frobenius norm can be computed in two ways:

* ghost norm   ``sum_{s,t} (a_s . a_t)(g_s . g_t)``      -- O(T^2 (d + p)) per example
* direct norm  ``sum_{j,k} (sum_t a[t,j] g[t,k])^2``      -- O(T d p) per example

Both kernels here are tiled so that neither the ``[B, T, T]`` Gram matrices nor the
``[B, d, p]`` per-example gradients are ever materialised; every program reduces
its tile to a scalar and ``tl.atomic_add``s it into ``out[b]``.

Accumulation is fp32 for fp32/fp16/bf16 inputs (output float32) and fp64 for fp64
inputs (output float64). fp32/fp64 dots use ``input_precision="ieee"`` (no TF32);
fp16/bf16 dots run natively on tensor cores with fp32 accumulation on a GPU, and are
upcast to fp32 before ``tl.dot`` under the Triton interpreter (CPU tensors,
``TRITON_INTERPRET=1``), where low-precision dots are not reliable.

Note: the result is accumulated with atomics, so the fp32 result is not bitwise
deterministic run to run on a GPU (summation order of the per-tile partials varies).

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

__all__ = [
    "ghost_norm_triton",
    "direct_norm_triton",
    "aot_compile_specs",
    "SUPPORTED_DTYPES",
]

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------


@triton.jit
def _example_and_pair(T, BLOCK_T: tl.constexpr):
    """(b, sb, tb) of this program in a 1-D grid of B * NT (NT + 1) / 2 programs, b-major,
    NT = cdiv(T, BLOCK_T): example b and its upper-triangular block pair sb <= tb."""
    num_tb = tl.cdiv(T, BLOCK_T)
    num_pairs = num_tb * (num_tb + 1) // 2
    pid = tl.program_id(0)
    b = pid // num_pairs
    sb, tb = _pair_blocks((pid - b * num_pairs).to(tl.int64))
    return b, sb, tb


@triton.jit
def _pair_blocks(pair):
    """(sb, tb) with pair = tb (tb + 1) / 2 + sb, 0 <= sb <= tb: an upper-triangular block pair.

    Inverted with a float sqrt (an approximate one on the GPU), then the rounding error, at
    most +-1 for any pair index below 2^31, is fixed with exact integer arithmetic.
    """
    tb = ((tl.sqrt((8 * pair + 1).to(tl.float32)) - 1.0) * 0.5).to(tl.int64)
    tb = tl.where(tb * (tb + 1) // 2 > pair, tb - 1, tb)
    tb = tl.where((tb + 1) * (tb + 2) // 2 <= pair, tb + 1, tb)
    return pair - tb * (tb + 1) // 2, tb


@triton.jit
def _gram_tile(base, rs64, rt64, mask_s, mask_t, K, stride_t, stride_k, gram,
               BLOCK_K: tl.constexpr, UPCAST: tl.constexpr):
    """gram + X[rows_s, :] @ X[rows_t, :]^T over the K features of X (rows at stride_t)."""
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        mk = k < K
        k64 = k.to(tl.int64)
        x = tl.load(base + rs64[:, None] * stride_t + k64[None, :] * stride_k,
                    mask=mask_s[:, None] & mk[None, :], other=0.0)
        y = tl.load(base + k64[:, None] * stride_k + rt64[None, :] * stride_t,
                    mask=mk[:, None] & mask_t[None, :], other=0.0)
        if UPCAST:
            x = x.to(gram.dtype)
            y = y.to(gram.dtype)
        gram = tl.dot(x, y, gram, input_precision="ieee")
    return gram


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
    off-diagonal pairs and atomically adds it into out[b].
    """
    acc_ty = out_ptr.dtype.element_ty
    b, sb, tb = _example_and_pair(T, BLOCK_T)

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
    gram_a = _gram_tile(a_base, rs64, rt64, mask_s, mask_t, D, stride_at, stride_ad,
                        tl.zeros((BLOCK_T, BLOCK_T), dtype=acc_ty), BLOCK_KA, UPCAST)
    gram_g = _gram_tile(g_base, rs64, rt64, mask_s, mask_t, P, stride_gt, stride_gp,
                        tl.zeros((BLOCK_T, BLOCK_T), dtype=acc_ty), BLOCK_KG, UPCAST)

    val = tl.sum(tl.sum(gram_a * gram_g, axis=1), axis=0)
    # Off-diagonal block pairs stand for both (S, T) and (T, S).
    factor = tl.where(sb == tb, 1.0, 2.0).to(acc_ty)
    tl.atomic_add(out_ptr + b, val * factor)


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
    tile += A[t, dblk]^T @ G[t, pblk], then atomically adds sum(tile^2) into out[b].
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
        acc = tl.dot(x, y, acc, input_precision="ieee")

    val = tl.sum(tl.sum(acc * acc, axis=1), axis=0)
    tl.atomic_add(out_ptr + b, val)


# ---------------------------------------------------------------------------
# Block-size selection
# ---------------------------------------------------------------------------

_MIN_BLOCK = 16  # tl.dot needs every dimension >= 16


def _clamp_block(n: int, cap: int) -> int:
    """Smallest power of two >= n, clamped to [16, cap]."""
    return max(_MIN_BLOCK, min(cap, triton.next_power_of_2(max(int(n), 1))))


def _kernels_interpreted() -> bool:
    """True if triton was in interpreter mode (TRITON_INTERPRET=1) when the kernels
    above were decorated; @triton.jit then returns InterpretedFunction objects."""
    return not isinstance(_ghost_norm_kernel, triton.runtime.jit.JITFunction)


def _is_interpreter(device: torch.device) -> bool:
    """Whether a launch on ``device`` goes through the Triton interpreter."""
    return device.type == "cpu" or _kernels_interpreted()


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
    if _is_interpreter(a.device):
        caps = _CPU_GHOST
    else:
        caps = _GPU_GHOST_FP64 if a.dtype == torch.float64 else _GPU_GHOST
    return {
        "BLOCK_T": _clamp_block(T, caps["BLOCK_T"]),
        "BLOCK_KA": _clamp_block(D, caps["BLOCK_K"]),
        "BLOCK_KG": _clamp_block(P, caps["BLOCK_K"]),
    }


def _direct_config(a: torch.Tensor, T: int, D: int, P: int) -> dict:
    if _is_interpreter(a.device):
        caps = _CPU_DIRECT
    else:
        caps = _GPU_DIRECT_FP64 if a.dtype == torch.float64 else _GPU_DIRECT
    return {
        "BLOCK_T": _clamp_block(T, caps["BLOCK_T"]),
        "BLOCK_D": _clamp_block(D, caps["BLOCK_D"]),
        "BLOCK_P": _clamp_block(P, caps["BLOCK_P"]),
    }


# ---------------------------------------------------------------------------
# Input checking and launchers
# ---------------------------------------------------------------------------


def _check_inputs(op: str, a: torch.Tensor, g: torch.Tensor) -> None:
    if not isinstance(a, torch.Tensor) or not isinstance(g, torch.Tensor):
        raise ValueError(f"{op}: a and g must be tensors")
    if a.dim() != 3 or g.dim() != 3:
        raise ValueError(
            f"{op}: expected 3-D tensors a:[B,T,d] and g:[B,T,p], "
            f"got a.shape={tuple(a.shape)} and g.shape={tuple(g.shape)}"
        )
    if a.shape[0] != g.shape[0] or a.shape[1] != g.shape[1]:
        raise ValueError(
            f"{op}: a and g must agree in the batch and time dimensions (B, T), "
            f"got a.shape={tuple(a.shape)} and g.shape={tuple(g.shape)}"
        )
    if a.dtype != g.dtype:
        raise ValueError(f"{op}: a and g must have the same dtype, got {a.dtype} and {g.dtype}")
    if a.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"{op}: unsupported dtype {a.dtype}; supported: float32, float64, float16, bfloat16"
        )
    if a.device != g.device:
        raise ValueError(f"{op}: a and g must be on the same device, got {a.device} and {g.device}")


def _check_launchable(op: str, a: torch.Tensor) -> None:
    if a.device.type == "cpu" and not _kernels_interpreted():
        raise ValueError(
            f"{op}: got CPU tensors, but Triton kernels only run on CPU through the Triton "
            "interpreter; set TRITON_INTERPRET=1 in the environment before triton is first "
            "imported, or use a CUDA device"
        )


_MAX_GRID_X = 2**31 - 1


def _check_grid(op: str, programs: int) -> None:
    if programs > _MAX_GRID_X:
        raise ValueError(
            f"{op}: problem too large for one launch ({programs} programs > 2^31 - 1); "
            "split the batch"
        )


def _out_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _launch_ghost(a: torch.Tensor, g: torch.Tensor, config: dict | None = None) -> torch.Tensor:
    B, T, D = a.shape
    P = g.shape[2]
    out = torch.zeros(B, dtype=_out_dtype(a.dtype), device=a.device)
    if B == 0 or T == 0 or D == 0 or P == 0:
        return out
    cfg = dict(config) if config is not None else _ghost_config(a, T, D, P)
    nt = triton.cdiv(T, cfg["BLOCK_T"])
    grid = (B * (nt * (nt + 1) // 2),)
    _check_grid("bk::ghost_norm_triton", grid[0])
    interp = _is_interpreter(a.device)
    torch.library.wrap_triton(_ghost_norm_kernel)[grid](
        a, g, out,
        T, D, P,
        a.stride(0), a.stride(1), a.stride(2),
        g.stride(0), g.stride(1), g.stride(2),
        BLOCK_T=cfg["BLOCK_T"],
        BLOCK_KA=cfg["BLOCK_KA"],
        BLOCK_KG=cfg["BLOCK_KG"],
        UPCAST=interp,
        num_warps=_GPU_NUM_WARPS,
    )
    return out


def _launch_direct(a: torch.Tensor, g: torch.Tensor, config: dict | None = None) -> torch.Tensor:
    B, T, D = a.shape
    P = g.shape[2]
    out = torch.zeros(B, dtype=_out_dtype(a.dtype), device=a.device)
    if B == 0 or T == 0 or D == 0 or P == 0:
        return out
    cfg = dict(config) if config is not None else _direct_config(a, T, D, P)
    grid = (B * triton.cdiv(D, cfg["BLOCK_D"]) * triton.cdiv(P, cfg["BLOCK_P"]),)
    _check_grid("bk::direct_norm_triton", grid[0])
    interp = _is_interpreter(a.device)
    torch.library.wrap_triton(_direct_norm_kernel)[grid](
        a, g, out,
        T, D, P,
        a.stride(0), a.stride(1), a.stride(2),
        g.stride(0), g.stride(1), g.stride(2),
        BLOCK_T=cfg["BLOCK_T"],
        BLOCK_D=cfg["BLOCK_D"],
        BLOCK_P=cfg["BLOCK_P"],
        UPCAST=interp,
        num_warps=_GPU_NUM_WARPS,
    )
    return out


# ---------------------------------------------------------------------------
# torch.library registration
# ---------------------------------------------------------------------------


def _ghost_norm_impl(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """out[b] = sum_{s,t} (a[b,s] . a[b,t]) (g[b,s] . g[b,t]) = ||a[b]^T g[b]||_F^2."""
    _check_inputs("bk::ghost_norm_triton", a, g)
    if a.numel() == 0 or g.numel() == 0:  # B == 0, T == 0, d == 0 or p == 0
        return torch.zeros(a.shape[0], dtype=_out_dtype(a.dtype), device=a.device)
    _check_launchable("bk::ghost_norm_triton", a)
    return _launch_ghost(a, g)


def _direct_norm_impl(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """out[b] = sum_{j,k} (sum_t a[b,t,j] g[b,t,k])^2 = ||a[b]^T g[b]||_F^2."""
    _check_inputs("bk::direct_norm_triton", a, g)
    if a.numel() == 0 or g.numel() == 0:  # B == 0, T == 0, d == 0 or p == 0
        return torch.zeros(a.shape[0], dtype=_out_dtype(a.dtype), device=a.device)
    _check_launchable("bk::direct_norm_triton", a)
    return _launch_direct(a, g)


def _register(name: str, impl):
    if not _kernels_interpreted():
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
        _check_inputs(name, a, g)
        return a.new_empty((a.shape[0],), dtype=_out_dtype(a.dtype))

    return op


ghost_norm_triton = _register("bk::ghost_norm_triton", _ghost_norm_impl)
direct_norm_triton = _register("bk::direct_norm_triton", _direct_norm_impl)


# ---------------------------------------------------------------------------
# Ahead-of-time compile specs (compile checks without a GPU)
# ---------------------------------------------------------------------------

_TRITON_PTR_TYPE = {
    torch.float32: "*fp32",
    torch.float64: "*fp64",
    torch.float16: "*fp16",
    torch.bfloat16: "*bf16",
}

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


def _dtype_tag(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


_JIT_CACHE: dict = {}


def _as_jit_function(kernel):
    """The compilable JITFunction for ``kernel``.

    Under TRITON_INTERPRET=1 ``@triton.jit`` yields InterpretedFunction objects, which
    ``ASTSource`` cannot take; rebuild a JITFunction from the same Python function.
    Compiling it still needs a process where ``triton.language`` was imported without
    TRITON_INTERPRET=1: in interpreter mode triton's own @jit helpers (``tl.cdiv``,
    ``tl.sum``) are InterpretedFunctions too and code generation fails on them.
    """
    if isinstance(kernel, triton.runtime.jit.JITFunction):
        return kernel
    fn = kernel.fn
    if fn not in _JIT_CACHE:
        _JIT_CACHE[fn] = triton.runtime.jit.JITFunction(fn)
    return _JIT_CACHE[fn]


def aot_compile_specs() -> list[tuple[str, object, dict, dict]]:
    """``(name, kernel, signature, constexprs)`` for every kernel x supported dtype.

    ``kernel`` is always a ``triton.runtime.jit.JITFunction``, also when this module was
    imported with TRITON_INTERPRET=1 (but compile in a process without it; see
    ``_as_jit_function``).

    Each spec uses the GPU launch configuration (default H100 tiles, and the smallest
    16-wide tiles the launcher picks for tiny T/d/p; the 32-wide variants it picks in
    between are not listed; ``UPCAST=False``) and can be fed to
    ``triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
    target=GPUTarget("cuda", 90, 32))`` without a GPU. Launches use num_warps=4, which
    is triton's default compile option.
    """
    specs = []
    for dtype in SUPPORTED_DTYPES:
        ptr = _TRITON_PTR_TYPE[dtype]
        out_ptr = _TRITON_PTR_TYPE[_out_dtype(dtype)]
        tag = _dtype_tag(dtype)

        g_caps = _GPU_GHOST_FP64 if dtype == torch.float64 else _GPU_GHOST
        ghost_cfgs = {
            "default": {"BLOCK_T": g_caps["BLOCK_T"], "BLOCK_KA": g_caps["BLOCK_K"],
                        "BLOCK_KG": g_caps["BLOCK_K"]},
            "small": {"BLOCK_T": _MIN_BLOCK, "BLOCK_KA": _MIN_BLOCK, "BLOCK_KG": _MIN_BLOCK},
        }
        d_caps = _GPU_DIRECT_FP64 if dtype == torch.float64 else _GPU_DIRECT
        direct_cfgs = {
            "default": dict(d_caps),
            "small": {"BLOCK_T": _MIN_BLOCK, "BLOCK_D": _MIN_BLOCK, "BLOCK_P": _MIN_BLOCK},
        }
        for kname, kernel, cfgs in (
            ("ghost_norm", _as_jit_function(_ghost_norm_kernel), ghost_cfgs),
            ("direct_norm", _as_jit_function(_direct_norm_kernel), direct_cfgs),
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
