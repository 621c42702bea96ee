"""Convolution norms and clipped sums against per-example gradients (one backward each)."""
import pytest
import torch
import torch.nn.functional as F

from bk_kernels.ops import conv
from python_tests.ops.test_norms import backend_params

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
# (spatial dims, layer arguments, input shape, out channels)
CASES = [
    (1, dict(kernel_size=3, stride=2, padding=1, dilation=1, groups=1), (3, 4, 17), 6),
    (1, dict(kernel_size=5, stride=1, padding=0, dilation=2, groups=1), (1, 3, 37), 5),
    (2, dict(kernel_size=(3, 2), stride=(1, 2), padding=(1, 0), dilation=(2, 1), groups=2), (2, 4, 9, 8), 6),
    (2, dict(kernel_size=3, stride=1, padding=1, dilation=1, groups=4), (2, 4, 7, 7), 8),  # depthwise, x2
    (2, dict(kernel_size=1, stride=1, padding=0, dilation=1, groups=1), (0, 3, 5, 5), 4),  # B = 0
    (3, dict(kernel_size=2, stride=1, padding=(0, 1, 0), dilation=1, groups=1), (2, 3, 4, 5, 3), 2),
    # one output position per example (the CPU clipped sum's matmul path): a 3x3 kernel on a 1x1
    # map padded by 1 (ResNet's last stage at 32 x 32), strided with groups, unpadded, in 3-d
    (2, dict(kernel_size=3, stride=1, padding=1, dilation=1, groups=1), (3, 4, 1, 1), 5),
    (2, dict(kernel_size=3, stride=1, padding=1, dilation=1, groups=1), (0, 4, 1, 1), 5),  # B = 0
    (2, dict(kernel_size=3, stride=2, padding=1, dilation=1, groups=2), (2, 4, 2, 2), 6),
    (1, dict(kernel_size=4, stride=1, padding=0, dilation=1, groups=1), (1, 3, 4), 2),
    (3, dict(kernel_size=2, stride=2, padding=0, dilation=1, groups=1), (3, 2, 2, 2, 2), 3),
    # the CPU's pointwise (batched matmul) and depthwise (forward convolution) weight gradients:
    # strided, grouped, 1-3 spatial dims, one example; padded 1x1 and depthwise x2 take torch's
    (2, dict(kernel_size=1, stride=2, padding=0, dilation=1, groups=2), (3, 4, 7, 6), 6),
    (1, dict(kernel_size=1, stride=1, padding=0, dilation=3, groups=1), (2, 5, 9), 3),
    (3, dict(kernel_size=1, stride=(1, 2, 1), padding=0, dilation=1, groups=1), (2, 3, 3, 5, 2), 4),
    (2, dict(kernel_size=1, stride=1, padding=1, dilation=1, groups=1), (2, 3, 4, 4), 2),
    (2, dict(kernel_size=3, stride=2, padding=2, dilation=2, groups=4), (3, 4, 9, 8), 4),
    (1, dict(kernel_size=5, stride=1, padding=2, dilation=1, groups=3), (2, 3, 11), 3),
    (3, dict(kernel_size=(3, 1, 2), stride=(1, 1, 2), padding=(1, 0, 1), dilation=1, groups=2), (2, 2, 4, 3, 5), 2),
    (2, dict(kernel_size=7, stride=1, padding=3, dilation=1, groups=5), (1, 5, 6, 6), 5),
    # groups whose channels outnumber the kernel's last size: the norms' patches copied channels last
    (2, dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 1), dilation=(1, 2), groups=2), (2, 8, 7, 6), 4),
]


def make_case(n, kw, x_shape, c_out, dtype):
    x = torch.randn(x_shape, dtype=torch.float64)
    k = kw["kernel_size"]
    k = (k,) * n if isinstance(k, int) else k
    weight_shape = (c_out, x_shape[1] // kw["groups"], *k)
    y = CONV[n](x, torch.randn(weight_shape, dtype=torch.float64), None, kw["stride"], kw["padding"],
                kw["dilation"], kw["groups"])
    g = torch.randn_like(y)
    return x.to(dtype), g.to(dtype), weight_shape


def layer_args(kw):
    return {k: v for k, v in kw.items() if k != "kernel_size"}


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("mode", ["auto", "ghost", "direct"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}d-{c[2]}")
def test_conv_norm_matches_per_example_gradients(case, dtype, mode, device, backend):
    n, kw, x_shape, c_out = case
    x, g, weight_shape = make_case(n, kw, x_shape, c_out, dtype)
    grads = conv.conv_per_example_grads_ref(x, g, weight_shape=weight_shape, **layer_args(kw))
    want = grads.flatten(1).square().sum(1) + g.double().sum(tuple(range(2, g.dim()))).square().sum(1)
    got = conv.conv_norm(x.to(device), g.to(device), bias=True, mode=mode, backend=backend, **kw)
    assert got.shape == (x_shape[0],) and got.device.type == device
    rel = (got.cpu().double() - want).abs() / want.clamp_min(1e-300)
    assert (rel <= (1e-10 if dtype == torch.float64 else 1e-5)).all(), rel


def test_pointwise_clipped_sum_over_chunks_of_examples(monkeypatch):
    """The CPU's pointwise clipped sum copies each chunk of examples' rows (bounded memory) and
    adds the chunks' products: one example a chunk gives the same sum."""
    monkeypatch.setattr(conv, "example_chunks", lambda B, width: [(b, b + 1) for b in range(B)])
    x, g, weight_shape = make_case(2, dict(kernel_size=1, stride=2, padding=0, dilation=1, groups=2), (3, 4, 7, 6),
                                   6, torch.float64)
    c = torch.rand(3, dtype=torch.float64)
    grads = conv.conv_per_example_grads_ref(x, g, weight_shape=weight_shape, stride=2, groups=2)
    got, _ = conv.conv_clipped_sum(x, g, c, weight_shape=weight_shape, stride=2, groups=2)
    torch.testing.assert_close(got, (c.view(-1, 1, 1, 1, 1) * grads).sum(0), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}d-{c[2]}")
def test_conv_clipped_sum_matches_per_example_gradients(case, dtype, device):
    n, kw, x_shape, c_out = case
    x, g, weight_shape = make_case(n, kw, x_shape, c_out, dtype)
    c = torch.rand(x_shape[0], dtype=torch.float64)
    grads = conv.conv_per_example_grads_ref(x, g, weight_shape=weight_shape, **layer_args(kw))
    want_w = (c.view(-1, *[1] * (n + 2)) * grads).sum(0)
    want_b = (c[:, None] * g.double().sum(tuple(range(2, g.dim())))).sum(0)
    out = (torch.ones(weight_shape, dtype=torch.float64, device=device),
           torch.ones(c_out, dtype=torch.float64, device=device))
    w, b = conv.conv_clipped_sum(x.to(device), g.to(device), c.to(device), weight_shape=weight_shape,
                                 bias=True, out=out, **layer_args(kw))
    assert w is out[0] and b is out[1]
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-5}[dtype]  # bf16: fp32 accumulation
    scale = max(want_w.abs().max().item(), 1.0)
    torch.testing.assert_close(w.cpu() - 1, want_w, rtol=0, atol=tol * scale)
    torch.testing.assert_close(b.cpu() - 1, want_b, rtol=0, atol=tol * max(want_b.abs().max().item(), 1.0))


def test_conv_bad_arguments():
    x, g = torch.randn(2, 4, 9), torch.randn(2, 6, 7)
    with pytest.raises(ValueError, match="does not match the output size"):
        conv.conv_norm(x, g, kernel_size=2)
    with pytest.raises(ValueError, match="divisible by groups"):
        conv.conv_norm(x, g, kernel_size=3, groups=3)
    with pytest.raises(ValueError, match="kernel_size must be"):
        conv.conv_norm(x, g, kernel_size=(3, 3))
    with pytest.raises(ValueError, match="one batch size"):
        conv.conv_norm(x, g[:1], kernel_size=3)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}d-{c[2]}")
def test_conv_per_example_grads_batched_by_groups(case, dtype):
    """One weight-gradient call with the batch folded into the groups gives every example's own
    gradient (the engine keeps them for small direct-mode conv layers)."""
    n, kw, x_shape, c_out = case
    x, g, weight_shape = make_case(n, kw, x_shape, c_out, dtype)
    if dtype == torch.float64:  # a non-contiguous x and g too
        x, g = x.transpose(0, 1).contiguous().transpose(0, 1), g.transpose(0, 1).contiguous().transpose(0, 1)
    want = conv.conv_per_example_grads_ref(x, g, weight_shape=weight_shape, **layer_args(kw))
    got = conv.conv_per_example_grads(x, g, weight_shape=weight_shape, **layer_args(kw))
    assert got.shape == (x_shape[0], *weight_shape) and got.dtype == (torch.float64 if dtype == torch.float64
                                                                         else torch.float32)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-5}[dtype]  # bf16: fp32 accumulation
    scale = max(want.abs().max().item(), 1.0) if want.numel() else 1.0
    torch.testing.assert_close(got.double(), want, rtol=0, atol=tol * scale)


@pytest.mark.parametrize("fold", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}d-{c[2]}")
def test_conv_per_example_grads_of_folded_inputs_sum_each_examples_fold(case, dtype, fold):
    """fold=k: [B*k, C, *S] holds k inputs per example (a video's frames, example-major); each
    example's gradient is the sum of its k inputs' own (B = 0, 1 and more; groups; dilation)."""
    n, kw, x_shape, c_out = case
    x_shape = (x_shape[0] * fold, *x_shape[1:])
    x, g, weight_shape = make_case(n, kw, x_shape, c_out, dtype)
    per_input = conv.conv_per_example_grads_ref(x, g, weight_shape=weight_shape, **layer_args(kw))
    want = per_input.view(-1, fold, *weight_shape).sum(1)
    got = conv.conv_per_example_grads(x, g, weight_shape=weight_shape, fold=fold, **layer_args(kw))
    assert got.shape == want.shape == (x_shape[0] // fold, *weight_shape)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}[dtype]
    scale = max(want.abs().max().item(), 1.0) if want.numel() else 1.0
    torch.testing.assert_close(got.double(), want, rtol=0, atol=tol * scale)


def test_weight_gradients_turn_off_tf32_and_restore_it(monkeypatch):
    """On a GPU the conv weight-gradient calls run with cuDNN's TF32 off (float32 accuracy),
    and the user's setting is restored after; checked here through a stand-in weight-gradient
    function on a tensor that says it is on CUDA."""
    from bk_kernels.ops import conv as conv_ops

    seen = []

    class FakeCuda:
        device = torch.device("cuda")

    monkeypatch.setitem(conv_ops._WEIGHT_GRADS, 2, lambda *a: seen.append(torch.backends.cudnn.allow_tf32) or 7)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    assert conv_ops._weight_grad(2, FakeCuda()) == 7
    assert seen == [False] and torch.backends.cudnn.allow_tf32 is True
