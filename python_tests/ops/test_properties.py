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


def triton_has(module):
    import importlib.util

    return importlib.util.find_spec(f"bk_kernels.ops.{module}") is not None


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
    if backend == "triton" and not triton_has("triton_clipped_sum"):
        backend = "torch"
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
