"""DP noise: bk add_noise_ against stock PyTorch, sweeping the gradient's size.

Stock paths: `grad.add_(torch.randn_like(grad), alpha=std).mul_(scale)` (what a DP optimizer
does with torch's generator: a normal draw into a new tensor, then two passes) and
`torch.empty_like(grad).normal_()` alone (the draw, the dominant cost). The fused op draws
Philox normals and adds and scales them in one pass, in place.
"""
import torch

from bench import harness
from bk_kernels.ops import _backend
from bk_kernels.ops.add_noise import add_noise_, add_noise_ref, counters

STD, SCALE, SEED = 1.1, 1 / 256, 20240601


def stock_noise(grad, offset):
    return grad.add_(torch.randn_like(grad), alpha=STD).mul_(SCALE)


def stock_normal(grad, offset):
    return torch.empty_like(grad).normal_()


def methods(device):
    """name -> (function of (grad, offset), whether it draws in bk's Philox stream)."""
    found = {}
    for backend in _backend.available_backends(device):
        if backend == "torch":
            continue  # the float64 reference, chunked; the stock paths stand for pure PyTorch
        if backend == "triton" and device.type == "cpu":
            continue  # Triton's interpreter is for tests, not timing
        if backend == "triton" and not hasattr(torch.ops.bk, "add_noise_triton"):
            continue  # not built yet
        found[f"bk add_noise_ ({backend})"] = (
            lambda g, off, b=backend: add_noise_(g, STD, SCALE, SEED, off, backend=b), True)
    found["stock randn_like+add_+mul_"] = (stock_noise, False)
    found["stock normal_ only"] = (stock_normal, False)
    return found


def sizes(quick):
    return [10**4, 10**5, 10**6] if quick else [10**4, 10**5, 10**6, 10**7]


def check(fn, g):
    """The op against the float64 reference on the tensor's first elements."""
    head = g[:4096].clone()
    fn(head, 0)
    want = add_noise_ref(g[:4096], STD, SCALE, SEED, 0)
    roundoff = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}.get(g.dtype, 0.0)
    tol = 1e-5 * (g[:4096].double().abs() + 6 * STD) * SCALE + roundoff * want.abs()
    assert ((head.double() - want).abs() <= tol).all(), "add_noise_ disagrees with add_noise_ref"


def run(device, dtype, quick, command):
    found = methods(device)
    grid = sizes(quick)
    progress = harness.Progress(len(grid) * len(found), f"noise {device.type}")
    ctx = harness.context(device, command)
    rows = []
    for n in grid:
        grad = torch.randn(n, device=device, dtype=dtype)
        medians = {}
        for name, (fn, philox) in found.items():
            if philox:
                check(fn, grad)
            offset = [0]

            def call():  # advances the counter offset as a training loop would
                fn(grad, offset[0])
                offset[0] += counters(n)

            peak = harness.peak_extra_bytes(call, device)
            med, lo, hi = harness.time_call(call, device, budget_s=0.5 if quick else 1.0)
            medians[name] = med
            rows.append(dict(ctx, op="noise", method=name, n=n, dtype=str(dtype).split(".")[1],
                             median_ms=round(med * 1e3, 4), min_ms=round(lo * 1e3, 4),
                             max_ms=round(hi * 1e3, 4), ns_per_elem=round(med / n * 1e9, 3),
                             peak_extra_mib=round(peak / 2**20, 3), vs_stock="", vs_normal=""))
            progress.step(f"{name} n={n}")
        for row in rows[-len(found):]:
            if row["method"].startswith("bk"):
                ours = medians[row["method"]]
                row["vs_stock"] = round(ours / medians["stock randn_like+add_+mul_"], 3)
                row["vs_normal"] = round(ours / medians["stock normal_ only"], 3)
    return rows


COLUMNS = ["method", "n", "median_ms", "min_ms", "max_ms", "ns_per_elem", "peak_extra_mib", "vs_stock",
           "vs_normal"]


if __name__ == "__main__":  # standalone, without saving: python -m bench.noise [--quick]
    import sys

    cmd = " ".join(["python -m bench.noise"] + sys.argv[1:])
    result = run(torch.device("cpu"), torch.float32, "--quick" in sys.argv, cmd)
    ctx = result[0]
    print(f"\nnoise on {ctx['device']}, commit {ctx['commit']}, torch {ctx['torch']}\n`{cmd}`")
    print(harness.table(result, COLUMNS))
