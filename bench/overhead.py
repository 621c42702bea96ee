"""The engine's fixed cost: microseconds per step and per layer, on layers too small to cost
anything else (a stack of L Linear(8, 8) + ReLU at B = 4, noise included).

bk's step and the non-private step are timed side by side for L = 2, 8 and 32 (interleaved
calls); the extra time of bk is fitted as  extra(L) = per_step + per_layer * L  (least squares
over the three L). What it measures is Python and dispatch work: the layers' autograd Functions,
the engine's records and clip factors, one clipped sum, one norm and one noise call per
parameter.
"""
import copy

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
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            opt.step()
        return run
    return step(plain, plain_opt), step(private, private_opt)


def run(device, dtype, quick, command):
    ctx = harness.context(device, command)
    grid = [2, 8] if quick else [2, 8, 32]
    progress = harness.Progress(len(grid), f"overhead {device.type}")
    rows, extra = [], []
    for layers in grid:
        plain, private = _steps(layers, device, dtype)
        for _ in range(5):  # warm both
            plain(), private()
        times = {"non-private": [], "bk": []}
        for _ in range(20 if quick else 100):  # interleaved, so drift hits both alike
            times["non-private"].append(harness.timed(plain, device))
            times["bk"].append(harness.timed(private, device))
        med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
        extra.append((layers, med["bk"] - med["non-private"]))
        rows.append(dict(ctx, op="overhead", layers=layers, B=BATCH, width=WIDTH,
                         non_private_us=round(med["non-private"] * 1e6, 1), bk_us=round(med["bk"] * 1e6, 1),
                         extra_us=round((med["bk"] - med["non-private"]) * 1e6, 1), per_step_us="", per_layer_us=""))
        progress.step(f"L={layers}")
    # extra(L) = per_step + per_layer * L, least squares
    n = len(extra)
    mean_l = sum(L for L, _ in extra) / n
    mean_e = sum(e for _, e in extra) / n
    slope = sum((L - mean_l) * (e - mean_e) for L, e in extra) / sum((L - mean_l) ** 2 for L, _ in extra)
    for row in rows:
        row["per_layer_us"] = round(slope * 1e6, 1)
        row["per_step_us"] = round((mean_e - slope * mean_l) * 1e6, 1)
    return rows


COLUMNS = ["layers", "B", "width", "non_private_us", "bk_us", "extra_us", "per_step_us", "per_layer_us"]
