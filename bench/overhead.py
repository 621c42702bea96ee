"""The engine's fixed cost: microseconds per step and per layer, on layers too small to cost
anything else (a stack of L Linear(8, 8) + ReLU at B = 4, noise included).

bk's step and the non-private step are timed side by side for L = 2, 8 and 32 (interleaved
calls); the extra time of bk is fitted as  extra(L) = per_step + per_layer * L  (least squares
over the three L). What it measures is Python and dispatch work: the layers' autograd Functions,
the engine's records and clip factors, one clipped sum, one norm and one noise call per
parameter. The per-layer cost is also split by phase, each fitted the same way: the forward,
the backward (which includes the engine's clip factors and clipped sums, run when the backward
ends) and the optimizer's zero_grad and step (noise and the division by the batch size).
"""
import copy
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench import harness

WIDTH, BATCH = 8, 4


def _stack(layers):
    torch.manual_seed(0)
    blocks = []
    for _ in range(layers):
        blocks += [nn.Linear(WIDTH, WIDTH), nn.ReLU()]
    return nn.Sequential(*blocks)


def _steps(layers, device, dtype):
    import bk_kernels as bk

    model = _stack(layers).to(device, dtype)
    x = torch.randn(BATCH, WIDTH, device=device, dtype=dtype)
    y = torch.randint(0, WIDTH, (BATCH,), device=device)
    plain = copy.deepcopy(model)
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.01)
    private = bk.convert(copy.deepcopy(model))
    engine = bk.PrivacyEngine(private, batch_size=BATCH, sample_size=100 * BATCH, noise_multiplier=1.0,
                              max_grad_norm=1.0, seed=0)
    private_opt = engine.attach(torch.optim.SGD(private.parameters(), lr=0.01))

    def step(m, opt):
        def run():
            """Seconds of the forward, the backward and the optimizer (zero_grad and step)."""
            start = _now(device)
            opt.zero_grad()
            t0 = _now(device)
            loss = F.cross_entropy(m(x), y)
            t1 = _now(device)
            loss.backward()
            t2 = _now(device)
            opt.step()
            t3 = _now(device)
            return t1 - t0, t2 - t1, (t0 - start) + (t3 - t2)
        return run
    return step(plain, plain_opt), step(private, private_opt)


def _now(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


PHASES = ("fwd", "bwd", "step")


def _fit(points):
    """(intercept, slope) of the least-squares line through [(L, value)]."""
    n = len(points)
    mean_l = sum(L for L, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    slope = sum((L - mean_l) * (v - mean_v) for L, v in points) / sum((L - mean_l) ** 2 for L, _ in points)
    return mean_v - slope * mean_l, slope


def run(device, dtype, quick, command):
    ctx = harness.context(device, command)
    grid = [2, 8] if quick else [2, 8, 32]
    progress = harness.Progress(len(grid), f"overhead {device.type}")
    rows, extra = [], []
    for layers in grid:
        plain, private = _steps(layers, device, dtype)
        for _ in range(5):  # warm both
            plain(), private()
        times = {m: {ph: [] for ph in ("total",) + PHASES} for m in ("non-private", "bk")}
        for _ in range(20 if quick else 100):  # interleaved, so drift hits both alike
            for m, fn in (("non-private", plain), ("bk", private)):
                phases = fn()
                times[m]["total"].append(sum(phases))
                for ph, t in zip(PHASES, phases):
                    times[m][ph].append(t)
        med = {m: {ph: sorted(v)[len(v) // 2] for ph, v in by_phase.items()} for m, by_phase in times.items()}
        extra.append((layers, {ph: med["bk"][ph] - med["non-private"][ph] for ph in ("total",) + PHASES}))
        rows.append(dict(ctx, op="overhead", layers=layers, B=BATCH, width=WIDTH,
                         non_private_us=round(med["non-private"]["total"] * 1e6, 1),
                         bk_us=round(med["bk"]["total"] * 1e6, 1),
                         extra_us=round(extra[-1][1]["total"] * 1e6, 1), per_step_us="", per_layer_us=""))
        progress.step(f"L={layers}")
    # extra(L) = per_step + per_layer * L, least squares; the same per phase (medians of each)
    per_step, per_layer = _fit([(L, e["total"]) for L, e in extra])
    slopes = {ph: _fit([(L, e[ph]) for L, e in extra])[1] for ph in PHASES}
    for row in rows:
        row["per_layer_us"] = round(per_layer * 1e6, 1)
        row["per_step_us"] = round(per_step * 1e6, 1)
        for ph in PHASES:
            row[f"per_layer_{ph}_us"] = round(slopes[ph] * 1e6, 1)
    return rows


COLUMNS = ["layers", "B", "width", "non_private_us", "bk_us", "extra_us", "per_step_us", "per_layer_us",
           "per_layer_fwd_us", "per_layer_bwd_us", "per_layer_step_us"]
