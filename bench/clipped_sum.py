"""clipped_sum against torch.mm on the same flattened shapes.

torch.mm(g^T, a) is the non-private weight gradient: the floor a clipped sum can reach. The
stock private way scales a copy of g by c first, then multiplies.
"""
import torch

from bk_kernels import ops
from bench import harness


def methods(device):
    found = {}
    for backend in ops.available_backends(device):
        if backend == "torch" or (device.type == "cpu" and backend == "triton"):
            continue
        found[f"bk clipped_sum ({backend})"] = (
            lambda a, g, c, b=backend: ops.clipped_sum(a, g, c, bias=True, backend=b))
    found["torch.mm (no clipping)"] = lambda a, g, c: torch.mm(g.flatten(0, 1).T, a.flatten(0, 1))
    found["stock scale + mm"] = lambda a, g, c: torch.mm((g * c[:, None, None]).flatten(0, 1).T, a.flatten(0, 1))
    return found


def shapes(quick):
    if quick:
        return [(8, 128, 256, 256), (8, 128, 768, 768)]
    return [(8, 128, 256, 256), (8, 128, 768, 768), (8, 128, 768, 3072), (8, 512, 768, 768), (64, 16, 1024, 1024)]


def run(device, dtype, quick, command):
    found = methods(device)
    grid = shapes(quick)
    progress = harness.Progress(len(grid) * len(found), f"clipped_sum {device.type}")
    ctx = harness.context(device, command)
    rows = []
    for B, T, d, p in grid:
        a = torch.randn(B, T, d, device=device, dtype=dtype)
        g = torch.randn(B, T, p, device=device, dtype=dtype)
        c = torch.rand(B, device=device, dtype=torch.float32)
        medians = {}
        for name, fn in found.items():
            peak = harness.peak_extra_bytes(lambda: fn(a, g, c), device)
            med, lo, hi = harness.time_call(lambda: fn(a, g, c), device, budget_s=0.5 if quick else 1.0)
            medians[name] = med
            rows.append(dict(ctx, op="clipped_sum", method=name, B=B, T=T, d=d, p=p, dtype=str(dtype).split(".")[1],
                             median_ms=round(med * 1e3, 4), min_ms=round(lo * 1e3, 4), max_ms=round(hi * 1e3, 4),
                             peak_extra_mib=round(peak / 2**20, 3), vs_mm=""))
            progress.step(f"{name} B={B} T={T} d={d} p={p}")
        for row in rows[-len(found):]:
            row["vs_mm"] = round(medians[row["method"]] / medians["torch.mm (no clipping)"], 3)
    return rows


COLUMNS = ["method", "B", "T", "d", "p", "median_ms", "min_ms", "max_ms", "peak_extra_mib", "vs_mm"]
