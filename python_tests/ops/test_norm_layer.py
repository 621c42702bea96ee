"""norm_layer_grads on every backend that runs here, against the float64 reference, which is
checked in turn against per-example autograd through nn.LayerNorm, nn.GroupNorm and
nn.InstanceNorm2d."""
import pytest
import torch

from bk_kernels import ops
from bk_kernels.ops import norm_layer as nl
from python_tests.tolerances import FLOOR_LOWP, LOW_PRECISION, RATIO_LOWP, REL_TOL

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=GPU)]

# (B, T, C): B=0, T=0, T=1, C=1, odd sizes, long T (GroupNorm's spatial positions), C=0.
SHAPES = [(0, 4, 3), (2, 0, 5), (1, 1, 1), (3, 37, 123), (2, 1, 300), (1, 700, 5), (4, 130, 17), (2, 5, 0)]
# contiguous: LayerNorm's [B, T, C]; channel_major: GroupNorm's [B, C, S] transposed; the
# rest: batch not outermost, strided channels, one example broadcast over the batch.
LAYOUTS = ["contiguous", "channel_major", "transposed", "sliced", "expanded"]


def backend_params():
    params = [pytest.param("cpu", name, id=f"cpu-{name}") for name in ops.available_backends("cpu")]
    for name in ("cuda", "triton", "torch"):
        params.append(pytest.param("cuda", name, id=f"cuda-{name}", marks=GPU))
    return params



def make_operand(B, T, C, dtype, device, layout, gen):
    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).to(device)

    if layout == "contiguous":
        return randn(B, T, C)
    if layout == "channel_major":
        return randn(B, C, T).transpose(1, 2)
    if layout == "transposed":
        return randn(T, B, C).transpose(0, 1)
    if layout == "sliced":
        return randn(B, T, 2 * C + 3)[..., 1 : 2 * C + 1 : 2]
    if layout == "expanded":
        return randn(1, T, C).expand(B, T, C)
    raise ValueError(layout)


def assert_grads_close(got, xhat, g, bias):
    gw, gb, sq = got
    xhat, g = xhat.cpu(), g.cpu()
    rgw, rgb, rsq = nl.norm_layer_grads_ref(xhat, g, bias)
    acc = torch.float64 if xhat.dtype == torch.float64 else torch.float32
    for out, ref in ((gw, rgw), (gb, rgb), (sq, rsq)):
        assert out.shape == ref.shape and out.dtype == acc
    # Sums over t may cancel: gw and gb are judged relative to sum_t |xhat g| and sum_t |g|.
    gw_scale = (xhat.double() * g.double()).abs().sum(1)
    gb_scale = g.double().abs().sum(1) if bias else rgb
    if xhat.dtype in LOW_PRECISION:
        eager_gw, eager_gb = (xhat * g).sum(1), g.sum(1)  # stock, in the inputs' dtype
        eager_sq = eager_gw.square().sum(1) + (eager_gb.square().sum(1) if bias else 0)
        checks = [(gw, rgw, RATIO_LOWP * (eager_gw.double() - rgw).abs() + FLOOR_LOWP * gw_scale),
                  (sq, rsq, RATIO_LOWP * (eager_sq.double() - rsq).abs() + FLOOR_LOWP * rsq)]
        if bias:
            checks.append((gb, rgb, RATIO_LOWP * (eager_gb.double() - rgb).abs() + FLOOR_LOWP * gb_scale))
    else:
        tol = REL_TOL[xhat.dtype]
        checks = [(gw, rgw, tol * gw_scale), (gb, rgb, tol * gb_scale), (sq, rsq, tol * rsq)]
    for out, ref, bound in checks:
        err = (out.cpu().double() - ref).abs()
        assert (err <= bound).all(), f"max error {err.max().item()} above its bound {bound.flatten()[err.argmax()]}"


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}T{}C{}".format(*s))
def test_matches_float64_reference(shape, dtype, layout, device, backend):
    gen = torch.Generator().manual_seed(0)
    xhat = make_operand(*shape, dtype, device, layout, gen)
    # g in a different layout from xhat as well as in the same one
    for g_layout in {layout, "contiguous"}:
        g = make_operand(*shape, dtype, device, g_layout, gen)
        for bias in (True, False):
            got = nl.norm_layer_grads(xhat, g, bias, backend=backend)
            assert all(t.device == xhat.device for t in got)
            assert_grads_close(got, xhat, g, bias)


@pytest.mark.parametrize("device,backend", backend_params())
def test_two_dimensional_inputs_are_one_position(device, backend):
    xhat = torch.randn(4, 7, dtype=torch.float64, device=device)
    g = torch.randn(4, 7, dtype=torch.float64, device=device)
    gw, gb, sq = nl.norm_layer_grads(xhat, g, backend=backend)
    torch.testing.assert_close(gw, xhat * g, rtol=1e-15, atol=0)
    torch.testing.assert_close(gb, g, rtol=0, atol=0)
    torch.testing.assert_close(sq, (xhat * g).square().sum(1) + g.square().sum(1), rtol=1e-12, atol=0)


def per_example_autograd(layer, x):
    """(d loss/d y, [per-example weight grads], [per-example bias grads]) through `layer`,
    one backward per example; loss_b = sum (y_b - target_b)^2."""
    target = torch.randn_like(layer(x))
    weights, biases = [], []
    for b in range(x.shape[0]):
        layer.zero_grad()
        ((layer(x[b : b + 1]) - target[b : b + 1]) ** 2).sum().backward()
        weights.append(layer.weight.grad.flatten().clone())
        biases.append(layer.bias.grad.flatten().clone())
    g = 2 * (layer(x) - target).detach()
    return g, torch.stack(weights), torch.stack(biases)


def normalise(x, dims, eps):
    mean = x.mean(dims, keepdim=True)
    var = x.var(dims, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


@pytest.mark.parametrize("kind", ["layer_norm", "group_norm", "instance_norm"])
def test_reference_and_kernels_are_per_example_autograd(kind):
    torch.manual_seed(1)
    f64 = dict(dtype=torch.float64)
    B, C = 3, 6
    if kind == "layer_norm":  # [B, T, C]: positions share the per-channel affine
        x = torch.randn(B, 5, C, **f64)
        layer = torch.nn.LayerNorm(C, **f64)
        xhat = normalise(x, -1, layer.eps)
        as_btc = lambda t: t  # noqa: E731
    else:  # [B, C, H, W]: xhat per group (or per channel), viewed as [B, H*W, C]
        x = torch.randn(B, C, 4, 5, **f64)
        if kind == "group_norm":
            layer = torch.nn.GroupNorm(2, C, **f64)
            xhat = normalise(x.view(B, 2, -1), -1, layer.eps).view_as(x)
        else:
            layer = torch.nn.InstanceNorm2d(C, affine=True, **f64)
            xhat = normalise(x, (2, 3), layer.eps)
        as_btc = lambda t: t.flatten(2).transpose(1, 2)  # noqa: E731  (channel-major, no copy)
    with torch.no_grad():  # non-trivial affine parameters
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
    g, want_w, want_b = per_example_autograd(layer, x)
    want_sq = want_w.square().sum(1) + want_b.square().sum(1)
    xhat, g = as_btc(xhat), as_btc(g)
    if kind != "layer_norm":
        assert xhat.stride(1) == 1  # the kernels see the channel-major layout
    for got in (nl.norm_layer_grads_ref(xhat, g), nl.norm_layer_grads(xhat, g)):
        torch.testing.assert_close(got[0], want_w, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got[1], want_b, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got[2], want_sq, rtol=1e-10, atol=0)


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("layout", ["contiguous", "channel_major"])
def test_bit_identical_across_thread_counts(layout, device, backend):
    gen = torch.Generator().manual_seed(0)
    xhat = make_operand(5, 300, 77, torch.float32, device, layout, gen)
    g = make_operand(5, 300, 77, torch.float32, device, layout, gen)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3, 4):
            torch.set_num_threads(n)
            results.append(nl.norm_layer_grads(xhat, g, backend=backend))
    finally:
        torch.set_num_threads(threads)
    for r in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(r, results[0]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck(dtype, device):
    gen = torch.Generator().manual_seed(0)
    op = torch.ops.bk.norm_layer_grads.default
    for B, T, C in [(3, 37, 12), (0, 4, 3), (1, 1, 1)]:
        for layout in ("contiguous", "channel_major"):
            xhat = make_operand(B, T, C, dtype, device, layout, gen)
            g = make_operand(B, T, C, dtype, device, layout, gen)
            for bias in (True, False):
                torch.library.opcheck(op, (xhat, g, bias))


def test_torch_compile_fullgraph_through_the_dispatcher_op():
    compiled = torch.compile(lambda x, g: nl.norm_layer_grads(x, g, backend="cpu")[2], fullgraph=True)
    xhat, g = torch.randn(3, 37, 12, dtype=torch.float64), torch.randn(3, 37, 12, dtype=torch.float64)
    torch.testing.assert_close(compiled(xhat, g), nl.norm_layer_grads_ref(xhat, g)[2], rtol=1e-12, atol=0)


def test_bad_inputs_raise_clear_errors():
    xhat, g = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="one shape"):
        nl.norm_layer_grads(xhat, g[:, :2])
    with pytest.raises(ValueError, match="one dtype"):
        nl.norm_layer_grads(xhat, g.double())
    with pytest.raises(ValueError, match="unsupported dtype"):
        nl.norm_layer_grads(xhat.int(), g.int())
    with pytest.raises(ValueError, match=r"\[B,T,C\]"):
        nl.norm_layer_grads(xhat[None], g[None])
    with pytest.raises(ValueError, match="backend must be one of"):
        nl.norm_layer_grads(xhat, g, backend="gpu")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        nl.norm_layer_grads(xhat, g, backend="cuda")
    with pytest.raises(TypeError, match="must be tensors"):
        nl.norm_layer_grads(xhat.numpy(), g)


def test_dispatcher_op_checks_inputs_too():
    op = torch.ops.bk.norm_layer_grads
    with pytest.raises(RuntimeError, match="one shape"):
        op(torch.randn(2, 3, 4), torch.randn(2, 3, 5), True)
    with pytest.raises(RuntimeError, match="one dtype"):
        op(torch.randn(2, 3, 4), torch.randn(2, 3, 4, dtype=torch.float64), True)
    with pytest.raises(RuntimeError, match=r"expected xhat:\[B,T,C\]"):
        op(torch.randn(2, 4), torch.randn(2, 4), True)
