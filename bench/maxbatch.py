"""The largest batch whose training step fits a memory budget, per method (MLP and GPT-2).
`est_max_batch` extends the two largest fitting probes linearly to the budget (for batches past
the largest one tried, where the step itself would take too long to run).

For each method one fresh process (bench/fresh.py) builds the model at growing
batch sizes, doubling while the step memory (what two steps add over the built model and data,
as in the models scenario) stays within the budget, then bisects between the last batch that
fit and the first that did not, to within 1/16. Every probe (B, memory) is kept: they are the
memory-vs-batch-size curves of the plots.
"""
import gc

import torch

from bench import fresh, harness, models, workloads

# name -> (model, starting sizes, largest batch tried: beyond it the row gives the linear estimate)
# The MLP is capped at 8192 examples (est_max_batch extends the line past it): larger probes
# cost minutes of the 15-minute `make bench` and add nothing the line does not show.
# GPT-2 starts at B=8 (a step of B=8 at T=128 adds ~0.7 GiB: inside any sensible budget; it
# shrinks from there if not): two probes fewer per method.
CONFIGS = {"mlp": ("mlp", dict(B=256), 1 << 13), "gpt2": ("gpt2", dict(B=8, T=128), 256)}
QUICK_CONFIGS = ["mlp"]
# Left out on the CPU for time (--all-methods runs them): GPT-2 steps of these take ~10 s at B=16.
SKIP = {"gpt2": ("vmap", "opacus hooks")}


def estimate(probes, budget):
    """The batch at which the line through the two largest fitting probes reaches the budget."""
    pts = sorted((b, v) for b, v in probes if v <= budget)
    if len(pts) < 2 or pts[-1][0] == pts[-2][0] or pts[-1][1] <= pts[-2][1]:
        return None
    (b0, v0), (b1, v1) = pts[-2], pts[-1]
    return int(b1 + (budget - v1) * (b1 - b0) / (v1 - v0))


def search(model, sizes, method, device, dtype, budget, cap=None):
    """In this process: {"max_batch": B or 0, "probes": [[B, bytes], ...]}; None if unsupported."""
    probes = []

    def fits(B):
        got = models.step_memory(model, dict(sizes, B=B), method, device, dtype, steps=1)
        gc.collect()
        if got is None:
            raise workloads.Unsupported(method)
        probes.append([B, got])
        return got <= budget

    try:
        B = sizes["B"]
        if not fits(B):
            lo, hi = 0, B
            while hi - lo > 1 and lo == 0:  # shrink until something fits
                hi, B = B, B // 2
                if B == 0:
                    return {"max_batch": 0, "probes": probes}
                if fits(B):
                    lo = B
        else:
            lo = B
            while True:
                if cap and 2 * lo > cap:
                    return {"max_batch": lo, "probes": probes, "capped": True}
                if fits(2 * lo):
                    lo *= 2
                else:
                    hi = 2 * lo
                    break
        while hi - lo > max(1, lo // 16):
            mid = (lo + hi) // 2
            if fits(mid):
                lo = mid
            else:
                hi = mid
        return {"max_batch": lo, "probes": probes}
    except workloads.Unsupported:
        return None


def run(device, dtype, quick, command, configs=None, budget_gib=None, all_methods=False):
    configs = configs or (QUICK_CONFIGS if quick else list(CONFIGS))
    if budget_gib is None:  # CPU: 2 GiB; GPU: 90% of what is free
        budget_gib = 2.0 if device.type == "cpu" else round(0.9 * torch.cuda.mem_get_info(device)[0] / 2**30, 1)
    budget = int(budget_gib * 2**30)
    methods = workloads.method_names(device)
    ctx = harness.context(device, command)
    dname = str(dtype).split(".")[1]
    rows = []
    for config in configs:
        model, sizes, cap = CONFIGS[config]
        if quick:
            cap = min(cap, 4096 if model == "mlp" else 8)
        searched = [m for m in methods if not (device.type == "cpu" and m in SKIP.get(config, ()) and not all_methods)]
        jobs = [dict(model=model, sizes=sizes, method=m, device=str(device), dtype=dname, budget=budget, cap=cap)
                for m in searched]
        with harness.progress(len(jobs), f"max batch {config} ({budget_gib:g} GiB)") as bar:
            found = dict(zip(searched, fresh.run(models.measure, jobs, parallel=fresh.parallel(device),
                                                 on_done=lambda i: bar.update(1))))
        for m in methods:
            row = dict(ctx, scenario="max_batch", config=config, model=model, T=sizes.get("T", 1), method=m,
                       dtype=dname, budget_gib=budget_gib, max_batch="", capped="", est_max_batch="",
                       probes="", status="ok")
            got = found.get(m, "skipped")
            if got == "skipped":
                row["status"] = "skipped for time on the CPU (--all-methods runs it)"
            elif got is None:
                row["status"] = "unsupported"
            elif isinstance(got, str):
                row["status"] = got
            else:
                row.update(max_batch=got["max_batch"], capped=bool(got.get("capped")),
                           est_max_batch=estimate(got["probes"], budget) or "",
                           probes=";".join(f"{b}:{round(v / 2**20, 1)}" for b, v in got["probes"]))
            rows.append(row)
    return rows


COLUMNS = ["config", "T", "method", "budget_gib", "max_batch", "capped", "est_max_batch", "probes", "status"]


def probes_of(row):
    """[(B, MiB)] from a row's probes cell."""
    if not row.get("probes"):
        return []
    return [(int(b), float(v)) for b, v in (p.split(":") for p in row["probes"].split(";"))]


if __name__ == "__main__":
    print(search("mlp", dict(B=64), "non-private", torch.device("cpu"), torch.float32, 2**28, 4096))
