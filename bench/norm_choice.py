"""The ghost-or-direct choice against both alternatives.

For each shape both norms are timed; the row says which the FLOP rule (ops.use_ghost) picks and
how the pick compares with the faster of the two (1.0 = the rule chose the faster one), and the
same for linear_norm under set_cpu_norm_impl("auto") (on the CPU it times both where the FLOP
counts are close; the default, "kernel", uses the rule).
"""
import torch

from bk_kernels import ops
from bench import harness


def shapes(quick):
    Ts = [8, 64, 512] if quick else [4, 16, 64, 256, 1024]
    widths = [(64, 64), (768, 768)] if quick else [(32, 32), (128, 128), (768, 768), (768, 3072), (3072, 768)]
    return [(8, T, d, p) for T in Ts for d, p in widths]


def run(device, dtype, quick, command):
    backend = "cpu" if device.type == "cpu" else ("cuda" if "cuda" in ops.available_backends(device) else "triton")
    grid = shapes(quick)
    progress = harness.Progress(len(grid), f"norm choice {device.type}")
    ctx = harness.context(device, command)
    rows, before = [], ops.cpu_norm_impl()
    ops.set_cpu_norm_impl("auto")
    try:
        rows += _rows(grid, backend, device, dtype, quick, ctx, progress)
    finally:
        ops.set_cpu_norm_impl(before)
    return rows


def _rows(grid, backend, device, dtype, quick, ctx, progress):
    rows = []
    for B, T, d, p in grid:
        a = torch.randn(B, T, d, device=device, dtype=dtype)
        g = torch.randn(B, T, p, device=device, dtype=dtype)
        budget = 0.2 if quick else 0.5
        ghost = harness.time_call(lambda: ops.ghost_norm(a, g, backend=backend), device, budget_s=budget)[0]
        direct = harness.time_call(lambda: ops.direct_norm(a, g, backend=backend), device, budget_s=budget)[0]
        auto = harness.time_call(lambda: ops.linear_norm(a, g, backend=backend), device, budget_s=budget)[0]
        pick = "ghost" if ops.use_ghost(T, d, p) else "direct"
        picked = ghost if pick == "ghost" else direct
        rows.append(dict(ctx, op="norm_choice", method=f"bk ({backend})", B=B, T=T, d=d, p=p,
                         dtype=str(dtype).split(".")[1], ghost_ms=round(ghost * 1e3, 4),
                         direct_ms=round(direct * 1e3, 4), rule_picks=pick,
                         pick_vs_best=round(picked / min(ghost, direct), 3), auto_ms=round(auto * 1e3, 4),
                         auto_vs_best=round(auto / min(ghost, direct), 3)))
        progress.step(f"T={T} d={d} p={p}")
    return rows


COLUMNS = ["B", "T", "d", "p", "ghost_ms", "direct_ms", "rule_picks", "pick_vs_best", "auto_ms", "auto_vs_best"]
