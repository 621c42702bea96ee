"""add_noise_: the Philox4x32-10 counter layout against the float64 PyTorch reference, the
normals' statistics, reproducibility, every dtype and shape, bad inputs.

Every random draw is from fixed seeds, so each test is deterministic; the statistical bounds
are derived from the sample size (a correct generator passes them for all but a tiny fraction
of seeds), not tuned to the seeds used.
"""
import math
import os

import pytest
import torch

from bk_kernels.ops.add_noise import (
    add_noise_,
    add_noise_list_,
    add_noise_ref,
    philox4x32_10_ref,
    philox_normals_ref,
    philox_words_ref,
)
from python_tests.tolerances import FLOOR_LOWP, LOW_PRECISION, RATIO_LOWP

EPS32 = 2.0**-24  # float32's unit roundoff
# Unit roundoff of each buffer dtype: the final rounding's relative error.
ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8,
            torch.float16: 2.0**-11}
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# Triton runs CPU tensors only in its interpreter, which conftest.py switches on where no GPU is.
INTERPRETER = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="Triton on CPU tensors needs its interpreter (on where no GPU is)")
# The largest |z| Box-Muller can give: sqrt(-2 ln 2^-32).
Z_MAX = math.sqrt(64 * math.log(2))


def backend_params():
    """(device, backend) pairs; the GPU ones are listed (and skipped) where there is no GPU."""
    params = [pytest.param("cpu", "cpu", id="cpu-cpu"), pytest.param("cpu", "torch", id="cpu-torch"),
              pytest.param("cpu", "triton", id="cpu-triton", marks=INTERPRETER)]
    for name in ("cuda", "triton", "torch"):
        params.append(pytest.param("cuda", name, id=f"cuda-{name}", marks=GPU))
    return params


def skip_missing(backend):
    """The Triton op registers when its module is imported: import it (a missing module fails)."""
    if backend == "triton":
        import bk_kernels.ops.triton_noise  # noqa: F401


def normals(n, seed, offset, device="cpu", backend="cpu"):
    """The normals add_noise_ draws: noise on a zero float32 gradient, std = scale = 1."""
    z = torch.zeros(n, device=device)
    add_noise_(z, 1.0, 1.0, seed, offset, backend=backend)
    return z.cpu()


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


# --- the reference itself ---------------------------------------------------------------------


def test_reference_philox_known_answers():
    """Random123's known-answer vectors of Philox4x32-10."""
    kats = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ]
    for ctr, key, want in kats:
        got = philox4x32_10_ref(*(torch.tensor([c], dtype=torch.int64) for c in ctr), *key)
        assert [int(w) for w in got] == list(want)


def test_reference_layout():
    """Counter c is lane c % 4 of block c // 4 (counter (c // 4, 0, 0) as 32-bit words, key
    (seed_lo, seed_hi)), written out by hand for a few counters."""
    seed = 0x0123456789ABCDEF
    for c in [0, 1, 2, 3, 4, 7, 4 * 2**32 + 2, 2**62 + 1]:
        q = c // 4
        w = [int(x) for x in philox_words_ref(seed, q, 1)[0]]
        pair = w[0:2] if c % 4 < 2 else w[2:4]
        r = math.sqrt(-2 * math.log((pair[0] + 1) * 2.0**-32))
        theta = 2 * math.pi * pair[1] * 2.0**-32
        want = r * (math.cos(theta) if c % 2 == 0 else math.sin(theta))
        assert philox_normals_ref(seed, c, 1).item() == pytest.approx(want, rel=1e-15, abs=1e-15)
    # A slice of the stream is the stream of the slice.
    whole = philox_normals_ref(seed, 5, 40)
    assert torch.equal(whole[7:30], philox_normals_ref(seed, 12, 23))
    assert philox_normals_ref(seed, 3, 0).numel() == 0


def test_reference_add_noise():
    g = torch.randn(3, 5, dtype=torch.float64)
    want = (g + 0.5 * philox_normals_ref(9, 6, 15).view(3, 5)) * 0.25
    torch.testing.assert_close(add_noise_ref(g, 0.5, 0.25, 9, 6), want, rtol=0, atol=0)


# --- the counter layout -----------------------------------------------------------------------

# (seed, offset, n): offsets not a multiple of 4, the block counter's low word carrying into
# the high one (2^34 = 4 * 2^32), key words with the high bit set, odd sizes.
LAYOUT_CASES = [
    (0, 0, 4099),
    (123, 1, 1000),
    (2**40 + 5, 3, 513),
    (-1, 2**34 - 5, 777),
    (2**63 - 1, 2**61 + 2, 130),
    (0x9E3779B97F4A7C15, 64, 1),
]


def assert_normals_close(got, want):
    """float32 accuracy: within 4 float32 ulps of |z| (absolute 4 * 2^-24 near 0, where the
    angle's own rounding shows up as r * 2^-24)."""
    err = (got.double() - want).abs()
    bound = 4 * EPS32 * (want.abs() + 1)
    units = (err / (EPS32 * (want.abs() + 1))).max()
    assert (err <= bound).all(), f"max error {units:.2f} x 2^-24 (|z| + 1)"


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("seed,offset,n", LAYOUT_CASES)
def test_normals_match_float64_reference(seed, offset, n, device, backend):
    skip_missing(backend)
    assert_normals_close(normals(n, seed, offset, device, backend), philox_normals_ref(seed, offset, n))


def test_normals_match_float64_reference_on_a_million():
    n = 1_000_003
    assert_normals_close(normals(n, 2024, 8), philox_normals_ref(2024, 8, n))


def test_torch_backend_is_the_reference_rounded_once():
    g = torch.randn(1001)
    got = g.clone()
    add_noise_(got, 0.3, 0.5, 11, 3, backend="torch")
    assert torch.equal(got, add_noise_ref(g, 0.3, 0.5, 11, 3).float())


@pytest.mark.parametrize("shift", [1, 2, 3, 4, 61, 1001])
def test_offset_shifts_the_stream(shift):
    """Element i at offset o is element i + s at offset o - s, bit for bit, wherever a call
    starts inside a block or a vector group."""
    n = 5000
    whole = normals(n, 77, 40)
    assert torch.equal(normals(n - shift, 77, 40 + shift), whole[shift:])


@pytest.mark.parametrize("size", [1, 3, 5, 63, 64, 65])
def test_small_sizes(size):
    assert_normals_close(normals(size, 5, 2), philox_normals_ref(5, 2, size))


def test_seed_is_taken_as_64_bits():
    assert torch.equal(normals(100, 2**64 - 1, 0), normals(100, -1, 0))
    assert torch.equal(normals(100, 2**63, 0), normals(100, -(2**63), 0))
    # The high key word matters.
    assert not torch.equal(normals(100, 5, 0), normals(100, 5 + 2**32, 0))


# --- statistics -----------------------------------------------------------------------------

N_STATS = 1 << 22


@pytest.fixture(scope="module")
def big_sample():
    return normals(N_STATS, 20240601, 0).double()


def test_moments(big_sample):
    """Mean and variance within 5 standard errors: sd(mean) = 1/sqrt(n), sd(s^2) = sqrt(2/(n-1))."""
    n = big_sample.numel()
    assert abs(big_sample.mean().item()) <= 5 / math.sqrt(n)
    assert abs(big_sample.var().item() - 1) <= 5 * math.sqrt(2 / (n - 1))
    # Third and fourth moments: E z^3 = 0 (sd sqrt(15/n)), E z^4 = 3 (sd sqrt(96/n)).
    assert abs(big_sample.pow(3).mean().item()) <= 5 * math.sqrt(15 / n)
    assert abs(big_sample.pow(4).mean().item() - 3) <= 5 * math.sqrt(96 / n)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_tails(big_sample, k):
    """P(|z| > k) within 5 binomial standard errors of the normal's."""
    n = big_sample.numel()
    p = math.erfc(k / math.sqrt(2))
    frac = (big_sample.abs() > k).double().mean().item()
    assert abs(frac - p) <= 5 * math.sqrt(p * (1 - p) / n)
    assert big_sample.abs().max().item() <= Z_MAX * (1 + 1e-6)


def test_kolmogorov_smirnov(big_sample):
    """sup |F_n - Phi| below the KS critical value at level 1e-4: sqrt(ln(2 / 1e-4) / 2) / sqrt(n)."""
    n = big_sample.numel()
    x, _ = big_sample.sort()
    cdf = torch.special.ndtr(x)
    ranks = torch.arange(1, n + 1, dtype=torch.float64)
    d = torch.maximum(ranks / n - cdf, cdf - (ranks - 1) / n).max().item()
    assert d <= math.sqrt(math.log(2 / 1e-4) / 2) / math.sqrt(n)


def _corr(a, b):
    a, b = a - a.mean(), b - b.mean()
    return ((a * b).sum() / (a.norm() * b.norm())).item()


def test_streams_are_uncorrelated(big_sample):
    """|corr| within 5 / sqrt(n) (its sd is 1/sqrt(n)) between: other offsets, other seeds
    (the low and the high key word), the cos/sin partners of one Box-Muller pair, the two pairs
    of a block, neighbouring blocks."""
    n = 1 << 20
    z = big_sample[:n]
    bound = 5 / math.sqrt(n)
    assert abs(_corr(z, normals(n, 20240601, n).double())) <= bound
    assert abs(_corr(z, normals(n, 20240602, 0).double())) <= bound
    assert abs(_corr(z, normals(n, 20240601 + 2**32, 0).double())) <= bound
    blocks = big_sample.view(-1, 4)
    m = blocks.shape[0]
    bound = 5 / math.sqrt(m)
    assert abs(_corr(blocks[:, 0], blocks[:, 1])) <= bound
    assert abs(_corr(blocks[:, 0], blocks[:, 2])) <= bound
    assert abs(_corr(blocks[:, 1], blocks[:, 3])) <= bound
    assert abs(_corr(blocks[1:, 0], blocks[:-1, 0])) <= 5 / math.sqrt(m - 1)


# --- reproducibility ------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_same_seed_and_offset_reproduce_bit_for_bit(backend):
    g = torch.randn(10007)
    a, b = g.clone(), g.clone()
    add_noise_(a, 0.9, 0.1, 31, 8, backend=backend)
    add_noise_(b, 0.9, 0.1, 31, 8, backend=backend)
    assert torch.equal(a, b)
    c = g.clone()
    add_noise_(c, 0.9, 0.1, 31, 12, backend=backend)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_thread_count_does_not_change_the_bits(dtype, restore_threads):
    g = torch.randn(1_000_003).to(dtype)
    results = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        out = g.clone()
        add_noise_(out, 0.5, 0.25, 99, 5)
        results.append(out)
    for out in results[1:]:
        assert torch.equal(out, results[0])


# --- the op on gradients ----------------------------------------------------------------------


def assert_noised_close(out, g, std, scale, seed, offset):
    """out against the float64 reference from the same (rounded) g: the float32 noise's own
    error, float32 arithmetic (double buffers: double), one final rounding to the dtype; for
    bf16/fp16 also at most RATIO_LOWP times eager PyTorch's error (same z, in the dtype)."""
    assert out.dtype == g.dtype and out.shape == g.shape
    z = philox_normals_ref(seed, offset, g.numel()).view(g.shape)
    g64 = g.double()
    want = (g64 + std * z) * scale  # add_noise_ref
    compute = 2.0**-50 if g.dtype == torch.float64 else 2 * EPS32
    bound = abs(scale) * (std * 4 * EPS32 * (z.abs() + 1) + compute * (g64.abs() + std * z.abs()))
    bound += ROUNDOFF[g.dtype] * want.abs() * (1 + 2.0**-20)
    err = (out.double() - want).abs()
    assert (err <= bound).all(), f"max error / bound {(err / bound).max():.3f}"
    if g.dtype in LOW_PRECISION and g.numel():
        eager = g.clone().add_(z.to(g.dtype), alpha=std).mul_(scale)
        eager_err = (eager.double() - want).abs().max()
        assert err.max() <= RATIO_LOWP * eager_err + FLOOR_LOWP * want.abs().max()


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1,), (3,), (5,), (1000003,), (3, 37, 123), ()], ids=str)
def test_noise_matches_reference(shape, dtype, device, backend):
    skip_missing(backend)
    g = torch.randn(shape).to(dtype)
    out = g.to(device, copy=True)
    ret = add_noise_(out, 0.7, 1 / 3, 1234, 6, backend=backend)
    assert ret is out
    assert_noised_close(out.cpu(), g, 0.7, 1 / 3, 1234, 6)


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_empty_tensors(dtype, device, backend):
    skip_missing(backend)
    for shape in [(0,), (3, 0, 5)]:
        g = torch.zeros(shape, dtype=dtype, device=device)
        add_noise_(g, 1.0, 2.0, 1, 0, backend=backend)
        assert g.shape == shape


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_std_zero_is_exactly_grad_times_scale(dtype, device, backend):
    skip_missing(backend)
    g = torch.randn(3, 1001).to(dtype).to(device)
    for scale in (1 / 3, -2.5, 1e-3):
        out = g.clone()
        add_noise_(out, 0.0, scale, 5, 0, backend=backend)
        assert torch.equal(out, g * scale)


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("layout", ["transposed", "sliced", "channels_last"])
def test_non_contiguous_grad_is_noised_in_row_major_order(layout, device, backend):
    """Element i is the i-th in row-major (logical) order, whatever the strides: the same as
    noising a contiguous copy, and the memory outside the view is untouched."""
    skip_missing(backend)
    base = torch.randn(6, 8, 10, 12, device=device)
    if layout == "transposed":
        view = base.transpose(1, 3)
    elif layout == "sliced":
        view = base[:, 1::2, :, 3:9]
    else:
        view = base.contiguous(memory_format=torch.channels_last)
    assert not view.is_contiguous()
    want = view.contiguous()
    add_noise_(want, 0.5, 2.0, 17, 4, backend=backend)
    before = base.clone()
    add_noise_(view, 0.5, 2.0, 17, 4, backend=backend)
    assert torch.equal(view, want)
    if layout == "sliced":
        outside = torch.ones_like(base, dtype=torch.bool)
        outside[:, 1::2, :, 3:9] = False
        assert torch.equal(base[outside], before[outside])


def test_successive_calls_never_reuse_a_counter():
    """Advancing offset by numel rounded up to 4 gives disjoint slices of one stream."""
    sizes = [5, 8, 3, 1]
    offset, parts = 0, []
    for n in sizes:
        parts.append(normals(n, 8, offset))
        offset += (n + 3) // 4 * 4
    stream = normals(offset, 8, 0)
    starts = [0, 8, 16, 20]
    for start, n, part in zip(starts, sizes, parts):
        assert torch.equal(part, stream[start : start + n])


# --- a whole step in one call ---------------------------------------------------------------


def _step_grads(dtype, device):
    """A step's gradients: odd sizes (so the rounding of each offset to 4 shows), a scalar, an
    empty one and a transposed (non-contiguous) one."""
    gen = torch.Generator().manual_seed(5)
    shapes = [(7, 3), (), (0,), (5,), (4, 9), (1,)]
    grads = [torch.randn(s, generator=gen).to(dtype).to(device) for s in shapes]
    grads[4] = grads[4].t()
    return grads


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_list_is_bitwise_one_call_per_tensor(dtype, device, backend):
    """add_noise_list_ gives each tensor the counters that successive add_noise_ calls advancing
    the offset by numel rounded up to 4 give it, bit for bit, and returns the next offset."""
    skip_missing(backend)
    grads = _step_grads(dtype, device)
    want = [g.clone() for g in grads]
    offset = 6
    for g in want:
        add_noise_(g, 0.7, 0.125, 2**63 + 11, offset, backend=backend)
        offset += (g.numel() + 3) // 4 * 4
    end = add_noise_list_(grads, 0.7, 0.125, 2**63 + 11, 6, backend=backend)
    assert end == offset == 6 + 24 + 4 + 0 + 8 + 36 + 4
    for got, expected in zip(grads, want):
        assert torch.equal(got, expected)
    assert not grads[4].is_contiguous()  # noised in place, layout kept


def test_list_op_matches_the_reference_stream():
    """The dispatcher op on its own (no Python wrapper) against the float64 reference."""
    grads = _step_grads(torch.float64, "cpu")
    before = [g.clone() for g in grads]
    torch.ops.bk.add_noise_list_(grads, 1.5, 0.5, 3, 2)
    offset = 2
    for got, old in zip(grads, before):
        assert_noised_close(got, old, 1.5, 0.5, 3, offset)
        offset += (old.numel() + 3) // 4 * 4


def test_list_of_nothing_returns_the_offset():
    assert add_noise_list_([], 1.0, 1.0, 0, 12) == 12
    torch.ops.bk.add_noise_list_([], 1.0, 1.0, 0, 12)


def test_list_bad_input_changes_nothing():
    """A bad tensor anywhere in the list is found before any tensor is noised."""
    good, bad = torch.randn(10), torch.randn(10).int()
    before = good.clone()
    with pytest.raises(ValueError, match="float32, float64, float16 or bfloat16"):
        add_noise_list_([good, bad], 1.0, 1.0, 0, 0)
    with pytest.raises(RuntimeError, match="float32, float64, float16 or bfloat16"):
        torch.ops.bk.add_noise_list_([good, bad], 1.0, 1.0, 0, 0)
    with pytest.raises(RuntimeError, match="sharing memory"):
        torch.ops.bk.add_noise_list_([good, torch.randn(1, 5).expand(3, 5)], 1.0, 1.0, 0, 0)
    with pytest.raises(ValueError, match="overflows int64"):
        add_noise_list_([good, good], 1.0, 1.0, 0, 2**63 - 20)
    with pytest.raises(RuntimeError, match="overflows int64"):
        torch.ops.bk.add_noise_list_([good, good], 1.0, 1.0, 0, 2**63 - 20)
    with pytest.raises(ValueError, match="std must be finite"):
        add_noise_list_([good], -1.0, 1.0, 0, 0)
    with pytest.raises(ValueError, match="one device"):
        add_noise_list_([good, torch.randn(3, device="meta")], 1.0, 1.0, 0, 0)
    assert torch.equal(good, before)


# --- bad input ------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    g = torch.randn(10)
    with pytest.raises(ValueError, match="float32, float64, float16 or bfloat16"):
        add_noise_(g.int(), 1.0, 1.0, 0, 0)
    for std in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="std must be finite and >= 0"):
            add_noise_(g, std, 1.0, 0, 0)
    for scale in (float("nan"), float("-inf")):
        with pytest.raises(ValueError, match="scale must be finite"):
            add_noise_(g, 1.0, scale, 0, 0)
    for seed in (2**64, -(2**63) - 1, 1.5, True):
        with pytest.raises(ValueError, match="seed must be an int"):
            add_noise_(g, 1.0, 1.0, seed, 0)
    for offset in (-1, 2.0):
        with pytest.raises(ValueError, match="offset"):
            add_noise_(g, 1.0, 1.0, 0, offset)
    with pytest.raises(ValueError, match="overflows int64"):
        add_noise_(g, 1.0, 1.0, 0, 2**63 - 5)
    with pytest.raises(ValueError, match="backend must be one of"):
        add_noise_(g, 1.0, 1.0, 0, 0, backend="gpu")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        add_noise_(g, 1.0, 1.0, 0, 0, backend="cuda")
    with pytest.raises(TypeError, match="must be a tensor"):
        add_noise_(g.numpy(), 1.0, 1.0, 0, 0)


def test_dispatcher_op_checks_inputs_too():
    """The C++ op checks what it is given even when called without the Python wrapper."""
    op = torch.ops.bk.add_noise_
    g = torch.randn(10)
    with pytest.raises(RuntimeError, match="float32, float64, float16 or bfloat16"):
        op(g.long(), 1.0, 1.0, 0, 0)
    with pytest.raises(RuntimeError, match="std must be finite and >= 0"):
        op(g, -0.5, 1.0, 0, 0)
    with pytest.raises(RuntimeError, match="std must be finite and >= 0"):
        op(g, float("nan"), 1.0, 0, 0)
    with pytest.raises(RuntimeError, match="scale must be finite"):
        op(g, 1.0, float("inf"), 0, 0)
    with pytest.raises(RuntimeError, match="offset"):
        op(g, 1.0, 1.0, 0, -4)
    with pytest.raises(RuntimeError, match="overflows int64"):
        op(g, 1.0, 1.0, 0, 2**63 - 5)
    with pytest.raises(RuntimeError, match="sharing memory"):
        op(torch.randn(1, 5).expand(3, 5), 1.0, 1.0, 0, 0)


# --- the dispatcher ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck(dtype):
    op = torch.ops.bk.add_noise_.default
    for g in [torch.randn(37, 5).to(dtype), torch.randn(0).to(dtype), torch.randn(8, 3).to(dtype).t()]:
        torch.library.opcheck(op, (g, 0.5, 0.25, 3, 8))


def test_torch_compile_fullgraph():
    def step(grad, std, scale, seed, offset):
        add_noise_(grad, std, scale, seed, offset, backend="cpu")
        return grad * 2

    compiled = torch.compile(step, fullgraph=True)
    for offset in (4, 104, 204):  # a training loop advances the offset every step
        g = torch.randn(100)
        a, b = g.clone(), g.clone()
        out = compiled(a, 0.5, 0.1, 7, offset)
        want = step(b, 0.5, 0.1, 7, offset)
        assert torch.equal(a, b) and torch.equal(out, want)
