"""embedding_norm and embedding_clipped_sum on every backend that runs here, against float64
references (the dense per-example gradients, one-hot^T g), which are checked in turn against
per-example autograd through nn.Embedding and against the pairwise definition."""
import pytest
import torch

from bk_kernels import ops
from bk_kernels.ops import embedding as emb
from python_tests.tolerances import FLOOR_LOWP, LOW_PRECISION, RATIO_LOWP, REL_TOL

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=GPU)]

# (B, T, d, V, padding_idx): B=0, T=0, T=1, V=1 (every id repeated), odd T and d, a padding id
# that is present, one that takes every position (V=1), V much larger than B*T.
SHAPES = [
    (0, 5, 3, 4, None),
    (2, 0, 3, 4, 1),
    (1, 1, 1, 1, None),
    (1, 1, 1, 1, 0),
    (3, 1, 17, 6, None),
    (2, 37, 123, 1, None),
    (3, 37, 123, 5, 2),
    (4, 17, 130, 50, 7),
    (2, 9, 19, 20000, 5),  # above 8 * B * T + 4096: the cpu kernel sorts instead of counting
]
SHAPE_IDS = ["B{}T{}d{}V{}pad{}".format(*s) for s in SHAPES]
LAYOUTS = ["contiguous", "strided", "sliced"]


def backend_params():
    """(device, backend) pairs; GPU ones are listed (and skipped) even where no GPU exists."""
    params = [pytest.param("cpu", name, id=f"cpu-{name}") for name in ops.available_backends("cpu")]
    for name in ("cuda", "triton", "torch"):
        params.append(pytest.param("cuda", name, id=f"cuda-{name}", marks=GPU))
    return params



def make_inputs(B, T, d, V, dtype, device, layout, id_dtype=torch.int64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=gen).to(id_dtype)
    g = torch.randn(B, T, d, generator=gen, dtype=torch.float64).to(dtype)
    if layout != "contiguous":
        ids = torch.stack([ids, ids], dim=2)[..., 0]  # positions strided
        # batch not the outer dimension, rows padded
        big = torch.zeros(T, B, 2 * d + 1, dtype=dtype)
        if layout == "strided":  # columns contiguous
            big[..., 1 : d + 1] = g.transpose(0, 1)
            g = big[..., 1 : d + 1].transpose(0, 1)
        else:  # "sliced": columns strided too
            big[..., 1::2] = g.transpose(0, 1)
            g = big[..., 1::2].transpose(0, 1)
    return ids.to(device), g.to(device)


def assert_norms_close(out, ids, g, padding_idx):
    ref = emb.embedding_norm_ref(ids.cpu(), g.cpu(), padding_idx)
    assert out.shape == ref.shape
    assert out.dtype == (torch.float64 if g.dtype == torch.float64 else torch.float32)
    err = (out.cpu().double() - ref).abs()
    if g.dtype in LOW_PRECISION:
        # Eager PyTorch in the same dtype: dense per-example gradients, square-summed.
        V = int(ids.max()) + 1 if ids.numel() else 1
        one_hot = torch.nn.functional.one_hot(ids.cpu().long(), V).to(g.dtype)
        if padding_idx is not None:
            one_hot[ids.cpu() == padding_idx] = 0
        eager = (one_hot.mT @ g.cpu()).square().sum((1, 2))
        bound = RATIO_LOWP * (eager.double() - ref).abs() + FLOOR_LOWP * ref
        assert (err <= bound).all(), f"error {err.tolist()} above {bound.tolist()}"
    elif ref.numel():
        rel = err / ref.clamp_min(torch.finfo(torch.float64).tiny)
        assert rel.max().item() <= REL_TOL[g.dtype], rel


def assert_sums_close(got, start, ids, g, c, padding_idx):
    """got = start + clipped sum, checked element by element against the float64 reference,
    relative to sum |c_b g_b,t| of the element (the sum may cancel), plus half an ulp of got's
    dtype (the one rounding into it)."""
    V, d = start.shape
    ids, g, c, start = ids.cpu(), g.cpu(), c.cpu(), start.cpu()
    want = start.double() + emb.embedding_clipped_sum_ref(ids, g, c, V, padding_idx)
    scale = start.double().abs() + emb.embedding_clipped_sum_ref(ids, g.abs(), c.abs(), V, padding_idx)
    err = (got.cpu().double() - want).abs()
    if g.dtype in LOW_PRECISION:
        keep = (ids != padding_idx) if padding_idx is not None else torch.ones_like(ids, dtype=torch.bool)
        flat = (c[:, None, None].to(g.dtype) * g)[keep]
        eager = start.to(g.dtype).index_add_(0, ids[keep].long(), flat)  # stock, in g's dtype
        bound = RATIO_LOWP * (eager.double() - want).abs() + FLOOR_LOWP * scale
    else:
        bound = REL_TOL[g.dtype] * scale
    if got.dtype != torch.float64:  # the one rounding into got's dtype
        bound = bound + torch.finfo(got.dtype).eps / 2 * want.abs()
    assert (err <= bound).all(), f"max error {err.max().item()} (bound there {bound.flatten()[err.argmax()]})"


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_embedding_norm_matches_float64_reference(shape, dtype, layout, device, backend):
    B, T, d, V, padding_idx = shape
    for id_dtype in (torch.int64, torch.int32):
        ids, g = make_inputs(B, T, d, V, dtype, device, layout, id_dtype)
        out = emb.embedding_norm(ids, g, padding_idx, backend=backend)
        assert out.device == g.device
        assert_norms_close(out, ids, g, padding_idx)


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_clipped_sum_matches_float64_reference(shape, dtype, layout, device, backend):
    B, T, d, V, padding_idx = shape
    ids, g = make_inputs(B, T, d, V, dtype, device, layout, torch.int32 if B % 2 else torch.int64)
    c = torch.rand(B, dtype=torch.float64).to(device) + 0.1
    c = c if dtype == torch.float64 else c.float()
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    out = emb.embedding_clipped_sum(ids, g, c, V, padding_idx, backend=backend)
    assert out.shape == (V, d) and out.dtype == acc and out.device == g.device
    assert_sums_close(out, torch.zeros(V, d, dtype=acc), ids, g, c, padding_idx)
    # out= accumulates into any floating dtype, rounding once.
    for out_dtype in DTYPES:
        start = torch.randn(V, d, dtype=torch.float64).to(out_dtype).to(device)
        target = start.clone()
        returned = emb.embedding_clipped_sum(ids, g, c, padding_idx=padding_idx, out=target, backend=backend)
        assert returned is target and target.dtype == out_dtype
        assert_sums_close(target, start, ids, g, c, padding_idx)


@pytest.mark.parametrize("device,backend", backend_params())
def test_out_with_strided_rows_and_columns(device, backend):
    ids, g = make_inputs(3, 11, 9, 7, torch.float32, device, "contiguous")
    c = torch.rand(3, device=device)
    for start in (torch.randn(7, 20, device=device)[:, 1:10], torch.randn(9, 7, device=device).t()):
        before = start.clone()
        emb.embedding_clipped_sum(ids, g, c, out=start, backend=backend)
        assert_sums_close(start, before, ids, g, c, None)


@pytest.mark.parametrize("device,backend", backend_params())
def test_ids_of_any_rank(device, backend):
    """ids [B] is one position per example; ids [B, *] positions are flattened."""
    ids, g = make_inputs(4, 6, 5, 3, torch.float64, device, "contiguous")
    c = torch.rand(4, dtype=torch.float64, device=device)
    for shaped_ids, shaped_g in [(ids[:, 0], g[:, 0]), (ids.view(4, 2, 3), g.view(4, 2, 3, 5))]:
        flat_ids, flat_g = shaped_ids.reshape(4, -1), shaped_g.reshape(4, -1, 5)
        torch.testing.assert_close(emb.embedding_norm(shaped_ids, shaped_g, 1, backend=backend),
                                   emb.embedding_norm_ref(flat_ids, flat_g, 1), rtol=1e-12, atol=0)
        torch.testing.assert_close(emb.embedding_clipped_sum(shaped_ids, shaped_g, c, 3, 1, backend=backend),
                                   emb.embedding_clipped_sum_ref(flat_ids, flat_g, c, 3, 1), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("padding_idx", [None, 0, 3])
def test_references_are_per_example_autograd(padding_idx):
    """One backward per example through a real nn.Embedding in float64."""
    B, T, V, d = 4, 9, 6, 5
    layer = torch.nn.Embedding(V, d, padding_idx=padding_idx, dtype=torch.float64)
    ids = torch.randint(0, V, (B, T))
    ids[0, :3] = 2  # a repeated id for sure
    if padding_idx is not None:
        ids[1, 4] = padding_idx
    target = torch.randn(B, T, d, dtype=torch.float64)
    grads = []
    for b in range(B):
        layer.zero_grad()
        ((layer(ids[b]) - target[b]) ** 2).sum().backward()
        grads.append(layer.weight.grad.clone())
    grads = torch.stack(grads)
    g = 2 * (layer(ids) - target).detach()  # d loss / d output
    c = torch.rand(B, dtype=torch.float64)
    torch.testing.assert_close(emb.embedding_grads_ref(ids, g, V, padding_idx), grads, rtol=1e-12, atol=0)
    torch.testing.assert_close(emb.embedding_norm_ref(ids, g, padding_idx), grads.square().sum((1, 2)),
                               rtol=1e-12, atol=0)
    want_sum = (c[:, None, None] * grads).sum(0)
    torch.testing.assert_close(emb.embedding_clipped_sum_ref(ids, g, c, V, padding_idx), want_sum,
                               rtol=1e-12, atol=1e-15)
    # and the kernels, on the very same inputs
    torch.testing.assert_close(emb.embedding_norm(ids, g, padding_idx), grads.square().sum((1, 2)),
                               rtol=1e-12, atol=0)
    torch.testing.assert_close(emb.embedding_clipped_sum(ids, g, c, V, padding_idx), want_sum,
                               rtol=1e-12, atol=1e-15)


def test_norm_reference_is_the_pairwise_definition():
    B, T, d, V = 3, 20, 7, 4
    ids, g = torch.randint(0, V, (B, T)), torch.randn(B, T, d, dtype=torch.float64)
    for padding_idx in (None, 1):
        same = ids[:, :, None] == ids[:, None, :]
        if padding_idx is not None:
            same &= (ids != padding_idx)[:, :, None]
        pairwise = (same * (g @ g.mT)).sum((1, 2))
        torch.testing.assert_close(emb.embedding_norm_ref(ids, g, padding_idx), pairwise, rtol=1e-12, atol=0)


@pytest.mark.parametrize("device,backend", backend_params())
def test_deterministic_is_bit_identical_across_thread_counts(device, backend):
    # Many repeats of few ids, and a large d: every id's sum spans threads' work.
    ids, g = make_inputs(16, 64, 300, 3, torch.float32, device, "contiguous")
    c = torch.rand(16, device=device)
    threads = torch.get_num_threads()
    results, norms = [], []
    try:
        for n in (1, 2, 3, 4, 1):
            torch.set_num_threads(n)
            start = torch.randn(3, 300, generator=torch.Generator().manual_seed(1)).to(device)
            results.append(emb.embedding_clipped_sum(ids, g, c, out=start, deterministic=True, backend=backend))
            norms.append(emb.embedding_norm(ids, g, backend=backend))
    finally:
        torch.set_num_threads(threads)
    for r in results[1:]:
        assert torch.equal(r, results[0])
    if backend != "torch":  # the torch fallback's norm uses index_add_ (atomics on a GPU)
        for n in norms[1:]:
            assert torch.equal(n, norms[0])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck(dtype, device):
    for B, T, d, V, padding_idx in [(3, 37, 12, 5, 2), (0, 4, 3, 2, None), (1, 1, 1, 1, None)]:
        ids, g = make_inputs(B, T, d, V, dtype, device, "contiguous")
        c = torch.rand(B, device=device, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
        torch.library.opcheck(torch.ops.bk.embedding_norm.default, (ids, g, padding_idx))
        batch_inner = g.transpose(0, 1).contiguous().transpose(0, 1)
        torch.library.opcheck(torch.ops.bk.embedding_norm.default, (ids.int(), batch_inner, padding_idx))
        for det in (False, True):
            torch.library.opcheck(torch.ops.bk.embedding_clipped_sum.default, (ids, g, c, V, padding_idx, det))
            for out_dtype in (torch.float32, dtype):
                out = torch.randn(V, d, device=device).to(out_dtype)
                torch.library.opcheck(torch.ops.bk.embedding_clipped_sum_.default, (out, ids, g, c, padding_idx, det))


def test_torch_compile_fullgraph_through_the_dispatcher_ops():
    def both(ids, g, c):
        return emb.embedding_norm(ids, g, 0, backend="cpu"), emb.embedding_clipped_sum(ids, g, c, 5, 0, backend="cpu")

    compiled = torch.compile(both, fullgraph=True)
    ids, g = make_inputs(3, 10, 4, 5, torch.float64, "cpu", "contiguous")
    c = torch.rand(3, dtype=torch.float64)
    norm, total = compiled(ids, g, c)
    torch.testing.assert_close(norm, emb.embedding_norm_ref(ids, g, 0), rtol=1e-12, atol=0)
    torch.testing.assert_close(total, emb.embedding_clipped_sum_ref(ids, g, c, 5, 0), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("backend", [b for b in ops.available_backends("cpu") if b != "triton"])
def test_out_of_range_ids_are_named(backend):
    ids, g = make_inputs(2, 5, 3, 4, torch.float32, "cpu", "contiguous")
    c = torch.ones(2)
    ids[1, 3] = 4
    with pytest.raises((ValueError, RuntimeError), match=r"ids\[1, 3\] = 4 is out of range for 4 embeddings"):
        emb.embedding_clipped_sum(ids, g, c, 4, backend=backend)
    ids[1, 3] = -2
    with pytest.raises((ValueError, RuntimeError), match=r"ids\[1, 3\] = -2 is out of range"):
        emb.embedding_clipped_sum(ids, g, c, out=torch.zeros(4, 3), backend=backend)
    ids[1, 3] = 0  # a padding id is never looked up, in range or not
    emb.embedding_clipped_sum(ids, g, c, 4, padding_idx=0, backend=backend)


def test_bad_inputs_raise_clear_errors():
    ids, g = make_inputs(2, 5, 3, 4, torch.float32, "cpu", "contiguous")
    c = torch.ones(2)
    with pytest.raises(ValueError, match=r"ids:\[B,T\] and g:\[B,T,d\]"):
        emb.embedding_norm(ids, g[:, :4])
    with pytest.raises(ValueError, match="int64 or int32"):
        emb.embedding_norm(ids.float(), g)
    with pytest.raises(ValueError, match="unsupported dtype"):
        emb.embedding_norm(ids, g.int())
    with pytest.raises(ValueError, match="non-negative"):
        emb.embedding_norm(ids, g, padding_idx=-1)
    with pytest.raises(TypeError, match="must be tensors"):
        emb.embedding_norm(ids.numpy(), g)
    with pytest.raises(ValueError, match="backend must be one of"):
        emb.embedding_norm(ids, g, backend="gpu")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        emb.embedding_norm(ids, g, backend="cuda")
    with pytest.raises(ValueError, match=r"c must have shape \[B\] = \[2\]"):
        emb.embedding_clipped_sum(ids, g, torch.ones(3), 4)
    with pytest.raises(ValueError, match="c must be floating point"):
        emb.embedding_clipped_sum(ids, g, torch.ones(2, dtype=torch.int64), 4)
    with pytest.raises(ValueError, match="pass num_embeddings"):
        emb.embedding_clipped_sum(ids, g, c)
    with pytest.raises(ValueError, match=r"out must be \[V, d\] with d = 3"):
        emb.embedding_clipped_sum(ids, g, c, out=torch.zeros(4, 2))
    with pytest.raises(ValueError, match="num_embeddings=5 but out has 4 rows"):
        emb.embedding_clipped_sum(ids, g, c, 5, out=torch.zeros(4, 3))
    with pytest.raises(ValueError, match="padding_idx 4 is out of range for 4 embeddings"):
        emb.embedding_clipped_sum(ids, g, c, 4, padding_idx=4)


def test_dispatcher_ops_check_inputs_too():
    """The C++ ops check what they are given even when called without the Python wrapper."""
    ids, g = make_inputs(2, 5, 3, 4, torch.float32, "cpu", "contiguous")
    c = torch.ones(2)
    with pytest.raises(RuntimeError, match="agree in batch and position"):
        torch.ops.bk.embedding_norm(ids[:1], g, None)
    with pytest.raises(RuntimeError, match="int64 or int32"):
        torch.ops.bk.embedding_norm(ids.float(), g, None)
    with pytest.raises(RuntimeError, match="non-negative"):
        torch.ops.bk.embedding_norm(ids, g, -1)
    with pytest.raises(RuntimeError, match=r"c must have shape \[B\]"):
        torch.ops.bk.embedding_clipped_sum(ids, g, torch.ones(3), 4, None, False)
    with pytest.raises(RuntimeError, match=r"grad_weight must be \[V, d\]"):
        torch.ops.bk.embedding_clipped_sum_(torch.zeros(4, 2), ids, g, c, None, False)
    with pytest.raises(RuntimeError, match="padding_idx 7 is out of range for 4"):
        torch.ops.bk.embedding_clipped_sum(ids, g, c, 4, 7, False)
    with pytest.raises(RuntimeError, match=r"ids\[0, 0\] = 9 is out of range for 4 embeddings"):
        torch.ops.bk.embedding_clipped_sum(torch.full_like(ids, 9), g, c, 4, None, False)
