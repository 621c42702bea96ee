"""Property-based tests (hypothesis): random shapes, strides, dtypes and backends for every op,
against the float64 references. Derandomized, so a run is reproducible and never flaky."""
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bk_kernels import ops
from bk_kernels.ops.clipped_sum import clipped_sum, clipped_sum_ref
from python_tests.ops.norm_checks import LAYOUTS, assert_norms_close, make_operand
from python_tests.ops.test_clipped_sum import assert_sum_close, eager_clipped_sum

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])
DTYPES = st.sampled_from([torch.float64, torch.float32, torch.bfloat16, torch.float16])


def backends_here():
    names = ops.available_backends("cpu")
    return st.sampled_from(names)


@st.composite
def linear_case(draw):
    B = draw(st.integers(0, 4))
    T = draw(st.integers(1, 40))
    d = draw(st.integers(1, 48))
    p = draw(st.integers(1, 48))
    dtype = draw(DTYPES)
    layouts = draw(st.tuples(st.sampled_from(LAYOUTS), st.sampled_from(LAYOUTS)))
    seed = draw(st.integers(0, 2**31 - 1))
    return B, T, d, p, dtype, layouts, seed


@SETTINGS
@given(case=linear_case(), backend=backends_here(), name=st.sampled_from(["ghost_norm", "direct_norm"]))
def test_norm_ops(case, backend, name):
    B, T, d, p, dtype, (layout_a, layout_g), seed = case
    torch.manual_seed(seed)
    a = make_operand(B, T, d, dtype, "cpu", layout_a)
    g = make_operand(B, T, p, dtype, "cpu", layout_g)
    out = getattr(ops, name)(a, g, backend=backend)
    assert_norms_close(name, out, a, g)


@SETTINGS
@given(case=linear_case(), backend=backends_here(), bias=st.booleans())
def test_clipped_sum(case, backend, bias):
    B, T, d, p, dtype, (layout_a, layout_g), seed = case
    torch.manual_seed(seed)
    a = make_operand(B, T, d, dtype, "cpu", layout_a)
    g = make_operand(B, T, p, dtype, "cpu", layout_g)
    c = torch.rand(B)
    w, b = clipped_sum(a, g, c, bias=bias, backend=backend)
    want_w, want_b = clipped_sum_ref(a, g, c, bias)
    eager_w, eager_b = eager_clipped_sum(a, g, c, bias)
    assert_sum_close(w, want_w, eager_w, dtype)
    if bias:
        assert_sum_close(b, want_b, eager_b, dtype)


@st.composite
def embedding_case(draw):
    B, T = draw(st.integers(0, 4)), draw(st.integers(1, 40))
    d, V = draw(st.integers(1, 24)), draw(st.integers(1, 12))
    dtype = draw(DTYPES)
    layout = draw(st.sampled_from(["contiguous", "strided", "sliced"]))
    padding_idx = draw(st.one_of(st.none(), st.integers(0, V - 1)))
    return B, T, d, V, dtype, layout, padding_idx, draw(st.integers(0, 2**31 - 1))


@SETTINGS
@given(case=embedding_case(), backend=backends_here(), deterministic=st.booleans())
def test_embedding_ops(case, backend, deterministic):
    from python_tests.ops.test_embedding import assert_norms_close as assert_embedding_norms_close
    from python_tests.ops.test_embedding import assert_sums_close, make_inputs

    B, T, d, V, dtype, layout, padding_idx, seed = case
    ids, g = make_inputs(B, T, d, V, dtype, "cpu", layout, seed=seed)
    assert_embedding_norms_close(ops.embedding_norm(ids, g, padding_idx, backend=backend), ids, g, padding_idx)
    c = torch.rand(B, generator=torch.Generator().manual_seed(seed))
    start = torch.randn(V, d)
    got = ops.embedding_clipped_sum(ids, g, c, padding_idx=padding_idx, out=start.clone(),
                                    deterministic=deterministic, backend=backend)
    assert_sums_close(got, start, ids, g, c, padding_idx)


@st.composite
def norm_layer_case(draw):
    B, T, C = draw(st.integers(0, 4)), draw(st.integers(1, 40)), draw(st.integers(1, 48))
    layout = draw(st.sampled_from(["contiguous", "channel_major", "transposed", "sliced", "expanded"]))
    return B, T, C, draw(DTYPES), layout, draw(st.booleans()), draw(st.integers(0, 2**31 - 1))


@SETTINGS
@given(case=norm_layer_case(), backend=backends_here())
def test_norm_layer_grads(case, backend):
    from python_tests.ops.test_norm_layer import assert_grads_close
    from python_tests.ops.test_norm_layer import make_operand as make_norm_operand

    B, T, C, dtype, layout, bias, seed = case
    gen = torch.Generator().manual_seed(seed)
    xhat = make_norm_operand(B, T, C, dtype, "cpu", layout, gen)
    g = make_norm_operand(B, T, C, dtype, "cpu", layout, gen)
    assert_grads_close(ops.norm_layer_grads(xhat, g, bias, backend=backend), xhat, g, bias)


@SETTINGS
@given(n=st.integers(0, 5000), dtype=DTYPES, std=st.sampled_from([0.0, 0.3, 2.0]),
       offset=st.integers(0, 2**40).map(lambda o: o // 4 * 4), seed=st.integers(-2**63, 2**63 - 1),
       backend=backends_here())
def test_add_noise(n, dtype, std, offset, seed, backend):
    """The fused noise equals the float64 Philox reference, whatever the size, dtype and counters."""
    grad = torch.randn(n, generator=torch.Generator().manual_seed(n)).to(dtype)
    want = ops.add_noise_ref(grad, std, 0.25, seed, offset)
    got = grad.clone()
    ops.add_noise_(got, std, 0.25, seed, offset, backend=backend)
    # The noise is drawn in float32 (its log/cos good to ~1e-5 relative even in the tails), then
    # the sum rounded once into grad's dtype.
    z = ((want.double() / 0.25 - grad.double()) / std) if std else torch.zeros(n, dtype=torch.float64)
    bound = 2e-5 * std * 0.25 * (1 + z.abs()) + torch.finfo(dtype).eps * want.double().abs()
    assert ((got.double() - want.double()).abs() <= bound).all()
