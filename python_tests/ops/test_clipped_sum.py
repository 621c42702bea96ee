"""clipped_sum (and its accumulating form) on every backend against float64 per-example
gradients; clip_factors; a clipping unit's step (unit_clip_factors); the layer-wise fused path;
the ghost/direct choice."""
import math
import sys
import time

import pytest
import torch

import bk_kernels as bk
from bk_kernels import ops
from bk_kernels.ops.clipped_sum import clipped_sum, clipped_sum_ref
from bk_kernels.ops.layerwise import clipped_sum_layerwise
from bk_kernels.ops.linear_norm import choose_mode, linear_norm, use_ghost
from python_tests.ops.norm_checks import make_operand
from python_tests.ops.test_norms import DTYPES, SHAPES, backend_params
from python_tests.tolerances import FLOOR_LOWP, LOW_PRECISION, RATIO_LOWP, REL_TOL


def assert_sum_close(got, want, eager, dtype):
    """Max error relative to the largest entry (sums of mixed signs); bf16/fp16 by the eager rule."""
    if want.numel() == 0:
        assert got.numel() == 0
        return
    err = (got.double() - want).abs().max().item()
    scale = want.abs().max().item()
    if dtype in LOW_PRECISION:
        eager_err = (eager.double() - want).abs().max().item()
        # Eager returns its sum in the inputs' dtype: its error is up to half an ulp there, and
        # smaller only by luck. With a few terms that luck decides (B=T=d=p=1 on a GPU: the
        # kernels' one fp16 rounding of c*g, 8.7e-7, against eager's 2.4e-7; half an ulp 9.5e-7).
        eager_rounding = torch.finfo(dtype).eps / 2 * scale
        assert err <= RATIO_LOWP * eager_err + eager_rounding + FLOOR_LOWP * scale, (err, eager_err, scale)
    else:
        assert err <= REL_TOL[dtype] * max(scale, 1e-300), (err, scale)


def eager_clipped_sum(a, g, c, bias):
    """What eager PyTorch computes in the inputs' dtype: scale g, one matmul."""
    gs = g * c.to(g.dtype)[:, None, None]
    w = gs.flatten(0, 1).T @ a.flatten(0, 1)
    return w, (gs.sum((0, 1)) if bias else None)


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}T{}d{}p{}".format(*s))
@pytest.mark.parametrize("bias", [False, True])
def test_clipped_sum_matches_float64_reference(bias, shape, dtype, layout, device, backend):
    B, T, d, p = shape
    a = make_operand(B, T, d, dtype, device, layout)
    g = make_operand(B, T, p, dtype, device, layout)
    c = torch.rand(B, device=device)
    w, b = clipped_sum(a, g, c, bias=bias, backend=backend)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert w.dtype == acc and w.shape == (p, d) and w.device == a.device
    want_w, want_b = clipped_sum_ref(a.cpu(), g.cpu(), c.cpu(), bias)
    eager_w, eager_b = eager_clipped_sum(a.cpu(), g.cpu(), c.cpu(), bias)
    assert_sum_close(w.cpu(), want_w, eager_w, dtype)
    if bias:
        assert b.dtype == acc and b.shape == (p,)
        assert_sum_close(b.cpu(), want_b, eager_b, dtype)
    else:
        assert b is None


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_out_accumulates(device, backend, out_dtype):
    """Two micro-batches into one buffer equal one batch of both (gradient accumulation)."""
    a = torch.randn(5, 9, 13, dtype=torch.float64, device=device)
    g = torch.randn(5, 9, 6, dtype=torch.float64, device=device)
    c = torch.rand(5, dtype=torch.float64, device=device)
    start_w = torch.randn(6, 13, dtype=torch.float64)
    start_b = torch.randn(6, dtype=torch.float64)
    out = (start_w.to(device, out_dtype, copy=True), start_b.to(device, out_dtype, copy=True))
    a_in, g_in = a.to(torch.float32), g.to(torch.float32)
    w, b = clipped_sum(a_in[:2], g_in[:2], c[:2], bias=True, out=out, backend=backend)
    assert w is out[0] and b is out[1]
    clipped_sum(a_in[2:], g_in[2:], c[2:], bias=True, out=out, backend=backend)
    want_w, want_b = clipped_sum_ref(a_in, g_in, c, True)
    tol = 1e-5 if out_dtype != torch.bfloat16 else 1e-2
    torch.testing.assert_close(out[0].double().cpu(), start_w + want_w.cpu(), rtol=tol, atol=tol)
    torch.testing.assert_close(out[1].double().cpu(), start_b + want_b.cpu(), rtol=tol, atol=tol)


def test_clipped_sum_bad_inputs():
    a, g = torch.randn(2, 3, 4), torch.randn(2, 3, 5)
    with pytest.raises(ValueError, match="c must be a tensor of shape"):
        clipped_sum(a, g, torch.ones(3))
    with pytest.raises(ValueError, match="out grad_weight must have shape"):
        clipped_sum(a, g, torch.ones(2), out=torch.zeros(4, 5))
    with pytest.raises(ValueError, match="pair"):
        clipped_sum(a, g, torch.ones(2), bias=True, out=torch.zeros(5, 4))
    with pytest.raises(RuntimeError, match="c must have shape"):
        torch.ops.bk.clipped_sum(a, g, torch.ones(3), False)
    wrong = torch.full((4, 5), 7.0)  # [d, p]: the transpose of grad_weight's [p, d]
    with pytest.raises(RuntimeError, match="grad_weight must have shape"):
        torch.ops.bk.clipped_sum_(wrong, None, a, g, torch.ones(2))
    assert (wrong == 7.0).all()  # refused before writing anything


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck(dtype):
    a = torch.randn(3, 7, 5).to(dtype)
    g = torch.randn(3, 7, 4).to(dtype)
    c = torch.rand(3)
    for bias in (False, True):
        torch.library.opcheck(torch.ops.bk.clipped_sum.default, (a, g, c, bias))
    w = torch.zeros(4, 5, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    torch.library.opcheck(torch.ops.bk.clipped_sum_.default, (w, torch.zeros_like(w[:, 0]), a, g, c))
    torch.library.opcheck(torch.ops.bk.clip_factors.default, (torch.rand(5), 1.0, "abadi", 0.01))
    torch.library.opcheck(torch.ops.bk.clipped_sum_layerwise.default, (a, g, True, 1.0, "automatic", 0.01, "ghost"))


@pytest.mark.parametrize("clip_fn", ["abadi", "automatic", "normalized"])
def test_clip_factors_follow_the_contract(clip_fn):
    norms = torch.tensor([0.0, 0.3, 1.0, 2.5, 40.0], dtype=torch.float64)
    R, gamma = 1.5, 0.02
    want = {"abadi": torch.clamp(R / (norms + 1e-6), max=1.0), "automatic": R / (norms + gamma),
            "normalized": R / (norms + 1e-6)}[clip_fn]
    torch.testing.assert_close(torch.ops.bk.clip_factors(norms.square(), R, clip_fn, gamma), want,
                               rtol=1e-15, atol=0)


def test_clip_factors_bad_arguments():
    with pytest.raises(RuntimeError, match="clip_fn must be"):
        torch.ops.bk.clip_factors(torch.ones(2), 1.0, "flat", 0.01)
    with pytest.raises(RuntimeError, match="must be positive"):
        torch.ops.bk.clip_factors(torch.ones(2), 0.0, "abadi", 0.01)


def _unit_terms(B, dtypes, seed=0):
    """[B] squared-norm terms of the given dtypes, one a strided view (a cross term may be
    negative: 2 <G, G'> of two uses of one parameter)."""
    gen = torch.Generator().manual_seed(seed)
    terms = [(torch.rand(2 * B, generator=gen, dtype=torch.float64) * 10).to(dtype)[::2] for dtype in dtypes]
    if len(terms) > 1:
        terms[-1] = terms[-1] - 0.5 * terms[-1].max() if B else terms[-1]
    return terms


@pytest.mark.parametrize("B", [0, 1, 7, 130])
@pytest.mark.parametrize("dtypes", [(torch.float32,), (torch.float64,), (torch.float32, torch.float64, torch.float32),
                                    (torch.bfloat16, torch.float32), (torch.float16,)], ids=str)
@pytest.mark.parametrize("clip_fn", ["abadi", "automatic", "normalized"])
def test_unit_clip_factors_against_reference(B, dtypes, clip_fn):
    """The CPU kernel (float32/float64 terms) and the composite (16-bit terms) against the
    float64 reference: the terms are exact in float64, so both agree to float64 rounding."""
    terms = _unit_terms(B, dtypes)
    sq, c, finite = torch.ops.bk.unit_clip_factors(terms, 64.0**2, 1.7, clip_fn, 0.05, 64.0)
    want_sq, want_c, want_finite = bk.clipping.unit_clip_factors_ref(terms, 64.0**2, 1.7, clip_fn, 0.05, 64.0)
    assert sq.dtype == c.dtype == torch.float64 and finite.dtype == torch.bool and finite.dim() == 0
    torch.testing.assert_close(sq, want_sq, rtol=1e-14, atol=0)
    torch.testing.assert_close(c, want_c, rtol=1e-14, atol=0)
    assert bool(finite) and want_finite  # finite terms: both report finite norms


def test_unit_clip_factors_matches_the_composite_of_its_parts():
    """The engine's one call is the chain it replaced: the float64 sum of the terms, scaled,
    then clip_factors (abadi clamps at 1 before out_scale)."""
    terms = _unit_terms(33, (torch.float32, torch.float32, torch.float64), seed=3)
    sq, c, _ = torch.ops.bk.unit_clip_factors(terms, 9.0, 0.5, "abadi", 0.01, 3.0)
    want_sq = torch.stack([t.double() for t in terms]).sum(0) * 9.0
    torch.testing.assert_close(sq, want_sq, rtol=1e-15, atol=0)
    torch.testing.assert_close(c, torch.ops.bk.clip_factors(want_sq, 0.5, "abadi", 0.01) * 3.0, rtol=1e-15, atol=0)
    assert c.max() <= 3.0 and c.min() > 0


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_unit_clip_factors_reports_non_finite_norms(bad, dtype):
    terms = _unit_terms(5, (dtype, torch.float32))
    terms[0] = terms[0].clone()
    terms[0][3] = bad
    sq, c, finite = torch.ops.bk.unit_clip_factors(terms, 4.0, 1.0, "abadi", 0.01, 2.0)
    assert not bool(finite)
    assert not math.isfinite(sq[3].item()) and torch.isfinite(sq[[0, 1, 2, 4]]).all()
    assert torch.isfinite(c[[0, 1, 2, 4]]).all()


def test_unit_clip_factors_bad_arguments():
    ok = [torch.rand(4), torch.rand(4)]
    cases = [([], "at least one"), ([torch.rand(4), torch.rand(5)], "one length"), ([torch.rand(2, 2)], "1-D"),
             ([torch.arange(4)], "floating point")]
    for terms, match in cases:
        with pytest.raises(RuntimeError, match=match):
            torch.ops.bk.unit_clip_factors(terms, 1.0, 1.0, "abadi", 0.01, 1.0)
    with pytest.raises(RuntimeError, match="must be positive"):
        torch.ops.bk.unit_clip_factors(ok, 1.0, 0.0, "abadi", 0.01, 1.0)
    with pytest.raises(RuntimeError, match="clip_fn must be"):
        torch.ops.bk.unit_clip_factors(ok, 1.0, 1.0, "flat", 0.01, 1.0)
    with pytest.raises(RuntimeError, match="gamma > 0"):
        torch.ops.bk.unit_clip_factors(ok, 1.0, 1.0, "automatic", 0.0, 1.0)


def test_unit_clip_factors_opcheck():
    for terms in (_unit_terms(6, (torch.float32, torch.float64)), _unit_terms(6, (torch.bfloat16,))):
        torch.library.opcheck(torch.ops.bk.unit_clip_factors.default, (terms, 4.0, 1.0, "automatic", 0.01, 2.0))


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("mode", ["auto", "ghost", "direct"])
@pytest.mark.parametrize("clip_fn", ["abadi", "automatic"])
def test_layerwise_fused_path(device, backend, mode, clip_fn):
    B, T, d, p = 4, 11, 9, 7
    a = torch.randn(B, T, d, dtype=torch.float64, device=device)
    g = torch.randn(B, T, p, dtype=torch.float64, device=device)
    w, b, sq, c = clipped_sum_layerwise(a, g, bias=True, max_grad_norm=0.5, clip_fn=clip_fn, mode=mode,
                                        backend=backend)
    grads = torch.einsum("btp,btd->bpd", g, a).cpu()
    bias_grads = g.sum(1).cpu()
    want_sq = grads.square().sum((1, 2)) + bias_grads.square().sum(1)
    torch.testing.assert_close(sq.cpu(), want_sq, rtol=1e-12, atol=0)
    norms = want_sq.sqrt()
    want_c = torch.clamp(0.5 / (norms + 1e-6), max=1) if clip_fn == "abadi" else 0.5 / (norms + 0.01)
    torch.testing.assert_close(c.cpu(), want_c, rtol=1e-12, atol=0)
    torch.testing.assert_close(w.cpu(), (want_c[:, None, None] * grads).sum(0), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(b.cpu(), (want_c[:, None] * bias_grads).sum(0), rtol=1e-12, atol=1e-14)


def test_choice_follows_flops():
    assert use_ghost(T=16, d=768, p=768)          # 16*1536 < 768*768
    assert not use_ghost(T=1024, d=768, p=768)
    assert not use_ghost(T=1, d=1, p=1)           # 1*2 > 1: direct for the tiniest layer
    assert choose_mode("auto", 128, 768, 3072) == "ghost"
    assert choose_mode("direct", 2, 768, 3072) == "direct"
    with pytest.raises(ValueError, match="clipping_mode"):
        choose_mode("fastest", 1, 1, 1)


def test_choice_is_made_per_call(monkeypatch):
    """The sequence length may change between batches: each call decides from its own shapes."""
    calls = []
    module = sys.modules["bk_kernels.ops.linear_norm"]  # the package exports a function of that name
    monkeypatch.setattr(module, "ghost_norm_3d", lambda a, g, backend: calls.append("ghost"))
    monkeypatch.setattr(module, "direct_norm_3d", lambda a, g, backend: calls.append("direct"))
    linear_norm(torch.randn(2, 4, 64), torch.randn(2, 4, 64))
    linear_norm(torch.randn(2, 400, 64), torch.randn(2, 400, 64))
    assert calls == ["ghost", "direct"]


@pytest.fixture
def slow_ghost(monkeypatch):
    """The ghost norm made 2 ms slower than the direct norm; calls recorded by method."""
    calls = []
    module = sys.modules["bk_kernels.ops.linear_norm"]

    def ghost(a, g, backend):
        calls.append("ghost")
        time.sleep(2e-3)
        return ops.ghost_norm_ref(a, g)

    def direct(a, g, backend):
        calls.append("direct")
        return ops.direct_norm_ref(a, g)

    monkeypatch.setattr(module, "ghost_norm_3d", ghost)
    monkeypatch.setattr(module, "direct_norm_3d", direct)
    before = ops.cpu_norm_impl()
    ops.set_cpu_norm_impl("auto")
    yield calls
    ops.set_cpu_norm_impl(before)


def test_cpu_auto_times_close_choices_once_per_shape_class(slow_ghost):
    """Where the FLOP counts are within 4x (here 2x, the rule says ghost), the CPU times both
    methods once per shape class and keeps the faster: the (slowed) ghost norm loses."""
    a, g = torch.randn(4, 16, 64, dtype=torch.float64), torch.randn(4, 16, 64, dtype=torch.float64)
    assert use_ghost(16, 64, 64)
    torch.testing.assert_close(linear_norm(a, g), ops.direct_norm_ref(a, g), rtol=1e-12, atol=0)
    assert slow_ghost.count("ghost") == 3 and slow_ghost.count("direct") == 4  # 3 timed, 1 kept
    slow_ghost.clear()
    linear_norm(a[:3, :9], g[:3, :9])  # the same class (sizes round up alike): no timing
    assert slow_ghost == ["direct"]
    (made,) = [c for c in ops.cpu_norm_choices() if c["op"] == "linear_norm"]
    assert (made["impl"], made["T"], made["dtype"]) == ("direct", 16, "float64")
    assert made["ghost_us"] > made["direct_us"] + 1000


def test_cpu_rule_outside_the_band_and_when_forced(slow_ghost):
    linear_norm(torch.randn(2, 2, 256), torch.randn(2, 2, 256))  # 8x fewer FLOPs: the rule
    linear_norm(torch.randn(3, 16, 64), torch.randn(3, 16, 64), backend="torch")  # not the CPU kernels
    assert slow_ghost == ["ghost"] * 2
    ops.set_cpu_norm_impl("kernel")  # a forced implementation turns the timing off
    linear_norm(torch.randn(3, 16, 64), torch.randn(3, 16, 64))
    assert slow_ghost == ["ghost"] * 3
    assert not [c for c in ops.cpu_norm_choices() if c["op"] == "linear_norm"]
