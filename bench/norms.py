"""Per-example norm ops against stock PyTorch, sweeping T, d, p.

Stock paths: the Gram matrices via bmm (what a plain ghost-norm implementation does, B*T*T
memory) and the per-example gradients via einsum (B*d*p memory). The fused ops compute the
same [B] norms tile by tile. On the CPU each op also runs with each implementation forced
(ops.set_cpu_norm_impl): the plain "(cpu)" rows are the default, the hand-written kernels;
"(cpu auto)" times the kernel and torch's BLAS on chunks of examples once per shape class and
keeps the faster; "(cpu blas)" forces BLAS.
"""
import torch

from bk_kernels import ops
from bench import harness


def stock_gram_bmm(a, g):
    return ((a @ a.mT) * (g @ g.mT)).sum((1, 2))


def stock_einsum_grads(a, g):
    return torch.einsum("btd,btp->bdp", a, g).square().sum((1, 2))


def methods(device):
    """name -> (function, the stock method it replaces, the CPU norm implementation setting)."""
    found = {}
    for backend in ops.available_backends(device):
        if backend == "torch":
            continue  # the chunked pure-PyTorch fallback; the stock paths below stand for it
        for impl in ("kernel", "auto", "blas") if backend == "cpu" else ("kernel",):
            tag = backend if impl == "kernel" else f"{backend} {impl}"  # "kernel": the default
            found[f"bk ghost ({tag})"] = (lambda a, g, b=backend: ops.ghost_norm(a, g, backend=b), "stock gram bmm", impl)
            found[f"bk direct ({tag})"] = (lambda a, g, b=backend: ops.direct_norm(a, g, backend=b),
                                           "stock einsum grads", impl)
    found["stock gram bmm"] = (stock_gram_bmm, None, "kernel")
    found["stock einsum grads"] = (stock_einsum_grads, None, "kernel")
    return found


def shapes(quick):
    B = 8
    Ts = [32, 128] if quick else [32, 128, 512]
    dps = [(128, 128), (256, 1024)] if quick else [(128, 128), (256, 1024), (768, 768)]
    return [(B, T, d, p) for T in Ts for d, p in dps]


def run(device, dtype, quick, command):
    if device.type == "cpu":
        # Triton's interpreter is for tests, not timing.
        found = {k: v for k, v in methods(device).items() if "triton" not in k}
    else:
        found = methods(device)
    grid = shapes(quick)
    progress = harness.Progress(len(grid) * len(found), f"norms {device.type}")
    ctx = harness.context(device, command)
    rows = []
    for B, T, d, p in grid:
        a = torch.randn(B, T, d, device=device, dtype=dtype)
        g = torch.randn(B, T, p, device=device, dtype=dtype)
        want = ops.direct_norm_ref(a, g)
        medians, before = {}, ops.cpu_norm_impl()
        for name, (fn, _, impl) in found.items():
            ops.set_cpu_norm_impl(impl)  # "auto" forgets earlier choices: its first call measures
            got = fn(a, g).double()
            torch.testing.assert_close(got, want, rtol=1e-3 if dtype != torch.float64 else 1e-9, atol=0)
            peak = harness.peak_extra_bytes(lambda: fn(a, g), device)
            # the forced implementations are a comparison beside the default: a shorter budget
            budget = (0.5 if quick else 1.0) * (1.0 if impl == "kernel" else 0.3)
            med, lo, hi = harness.time_call(lambda: fn(a, g), device, budget_s=budget)
            medians[name] = med
            rows.append(dict(ctx, op="norm", method=name, B=B, T=T, d=d, p=p, dtype=str(dtype).split(".")[1],
                             median_ms=round(med * 1e3, 4), min_ms=round(lo * 1e3, 4), max_ms=round(hi * 1e3, 4),
                             peak_extra_mib=round(peak / 2**20, 3), vs_stock=""))
            progress.step(f"{name} T={T} d={d} p={p}")
        ops.set_cpu_norm_impl(before)
        for row in rows[-len(found):]:
            stock = found[row["method"]][1]
            if stock:
                row["vs_stock"] = round(medians[row["method"]] / medians[stock], 3)
    return rows


COLUMNS = ["method", "B", "T", "d", "p", "median_ms", "min_ms", "max_ms", "peak_extra_mib", "vs_stock"]
