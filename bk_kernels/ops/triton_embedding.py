"""Triton kernels for embedding layers: per-example gradient norms and clipped sums.

An embedding lookup of ids ``x: [B, T]`` with output gradient ``g: [B, T, d]`` has the
per-example weight gradient ``G_b[v] = sum_{t: x_t = v} g_t`` (a ``[V, d]`` matrix, mostly
zero rows). Padding positions (``x_t == padding_idx``) get no gradient.

* ``bk::embedding_norm_triton(Tensor ids, Tensor g, int? padding_idx) -> Tensor`` [B]::

      ||G_b||^2 = sum_{s,t} [x_s = x_t != padding_idx] <g_s, g_t>

  A masked Gram matrix over T x T tiles, only the upper triangle of tile pairs (off-diagonal
  pairs count twice), as the ghost-norm kernel in ``triton_norms``; the ``[B, T, T]`` matrix is
  never in memory. A tile pair with no equal ids skips its ``tl.dot`` loop entirely.

* ``bk::embedding_clipped_sum_triton(Tensor ids, Tensor g, Tensor c, int num_embeddings,
  int? padding_idx, bool deterministic) -> Tensor`` [V, d]::

      out[v] = sum_{b,t: x_b,t = v != padding_idx} c_b g_b,t

  ``deterministic=False``: every (row block, d block) program scales its rows of ``g`` and
  ``tl.atomic_add``s them into ``out[id]``; the fp32 summation order varies run to run on a
  GPU. ``deterministic=True``: the rows are sorted by (id, row) with a stable
  ``torch.sort`` of the flattened ids (outside the kernel); the sorted position that starts a
  run of equal ids owns that id, and the program of that position's block of ``BLOCK_S``
  positions (and of one d block) sums the run in sorted order and stores the result (no
  atomics), so the result is bitwise reproducible. The grid depends only on ``B*T`` and
  ``d`` (no device sync for the number of distinct ids).

Ids may be int32 or int64, ``g`` and ``ids`` any strides. Accumulation and outputs are
float32 (float64 for float64 ``g``); fp16/bf16 ``g`` tiles are upcast in registers (for the
Gram dot only under the Triton interpreter, where low-precision dots are wrong; on a GPU the
Gram tiles use tensor cores with fp32 accumulation). ``c`` is any floating dtype, loaded in
the accumulation dtype. Ids outside ``[0, num_embeddings)`` are an error (checked on the host
in eager mode, one device sync; the kernels also skip them, so they never write out of
bounds). A negative ``padding_idx`` means ``num_embeddings + padding_idx`` in the clipped sum
(as ``torch.nn.Embedding``); in the norm, which knows no vocabulary size, ids are compared
with ``padding_idx`` as given.
"""

from __future__ import annotations

from typing import Optional

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

__all__ = ["embedding_norm_triton", "embedding_clipped_sum_triton", "aot_compile_specs"]

_NORM_OP = "bk::embedding_norm_triton"
_SUM_OP = "bk::embedding_clipped_sum_triton"
# Explicit schemas: inferred ones would say SymInt where the C++ ops (csrc/extension.cpp) say int.
_NORM_SCHEMA = "(Tensor ids, Tensor g, int? padding_idx) -> Tensor"
_SUM_SCHEMA = ("(Tensor ids, Tensor g, Tensor c, int num_embeddings, int? padding_idx, "
               "bool deterministic) -> Tensor")
ID_DTYPES = (torch.int32, torch.int64)


# ---------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------


@triton.jit(do_not_specialize=["pad"])
def _embedding_norm_kernel(
    ids_ptr,
    g_ptr,
    out_ptr,
    T,
    D,
    stride_ib,
    stride_it,
    stride_gb,
    stride_gt,
    stride_gd,
    pad: tl.int64,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_PAD: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """One program per (upper-triangular T-block pair (sb <= tb), example b), flattened
    b-major as in triton_norms._ghost_norm_kernel. Sums the Gram tile G_s G_t^T where the
    ids agree (and are not padding); off-diagonal pairs count twice. Stores it as this
    program's share of out[b] (shares[pid]; summed in a fixed order by the launcher)."""
    acc_ty = out_ptr.dtype.element_ty
    b, sb, tb = example_and_pair(T, BLOCK_T)  # the ghost-norm kernel's mapping, tested there

    b64 = b.to(tl.int64)
    offs_t = tl.arange(0, BLOCK_T)
    rows_s = sb * BLOCK_T + offs_t
    rows_t = tb * BLOCK_T + offs_t
    mask_s = rows_s < T
    mask_t = rows_t < T
    rs64 = rows_s.to(tl.int64)
    rt64 = rows_t.to(tl.int64)

    ids_s = tl.load(ids_ptr + b64 * stride_ib + rs64 * stride_it, mask=mask_s, other=0).to(tl.int64)
    ids_t = tl.load(ids_ptr + b64 * stride_ib + rt64 * stride_it, mask=mask_t, other=0).to(tl.int64)
    keep_s = mask_s
    if HAS_PAD:
        keep_s = keep_s & (ids_s != pad)
    match = (ids_s[:, None] == ids_t[None, :]) & keep_s[:, None] & mask_t[None, :]

    if tl.sum(match.to(tl.int32)) > 0:  # most tile pairs of a long text share no id
        g_base = g_ptr + b64 * stride_gb
        gram = gram_tile(g_base, rs64, rt64, mask_s, mask_t, D, stride_gt, stride_gd,
                          tl.zeros((BLOCK_T, BLOCK_T), dtype=acc_ty), BLOCK_K, UPCAST)
        val = tl.sum(tl.sum(tl.where(match, gram, 0.0), axis=1), axis=0)
        factor = tl.where(sb == tb, 1.0, 2.0).to(acc_ty)
        tl.store(out_ptr + tl.program_id(0).to(tl.int64), val * factor)  # this program's share (zeros if skipped)


@triton.jit(do_not_specialize=["pad"])
def _embedding_scatter_kernel(
    ids_ptr,
    g_ptr,
    c_ptr,
    out_ptr,
    T,
    D,
    V,
    ROWS,
    stride_ib,
    stride_it,
    stride_gb,
    stride_gt,
    stride_gd,
    stride_c,
    pad: tl.int64,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_PAD: tl.constexpr,
):
    """Grid (cdiv(ROWS, BLOCK_R), cdiv(D, BLOCK_D)): out[id_r, dblk] += c_b(r) g[r, dblk]
    for the BLOCK_R rows r = b*T + t of the program, with atomics."""
    acc_ty = out_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_r = rows < ROWS
    mask_d = offs_d < D
    b = rows // T
    t = rows - b * T
    b64 = b.to(tl.int64)
    t64 = t.to(tl.int64)
    d64 = offs_d.to(tl.int64)

    ids = tl.load(ids_ptr + b64 * stride_ib + t64 * stride_it, mask=mask_r, other=-1).to(tl.int64)
    keep = mask_r & (ids >= 0) & (ids < V)
    if HAS_PAD:
        keep = keep & (ids != pad)
    cb = tl.load(c_ptr + b64 * stride_c, mask=keep, other=0.0).to(acc_ty)
    m2 = keep[:, None] & mask_d[None, :]
    x = tl.load(g_ptr + b64[:, None] * stride_gb + t64[:, None] * stride_gt + d64[None, :] * stride_gd,
                mask=m2, other=0.0)
    val = x.to(acc_ty) * cb[:, None]
    tl.atomic_add(out_ptr + ids[:, None] * D + d64[None, :], val, mask=m2)


@triton.jit(do_not_specialize=["pad"])
def _embedding_segment_kernel(
    sorted_ids_ptr,
    perm_ptr,
    ends_ptr,
    g_ptr,
    c_ptr,
    out_ptr,
    T,
    D,
    V,
    ROWS,
    stride_gb,
    stride_gt,
    stride_gd,
    stride_c,
    pad: tl.int64,
    BLOCK_S: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_PAD: tl.constexpr,
):
    """Grid (cdiv(ROWS, BLOCK_S), cdiv(D, BLOCK_D)) over the rows sorted by (id, row). Sorted
    position i owns id v = sorted_ids[i] if i starts its run; the program of positions
    [s0, s0 + BLOCK_S) visits them in turn and, for each owner, sums c_b g_r over the run
    [i, ends[i]) in sorted order, BLOCK_R rows at a time into a [BLOCK_R, BLOCK_D] register
    tile reduced once at the end (a fixed order), and stores out[v, dblk]."""
    acc_ty = out_ptr.dtype.element_ty
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    d64 = offs_d.to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    s0 = tl.program_id(0).to(tl.int64) * BLOCK_S
    for i in range(s0, tl.minimum(s0 + BLOCK_S, ROWS)):
        v = tl.load(sorted_ids_ptr + i).to(tl.int64)
        prev = tl.load(sorted_ids_ptr + i - 1, mask=i > 0, other=0).to(tl.int64)
        owner = ((i == 0) | (prev != v)) & (v >= 0) & (v < V)
        if HAS_PAD:
            owner = owner & (v != pad)
        if owner:
            end = tl.load(ends_ptr + i)
            acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=acc_ty)
            for j0 in range(i, end, BLOCK_R):
                j = j0 + offs_r
                mask_j = j < end
                r = tl.load(perm_ptr + j, mask=mask_j, other=0)
                b = r // T
                t = r - b * T
                cb = tl.load(c_ptr + b * stride_c, mask=mask_j, other=0.0).to(acc_ty)
                x = tl.load(
                    g_ptr + b[:, None] * stride_gb + t[:, None] * stride_gt + d64[None, :] * stride_gd,
                    mask=mask_j[:, None] & mask_d[None, :],
                    other=0.0,
                )
                acc += x.to(acc_ty) * cb[:, None]
            tl.store(out_ptr + v * D + d64, tl.sum(acc, axis=0), mask=mask_d)


# ---------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------

# GPU (H100, sm_90) tiles at num_warps=4. Registers per thread from ptxas (triton 3.8), no
# spills (asserted in test_triton_aot.py):
#   norm fp32 64/16: 128, fp16/bf16 64/16: 142/157 (wgmma), fp64 32/32: 69 (fp32 64/32 spills)
#   scatter 16/64: 64-71   segment 16/16/64: 92-126   (32/128 tiles reach 255 registers)
_GPU_NORM = {"BLOCK_T": 64, "BLOCK_K": 16}
_GPU_NORM_FP64 = {"BLOCK_T": 32, "BLOCK_K": 32}
_GPU_SCATTER = {"BLOCK_R": 16, "BLOCK_D": 64}
_GPU_SEGMENT = {"BLOCK_S": 16, "BLOCK_R": 16, "BLOCK_D": 64}
_GPU_NUM_WARPS = 4
# Interpreter: big tiles (cost is per program and per op).
_CPU_NORM = {"BLOCK_T": 128, "BLOCK_K": 128}
_CPU_SCATTER = {"BLOCK_R": 128, "BLOCK_D": 256}
_CPU_SEGMENT = {"BLOCK_S": 32, "BLOCK_R": 64, "BLOCK_D": 256}

_MAX_ROWS = 2**31 - 1 - 4096


def _norm_config(g: torch.Tensor, T: int, D: int) -> dict:
    if is_interpreter(g.device):
        caps = _CPU_NORM
    else:
        caps = _GPU_NORM_FP64 if g.dtype == torch.float64 else _GPU_NORM
    return {"BLOCK_T": clamp_block(T, caps["BLOCK_T"]), "BLOCK_K": clamp_block(D, caps["BLOCK_K"])}


def _sum_config(g: torch.Tensor, rows: int, D: int, deterministic: bool) -> dict:
    interp = is_interpreter(g.device)
    if deterministic:
        caps = _CPU_SEGMENT if interp else _GPU_SEGMENT
    else:
        caps = _CPU_SCATTER if interp else _GPU_SCATTER
    # no tl.dot here: blocks may be smaller than 16
    cfg = dict(caps)
    cfg["BLOCK_R"] = min(caps["BLOCK_R"], triton.next_power_of_2(max(rows, 1)))
    cfg["BLOCK_D"] = min(caps["BLOCK_D"], triton.next_power_of_2(max(D, 1)))
    return cfg


# ---------------------------------------------------------------------------
# Checks and launchers
# ---------------------------------------------------------------------------


def _check_ids_g(op: str, ids, g) -> None:
    if not isinstance(ids, torch.Tensor) or not isinstance(g, torch.Tensor):
        raise ValueError(f"{op}: ids and g must be tensors")
    if ids.dim() != 2 or g.dim() != 3 or tuple(ids.shape) != tuple(g.shape[:2]):
        raise ValueError(
            f"{op}: expected ids:[B,T] and g:[B,T,d], got ids.shape={tuple(ids.shape)} and "
            f"g.shape={tuple(g.shape)}"
        )
    if ids.dtype not in ID_DTYPES:
        raise ValueError(f"{op}: ids must be int32 or int64, got {ids.dtype}")
    if g.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"{op}: unsupported dtype {g.dtype} for g; supported: float32, float64, float16, bfloat16"
        )
    if ids.device != g.device:
        raise ValueError(f"{op}: ids and g must be on the same device, got {ids.device} and {g.device}")


def _check_c(op: str, g, c) -> None:
    if not isinstance(c, torch.Tensor):
        raise ValueError(f"{op}: c must be a tensor")
    if c.dim() != 1 or c.shape[0] != g.shape[0]:
        raise ValueError(
            f"{op}: c must have shape [B] = [{g.shape[0]}] (one clip factor per example), "
            f"got c.shape={tuple(c.shape)}"
        )
    if not c.is_floating_point():
        raise ValueError(f"{op}: c must be a floating-point tensor, got {c.dtype}")
    if c.device != g.device:
        raise ValueError(f"{op}: c must be on the same device as g, got {c.device} and {g.device}")


def _pad_args(padding_idx: Optional[int]) -> tuple[int, bool]:
    return (0, False) if padding_idx is None else (int(padding_idx), True)


def _launch_norm(ids, g, padding_idx, config: dict | None = None) -> torch.Tensor:
    B, T, D = g.shape
    if B == 0 or T == 0 or D == 0:
        return torch.zeros(B, dtype=out_dtype(g.dtype), device=g.device)
    cfg = dict(config) if config is not None else _norm_config(g, T, D)
    nt = triton.cdiv(T, cfg["BLOCK_T"])
    check_grid(_NORM_OP, B * (nt * (nt + 1) // 2))
    # The programs' shares summed in a fixed order: bitwise reproducible (ghost norm's scheme);
    # a skipped tile pair leaves its share at zero.
    return shares_summed(ids, g, nt * (nt + 1) // 2,
                         lambda ids, g, out, grid: _norm_grid(ids, g, out, grid, cfg, padding_idx), zeroed=True)


def _norm_grid(ids, g, out, grid, cfg, padding_idx):
    T, D = g.shape[1], g.shape[2]
    pad, has_pad = _pad_args(padding_idx)
    with on_device(ids):  # Triton launches on the current device and stream
        torch.library.wrap_triton(_embedding_norm_kernel)[grid](
            ids, g, out,
            T, D,
            ids.stride(0), ids.stride(1),
            g.stride(0), g.stride(1), g.stride(2),
            pad,
            BLOCK_T=cfg["BLOCK_T"],
            BLOCK_K=cfg["BLOCK_K"],
            HAS_PAD=has_pad,
            UPCAST=is_interpreter(g.device),
            num_warps=_GPU_NUM_WARPS,
        )


def _launch_sum(ids, g, c, num_embeddings: int, padding_idx, deterministic: bool,
                config: dict | None = None) -> torch.Tensor:
    B, T, D = g.shape
    V = num_embeddings
    acc = out_dtype(g.dtype)
    out = torch.zeros(V, D, dtype=acc, device=g.device)
    rows = B * T
    if rows == 0 or D == 0 or V == 0:
        return out
    if rows > _MAX_ROWS:
        raise ValueError(f"{_SUM_OP}: B*T = {rows} rows is too many for one launch; split the batch")
    cfg = dict(config) if config is not None else _sum_config(g, rows, D, deterministic)
    if padding_idx is not None and padding_idx < 0:
        padding_idx += V  # torch.nn.Embedding's convention
    pad, has_pad = _pad_args(padding_idx)
    if c.dtype == torch.float64 and acc != torch.float64:
        c = c.to(acc)
    nd = triton.cdiv(D, cfg["BLOCK_D"])
    if not deterministic:
        grid = (triton.cdiv(rows, cfg["BLOCK_R"]), nd)
        with on_device(ids):  # Triton launches on the current device and stream
            torch.library.wrap_triton(_embedding_scatter_kernel)[grid](
                ids, g, c, out,
                T, D, V, rows,
                ids.stride(0), ids.stride(1),
                g.stride(0), g.stride(1), g.stride(2),
                c.stride(0),
                pad,
                BLOCK_R=cfg["BLOCK_R"],
                BLOCK_D=cfg["BLOCK_D"],
                HAS_PAD=has_pad,
                num_warps=_GPU_NUM_WARPS,
            )
        return out
    # Rows ordered by (id, row): a stable sort of the row-major flattened ids keeps equal
    # ids in row order, so the order of the sums does not depend on the sort's internals.
    sorted_ids, perm = torch.sort(ids.reshape(-1), stable=True)
    ends = torch.searchsorted(sorted_ids, sorted_ids, right=True)  # end of each id's run
    grid = (triton.cdiv(rows, cfg["BLOCK_S"]), nd)
    with on_device(sorted_ids):  # Triton launches on the current device and stream
        torch.library.wrap_triton(_embedding_segment_kernel)[grid](
            sorted_ids, perm, ends, g, c, out,
            T, D, V, rows,
            g.stride(0), g.stride(1), g.stride(2),
            c.stride(0),
            pad,
            BLOCK_S=cfg["BLOCK_S"],
            BLOCK_R=cfg["BLOCK_R"],
            BLOCK_D=cfg["BLOCK_D"],
            HAS_PAD=has_pad,
            num_warps=_GPU_NUM_WARPS,
        )
    return out


def _is_traced(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return torch.compiler.is_compiling() or is_fake(t)


def _check_ids_range(op: str, ids: torch.Tensor, V: int) -> None:
    """Eager mode only (one device sync): while tracing, the kernels' own skip of bad ids
    is what remains."""
    if ids.numel() == 0 or _is_traced(ids):
        return
    lo, hi = (int(x) for x in torch.aminmax(ids))
    if lo < 0 or hi >= V:
        raise ValueError(
            f"{op}: ids must lie in [0, num_embeddings) = [0, {V}), got values in [{lo}, {hi}]"
        )


# ---------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------


def _embedding_norm_impl(ids: torch.Tensor, g: torch.Tensor, padding_idx: Optional[int]) -> torch.Tensor:
    """[B]: sum_{s,t} [ids_s = ids_t != padding_idx] <g_s, g_t>."""
    _check_ids_g(_NORM_OP, ids, g)
    if g.numel():
        check_launchable(_NORM_OP, g)
    return _launch_norm(ids, g, padding_idx)


def _check_sum_args(ids, g, c, num_embeddings, padding_idx) -> None:
    _check_ids_g(_SUM_OP, ids, g)
    _check_c(_SUM_OP, g, c)
    if num_embeddings < 0:
        raise ValueError(f"{_SUM_OP}: num_embeddings must be >= 0, got {num_embeddings}")
    if padding_idx is not None and not -num_embeddings <= padding_idx < num_embeddings:
        raise ValueError(
            f"{_SUM_OP}: padding_idx must lie in [-num_embeddings, num_embeddings) = "
            f"[{-num_embeddings}, {num_embeddings}), got {padding_idx}"
        )


def _embedding_clipped_sum_impl(
    ids: torch.Tensor,
    g: torch.Tensor,
    c: torch.Tensor,
    num_embeddings: int,
    padding_idx: Optional[int],
    deterministic: bool,
) -> torch.Tensor:
    """[V, d]: out[v] = sum_{b,t: ids=v != padding_idx} c_b g_b,t."""
    _check_sum_args(ids, g, c, num_embeddings, padding_idx)
    if g.numel() and num_embeddings:
        check_launchable(_SUM_OP, g)
    _check_ids_range(_SUM_OP, ids, num_embeddings)
    return _launch_sum(ids, g, c, num_embeddings, padding_idx, deterministic)


def _register():
    if not kernels_interpreted():
        return (
            torch.library.triton_op(_NORM_OP, _embedding_norm_impl, mutates_args=(), schema=_NORM_SCHEMA),
            torch.library.triton_op(_SUM_OP, _embedding_clipped_sum_impl, mutates_args=(), schema=_SUM_SCHEMA),
        )
    # Interpreter: opaque custom ops with fake kernels (see triton_norms._register).
    norm = torch.library.custom_op(_NORM_OP, _embedding_norm_impl, mutates_args=(), schema=_NORM_SCHEMA)
    clipped = torch.library.custom_op(_SUM_OP, _embedding_clipped_sum_impl, mutates_args=(), schema=_SUM_SCHEMA)

    @norm.register_fake
    def _norm_fake(ids, g, padding_idx):
        _check_ids_g(_NORM_OP, ids, g)
        return g.new_empty((g.shape[0],), dtype=out_dtype(g.dtype))

    @clipped.register_fake
    def _sum_fake(ids, g, c, num_embeddings, padding_idx, deterministic):
        _check_sum_args(ids, g, c, num_embeddings, padding_idx)
        return g.new_empty((num_embeddings, g.shape[2]), dtype=out_dtype(g.dtype))

    return norm, clipped


embedding_norm_triton, embedding_clipped_sum_triton = _register()


# ---------------------------------------------------------------------------
# Ahead-of-time compile specs
# ---------------------------------------------------------------------------

_ID_PTR = {torch.int32: "*i32", torch.int64: "*i64"}


def _sig(kernel, pointers: dict, scalars: dict, constexprs: dict) -> dict:
    sig = dict(pointers)
    sig.update(scalars)
    sig.update({k: "constexpr" for k in constexprs})
    return {k: sig[k] for k in kernel.arg_names}


def aot_compile_specs() -> list[tuple[str, object, dict, dict]]:
    """``(name, kernel, signature, constexprs)`` for the three kernels x every g dtype, at the
    default GPU tiles (int64 ids, with padding) and at small tiles (int32 ids, without
    padding); see ``triton_norms.aot_compile_specs``. c is fp32 (fp64 for fp64)."""
    norm_k = as_jit_function(_embedding_norm_kernel)
    scatter_k = as_jit_function(_embedding_scatter_kernel)
    segment_k = as_jit_function(_embedding_segment_kernel)
    i64 = "i64"
    specs = []
    for dtype in SUPPORTED_DTYPES:
        ptr = TRITON_PTR_TYPE[dtype]
        acc_ptr = TRITON_PTR_TYPE[out_dtype(dtype)]
        tag = dtype_tag(dtype)
        variants = {
            "default": (torch.int64, True,
                        _GPU_NORM_FP64 if dtype == torch.float64 else _GPU_NORM,
                        _GPU_SCATTER, _GPU_SEGMENT),
            "small": (torch.int32, False, {"BLOCK_T": MIN_BLOCK, "BLOCK_K": MIN_BLOCK},
                      {"BLOCK_R": 16, "BLOCK_D": 16}, {"BLOCK_S": 4, "BLOCK_R": 4, "BLOCK_D": 16}),
            # one row, d = 1 or 2: the summing kernels' blocks shrink to the next power of two
            "tiny": (torch.int64, True, {"BLOCK_T": MIN_BLOCK, "BLOCK_K": 32},
                     {"BLOCK_R": 1, "BLOCK_D": 2}, {"BLOCK_S": 16, "BLOCK_R": 1, "BLOCK_D": 1}),
            "tiny8": (torch.int32, False, {"BLOCK_T": 32, "BLOCK_K": MIN_BLOCK},
                      {"BLOCK_R": 8, "BLOCK_D": 4}, {"BLOCK_S": 16, "BLOCK_R": 2, "BLOCK_D": 8}),
        }
        for cname, (id_dtype, has_pad, norm_cfg, scatter_cfg, segment_cfg) in variants.items():
            ids_ptr = _ID_PTR[id_dtype]
            cx = dict(norm_cfg, HAS_PAD=has_pad, UPCAST=False)
            sig = _sig(norm_k, {"ids_ptr": ids_ptr, "g_ptr": ptr, "out_ptr": acc_ptr},
                       {"T": "i32", "D": "i32", "stride_ib": i64, "stride_it": i64,
                        "stride_gb": i64, "stride_gt": i64, "stride_gd": i64, "pad": i64}, cx)
            specs.append((f"embedding_norm_{tag}_{cname}", norm_k, sig, cx))

            cx = dict(scatter_cfg, HAS_PAD=has_pad)
            sig = _sig(scatter_k, {"ids_ptr": ids_ptr, "g_ptr": ptr, "c_ptr": acc_ptr,
                                   "out_ptr": acc_ptr},
                       {"T": "i32", "D": "i32", "V": "i32", "ROWS": "i32", "stride_ib": i64,
                        "stride_it": i64, "stride_gb": i64, "stride_gt": i64, "stride_gd": i64,
                        "stride_c": i64, "pad": i64}, cx)
            specs.append((f"embedding_scatter_{tag}_{cname}", scatter_k, sig, cx))

            cx = dict(segment_cfg, HAS_PAD=has_pad)
            sig = _sig(segment_k, {"sorted_ids_ptr": ids_ptr, "perm_ptr": "*i64", "ends_ptr": "*i64",
                                   "g_ptr": ptr, "c_ptr": acc_ptr, "out_ptr": acc_ptr},
                       {"T": "i32", "D": "i32", "V": "i32", "ROWS": "i32", "stride_gb": i64,
                        "stride_gt": i64, "stride_gd": i64, "stride_c": i64, "pad": i64}, cx)
            specs.append((f"embedding_segment_{tag}_{cname}", segment_k, sig, cx))
    return specs
