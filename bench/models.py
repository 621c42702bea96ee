"""Whole training steps: non-private autograd, naive per-example gradients (torch.func vmap),
Opacus hooks, Opacus ghost clipping and BK, on an MLP, a CNN, GPT-2 and a ViT.

Timing: each method gets its own copy of the model and optimizer; after warm-up, every round
runs k steps of each method in turn (interleaved, so the machine's drift hits all alike), and
the per-round ratio to the non-private step is reported (median, min, max over rounds). k is 1
unless a non-private step takes less than MIN_ROUND_S: then enough steps to fill it (a single
step of a few milliseconds, the small MLP's, moves by 2x between rounds with the machine). A
baseline (vmap, Opacus) whose step takes more than SLOW times the non-private one (2 times, where one round of
all methods would exceed ROUND_BUDGET_S) is timed in 3 rounds (the row says how many). A
config's rounds stop at 15, or once they have taken TIMING_BUDGET_S (after at least MIN_ROUNDS).
Memory: each method runs in a fresh process of its own (bench/fresh.py): the peak
memory two steps add over what is resident once the model and data are built (CPU: peak RSS,
VmHWM reset through /proc/self/clear_refs, else ru_maxrss; GPU: max_memory_allocated), and its
ratio to the non-private step's.
"""
import gc
import math
import resource
import statistics
import time
import warnings

import torch

from bench import fresh, harness, workloads

SLOW = 15.0  # methods slower than this many non-private steps get 3 rounds (--quick: 2)
BASELINES = ("vmap", "opacus hooks", "opacus ghost")  # only these get fewer rounds: never bk
ROUND_BUDGET_S = 8.0  # ... and those slower than 2x, when one round of every method takes longer
# A config's rounds stop once they have taken this long, after at least MIN_ROUNDS (unless
# --rounds is given): GPT-2 at T=512 takes ~12 s a round on 2 cores, so 7 rounds instead of 15.
TIMING_BUDGET_S = 90.0
MIN_ROUNDS = 5
MIN_ROUND_S = 0.05  # a round of the non-private step lasts at least this long (k steps, above)

# name -> (model builder, sizes); the GPU sizes are GPT-2 small (124M) and medium (355M).
CONFIGS = {
    "mlp": ("mlp", dict(B=256)),
    "cnn": ("cnn", dict(B=64)),
    "gpt2": ("gpt2", dict(B=8, T=128)),
    "gpt2-T512": ("gpt2", dict(B=8, T=512)),
    "vit": ("vit", dict(B=32)),
    "gpt2-124m": ("gpt2", dict(B=8, T=512, layers=12, width=768)),
    "gpt2-355m": ("gpt2", dict(B=8, T=512, layers=24, width=1024)),
    "llama": ("llama", dict(B=8, T=128)),
    "llama-lora": ("llama", dict(B=8, T=128, lora=True)),
    "mixtral": ("mixtral", dict(B=8, T=128)),
    "mamba2": ("mamba2", dict(B=8, T=128)),
    "timm-vit": ("timm_vit", dict(B=32)),
    "timm-convnext": ("timm_convnext", dict(B=16)),
    "timm-bit": ("timm_bit", dict(B=16)),
    "tv-vit": ("tv_vit", dict(B=32)),
    "tv-swin": ("tv_swin", dict(B=8)),
    "tv-resnet18": ("tv_resnet18", dict(B=32)),
    "tv-resnet18-frozen-bn": ("tv_resnet18", dict(B=32, frozen_bn=True)),
    # Small batches, where the engine's fixed cost per step and per layer shows (issue 12's sizes)
    "mlp-B64": ("mlp", dict(B=64)),
    "cnn-B32": ("cnn", dict(B=32)),
    "vit-B16": ("vit", dict(B=16)),
    "gpt2-v8192": ("gpt2", dict(B=8, T=128, layers=4, width=256, vocab=8192)),
}
SMALL_BATCH = ["mlp-B64", "cnn-B32", "vit-B16", "gpt2-v8192"]
# mixtral, mamba2, timm-vit, timm-convnext, timm-bit, tv-vit, tv-swin, tv-resnet18(-frozen-bn): opt-in with --config (1.6 min more on the 2-core EPYC
# for the first three)
CPU_CONFIGS = ["mlp", "cnn", "vit", "gpt2", "gpt2-T512", "llama", "llama-lora"] + SMALL_BATCH
GPU_CONFIGS = ["mlp", "cnn", "vit", "gpt2", "gpt2-T512", "gpt2-124m", "gpt2-355m", "llama", "llama-lora",
               "mixtral", "timm-vit"] + SMALL_BATCH
# Baselines left out of the default CPU suite for time (--all-methods runs them): at T=512 one
# step of either takes ~20 s on 2 cores; the T=128 rows show how they compare.
SKIP = {"gpt2-T512": {**{m: "slow baseline on the CPU (~20 s a step); shown at T=128; --all-methods runs it"
                         for m in ("vmap", "opacus hooks")},
                      # 10 s a step: 15 rounds cost 2.5 of the 15 minutes of `make bench`
                      "opacus ghost": "left out on the CPU for time (2.09x non-private in the run of 2026-11-25 "
                                      "in README); shown at T=128; --all-methods runs it"}}
# bk against non-private only on these: the default-size rows compare the baselines
for _config in ("llama", "llama-lora", "mixtral", "mamba2", "timm-vit", "timm-convnext", "timm-bit", "tv-vit", "tv-swin",
                "tv-resnet18", "tv-resnet18-frozen-bn", *SMALL_BATCH):
    SKIP[_config] = {m: "left out for time; the default-size rows compare the baselines" for m in BASELINES}
QUICK = {"mlp": dict(B=64), "cnn": dict(B=16), "vit": dict(B=8), "gpt2": dict(B=4, T=64),
         "llama": dict(B=4, T=64), "llama-lora": dict(B=4, T=64), "mixtral": dict(B=4, T=64), "timm-vit": dict(B=8)}


def sizes_of(config, quick):
    model, sizes = CONFIGS[config]
    if quick:
        sizes = dict(sizes, **QUICK.get(config, {}))
    return model, sizes


# ---------------------------------------------------------------- memory, in a subprocess

def _rss_kib():
    return harness._status_kib("VmRSS")


# Tiny versions of the models: steps on one (non-private, then the method measured) load the
# libraries' lazy state (oneDNN primitives, thread pools, the autograd engine, code pages that a
# process forked from bench/fresh.py's server has not touched yet) before the measured steps.
TINY = {"mlp": dict(B=4, width=16), "cnn": dict(B=2, width=4, size=8),
        "vit": dict(B=2, width=32, layers=1, heads=2, size=8), "gpt2": dict(B=2, T=8, layers=1, width=32, vocab=53),
        "llama": dict(B=2, T=8, layers=1, width=64, vocab=53),
        "mixtral": dict(B=2, T=8, layers=1, width=64, experts=4, vocab=53),
        "mamba2": dict(B=2, T=8, layers=1, width=64, state=8, head_dim=16, chunk=4, vocab=53),
        "timm_vit": dict(B=2, size=8, patch=4, width=32, layers=1, heads=2),
        "timm_convnext": dict(B=2, size=32), "timm_bit": dict(B=2, size=32),
        "tv_vit": dict(B=2, size=8, patch=4, width=32, layers=1, heads=2), "tv_swin": dict(B=2, size=32),
        "tv_resnet18": dict(B=2, size=32)}
_warmed = set()


def _warm_process(model, device, dtype, method):
    for m in dict.fromkeys(["non-private", method]):
        if (model, str(device), dtype, m) in _warmed:
            continue
        w = workloads.build(model, device, dtype, **TINY[model])
        try:
            step = workloads.make_step(w, m, fresh=False, check=False)[1]
        except workloads.Unsupported:
            continue
        step()
        step()
        del w, step
        gc.collect()
        _warmed.add((model, str(device), dtype, m))


def step_memory(model, sizes, method, device, dtype, steps=2):
    """Bytes the training steps add over what is resident after building model, data and
    method (this process only; call it in a fresh one). None when unsupported. Built, warmed
    and measured with large blocks mmapped (harness.memory_allocator), as the fresh processes
    are from the start."""
    with harness.memory_allocator():
        return _step_memory(model, sizes, method, device, dtype, steps)


def _step_memory(model, sizes, method, device, dtype, steps):
    _warm_process(model, device, dtype, method)
    w = workloads.build(model, device, dtype, **sizes)
    try:
        _, step = workloads.make_step(w, method, fresh=False, check=False)
    except workloads.Unsupported:
        return None
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        before = _rss_kib()
        for _ in range(steps):
            step()
        return max(0, harness._status_kib("VmHWM") - before) * 1024
    except OSError:  # no clear_refs: ru_maxrss, which also holds any earlier peak of the build
        before = _rss_kib()
        for _ in range(steps):
            step()
        return max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024


def measure(args):
    """One measurement, run in a fresh process (bench/fresh.py): the step memory of one method,
    or (with a "budget") maxbatch's search."""
    device, dtype = torch.device(args["device"]), getattr(torch, args["dtype"])
    if "budget" in args:
        from bench import maxbatch

        return maxbatch.search(args["model"], args["sizes"], args["method"], device, dtype, args["budget"],
                               args.get("cap"))
    return step_memory(args["model"], args["sizes"], args["method"], device, dtype, args.get("steps", 2))


# ---------------------------------------------------------------- the scenario

def run(device, dtype, quick, command, configs=None, memory=True, rounds=None, warmup=None, all_methods=False):
    configs = configs or (GPU_CONFIGS if device.type == "cuda" else CPU_CONFIGS)
    if quick:
        configs = [c for c in configs if c in QUICK] or configs
    methods = workloads.method_names(device)
    budget_s = None if rounds else TIMING_BUDGET_S
    rounds = rounds or (3 if quick else 15)
    warmup = warmup or (1 if quick else 2)
    slow_rounds = min(rounds, 2 if quick else 3)
    warnings.filterwarnings("ignore", module="opacus")  # e.g. "secure RNG turned off"
    ctx = harness.context(device, command)
    dname = str(dtype).split(".")[1]
    rows = []
    for config in configs:
        model, sizes = sizes_of(config, quick)
        w = workloads.build(model, device, dtype, **sizes)
        shape = dict(w.shape, params=workloads.param_count(w.model))
        steps, status = {}, {}
        for m in methods:
            if device.type == "cpu" and m in SKIP.get(config, ()) and not all_methods:
                status[m] = f"skipped: {SKIP[config][m]}"
                continue
            try:
                steps[m] = workloads.make_step(w, m)[1]
                status[m] = "ok" + (f" ({steps[m].note})" if getattr(steps[m], "note", "") else "")
            except workloads.Unsupported as err:
                status[m] = f"unsupported: {err}"
        # Warm-up, which also sorts out the slow methods: SLOW x non-private, or only 2x where a
        # round of every method would take more than ROUND_BUDGET_S (GPT-2 on the CPU).
        warm = {m: [harness.timed(fn, device) for _ in range(warmup)][-1] for m, fn in steps.items()}
        per_round = 1
        if "non-private" in warm and 0 < warm["non-private"] < MIN_ROUND_S:
            per_round = math.ceil(MIN_ROUND_S / warm["non-private"])
            for fn in steps.values():  # warm-up as long as a round
                for _ in range(per_round):
                    fn()
        slow = SLOW if sum(warm.values()) <= ROUND_BUDGET_S else 2.0
        n_rounds = {m: slow_rounds if m in BASELINES and warm[m] > slow * warm["non-private"] else rounds
                    for m in steps}
        total = sum(n_rounds.values())
        times = {m: [] for m in steps}
        workloads.GENERIC_SECONDS[0] = 0.0
        started = time.perf_counter()
        with harness.progress(total, f"steps {config}") as bar:
            for r in range(rounds):
                for m, fn in steps.items():
                    if r < n_rounds[m]:
                        steps_of_round = lambda: [fn() for _ in range(per_round)]  # noqa: E731
                        times[m].append(harness.timed(steps_of_round, device) / per_round)
                        bar.update(1)
                        bar.set_postfix_str(f"round {r} {m}")
                if budget_s and r + 1 >= MIN_ROUNDS and time.perf_counter() - started > budget_s:
                    break
        generic_share = {}
        for m, fn in steps.items():  # the generic path's share of bk's step (one bk method per device)
            if getattr(fn, "generic", None) and times[m]:
                generic_share[m] = workloads.GENERIC_SECONDS[0] / sum(times[m])
                status[m] += (f" (generic path: {len(fn.generic)} modules, {generic_share[m]:.0%} of the step)")
        mem = {}
        if memory:
            measured = [m for m in methods if status[m].startswith("ok")]
            jobs = [dict(model=model, sizes=sizes, method=m, device=str(device), dtype=dname,
                         steps=1 if sizes.get("T", 1) >= 512 else 2) for m in measured]
            with harness.progress(len(jobs), f"memory {config}") as bar:
                results = fresh.run(measure, jobs, parallel=fresh.parallel(device), on_done=lambda i: bar.update(1))
            mem = dict(zip(measured, results))
        del steps, w
        gc.collect()
        base_mem = mem.get("non-private")
        for m in methods:
            row = dict(ctx, scenario="step", config=config, **shape, method=m, dtype=dname,
                       status=status[m], rounds=0, steps_per_round=per_round, median_ms="", min_ms="", max_ms="",
                       ratio="", ratio_min="", ratio_max="", mem_mib="", mem_ratio="")
            if m in times:
                base = times["non-private"]
                ratios = [t / b for t, b in zip(times[m], base)]
                row.update(rounds=len(times[m]), median_ms=round(statistics.median(times[m]) * 1e3, 2),
                           min_ms=round(min(times[m]) * 1e3, 2), max_ms=round(max(times[m]) * 1e3, 2),
                           ratio=round(statistics.median(ratios), 3), ratio_min=round(min(ratios), 3),
                           ratio_max=round(max(ratios), 3))
            got = mem.get(m)
            if isinstance(got, (int, float)):
                row["mem_mib"] = round(got / 2**20, 1)
                if isinstance(base_mem, (int, float)) and base_mem > 0:
                    row["mem_ratio"] = round(got / base_mem, 3)
            elif isinstance(got, str):
                row["mem_mib"] = got
            rows.append(row)
    return rows


COLUMNS = ["config", "layers", "width", "T", "B", "method", "rounds", "steps_per_round", "median_ms", "min_ms", "max_ms",
           "ratio", "ratio_min", "ratio_max", "mem_mib", "mem_ratio", "status"]
