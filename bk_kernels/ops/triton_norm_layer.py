"""Triton kernel for the per-example affine gradients of a normalisation layer.

For a LayerNorm/GroupNorm-style layer with normalised input ``xhat: [B, T, C]`` and output
gradient ``g: [B, T, C]`` (any strides, each its own), the per-example gradients of the
affine weight and bias and their squared norms are::

    gw [B, C] = sum_t xhat * g      gb [B, C] = sum_t g      sq_norms [B] = ||gw_b||^2 + ||gb_b||^2

(``gb`` is ``[B, 0]`` and left out of ``sq_norms`` when ``bias=False``.)

One program per (example, C-block) sums ``[BLOCK_T, BLOCK_C]`` tiles over t in registers,
stores its columns of ``gw``/``gb`` and its share of their squared sum (the shares summed in a
fixed order afterwards, so the result is bitwise reproducible) into
``sq_norms[b]`` (so ``sq_norms`` is not bitwise deterministic on a GPU when C spans several
blocks). Loads are upcast in registers: accumulation and outputs in float32 (float64 for
float64 inputs).

Importing this module registers ``bk::norm_layer_grads_triton(Tensor xhat, Tensor g, bool
bias) -> (Tensor, Tensor, Tensor)``: a ``triton_op`` for compiled kernels, an opaque
``custom_op`` with a fake kernel in interpreter mode (see ``triton_norms``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import (
    SUPPORTED_DTYPES,
    TRITON_PTR_TYPE,
    as_jit_function,
    check_grid,
    check_launchable,
    dtype_tag,
    is_interpreter,
    kernels_interpreted,
    on_device,
    out_dtype,
)

__all__ = ["norm_layer_grads_triton", "aot_compile_specs"]

_OP = "bk::norm_layer_grads_triton"
_SCHEMA = "(Tensor xhat, Tensor g, bool bias) -> (Tensor, Tensor, Tensor)"


@triton.jit
def _norm_layer_grads_kernel(
    x_ptr,
    g_ptr,
    gw_ptr,
    gb_ptr,
    sq_ptr,
    T,
    C,
    stride_xb,
    stride_xt,
    stride_xc,
    stride_gb,
    stride_gt,
    stride_gc,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    """Flattened grid B * cdiv(C, BLOCK_C), (b, C-block) with the C-block fastest."""
    acc_ty = gw_ptr.dtype.element_ty
    num_cb = tl.cdiv(C, BLOCK_C)
    pid = tl.program_id(0)
    b = pid // num_cb
    cb = pid - b * num_cb
    b64 = b.to(tl.int64)
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    c64 = offs_c.to(tl.int64)
    offs_t = tl.arange(0, BLOCK_T)
    x_base = x_ptr + b64 * stride_xb
    g_base = g_ptr + b64 * stride_gb

    accw = tl.zeros((BLOCK_T, BLOCK_C), dtype=acc_ty)
    accb = tl.zeros((BLOCK_T, BLOCK_C), dtype=acc_ty)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + offs_t
        t64 = t.to(tl.int64)
        m = (t < T)[:, None] & mask_c[None, :]
        x = tl.load(x_base + t64[:, None] * stride_xt + c64[None, :] * stride_xc, mask=m, other=0.0)
        y = tl.load(g_base + t64[:, None] * stride_gt + c64[None, :] * stride_gc, mask=m, other=0.0)
        y = y.to(acc_ty)
        accw += x.to(acc_ty) * y
        if HAS_BIAS:
            accb += y
    gw = tl.sum(accw, axis=0)
    tl.store(gw_ptr + b64 * C + c64, gw, mask=mask_c)
    sq = tl.sum(gw * gw, axis=0)
    if HAS_BIAS:
        gb = tl.sum(accb, axis=0)
        tl.store(gb_ptr + b64 * C + c64, gb, mask=mask_c)
        sq += tl.sum(gb * gb, axis=0)
    tl.store(sq_ptr + pid.to(tl.int64), sq)  # this program's share of sq[b], summed in a fixed order


# GPU (H100, sm_90) tiles at num_warps=4: a [16, 128] tile of each input per step; ptxas
# (triton 3.8) reports 80 registers for fp32/fp16/bf16 and 154 for fp64 with bias, no spills
# ([32, 128] spills for fp16). The interpreter pays per op: bigger tiles.
_GPU = {"BLOCK_T": 16, "BLOCK_C": 128}
_GPU_NUM_WARPS = 4
_CPU = {"BLOCK_T": 128, "BLOCK_C": 256}


def _config(x: torch.Tensor, T: int, C: int) -> dict:
    caps = _CPU if is_interpreter(x.device) else _GPU
    return {"BLOCK_T": min(caps["BLOCK_T"], triton.next_power_of_2(max(T, 1))),
            "BLOCK_C": min(caps["BLOCK_C"], triton.next_power_of_2(max(C, 1)))}


def _check_inputs(op: str, xhat, g) -> None:
    if not isinstance(xhat, torch.Tensor) or not isinstance(g, torch.Tensor):
        raise ValueError(f"{op}: xhat and g must be tensors")
    if xhat.dim() != 3 or tuple(xhat.shape) != tuple(g.shape):
        raise ValueError(
            f"{op}: expected xhat and g of one shape [B,T,C], got xhat.shape={tuple(xhat.shape)} "
            f"and g.shape={tuple(g.shape)}"
        )
    if xhat.dtype != g.dtype:
        raise ValueError(f"{op}: xhat and g must have the same dtype, got {xhat.dtype} and {g.dtype}")
    if xhat.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"{op}: unsupported dtype {xhat.dtype}; supported: float32, float64, float16, bfloat16"
        )
    if xhat.device != g.device:
        raise ValueError(f"{op}: xhat and g must be on the same device, got {xhat.device} and {g.device}")


def _launch(xhat, g, bias: bool, config: dict | None = None):
    B, T, C = xhat.shape
    acc = out_dtype(xhat.dtype)
    gw = torch.zeros(B, C, dtype=acc, device=xhat.device)
    gb = torch.zeros(B, C if bias else 0, dtype=acc, device=xhat.device)
    if B == 0 or T == 0 or C == 0:
        return gw, gb, torch.zeros(B, dtype=acc, device=xhat.device)
    cfg = dict(config) if config is not None else _config(xhat, T, C)
    num_cb = triton.cdiv(C, cfg["BLOCK_C"])
    grid = (B * num_cb,)
    check_grid(_OP, grid[0])
    shares = torch.empty(grid[0], dtype=acc, device=xhat.device)  # summed in a fixed order: reproducible
    with on_device(xhat):  # Triton launches on the current device and stream
        torch.library.wrap_triton(_norm_layer_grads_kernel)[grid](
            xhat, g, gw, gb, shares,
            T, C,
            xhat.stride(0), xhat.stride(1), xhat.stride(2),
            g.stride(0), g.stride(1), g.stride(2),
            BLOCK_T=cfg["BLOCK_T"],
            BLOCK_C=cfg["BLOCK_C"],
            HAS_BIAS=bias,
            num_warps=_GPU_NUM_WARPS,
        )
    return gw, gb, shares.view(B, num_cb).sum(1)


def _norm_layer_grads_impl(
    xhat: torch.Tensor, g: torch.Tensor, bias: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gw [B,C] = sum_t xhat*g, gb [B,C] = sum_t g or [B,0], sq_norms [B])."""
    _check_inputs(_OP, xhat, g)
    if xhat.numel():
        check_launchable(_OP, xhat)
    return _launch(xhat, g, bias)


def _register():
    if not kernels_interpreted():
        return torch.library.triton_op(_OP, _norm_layer_grads_impl, mutates_args=(), schema=_SCHEMA)
    op = torch.library.custom_op(_OP, _norm_layer_grads_impl, mutates_args=(), schema=_SCHEMA)

    @op.register_fake
    def _fake(xhat, g, bias):
        _check_inputs(_OP, xhat, g)
        B, _, C = xhat.shape
        acc = out_dtype(xhat.dtype)
        return (xhat.new_empty((B, C), dtype=acc), xhat.new_empty((B, C if bias else 0), dtype=acc),
                xhat.new_empty((B,), dtype=acc))

    return op


norm_layer_grads_triton = _register()


def aot_compile_specs() -> list[tuple[str, object, dict, dict]]:
    """``(name, kernel, signature, constexprs)`` for every dtype with and without bias at the
    default GPU tiles, and at small and tiny tiles (sizes 1..8, as the launcher picks for tiny
    T and C); see ``triton_norms.aot_compile_specs``."""
    kernel = as_jit_function(_norm_layer_grads_kernel)
    specs = []
    for dtype in SUPPORTED_DTYPES:
        ptr = TRITON_PTR_TYPE[dtype]
        acc_ptr = TRITON_PTR_TYPE[out_dtype(dtype)]
        for cname, cfg, bias in (("default", _GPU, True), ("default", _GPU, False),
                                 ("small", {"BLOCK_T": 4, "BLOCK_C": 16}, True),
                                 # T = 1 and C = 1 or 2 (next powers of two below 16: no dot here)
                                 ("tiny", {"BLOCK_T": 1, "BLOCK_C": 2}, True),
                                 ("tiny", {"BLOCK_T": 2, "BLOCK_C": 1}, False)):
            constexprs = dict(cfg, HAS_BIAS=bias)
            sig = {"x_ptr": ptr, "g_ptr": ptr, "gw_ptr": acc_ptr, "gb_ptr": acc_ptr, "sq_ptr": acc_ptr,
                   "T": "i32", "C": "i32"}
            sig.update({s: "i64" for s in ("stride_xb", "stride_xt", "stride_xc", "stride_gb",
                                           "stride_gt", "stride_gc")})
            sig.update({k: "constexpr" for k in constexprs})
            sig = {k: sig[k] for k in kernel.arg_names}
            name = f"norm_layer_grads_{dtype_tag(dtype)}_{cname}_{'bias' if bias else 'nobias'}"
            specs.append((name, kernel, sig, constexprs))
    return specs
