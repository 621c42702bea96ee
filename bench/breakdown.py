"""Where bk's extra time goes: side-by-side ablations of one workload in one process.

Several private steps of the same workload are timed in shuffled rounds next to the non-private
step: bk as it is, bk a second time (the noise floor: its ratio to the first should be 1), and bk
with one part of the private step removed:
  no noise         the Gaussian noise is not drawn (the division by the batch size stays)
  no norms         every use's per-example squared norm is zeros (no norm kernel runs)
  no clipped sums  no clipped sum runs: each gradient is a tensor of zeros made once
A removed part's share of the step is 1 - vs_bk. "no clipped sums" also drops the work that
non-private training does for its weight gradients, so it can come out below non-private.

DIAGNOSTIC ONLY: the ablated steps are not private (no noise, or wrong clipping). The parts are
removed by patching the engine only while that variant's steps run; nothing is patched after.
Timing differences of 2-3% need this side-by-side form on a noisy machine: the same script in
separate processes moves by 5% or more (session 22).
"""
import contextlib
import random
import statistics

import torch

from bench import harness, models, workloads

CONFIGS = ["mlp-B64", "vit-B16"]
VARIANTS = ["non-private", "bk", "bk again", "bk no noise", "bk no norms", "bk no clipped sums"]


@contextlib.contextmanager
def _without(part, device):
    """The engine with `part` removed while the block runs (see the module docstring)."""
    from bk_kernels import engine as engine_module, packed
    from bk_kernels.nn import _uses, moe

    Engine = engine_module.PrivacyEngine
    zeros = {}
    saved = []

    def patch(owner, name, value):
        saved.append((owner, name, owner.__dict__[name]))
        setattr(owner, name, value)

    if part == "noise":
        noise_and_scale = Engine._noise_and_scale
        patch(Engine, "_noise_and_scale", lambda self, add_noise: noise_and_scale(self, False))
    elif part == "norms":
        def no_norm(use, mode, backend):
            B = use.batch
            if B not in zeros:
                zeros[B] = torch.zeros(B, device=device)
            return zeros[B]

        for module in (_uses, moe, packed):  # every kind of use the layers record
            for use_class in [c for c in vars(module).values() if isinstance(c, type) and "sq_norm" in c.__dict__]:
                patch(use_class, "sq_norm", no_norm)
    elif part == "clipped sums":
        def no_clipped_sum(self, p, uses, c):
            if id(p) not in zeros:
                zeros[id(p)] = torch.zeros_like(p)
            p.grad = zeros[id(p)]

        patch(Engine, "_add_clipped", no_clipped_sum)
    try:
        yield
    finally:
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)


def _variant_step(w, variant, device):
    """(step function, context manager factory) of one variant, on its own copy of the model."""
    method = "non-private" if variant == "non-private" else f"bk ({device.type})"
    step = workloads.make_step(w, method)[1]
    part = variant[len("bk no "):] if variant.startswith("bk no ") else None
    return step, (lambda: _without(part, device)) if part else contextlib.nullcontext


def run(device, dtype, quick, command, configs=None):
    ctx = harness.context(device, command)
    configs = configs or CONFIGS
    rounds = 5 if quick else 30
    rows = []
    for config in configs:
        model, sizes = models.sizes_of(config, quick)
        w = workloads.build(model, device, dtype, **sizes)
        steps = {v: _variant_step(w, v, device) for v in VARIANTS}
        for fn, within in steps.values():  # warm-up: the allocator and every path of each variant
            with within():
                for _ in range(3):
                    fn()
        warm = harness.timed(steps["non-private"][0], device)
        per_round = max(1, round(models.MIN_ROUND_S / max(warm, 1e-6)))
        times = {v: [] for v in steps}
        order = list(steps)
        with harness.progress(rounds, f"breakdown {config}") as bar:
            for _ in range(rounds):
                random.shuffle(order)  # no variant always follows the same one
                for v in order:
                    fn, within = steps[v]
                    with within():
                        times[v].append(harness.timed(lambda: [fn() for _ in range(per_round)], device) / per_round)
                bar.update(1)
        for v in VARIANTS:
            vs_bk = [t / b for t, b in zip(times[v], times["bk"])]
            vs_np = [t / b for t, b in zip(times[v], times["non-private"])]
            rows.append(dict(ctx, config=config, B=sizes.get("B"), variant=v, rounds=rounds, steps_per_round=per_round,
                             median_ms=round(statistics.median(times[v]) * 1e3, 3),
                             vs_bk=round(statistics.median(vs_bk), 3), vs_bk_min=round(min(vs_bk), 3),
                             vs_bk_max=round(max(vs_bk), 3), vs_np=round(statistics.median(vs_np), 3)))
        del steps, w
    return rows


COLUMNS = ["config", "B", "variant", "rounds", "steps_per_round", "median_ms", "vs_bk", "vs_bk_min", "vs_bk_max",
           "vs_np"]
