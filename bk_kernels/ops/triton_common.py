"""What the Triton kernel modules share: dtypes, block sizes, interpreter detection, input and
launch checks, the upper-triangular block-pair grid and the Gram tile (jit helpers), and the
ahead-of-time compile helpers. The dtype rule: accumulate (and return) float64 for float64
inputs, float32 otherwise (out_dtype)."""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from ._norm_common import accumulation_dtype

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


@triton.jit
def example_and_pair(T, BLOCK_T: tl.constexpr):
    """(b, sb, tb) of this program in a 1-D grid of B * NT (NT + 1) / 2 programs, b-major,
    NT = cdiv(T, BLOCK_T): example b and its upper-triangular block pair sb <= tb."""
    num_tb = tl.cdiv(T, BLOCK_T).to(tl.int64)  # int64: num_tb (num_tb + 1) passes 2^31 for T > ~3M
    num_pairs = num_tb * (num_tb + 1) // 2
    pid = tl.program_id(0).to(tl.int64)
    b = pid // num_pairs
    sb, tb = pair_blocks((pid - b * num_pairs).to(tl.int64))
    return b, sb, tb


@triton.jit
def pair_blocks(pair):
    """(sb, tb) with pair = tb (tb + 1) / 2 + sb, 0 <= sb <= tb: an upper-triangular block pair.

    Inverted with a float sqrt (an approximate one on the GPU), then the rounding error, at
    most +-1 for any pair index below 2^31, is fixed with exact integer arithmetic.
    """
    tb = ((tl.sqrt((8 * pair + 1).to(tl.float32)) - 1.0) * 0.5).to(tl.int64)
    tb = tl.where(tb * (tb + 1) // 2 > pair, tb - 1, tb)
    tb = tl.where((tb + 1) * (tb + 2) // 2 <= pair, tb + 1, tb)
    return pair - tb * (tb + 1) // 2, tb


@triton.jit
def gram_tile(base, rs64, rt64, mask_s, mask_t, K, stride_t, stride_k, gram,
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
        gram = tl.dot(x, y, gram, input_precision="ieee", out_dtype=gram.dtype)
    return gram


MIN_BLOCK = 16  # tl.dot needs every dimension >= 16


def clamp_block(n: int, cap: int) -> int:
    """Smallest power of two >= n, clamped to [16, cap]."""
    return max(MIN_BLOCK, min(cap, triton.next_power_of_2(max(int(n), 1))))


def kernels_interpreted() -> bool:
    """True if triton was in interpreter mode (TRITON_INTERPRET=1) when the kernels were
    decorated (this module's and every kernel module's, imported after it); @triton.jit then
    returns InterpretedFunction objects."""
    return not isinstance(example_and_pair, triton.runtime.jit.JITFunction)


def is_interpreter(device: torch.device) -> bool:
    """Whether a launch on ``device`` goes through the Triton interpreter."""
    return device.type == "cpu" or kernels_interpreted()


def on_device(t: torch.Tensor):
    """Where a launch for ``t`` must run: Triton launches on the CURRENT device and its current
    stream, so tensors on cuda:1 while cuda:0 is current need the guard (as CUDAGuard in the C++
    bindings). Nothing on the CPU (the interpreter)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


# Programs that reduce to one value per example store their shares; one launch's shares stay
# within this many elements (256 MiB in fp32): more examples go in further launches.
MAX_SHARES = 1 << 26


def shares_summed(x, y, programs_per_example, launch, zeroed=False):
    """out[b] (in the accumulation dtype of y) as the sum, in a fixed order, of the shares
    [B, programs_per_example] that `launch(x_chunk, y_chunk, shares, grid)`'s programs store:
    bitwise reproducible run to run on a GPU (no float atomics). zeroed: programs may skip their
    store (shares start at zero)."""
    B = y.shape[0]
    acc = out_dtype(y.dtype)
    out = torch.zeros(B, dtype=acc, device=y.device)
    chunk = max(1, MAX_SHARES // programs_per_example)
    for lo in range(0, B, chunk):
        hi = min(B, lo + chunk)
        n = (hi - lo) * programs_per_example
        shares = (torch.zeros if zeroed else torch.empty)(n, dtype=acc, device=y.device)
        launch(x[lo:hi], y[lo:hi], shares, (n,))
        out[lo:hi] = shares.view(hi - lo, programs_per_example).sum(1)
    return out


def check_linear_inputs(op: str, a: torch.Tensor, g: torch.Tensor) -> None:
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


def check_launchable(op: str, a: torch.Tensor) -> None:
    if a.device.type == "cpu" and not kernels_interpreted():
        raise ValueError(
            f"{op}: got CPU tensors, but Triton kernels only run on CPU through the Triton "
            "interpreter; set TRITON_INTERPRET=1 in the environment before triton is first "
            "imported, or use a CUDA device"
        )


MAX_GRID_X = 2**31 - 1


def check_grid(op: str, programs: int) -> None:
    if programs > MAX_GRID_X:
        raise ValueError(
            f"{op}: problem too large for one launch ({programs} programs > 2^31 - 1); "
            "split the batch"
        )


out_dtype = accumulation_dtype  # the one dtype rule (_norm_common.py)


TRITON_PTR_TYPE = {
    torch.float32: "*fp32",
    torch.float64: "*fp64",
    torch.float16: "*fp16",
    torch.bfloat16: "*bf16",
}

def dtype_tag(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


_JIT_CACHE: dict = {}


def as_jit_function(kernel):
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
