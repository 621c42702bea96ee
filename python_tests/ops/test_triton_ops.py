"""The Triton twins of the clipping ops (clipped_sum, embedding, norm layer, noise) against
float64 references computed here (einsum / one-hot / plain loops). Without a GPU they run in
Triton's interpreter on CPU tensors (conftest.py); their sm_90 compilation is checked in
test_triton_aot.py.

Accuracy rule (python_tests/tolerances.py), per output element with its condition scale
``absref`` (the same sum with every term replaced by its absolute value):
fp64/fp32: |out - ref| <= REL_TOL * absref; fp16/bf16: |out - ref| <= (RATIO_LOWP * e +
FLOOR_LOWP) * absref, e the largest |eager - ref| / absref of eager PyTorch in that dtype.
"""
import math

import numpy as np
import pytest
import torch

from bk_kernels.ops import triton_clipped_sum as tcs
from bk_kernels.ops import triton_embedding as temb
from bk_kernels.ops import triton_noise as tnoise
from bk_kernels.ops import triton_norm_layer as tnl
from python_tests.ops.norm_checks import make_operand
from python_tests.tolerances import FLOOR_LOWP, LOW_PRECISION, RATIO_LOWP, REL_TOL

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
DT_IDS = lambda d: str(d).replace("torch.", "")  # noqa: E731
ACC = {torch.float64: torch.float64, torch.float32: torch.float32,
       torch.bfloat16: torch.float32, torch.float16: torch.float32}


def assert_close(out, ref, absref, dtype, eager=None):
    """out: kernel result; ref/absref: float64 reference and condition scale; eager: eager
    PyTorch in the low-precision dtype (required for fp16/bf16)."""
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert out.dtype == ACC[dtype], out.dtype
    err = (out.detach().cpu().double() - ref).abs()
    if dtype in LOW_PRECISION:
        scaled = (eager.cpu().double() - ref).abs() / absref.clamp_min(1e-300)
        e = scaled.max().item() if scaled.numel() else 0.0
        bound = (RATIO_LOWP * e + FLOOR_LOWP) * absref
    else:
        bound = REL_TOL[dtype] * absref
    bad = err > bound
    assert not bad.any(), f"{bad.sum().item()} elements off; worst error {err.max().item():.3g}, " \
        f"bound there {bound.flatten()[err.flatten().argmax()].item():.3g}"


def clip_factors(B, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    c = torch.rand(2 * B, generator=gen, dtype=torch.float64)[::2] + 0.05  # strided [B]
    return c.to(ACC[dtype]).to(DEVICE)


# ---------------------------------------------------------------------------
# clipped_sum
# ---------------------------------------------------------------------------


def clipped_sum_ref(a, g, c):
    a, g, c = a.cpu().double(), g.cpu().double(), c.cpu().double()
    gw = torch.einsum("b,btp,btd->pd", c, g, a)
    gb = torch.einsum("b,btp->p", c, g)
    gw_abs = torch.einsum("b,btp,btd->pd", c.abs(), g.abs(), a.abs())
    gb_abs = torch.einsum("b,btp->p", c.abs(), g.abs())
    return gw, gb, gw_abs, gb_abs


def clipped_sum_eager(a, g, c):
    """Eager PyTorch in a's dtype: c*g rounded once to the dtype, one matmul, one sum."""
    a, g, c = a.cpu(), g.cpu(), c.cpu()
    gs = (g.float() * c.float()[:, None, None]).to(a.dtype)
    B, T, p = g.shape
    return gs.reshape(B * T, p).mT @ a.reshape(B * T, -1), gs.sum((0, 1))


def check_clipped_sum(gw, gb, a, g, c, bias):
    ref_w, ref_b, abs_w, abs_b = clipped_sum_ref(a, g, c)
    eager_w, eager_b = clipped_sum_eager(a, g, c) if a.dtype in LOW_PRECISION else (None, None)
    assert_close(gw, ref_w, abs_w, a.dtype, eager_w)
    if bias:
        assert_close(gb, ref_b, abs_b, a.dtype, eager_b)
    else:
        assert gb.shape == (0,) and gb.dtype == ACC[a.dtype]


# (B, T, d, p, layout of a, layout of g, bias)
CLIPPED_CASES = [
    (3, 37, 123, 1, "contiguous", "contiguous", True),
    (2, 37, 17, 70, "transposed", "sliced", True),
    (1, 5, 123, 33, "feature_major", "expanded", False),
    (4, 1, 9, 5, "sliced", "transposed", True),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("case", CLIPPED_CASES, ids=lambda c: "B{}T{}d{}p{}-{}-{}-{}".format(*c))
def test_clipped_sum(case, dtype):
    B, T, d, p, la, lg, bias = case
    a = make_operand(B, T, d, dtype, DEVICE, la)
    g = make_operand(B, T, p, dtype, DEVICE, lg)
    c = clip_factors(B, dtype)
    gw, gb = torch.ops.bk.clipped_sum_triton(a, g, c, bias)
    check_clipped_sum(gw, gb, a, g, c, bias)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=DT_IDS)
def test_clipped_sum_split_k_small_tiles(dtype):
    """16-wide tiles and 32-row chunks: several p/d tiles, split-K atomics, chunks that end
    inside an example, the bias published by the first d-tile only."""
    B, T, d, p = 3, 37, 40, 20
    a = make_operand(B, T, d, dtype, DEVICE, "transposed")
    g = make_operand(B, T, p, dtype, DEVICE, "contiguous")
    c = clip_factors(B, dtype)
    cfg = {"BLOCK_P": 16, "BLOCK_D": 16, "BLOCK_K": 16, "ROWS_PER_SPLIT": 32}
    gw, gb = tcs._launch(a, g, c, True, cfg)
    check_clipped_sum(gw, gb, a, g, c, True)


@pytest.mark.parametrize("bias", [True, False])
def test_clipped_sum_empty(bias):
    for B, T, d, p in ((0, 4, 3, 2), (2, 0, 3, 2), (2, 4, 0, 2)):
        a = torch.randn(B, T, d, device=DEVICE)
        g = torch.randn(B, T, p, device=DEVICE)
        gw, gb = torch.ops.bk.clipped_sum_triton(a, g, torch.ones(B, device=DEVICE), bias)
        assert gw.shape == (p, d) and (gw == 0).all()
        assert gb.shape == ((p,) if bias else (0,)) and (gb == 0).all()


def test_clipped_sum_c_dtypes():
    """fp64 factors with fp32 inputs (converted) and bf16 factors (loaded and upcast)."""
    a, g = torch.randn(2, 7, 5, device=DEVICE), torch.randn(2, 7, 3, device=DEVICE)
    for c in (torch.tensor([0.5, 2.0], dtype=torch.float64, device=DEVICE),
              torch.tensor([0.5, 2.0], dtype=torch.bfloat16, device=DEVICE)):
        gw, gb = torch.ops.bk.clipped_sum_triton(a, g, c, True)
        ref_w, ref_b, abs_w, abs_b = clipped_sum_ref(a, g, c)
        assert_close(gw, ref_w, abs_w, torch.float32)
        assert_close(gb, ref_b, abs_b, torch.float32)


def test_clipped_sum_errors():
    a, g = torch.randn(2, 3, 4, device=DEVICE), torch.randn(2, 3, 5, device=DEVICE)
    op = torch.ops.bk.clipped_sum_triton
    with pytest.raises(Exception, match="c must have shape"):
        op(a, g, torch.ones(3, device=DEVICE), True)
    with pytest.raises(Exception, match="floating-point"):
        op(a, g, torch.ones(2, dtype=torch.int64, device=DEVICE), True)
    with pytest.raises(Exception, match="same dtype"):
        op(a, g.double(), torch.ones(2, device=DEVICE), True)
    with pytest.raises(Exception, match="agree in the batch"):
        op(a, g[:, :2], torch.ones(2, device=DEVICE), True)


# ---------------------------------------------------------------------------
# embedding_norm and embedding_clipped_sum
# ---------------------------------------------------------------------------


def make_ids(B, T, V, id_dtype, layout, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if layout == "transposed":
        ids = torch.randint(0, V, (T, B), generator=gen).t()
    else:
        ids = torch.randint(0, V, (B, T), generator=gen)
    return ids.to(id_dtype).to(DEVICE)


def one_hot(ids, V, padding_idx):
    oh = torch.nn.functional.one_hot(ids.cpu().long(), V).double()  # [B, T, V]
    if padding_idx is not None:
        oh[..., padding_idx % V] = 0
    return oh


def embedding_norm_ref(ids, g, padding_idx):
    """sum_{s,t} [x_s = x_t != pad] <g_s, g_t> by a plain mask, and its condition scale."""
    ids, g = ids.cpu().long(), g.cpu().double()
    match = ids[:, :, None] == ids[:, None, :]
    if padding_idx is not None:
        match &= (ids != padding_idx)[:, :, None]
    m = match.double()
    ref = torch.einsum("bst,bsk,btk->b", m, g, g)
    absref = torch.einsum("bst,bsk,btk->b", m, g.abs(), g.abs())
    return ref, absref, m


EMB_CASES = [  # (B, T, d, V, padding_idx, id dtype, ids layout, g layout)
    (3, 37, 123, 7, 2, torch.int64, "contiguous", "contiguous"),
    (2, 37, 17, 5, None, torch.int32, "transposed", "sliced"),
    (1, 130, 9, 1000, 0, torch.int64, "contiguous", "feature_major"),
    (4, 1, 33, 3, None, torch.int32, "contiguous", "expanded"),
]
EMB_IDS = lambda c: "B{}T{}d{}V{}-pad{}-{}-{}-{}".format(*c[:5], DT_IDS(c[5]), *c[6:])  # noqa: E731


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("case", EMB_CASES, ids=EMB_IDS)
def test_embedding_norm(case, dtype):
    B, T, d, V, pad, id_dtype, lid, lg = case
    ids = make_ids(B, T, V, id_dtype, lid)
    g = make_operand(B, T, d, dtype, DEVICE, lg)
    out = torch.ops.bk.embedding_norm_triton(ids, g, pad)
    ref, absref, m = embedding_norm_ref(ids, g, pad)
    eager = None
    if dtype in LOW_PRECISION:
        gc = g.cpu()
        eager = ((gc @ gc.mT) * m.to(dtype)).sum((1, 2))
    assert_close(out, ref, absref, dtype, eager)


def test_embedding_norm_is_the_gradient_norm():
    """The reference against the per-example embedding gradient by one-hot (float64)."""
    ids = make_ids(3, 37, 6, torch.int64, "contiguous")
    g = torch.randn(3, 37, 11, dtype=torch.float64, device=DEVICE)
    ref, _, _ = embedding_norm_ref(ids, g, 4)
    grad = torch.einsum("btv,btd->bvd", one_hot(ids, 6, 4), g.cpu())  # [B, V, d]
    torch.testing.assert_close(ref, grad.square().sum((1, 2)), rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=DT_IDS)
def test_embedding_norm_small_tiles(dtype):
    """16-wide tiles: many off-diagonal tile pairs, tile pairs without equal ids (skipped),
    several d chunks."""
    B, T, d = 2, 70, 40
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 50, (B, T), generator=gen)
    ids[:, 20:40] = 7  # one block-spanning run, equal ids far apart
    ids[:, 65] = 7
    ids = ids.to(DEVICE)
    g = make_operand(B, T, d, dtype, DEVICE, "transposed")
    out = temb._launch_norm(ids, g, 3, {"BLOCK_T": 16, "BLOCK_K": 16})
    ref, absref, m = embedding_norm_ref(ids, g, 3)
    eager = None
    if dtype in LOW_PRECISION:
        gc = g.cpu()
        eager = ((gc @ gc.mT) * m.to(dtype)).sum((1, 2))
    assert_close(out, ref, absref, dtype, eager)


def embedding_sum_ref(ids, g, c, V, padding_idx):
    oh = one_hot(ids, V, padding_idx)
    g, c = g.cpu().double(), c.cpu().double()
    ref = torch.einsum("b,btv,btd->vd", c, oh, g)
    absref = torch.einsum("b,btv,btd->vd", c.abs(), oh, g.abs())
    return ref, absref


def embedding_sum_eager(ids, g, c, V, padding_idx):
    """Eager in g's dtype: c*g rounded once, index_add_ into a [V, d] tensor of that dtype."""
    gs = (g.cpu().float() * c.cpu().float()[:, None, None]).to(g.dtype)
    flat, rows = ids.cpu().reshape(-1).long(), gs.reshape(-1, g.shape[2])
    keep = flat != (padding_idx % V) if padding_idx is not None else torch.ones_like(flat, dtype=torch.bool)
    out = torch.zeros(V, g.shape[2], dtype=g.dtype)
    return out.index_add_(0, flat[keep], rows[keep])


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("case", EMB_CASES, ids=EMB_IDS)
def test_embedding_clipped_sum(case, dtype, deterministic):
    B, T, d, V, pad, id_dtype, lid, lg = case
    ids = make_ids(B, T, V, id_dtype, lid)
    g = make_operand(B, T, d, dtype, DEVICE, lg)
    c = clip_factors(B, dtype)
    out = torch.ops.bk.embedding_clipped_sum_triton(ids, g, c, V, pad, deterministic)
    ref, absref = embedding_sum_ref(ids, g, c, V, pad)
    eager = embedding_sum_eager(ids, g, c, V, pad) if dtype in LOW_PRECISION else None
    assert_close(out, ref, absref, dtype, eager)
    if pad is not None:
        assert (out[pad] == 0).all()


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_embedding_clipped_sum_small_tiles(deterministic):
    """Blocks smaller than the runs of equal ids (the segment loop takes several steps) and
    than d; a negative padding_idx (counted from the end, as torch.nn.Embedding)."""
    B, T, d, V = 3, 37, 21, 4
    ids = make_ids(B, T, V, torch.int64, "transposed")
    g = make_operand(B, T, d, torch.float64, DEVICE, "sliced")
    c = clip_factors(B, torch.float64)
    cfg = {"BLOCK_S": 8, "BLOCK_R": 4, "BLOCK_D": 8}  # BLOCK_S: the scatter kernel ignores it
    out = temb._launch_sum(ids, g, c, V, -1, deterministic, cfg)
    ref, absref = embedding_sum_ref(ids, g, c, V, V - 1)
    assert_close(out, ref, absref, torch.float64)
    assert (out[V - 1] == 0).all()
    via_op = torch.ops.bk.embedding_clipped_sum_triton(ids, g, c, V, -1, deterministic)
    assert_close(via_op, ref, absref, torch.float64)


def test_embedding_clipped_sum_deterministic_is_reproducible():
    """Same bits on every call, and independent of how the ids tensor is laid out."""
    B, T, d, V = 4, 37, 33, 5
    ids = make_ids(B, T, V, torch.int64, "contiguous", seed=3)
    g = make_operand(B, T, d, torch.float32, DEVICE, "contiguous")
    c = clip_factors(B, torch.float32)
    op = torch.ops.bk.embedding_clipped_sum_triton
    first = op(ids, g, c, V, None, True)
    for _ in range(3):
        assert torch.equal(op(ids, g, c, V, None, True), first)
    ids_t = ids.t().contiguous().t()  # same values, column-major
    assert torch.equal(op(ids_t, g, c, V, None, True), first)
    ref, absref = embedding_sum_ref(ids, g, c, V, None)
    assert_close(first, ref, absref, torch.float32)


def test_embedding_empty_and_unused_rows():
    g = torch.randn(0, 5, 3, device=DEVICE)
    ids = torch.zeros(0, 5, dtype=torch.int64, device=DEVICE)
    assert torch.ops.bk.embedding_norm_triton(ids, g, None).shape == (0,)
    for det in (False, True):
        out = torch.ops.bk.embedding_clipped_sum_triton(ids, g, torch.ones(0, device=DEVICE), 4, None, det)
        assert out.shape == (4, 3) and (out == 0).all()
    # ids that never occur keep zero rows; all-padding input gives zero norms
    ids = torch.full((2, 6), 1, dtype=torch.int64, device=DEVICE)
    g = torch.randn(2, 6, 3, device=DEVICE)
    assert (torch.ops.bk.embedding_norm_triton(ids, g, 1) == 0).all()
    for det in (False, True):
        out = torch.ops.bk.embedding_clipped_sum_triton(ids, g, torch.ones(2, device=DEVICE), 4, None, det)
        assert (out[[0, 2, 3]] == 0).all() and (out[1] != 0).all()


def test_embedding_errors():
    ids = torch.tensor([[0, 5]], device=DEVICE)
    g = torch.randn(1, 2, 3, device=DEVICE)
    c = torch.ones(1, device=DEVICE)
    op = torch.ops.bk.embedding_clipped_sum_triton
    with pytest.raises(Exception, match=r"ids must lie in \[0, num_embeddings\)"):
        op(ids, g, c, 5, None, False)
    with pytest.raises(Exception, match="padding_idx must lie"):
        op(ids, g, c, 6, 6, False)
    with pytest.raises(Exception, match="int32 or int64"):
        torch.ops.bk.embedding_norm_triton(ids.float(), g, None)
    with pytest.raises(Exception, match="ids:\\[B,T\\] and g:\\[B,T,d\\]"):
        torch.ops.bk.embedding_norm_triton(ids[:, :1], g, None)


# ---------------------------------------------------------------------------
# norm_layer_grads
# ---------------------------------------------------------------------------


def norm_layer_ref(x, g):
    x, g = x.cpu().double(), g.cpu().double()
    gw, gb = (x * g).sum(1), g.sum(1)
    return gw, gb, (x * g).abs().sum(1), g.abs().sum(1)


NL_CASES = [  # (B, T, C, layout of xhat, layout of g, bias)
    (3, 37, 123, "contiguous", "contiguous", True),
    (2, 37, 1, "transposed", "sliced", True),
    (1, 130, 300, "feature_major", "transposed", False),
    (4, 1, 17, "expanded", "contiguous", True),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("case", NL_CASES, ids=lambda c: "B{}T{}C{}-{}-{}-{}".format(*c))
def test_norm_layer_grads(case, dtype):
    B, T, C, lx, lg, bias = case
    x = make_operand(B, T, C, dtype, DEVICE, lx)
    g = make_operand(B, T, C, dtype, DEVICE, lg)
    gw, gb, sq = torch.ops.bk.norm_layer_grads_triton(x, g, bias)
    ref_w, ref_b, abs_w, abs_b = norm_layer_ref(x, g)
    ref_sq = ref_w.square().sum(1) + (ref_b.square().sum(1) if bias else 0)
    abs_sq = abs_w.square().sum(1) + (abs_b.square().sum(1) if bias else 0)
    eager = [None] * 3
    if dtype in LOW_PRECISION:
        xc, gc = x.cpu(), g.cpu()
        ew, eb = (xc * gc).sum(1), gc.sum(1)
        eager = [ew, eb, ew.square().sum(1) + (eb.square().sum(1) if bias else 0)]
    assert_close(gw, ref_w, abs_w, dtype, eager[0])
    if bias:
        assert_close(gb, ref_b, abs_b, dtype, eager[1])
    else:
        assert gb.shape == (B, 0) and gb.dtype == ACC[dtype]
    assert_close(sq, ref_sq, abs_sq, dtype, eager[2])


def test_norm_layer_grads_small_tiles_and_empty():
    x = make_operand(3, 37, 40, torch.float64, DEVICE, "sliced")
    g = make_operand(3, 37, 40, torch.float64, DEVICE, "transposed")
    gw, gb, sq = tnl._launch(x, g, True, {"BLOCK_T": 4, "BLOCK_C": 16})
    ref_w, ref_b, abs_w, abs_b = norm_layer_ref(x, g)
    assert_close(gw, ref_w, abs_w, torch.float64)
    assert_close(gb, ref_b, abs_b, torch.float64)
    assert_close(sq, ref_w.square().sum(1) + ref_b.square().sum(1),
                 abs_w.square().sum(1) + abs_b.square().sum(1), torch.float64)
    for shape in ((0, 5, 3), (2, 0, 3)):
        gw, gb, sq = torch.ops.bk.norm_layer_grads_triton(torch.ones(shape, device=DEVICE),
                                                          torch.ones(shape, device=DEVICE), True)
        assert gw.shape == (shape[0], 3) and gb.shape == (shape[0], 3) and sq.shape == (shape[0],)
        assert not gw.any() and not gb.any() and not sq.any()
    with pytest.raises(Exception, match="one shape"):
        torch.ops.bk.norm_layer_grads_triton(torch.ones(2, 3, 4), torch.ones(2, 3, 5), True)


# ---------------------------------------------------------------------------
# add_noise
# ---------------------------------------------------------------------------

_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_W0, _W1 = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)
_LO = np.uint64(0xFFFFFFFF)


def philox4x32_10(ctr, key):
    """Philox4x32-10 (Random123) in numpy: ctr [n, 4] uint32, key (k0, k1) -> [n, 4] uint32."""
    c = [ctr[:, i].astype(np.uint64) for i in range(4)]
    k0, k1 = np.uint64(key[0]), np.uint64(key[1])
    for _ in range(10):
        p0, p1 = _M0 * c[0], _M1 * c[2]
        c = [((p1 >> np.uint64(32)) ^ c[1] ^ k0) & _LO, p1 & _LO,
             ((p0 >> np.uint64(32)) ^ c[3] ^ k1) & _LO, p0 & _LO]
        k0, k1 = (k0 + _W0) & _LO, (k1 + _W1) & _LO
    return np.stack(c, 1).astype(np.uint32)


def test_philox_reference_known_answers():
    """Random123's known-answer vectors for philox4x32_10."""
    kat = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
           ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
           ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    for ctr, key, want in kat:
        got = philox4x32_10(np.array([ctr], dtype=np.uint32), key)[0]
        assert tuple(int(w) for w in got) == want


def noise_ref(n, seed, offset):
    """z for elements 0..n-1 by the counter layout of docs/OPS.md, float64 after the fp32
    uniforms (u1, u2 and theta rounded to fp32 exactly as the kernel does), and r."""
    counters = np.arange(offset, offset + n, dtype=np.uint64)
    q, lane = counters >> np.uint64(2), (counters & np.uint64(3)).astype(np.int64)
    q_lo, q_hi = (q & _LO).astype(np.uint32), (q >> np.uint64(32)).astype(np.uint32)
    zero = np.zeros_like(q_lo)
    seed64 = seed & 0xFFFFFFFFFFFFFFFF
    w = philox4x32_10(np.stack([q_lo, q_hi, zero, zero], 1), (seed64 & 0xFFFFFFFF, seed64 >> 32))
    rows = np.arange(n)
    pair = lane // 2
    wa, wb = w[rows, 2 * pair], w[rows, 2 * pair + 1]
    two32 = np.float32(2.0**-32)
    u1 = (wa.astype(np.float32) + np.float32(1.0)) * two32
    u2 = wb.astype(np.float32) * two32
    theta = np.float32(2 * math.pi) * u2
    r = np.sqrt(-2.0 * np.log(u1.astype(np.float64)))
    z = np.where(lane % 2 == 0, r * np.cos(theta.astype(np.float64)), r * np.sin(theta.astype(np.float64)))
    return torch.from_numpy(z), torch.from_numpy(r)


def draw(n, seed, offset, dtype=torch.float32):
    x = torch.zeros(n, dtype=dtype, device=DEVICE)
    torch.ops.bk.add_noise_triton(x, 1.0, 1.0, seed, offset)
    return x.cpu()


def assert_noise_matches(z, seed, offset):
    """Against the float64 reference (not a copy of the kernel's own rounding): float32
    accuracy, within 4 x 2^-24 (|z| + 1), as every backend (test_add_noise.py)."""
    from bk_kernels.ops.add_noise import philox_normals_ref

    want = philox_normals_ref(seed, offset, z.numel())
    err = (z.double() - want).abs()
    bound = 4 * 2.0**-24 * (1 + want.abs())
    assert (err <= bound).all(), f"worst |dz| / bound = {(err / bound).max().item():.3g}"
    # the numpy Philox words of this file agree with the library's reference words
    zs, _ = noise_ref(min(z.numel(), 64), seed, offset)
    assert (zs - want[: zs.numel()]).abs().max() < 1e-5


@pytest.mark.parametrize("seed,offset", [(0, 0), (1234, 1), (-7, 6), (2**40 + 5, 3), (99, 4 * 2**32 + 2)])
def test_noise_follows_the_counter_layout(seed, offset):
    """Lanes, pairs, offsets not a multiple of 4, negative seeds and seeds above 2^32 (key
    word 1), counters above 2^34 (q_hi != 0): against numpy Philox + Box-Muller."""
    assert_noise_matches(draw(4099, seed, offset), seed, offset)


@pytest.mark.parametrize("offset", [0, 1, 2, 3, 2**33 + 1])
def test_noise_many_programs(offset):
    """16 Philox blocks (64 elements) per program: program boundaries, with the offset's
    lane shift r0 = offset % 4 moving the first program's elements."""
    x = torch.zeros(1001, device=DEVICE)
    tnoise._launch(x, 1.0, 1.0, 31, offset, block_q=16)
    assert_noise_matches(x.cpu(), 31, offset)


def test_noise_statistics():
    """Mean, variance, tails and lag-1 correlation of 2^20 draws within 5 sigma of N(0,1)."""
    n = 2**20
    z = draw(n, 20240607, 0).double()
    assert_noise_matches(z[:5000], 20240607, 0)
    assert abs(z.mean().item()) <= 5 / math.sqrt(n)
    assert abs(z.var().item() - 1) <= 5 * math.sqrt(2 / n)
    for k in (1.0, 2.0, 3.0, 4.0):
        p = math.erfc(k / math.sqrt(2))
        count = (z.abs() > k).sum().item()
        assert abs(count - n * p) <= 5 * math.sqrt(n * p * (1 - p)) + 1, (k, count, n * p)
    assert z.abs().max().item() <= math.sqrt(64 * math.log(2)) + 1e-4
    corr = (z[1:] * z[:-1]).mean().item()  # neighbours share a Philox block or a Box-Muller pair
    assert abs(corr) <= 5 / math.sqrt(n)
    skew = (z**3).mean().item()
    assert abs(skew) <= 5 * math.sqrt(15 / n)
    kurt = (z**4).mean().item()
    assert abs(kurt - 3) <= 5 * math.sqrt(96 / n)


def test_noise_reproducible_and_counter_disjoint():
    a, b = draw(1000, 5, 8), draw(1000, 5, 8)
    assert torch.equal(a, b)
    assert not torch.equal(a, draw(1000, 6, 8))
    assert not torch.equal(a, draw(1000, 5, 12))
    # successive calls, offset advanced by numel rounded up to 4, continue one stream
    whole = draw(1004 + 500, 5, 8)
    assert torch.equal(draw(1003, 5, 8), whole[:1003])
    assert torch.equal(draw(500, 5, 8 + 1004), whole[1004:])
    # an element's noise depends only on offset + i
    assert torch.equal(draw(997, 5, 11), whole[3:1000])


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_noise_update(dtype):
    """grad = (grad + std z) * scale in the acc dtype, rounded once; non-contiguous grads are
    updated in row-major counter order."""
    std, scale, seed, offset = 0.75, 1 / 3, 42, 13
    base = torch.randn(37, 123, dtype=torch.float64)
    for grad in (base.to(dtype).to(DEVICE), base.t().contiguous().to(dtype).to(DEVICE).t()):
        before = grad.cpu().clone()
        torch.ops.bk.add_noise_triton(grad, std, scale, seed, offset)
        z = draw(grad.numel(), seed, offset).reshape(grad.shape)
        if dtype == torch.float64:
            want = (before + std * z.double()) * scale
            torch.testing.assert_close(grad.cpu(), want, rtol=1e-14, atol=1e-14)
        else:
            want = ((before.float() + np.float32(std) * z) * np.float32(scale)).to(dtype)
            # fp32 arithmetic: equal up to fma contraction, i.e. one rounding of the result
            tol = {torch.float32: 1e-6, torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]
            torch.testing.assert_close(grad.cpu(), want, rtol=tol, atol=tol)


def test_noise_noop_and_errors():
    x = torch.zeros(0, device=DEVICE)
    torch.ops.bk.add_noise_triton(x, 1.0, 1.0, 0, 0)
    x = torch.ones(10, device=DEVICE)
    torch.ops.bk.add_noise_triton(x, 0.0, 0.5, 0, 0)
    assert (x == 0.5).all()
    with pytest.raises(Exception, match="std must be >= 0"):
        torch.ops.bk.add_noise_triton(x, -1.0, 1.0, 0, 0)
    with pytest.raises(Exception, match="offset must be >= 0"):
        torch.ops.bk.add_noise_triton(x, 1.0, 1.0, 0, -4)
    with pytest.raises(Exception, match="unsupported dtype"):
        torch.ops.bk.add_noise_triton(torch.zeros(3, dtype=torch.int32, device=DEVICE), 1.0, 1.0, 0, 0)


# ---------------------------------------------------------------------------
# Schemas and fake tensors
# ---------------------------------------------------------------------------

SCHEMAS = {
    "clipped_sum_triton": "bk::clipped_sum_triton(Tensor a, Tensor g, Tensor c, bool bias) -> (Tensor, Tensor)",
    "embedding_norm_triton": "bk::embedding_norm_triton(Tensor ids, Tensor g, int? padding_idx) -> Tensor",
    "embedding_clipped_sum_triton": "bk::embedding_clipped_sum_triton(Tensor ids, Tensor g, Tensor c, "
    "int num_embeddings, int? padding_idx, bool deterministic) -> Tensor",
    "norm_layer_grads_triton": "bk::norm_layer_grads_triton(Tensor xhat, Tensor g, bool bias) -> (Tensor, Tensor, Tensor)",
    "add_noise_triton": "bk::add_noise_triton(Tensor(a!) grad, float std, float scale, int seed, int offset) -> ()",
}


@pytest.mark.parametrize("name", SCHEMAS)
def test_registered_schema(name):
    schema = str(getattr(torch.ops.bk, name).default._schema)
    # torch 2.11's triton_op infers int arguments as SymInt and numbers alias sets (a0!): the
    # same op as 2.14's spelling (the GPU check runs on 2.11).
    schema = schema.replace("SymInt", "int").replace("(a0!)", "(a!)")
    assert schema == SCHEMAS[name]


def test_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        a = torch.empty(3, 7, 5, dtype=torch.bfloat16, device=DEVICE)
        g = torch.empty(3, 7, 2, dtype=torch.bfloat16, device=DEVICE)
        c = torch.empty(3, device=DEVICE)
        gw, gb = torch.ops.bk.clipped_sum_triton(a, g, c, True)
        assert gw.shape == (2, 5) and gb.shape == (2,) and gw.dtype == torch.float32
        gw, gb = torch.ops.bk.clipped_sum_triton(a.double(), g.double(), c.double(), False)
        assert gb.shape == (0,) and gw.dtype == torch.float64
        ids = torch.empty(3, 7, dtype=torch.int64, device=DEVICE)
        assert torch.ops.bk.embedding_norm_triton(ids, a, 0).shape == (3,)
        out = torch.ops.bk.embedding_clipped_sum_triton(ids, a, c, 11, None, True)
        assert out.shape == (11, 5) and out.dtype == torch.float32
        gw, gb, sq = torch.ops.bk.norm_layer_grads_triton(a, a, False)
        assert gw.shape == (3, 5) and gb.shape == (3, 0) and sq.shape == (3,)
        torch.ops.bk.add_noise_triton(a, 1.0, 0.5, 0, 0)


def test_every_triton_launch_runs_on_its_tensors_device():
    """Triton launches on the current device and stream: every wrap_triton(...)[grid](...) call
    must sit inside `with on_device(<a tensor it launches on>)` (a read of the source: no GPU
    here; the GPU check runs the ops on a second device when the machine has one)."""
    import ast
    import inspect

    from bk_kernels.ops import triton_norms as tnorms

    launches = 0
    for module in (tcs, temb, tnoise, tnl, tnorms):
        tree = ast.parse(inspect.getsource(module))
        guarded = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.With) and any(
                    isinstance(item.context_expr, ast.Call) and getattr(item.context_expr.func, "id", "") == "on_device"
                    for item in node.items):
                guarded.update(id(n) for n in ast.walk(node))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript) and "wrap_triton" in ast.unparse(
                    node.func):
                launches += 1
                assert id(node) in guarded, f"{module.__name__}: unguarded launch {ast.unparse(node.func)}"
    assert launches == 7


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_ops_on_a_second_gpu_while_the_first_is_current():
    a = torch.randn(3, 17, 40, device="cuda:1")
    g = torch.randn(3, 17, 24, device="cuda:1")
    c = torch.rand(3, device="cuda:1")
    with torch.cuda.device(0):
        gw, gb = torch.ops.bk.clipped_sum_triton(a, g, c, True)
    check_clipped_sum(gw, gb, a, g, c, True)


def test_norms_are_bitwise_reproducible_and_chunk_their_shares(monkeypatch):
    """Every Triton reduction stores per-program shares summed in a fixed order (no float
    atomics): two runs are bitwise equal (on a GPU atomics would make them differ in the last
    bits), and launches in chunks of examples (MAX_SHARES) give the same norms."""
    from bk_kernels.ops import triton_common
    from bk_kernels.ops import triton_norms as tnorms
    a = make_operand(5, 40, 24, torch.float32, DEVICE, "contiguous")
    g = make_operand(5, 40, 20, torch.float32, DEVICE, "transposed")
    ids = torch.randint(0, 7, (5, 40), device=DEVICE)
    c = torch.rand(5, device=DEVICE)
    small = {"BLOCK_T": 16, "BLOCK_KA": 16, "BLOCK_KG": 16}
    runs = {
        "ghost": lambda: tnorms._launch_ghost(a, g, small),
        "direct": lambda: tnorms._launch_direct(a, g, {"BLOCK_T": 16, "BLOCK_D": 16, "BLOCK_P": 16}),
        "embedding": lambda: temb._launch_norm(ids, g, None, {"BLOCK_T": 16, "BLOCK_K": 16}),
        "norm_layer": lambda: tnl._launch(a[..., :20], g, True, {"BLOCK_T": 16, "BLOCK_C": 16})[2],
        "clipped_sum": lambda: tcs._launch(a, g, c, True,
                                           {"BLOCK_P": 16, "BLOCK_D": 16, "BLOCK_K": 16, "ROWS_PER_SPLIT": 32})[0],
    }
    whole = {name: run() for name, run in runs.items()}
    for name, run in runs.items():
        assert torch.equal(run(), whole[name]), name
    monkeypatch.setattr(triton_common, "MAX_SHARES", 7)  # one example per launch
    for name in ("ghost", "direct", "embedding"):
        assert torch.equal(runs[name](), whole[name]), name
