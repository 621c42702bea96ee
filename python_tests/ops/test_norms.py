"""ghost_norm and direct_norm on every backend that runs here, against float64 references.

The independent reference is the per-example gradient itself (direct_norm_ref: one d x p
matrix per example, float64); ghost_norm_ref (full Gram matrices) is checked against it too.
"""
import os
import subprocess
import sys

import pytest
import torch

from bk_kernels import ops
from python_tests.ops.norm_checks import LAYOUTS, assert_norms_close, make_operand

NORM_OPS = {"ghost_norm": ops.ghost_norm, "direct_norm": ops.direct_norm}

# (B, T, d, p): B=0, B=1, T=1, odd T and d, p=1, a shape that crosses several tiles.
SHAPES = [
    (0, 5, 3, 2),
    (1, 1, 1, 1),
    (1, 37, 123, 1),
    (3, 1, 123, 5),
    (2, 37, 1, 70),
    (3, 37, 123, 70),
    (2, 130, 17, 9),
    (2, 5, 123, 70),  # much wider than long: the CPU ghost norm's row-major kernel
]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=GPU)]


def backend_params():
    """(device, backend) pairs; GPU ones are listed (and skipped) even where no GPU exists."""
    params = [pytest.param("cpu", name, id=f"cpu-{name}") for name in ops.available_backends("cpu")]
    for name in ("cuda", "triton", "torch"):
        params.append(pytest.param("cuda", name, id=f"cuda-{name}", marks=GPU))
    return params


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}T{}d{}p{}".format(*s))
@pytest.mark.parametrize("name", NORM_OPS)
def test_norm_matches_float64_reference(name, shape, dtype, layout, device, backend):
    B, T, d, p = shape
    a = make_operand(B, T, d, dtype, device, layout)
    g = make_operand(B, T, p, dtype, device, layout)
    out = NORM_OPS[name](a, g, backend=backend)
    assert out.device == a.device
    assert_norms_close(name, out.cpu(), a.cpu(), g.cpu())


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(40, 1, 1000, 33), (7, 1, 77, 300)], ids=lambda s: "B{}T{}d{}p{}".format(*s))
def test_cpu_one_position_norm(shape, dtype, layout):
    """T = 1 on the CPU (row sums of squares in vector accumulators): every loop of the row sum
    (4 vectors, 1 vector, the tail), and enough work to take threads. The interpreter-slow Triton
    backend is left to SHAPES."""
    B, T, d, p = shape
    a = make_operand(B, T, d, dtype, "cpu", layout)
    g = make_operand(B, T, p, dtype, "cpu", layout)
    for name, op in NORM_OPS.items():
        assert_norms_close(name, op(a, g, backend="cpu"), a, g)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}T{}d{}p{}".format(*s))
def test_references_agree(shape):
    B, T, d, p = shape
    a, g = torch.randn(B, T, d, dtype=torch.float64), torch.randn(B, T, p, dtype=torch.float64)
    torch.testing.assert_close(ops.ghost_norm_ref(a, g), ops.direct_norm_ref(a, g), rtol=1e-12, atol=0)


def test_reference_is_the_per_example_gradient_norm():
    """direct_norm_ref against autograd: one backward per example through a real linear layer."""
    B, T, d, p = 3, 5, 4, 6
    layer = torch.nn.Linear(d, p, bias=False, dtype=torch.float64)
    x = torch.randn(B, T, d, dtype=torch.float64)
    target = torch.randn(B, T, p, dtype=torch.float64)
    want = []
    for i in range(B):
        layer.zero_grad()
        ((layer(x[i]) - target[i]) ** 2).sum().backward()
        want.append(layer.weight.grad.square().sum())
    g = 2 * (layer(x) - target).detach()  # d loss / d output
    torch.testing.assert_close(ops.direct_norm_ref(x, g), torch.stack(want), rtol=1e-12, atol=0)


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("name", NORM_OPS)
def test_two_dimensional_inputs_are_one_position(name, device, backend):
    a = torch.randn(4, 7, dtype=torch.float64, device=device)
    g = torch.randn(4, 3, dtype=torch.float64, device=device)
    want = a.square().sum(1) * g.square().sum(1)  # ||a g^T||^2 = ||a||^2 ||g||^2
    torch.testing.assert_close(NORM_OPS[name](a, g, backend=backend), want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", NORM_OPS)
def test_bad_inputs_raise_clear_errors(name):
    op = NORM_OPS[name]
    a, g = torch.randn(2, 3, 4), torch.randn(2, 3, 5)
    with pytest.raises(ValueError, match="batch and position"):
        op(a, g[:1])
    with pytest.raises(ValueError, match="one dtype"):
        op(a, g.double())
    with pytest.raises(ValueError, match="unsupported dtype"):
        op(a.int(), g.int())
    with pytest.raises(ValueError, match=r"\[B,T,d\]"):
        op(a[None], g[None])
    with pytest.raises(ValueError, match="backend must be one of"):
        op(a, g, backend="gpu")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        op(a, g, backend="cuda")
    with pytest.raises(TypeError, match="must be tensors"):
        op(a.numpy(), g)


@pytest.mark.parametrize("name", NORM_OPS)
def test_dispatcher_op_checks_inputs_too(name):
    """The C++ op checks what it is given even when called without the Python wrapper."""
    op = getattr(torch.ops.bk, name)
    with pytest.raises(RuntimeError, match="agree in batch"):
        op(torch.randn(2, 3, 4), torch.randn(1, 3, 4))
    with pytest.raises(RuntimeError, match="one dtype"):
        op(torch.randn(2, 3, 4), torch.randn(2, 3, 4, dtype=torch.float64))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", NORM_OPS)
def test_opcheck(name, dtype, device):
    op = getattr(torch.ops.bk, name).default
    for B, T, d, p in [(3, 37, 12, 5), (0, 4, 3, 2), (1, 1, 1, 1)]:
        a = torch.randn(B, T, d, device=device).to(dtype)
        g = torch.randn(B, T, p, device=device).to(dtype)
        torch.library.opcheck(op, (a, g))
        torch.library.opcheck(op, (a.transpose(0, 1).contiguous().transpose(0, 1), g))


def test_torch_compile_fullgraph_through_the_dispatcher_ops():
    def both_norms(a, g):
        return ops.ghost_norm(a, g, backend="cpu") + ops.direct_norm(a, g, backend="cpu")

    compiled = torch.compile(both_norms, fullgraph=True)
    a, g = torch.randn(3, 37, 12, dtype=torch.float64), torch.randn(3, 37, 5, dtype=torch.float64)
    torch.testing.assert_close(compiled(a, g), 2 * ops.direct_norm_ref(a, g), rtol=1e-10, atol=0)


@pytest.fixture
def cpu_norm_impl():
    """Sets the CPU norm implementation for one test and restores the setting after it."""
    before = ops.cpu_norm_impl()
    yield ops.set_cpu_norm_impl
    ops.set_cpu_norm_impl(before)


@pytest.mark.parametrize("impl", ["kernel", "blas", "auto"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("shape", [s for s in SHAPES if s[1] > 1], ids=lambda s: "B{}T{}d{}p{}".format(*s))
@pytest.mark.parametrize("name", NORM_OPS)
def test_cpu_implementations_match_reference(name, shape, dtype, layout, impl, cpu_norm_impl):
    """Each CPU implementation (hand-written kernel, chunked BLAS, the measured pick) on its own."""
    cpu_norm_impl(impl)
    B, T, d, p = shape
    a = make_operand(B, T, d, dtype, "cpu", layout)
    g = make_operand(B, T, p, dtype, "cpu", layout)
    for _ in range(2):  # auto: the measuring call, then the chosen implementation
        assert_norms_close(name, NORM_OPS[name](a, g, backend="cpu"), a, g)


@pytest.mark.parametrize("shape", [(7, 32, 32), (9, 300, 300), (5, 16, 16), (30, 1000, 40)], ids=str)
@pytest.mark.parametrize("name", NORM_OPS)
def test_cpu_kernel_norm_of_an_example_does_not_depend_on_its_batch(name, shape, cpu_norm_impl):
    """The kernel runs threads over the examples of a batch, or over one example's tiles when the
    batch is smaller than the threads: either way an example's tile values are added in one
    order, so its norm is bitwise the same alone and in a batch (an OpenMP reduction over the
    tiles made one-example steps differ in the last bits from run to run)."""
    cpu_norm_impl("kernel")
    T, d, p = shape
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(2, T, d, dtype=torch.float64, generator=gen)
    g = torch.randn(2, T, p, dtype=torch.float64, generator=gen)
    in_batch = NORM_OPS[name](a, g, backend="cpu")
    alone = torch.cat([NORM_OPS[name](a[b : b + 1], g[b : b + 1], backend="cpu") for b in range(2)])
    assert torch.equal(in_batch, alone)


@pytest.mark.parametrize("name", NORM_OPS)
def test_cpu_blas_chunks_examples(name, cpu_norm_impl):
    """More examples than one BLAS chunk holds (2^22 elements: 64 examples' 256 x 256 Gram
    matrices for the ghost norm, 4 examples' 1024 x 1024 gradients for the direct norm), so the
    chunk loop runs more than once, with a short last chunk."""
    cpu_norm_impl("blas")
    B, T, d, p = (67, 256, 3, 2) if name == "ghost_norm" else (6, 2, 1024, 1024)
    a, g = torch.randn(B, T, d, dtype=torch.float64), torch.randn(B, T, p, dtype=torch.float64)
    assert_norms_close(name, NORM_OPS[name](a, g, backend="cpu"), a, g)


def test_cpu_auto_measures_once_per_shape_class(cpu_norm_impl):
    cpu_norm_impl("auto")  # forgets earlier choices
    assert ops.cpu_norm_choices() == []
    a, g = torch.randn(4, 30, 20), torch.randn(4, 30, 10)
    ops.ghost_norm(a, g, backend="cpu")
    ops.ghost_norm(a[:3, :29], g[:3, :29], backend="cpu")  # same class: B, T, d, p round up alike
    (made,) = ops.cpu_norm_choices()
    shape = (made["B"], made["T"], made["d"], made["p"])
    assert (made["op"], made["dtype"], shape) == ("ghost_norm", "float32", (4, 30, 20, 10))
    assert made["threads"] == torch.get_num_threads()
    assert made["kernel_us"] > 0 and made["blas_us"] > 0
    assert made["impl"] == ("blas" if made["blas_us"] < made["kernel_us"] else "kernel")
    ops.direct_norm(a, g, backend="cpu")  # another op
    ops.ghost_norm(a.double(), g.double(), backend="cpu")  # another dtype
    ops.ghost_norm(a[:, :1], g[:, :1], backend="cpu")  # T = 1: the kernel, nothing to measure
    ops.ghost_norm(a.bfloat16(), g.bfloat16(), backend="cpu")  # 16-bit: the kernel
    assert sorted((c["op"], c["dtype"]) for c in ops.cpu_norm_choices()) == [
        ("direct_norm", "float32"), ("ghost_norm", "float32"), ("ghost_norm", "float64")]


def test_cpu_norm_impl_setting_is_checked(cpu_norm_impl):
    cpu_norm_impl("kernel")
    with pytest.raises(ValueError, match="impl must be one of"):
        ops.set_cpu_norm_impl("mkl")
    assert ops.cpu_norm_impl() == "kernel"  # unchanged


def _run_with_cpu_norms_env(value):
    code = ("import torch, bk_kernels.ops as o; "
            "o.ghost_norm(torch.randn(2, 3, 4), torch.randn(2, 3, 5)); print(o.cpu_norm_impl())")
    env = {**os.environ, "BK_CPU_NORMS": value}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)


def test_cpu_norm_impl_environment_variable():
    default = _run_with_cpu_norms_env("")  # unset: the kernels, the same path in every process
    assert default.returncode == 0 and default.stdout.strip() == "kernel", default.stderr
    ok = _run_with_cpu_norms_env("blas")
    assert ok.returncode == 0 and ok.stdout.strip() == "blas", ok.stderr
    bad = _run_with_cpu_norms_env("fast")  # refused at import, naming the variable
    assert bad.returncode != 0
    assert "BK_CPU_NORMS must be 'auto', 'kernel' or 'blas', got 'fast'" in bad.stderr
