"""Triton kernel adding Gaussian noise to a gradient and scaling it, in place.

``bk::add_noise_triton(Tensor(a!) grad, float std, float scale, int seed, int offset) -> ()``::

    grad = (grad + std * z) * scale,      z ~ N(0, 1) in float32

Counter layout (the one of docs/OPS.md, "Noise", shared with the CPU/CUDA ``add_noise_``):
Philox4x32-10 keyed by ``(seed & 0xffffffff, (seed >> 32) & 0xffffffff)`` (``seed`` as a
64-bit two's-complement integer). Element ``i`` of ``grad`` in its row-major (contiguous)
order uses the counter ``n = offset + i``: Philox block ``q = n // 4`` (counter words
``(q & 0xffffffff, q >> 32, 0, 0)``) and lane ``n % 4``. Each block's four words
``w0..w3`` become four normals by Box-Muller on the pairs (w0, w1) and (w2, w3), in float32::

    u1 = (float(wa) + 1) * 2^-32   (never 0)      u2 = float(wb) * 2^-32
    r = sqrt(-2 ln u1),  theta = float32(2 pi) * u2
    lanes 0, 1 (pair w0, w1) and 2, 3 (pair w2, w3): r cos(theta), r sin(theta)

So |z| <= sqrt(64 ln 2) ~ 6.66. A call consumes counters ``offset .. offset + numel - 1``;
the caller advances ``offset`` by ``numel`` rounded up to a multiple of 4, so successive
calls never share a Philox block. The same ``(seed, offset)`` gives the same noise; a
different backend may differ in the last bits of the transcendental functions only.

Arithmetic: ``(grad + std * z) * scale`` in float32 for fp32/fp16/bf16 grads (``std`` and
``scale`` rounded to fp32) and in float64 for fp64 grads (z upcast; ``std``/``scale`` are
passed to the kernel as fp64), rounded once to ``grad``'s dtype. One program handles
``BLOCK_Q`` consecutive Philox blocks, i.e. ``4 * BLOCK_Q`` consecutive elements; a
non-contiguous ``grad`` is processed in a contiguous copy that is copied back.

Importing this module registers the op: a ``triton_op`` (``mutates_args=("grad",)``) for
compiled kernels, an opaque mutating ``custom_op`` with a fake kernel in interpreter mode.
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
)

__all__ = ["add_noise_triton", "aot_compile_specs"]

_OP = "bk::add_noise_triton"
_SCHEMA = "(Tensor(a!) grad, float std, float scale, int seed, int offset) -> ()"
_TWO_POW_M32 = tl.constexpr(2.3283064365386963e-10)  # 2^-32, exact in fp32


@triton.jit
def _log_u1(w):
    """ln((w + 1) 2^-32) for uint32 w, in (-22.2, 0], as the CUDA kernel computes it: for
    u1 > 1/2 as log1p(-(~w) 2^-32) (1 - u1 is exact in the integers, so u1 near 1 keeps its
    relative precision; log1p by Kahan's log(u) * y / (u - 1)), else as the log of the rounded u1."""
    y = (0xFFFFFFFF - w).to(tl.float32) * -_TWO_POW_M32  # -(1 - u1): ~w, exact up to one rounding
    u = 1.0 + y
    log1p = tl.where(u == 1.0, y, tl.log(u) * (y / tl.where(u == 1.0, 1.0, u - 1.0)))
    low = tl.log((w + 1).to(tl.float32) * _TWO_POW_M32)  # w < 2^31 there: no wrap-around
    return tl.where(w >= 0x80000000, log1p, low)


@triton.jit
def _sincos_turn(w):
    """(cos, sin) of 2 pi w 2^-32 for uint32 w, as the CUDA kernel: the turn splits exactly in
    the integers into a quadrant and a remainder in [-1/8, 1/8) of a turn, whose angle
    (|x| <= pi / 4) alone is rounded."""
    t = w + 0x20000000  # an eighth of a turn ahead: quadrants centred on 0 (wraps, as uint32)
    quadrant = t >> 30
    r = (t & 0x3FFFFFFF).to(tl.int32) - 0x20000000  # [-2^29, 2^29)
    x = (r.to(tl.float32) * 4.656612873077393e-10) * 3.141592653589793  # pi r 2^-31
    sin_x, cos_x = tl.sin(x), tl.cos(x)
    odd = (quadrant & 1) == 1
    c = tl.where(odd, sin_x, cos_x)
    s = tl.where(odd, cos_x, sin_x)
    c = tl.where((quadrant == 1) | (quadrant == 2), -c, c)
    s = tl.where(quadrant >= 2, -s, s)
    return c, s


@triton.jit
def _box_muller(wa, wb):
    r = tl.sqrt(-2.0 * _log_u1(wa))
    c, s = _sincos_turn(wb)
    return r * c, r * s


@triton.jit(do_not_specialize=["N", "seed", "q0", "r0"])
def _add_noise_kernel(
    x_ptr,
    N: tl.int64,
    std: tl.float64,
    scale: tl.float64,
    seed: tl.int64,
    q0: tl.int64,
    r0,
    BLOCK_Q: tl.constexpr,
):
    """Program p draws Philox blocks q0 + p*BLOCK_Q + [0, BLOCK_Q) and updates the elements
    i = 4 (q - q0) + lane - r0 that lie in [0, N) (offset = 4 q0 + r0, 0 <= r0 < 4)."""
    pid = tl.program_id(0).to(tl.int64)
    q = q0.to(tl.int64) + pid * BLOCK_Q + tl.arange(0, BLOCK_Q)
    w0, w1, w2, w3 = tl.randint4x(seed, q)
    z0, z1 = _box_muller(w0, w1)
    z2, z3 = _box_muller(w2, w3)
    # [BLOCK_Q, 2, 2] with z[q, j, k] = lane 2 j + k, flattened row-major: lane order
    z = tl.reshape(tl.join(tl.join(z0, z2), tl.join(z1, z3)), [4 * BLOCK_Q])

    i = pid * (4 * BLOCK_Q) - r0 + tl.arange(0, 4 * BLOCK_Q)
    mask = (i >= 0) & (i < N)
    x = tl.load(x_ptr + i, mask=mask, other=0.0)
    if x_ptr.dtype.element_ty == tl.float64:
        y = (x + tl.full((), std, tl.float64) * z.to(tl.float64)) * tl.full((), scale, tl.float64)
    else:
        y = (x.to(tl.float32) + tl.full((), std, tl.float32) * z) * tl.full((), scale, tl.float32)
    if x_ptr.dtype.element_ty == tl.bfloat16:
        # Rounded to nearest even in the integers, as the CPU and CUDA kernels round: Triton's
        # interpreter truncates float32 -> bfloat16 (a GPU rounds; this gives the same bits).
        bits = y.to(tl.uint32, bitcast=True)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).to(tl.uint16)
        rounded = tl.where(y != y, 0x7FC0, rounded)  # NaN stays NaN
        tl.store(x_ptr + i, rounded.to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(x_ptr + i, y.to(x_ptr.dtype.element_ty), mask=mask)


_GPU_BLOCK_Q = 256  # 1024 elements per program at num_warps=4
_GPU_NUM_WARPS = 4
_CPU_BLOCK_Q = 16384  # the interpreter pays per program and per op


def _launch(x: torch.Tensor, std: float, scale: float, seed: int, offset: int,
            block_q: int | None = None) -> None:
    """x contiguous, numel > 0."""
    n = x.numel()
    if block_q is None:
        block_q = _GPU_BLOCK_Q
        if is_interpreter(x.device):  # one program for up to 2^16 elements, no huge tiles
            block_q = min(_CPU_BLOCK_Q, max(16, triton.next_power_of_2(triton.cdiv(n + 3, 4))))
    q0, r0 = divmod(offset, 4)
    grid = (triton.cdiv(n + r0, 4 * block_q),)
    check_grid(_OP, grid[0])
    with on_device(x):  # Triton launches on the current device and stream
        torch.library.wrap_triton(_add_noise_kernel)[grid](
            x, n, float(std), float(scale), seed, q0, r0,
            BLOCK_Q=block_q,
            num_warps=_GPU_NUM_WARPS,
        )


def _check_args(grad, std, scale, seed, offset) -> None:
    if not isinstance(grad, torch.Tensor):
        raise ValueError(f"{_OP}: grad must be a tensor")
    if grad.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"{_OP}: unsupported dtype {grad.dtype}; supported: float32, float64, float16, bfloat16"
        )
    if not std >= 0:
        raise ValueError(f"{_OP}: std must be >= 0, got {std}")
    if offset < 0:
        raise ValueError(f"{_OP}: offset must be >= 0, got {offset}")
    if not -(2**63) <= seed < 2**63:
        raise ValueError(f"{_OP}: seed must be a 64-bit integer, got {seed}")
    if offset + grad.numel() + 3 >= 2**63:
        raise ValueError(f"{_OP}: offset + numel overflows the 64-bit counter (offset={offset})")


def _add_noise_impl(grad: torch.Tensor, std: float, scale: float, seed: int, offset: int) -> None:
    """grad = (grad + std * z) * scale in place, z ~ N(0,1) from Philox4x32-10 (see module doc)."""
    _check_args(grad, std, scale, seed, offset)
    if grad.numel() == 0:
        return
    check_launchable(_OP, grad)
    if grad.is_contiguous():
        _launch(grad, std, scale, seed, offset)
    else:
        tmp = grad.contiguous()  # row-major order = the counter order
        _launch(tmp, std, scale, seed, offset)
        grad.copy_(tmp)


def _register():
    if not kernels_interpreted():
        return torch.library.triton_op(_OP, _add_noise_impl, mutates_args=("grad",), schema=_SCHEMA)
    op = torch.library.custom_op(_OP, _add_noise_impl, mutates_args=("grad",), schema=_SCHEMA)

    @op.register_fake
    def _fake(grad, std, scale, seed, offset):
        _check_args(grad, std, scale, seed, offset)
        return None

    return op


add_noise_triton = _register()


def aot_compile_specs() -> list[tuple[str, object, dict, dict]]:
    """``(name, kernel, signature, constexprs)`` for every grad dtype at the GPU block size;
    see ``triton_norms.aot_compile_specs``."""
    kernel = as_jit_function(_add_noise_kernel)
    specs = []
    for dtype in SUPPORTED_DTYPES:
        constexprs = {"BLOCK_Q": _GPU_BLOCK_Q}
        sig = {"x_ptr": TRITON_PTR_TYPE[dtype], "N": "i64", "std": "fp64", "scale": "fp64",
               "seed": "i64", "q0": "i64", "r0": "i32", "BLOCK_Q": "constexpr"}
        sig = {k: sig[k] for k in kernel.arg_names}
        specs.append((f"add_noise_{dtype_tag(dtype)}", kernel, sig, constexprs))
    return specs
