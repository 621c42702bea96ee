"""add_noise_: the DP noise step, grad = (grad + std * z) * scale, in place and in one pass.

z ~ N(0, 1) comes from Philox4x32-10 keyed by `seed`; element i (in grad's logical row-major
order) uses the counter offset + i, so a (seed, offset) pair names the noise exactly and
successive calls that advance `offset` by numel (rounded up to a multiple of 4) never reuse a
counter. docs/OPS.md ("Noise: the counter layout") is the binding definition; here it is
written out in pure PyTorch (`philox_normals_ref`), which the kernels are tested against.

The CPU kernel draws the normals in float32 for every dtype (Box-Muller with its own
vectorized log/sqrt/sin/cos, a few ulp) and rounds the result once to grad's dtype.
"""
import math

import torch

from . import _backend

_MASK32 = 0xFFFFFFFF
_MUL = (0xD2511F53, 0xCD9E8D57)  # Philox4x32 multipliers
_WEYL = (0x9E3779B9, 0xBB67AE85)  # key schedule increments
_FLOATING = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_INT64_MAX = 2**63 - 1


def counters(numel):
    """The counters a tensor of `numel` elements takes: its numel rounded up to a multiple of 4
    (Philox draws 4 normals per counter block, so the next tensor starts on a fresh block)."""
    return (numel + 3) // 4 * 4


def add_noise_(grad, std, scale, seed, offset, *, backend="auto"):
    """grad = (grad + std * z) * scale in place, z the Philox normals of (seed, offset); returns grad.

    grad: float32/float64/float16/bfloat16 tensor, any shape and strides (element i is the
    i-th in row-major order). std: finite, >= 0 (0 draws nothing: grad *= scale exactly).
    scale: finite. seed: an int in [-2^63, 2^64) (its 64 bits are the Philox key).
    offset: the first counter, >= 0; advance it by numel rounded up to a multiple of 4.
    backend: "auto", "cpu", "cuda", "triton" or "torch" (pure PyTorch, float64 Box-Muller).
    """
    std, scale, seed, offset = _check(grad, std, scale, seed, offset)
    backend = _backend.resolve(backend, grad.device, "add_noise_")
    if backend in ("cpu", "cuda"):
        torch.ops.bk.add_noise_.default(grad, std, scale, seed, offset)
    elif backend == "triton":
        from . import triton_noise  # noqa: F401  (registers torch.ops.bk.add_noise_triton)

        torch.ops.bk.add_noise_triton(grad, std, scale, seed, offset)
    else:
        _add_noise_torch(grad, std, scale, seed, offset)
    return grad


def add_noise_list_(grads, std, scale, seed, offset, *, backend="auto"):
    """add_noise_ on each tensor of `grads` in turn, grads[k] starting at offset + the numels of
    grads[0..k), each rounded up to a multiple of 4: the same values as one add_noise_ call per
    tensor, in one call on the cpu and cuda backends. Everything is checked before anything is
    noised. Returns the next free offset (offset + all those rounded numels).

    grads: a list of tensors on one device (see add_noise_ for the other arguments).
    """
    grads = list(grads)
    if not grads:
        return offset
    std, scale, seed, offset = _check(grads[0], std, scale, seed, offset)
    end = offset
    for grad in grads:
        _check(grad, std, scale, seed, end)  # dtype and overflow of each, before any is noised
        if grad.device != grads[0].device:
            raise ValueError(f"add_noise_list_: grads must be on one device, got {grads[0].device} and {grad.device}")
        end += counters(grad.numel())
    if end > _INT64_MAX:
        raise ValueError(f"add_noise_list_: offset {offset} plus the gradients' elements overflows int64")
    backend = _backend.resolve(backend, grads[0].device, "add_noise_list_")
    if backend in ("cpu", "cuda"):
        torch.ops.bk.add_noise_list_.default(grads, std, scale, seed, offset)
        return end
    for grad in grads:  # triton, torch: one call per tensor
        add_noise_(grad, std, scale, seed, offset, backend=backend)
        offset += counters(grad.numel())
    return end


def _check(grad, std, scale, seed, offset):
    """The arguments as the op takes them (seed as a signed int64), or a clear error."""
    if not isinstance(grad, torch.Tensor):
        raise TypeError(f"add_noise_: grad must be a tensor, got {type(grad).__name__}")
    if grad.dtype not in _FLOATING:
        raise ValueError(
            f"add_noise_: grad must be float32, float64, float16 or bfloat16, got {grad.dtype}")
    std, scale = float(std), float(scale)
    if not (math.isfinite(std) and std >= 0):
        raise ValueError(f"add_noise_: std must be finite and >= 0, got {std}")
    if not math.isfinite(scale):
        raise ValueError(f"add_noise_: scale must be finite, got {scale}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not -(2**63) <= seed < 2**64:
        raise ValueError(f"add_noise_: seed must be an int in [-2^63, 2^64), got {seed!r}")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(
            f"add_noise_: offset (the first Philox counter) must be an int >= 0, got {offset!r}")
    if offset > _INT64_MAX - grad.numel():
        raise ValueError(f"add_noise_: offset {offset} + numel {grad.numel()} overflows int64")
    seed = seed - 2**64 if seed >= 2**63 else seed  # the same 64 bits, as the op's int64
    return std, scale, seed, offset


def _add_noise_torch(grad, std, scale, seed, offset, chunk=1 << 20):
    """Pure PyTorch: the float64 reference, chunk by chunk, rounded once into grad."""
    if std == 0:
        grad.mul_(scale)
        return
    flat = grad.reshape(-1) if grad.is_contiguous() else grad.contiguous().reshape(-1)
    for lo in range(0, flat.numel(), chunk):
        part = flat[lo : lo + chunk]
        z = philox_normals_ref(seed, offset + lo, part.numel(), device=grad.device)
        part.copy_((part.double() + std * z) * scale)
    if not grad.is_contiguous():  # flat was a copy
        grad.copy_(flat.view(grad.shape))


@torch.library.register_fake("bk::add_noise_")
def _add_noise_fake(grad, std, scale, seed, offset):
    return None


def _mulhilo(m, a):
    """(hi, lo) 32-bit words of m * a, a an int64 tensor of uint32 values, exactly: m is split
    in 16-bit halves so that no product leaves int64."""
    p_lo = a * (m & 0xFFFF)  # < 2^48
    p_hi = a * (m >> 16)  # < 2^48; m * a = p_hi 2^16 + p_lo
    s = ((p_hi & 0xFFFF) << 16) + p_lo  # < 2^49
    return (p_hi >> 16) + (s >> 32), s & _MASK32


def philox4x32_10_ref(x0, x1, x2, x3, k0, k1):
    """Philox4x32-10 (Salmon et al., SC'11) of the counters (x0, x1, x2, x3), int64 tensors of
    uint32 words, under the key (k0, k1): the four output words."""
    for _ in range(10):
        hi0, lo0 = _mulhilo(_MUL[0], x0)
        hi1, lo1 = _mulhilo(_MUL[1], x2)
        x0, x1, x2, x3 = hi1 ^ x1 ^ k0, lo1, hi0 ^ x3 ^ k1, lo0
        k0, k1 = (k0 + _WEYL[0]) & _MASK32, (k1 + _WEYL[1]) & _MASK32
    return x0, x1, x2, x3


def philox_words_ref(seed, first_block, n_blocks, device="cpu"):
    """The blocks first_block .. first_block + n_blocks - 1 of add_noise_'s stream (counter
    (q_lo, q_hi, 0, 0), key (seed_lo, seed_hi)): [n_blocks, 4] int64 holding uint32 words."""
    seed &= 2**64 - 1
    q = torch.arange(first_block, first_block + n_blocks, dtype=torch.int64, device=device)
    zero = torch.zeros_like(q)
    words = philox4x32_10_ref(q & _MASK32, q >> 32, zero, zero, seed & _MASK32, seed >> 32)
    return torch.stack(words, dim=1)


def philox_normals_ref(seed, offset, n, device="cpu"):
    """The float64 normals of the counters offset .. offset + n - 1 (docs/OPS.md): counter c is
    lane c % 4 of block c // 4; words (w0, w1) give lanes 0, 1 and (w2, w3) lanes 2, 3 by
    Box-Muller, u1 = (w + 1) 2^-32, u2 = w' 2^-32, (r cos 2 pi u2, r sin 2 pi u2), r = sqrt(-2 ln u1)."""
    if n == 0:
        return torch.zeros(0, dtype=torch.float64, device=device)
    first, last = offset // 4, (offset + n - 1) // 4
    words = philox_words_ref(seed, first, last - first + 1, device).double()
    u1 = (words[:, 0::2] + 1) * 2.0**-32  # [blocks, 2]: pairs (w0, w1) and (w2, w3)
    u2 = words[:, 1::2] * 2.0**-32
    r = torch.sqrt(-2 * torch.log(u1))
    theta = 2 * math.pi * u2
    z = torch.stack([r * torch.cos(theta), r * torch.sin(theta)], dim=2)  # [blocks, pair, cos/sin]
    start = offset % 4
    return z.reshape(-1)[start : start + n]


def add_noise_ref(grad, std, scale, seed, offset):
    """Reference: (grad + std * z) * scale in float64, a new tensor of grad's shape; z from
    philox_normals_ref over grad's row-major order."""
    z = philox_normals_ref(seed, offset, grad.numel(), device=grad.device).view(grad.shape)
    return (grad.double() + std * z) * scale
