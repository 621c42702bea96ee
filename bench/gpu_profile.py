"""Where a private GPT-2 step spends its time: torch.profiler over the non-private step and bk's
on each backend, the same workload as bench/gpu.py (GPT-2 124M, B = 8, T = 512, bf16 autocast).
Prints each method's busiest kernels and ops and writes DIR/gpu_profile.json.

    python bench/gpu_profile.py --out DIR            # on a GPU
    python bench/gpu_profile.py --out DIR --smoke    # tiny shapes on whatever device
"""
import argparse
import json
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import harness, workloads  # noqa: E402


def profile_method(w, method, device, steps):
    _, step = workloads.make_step(w, method)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def run():
        with autocast:
            step()
    wall_ms = harness.time_call(run, device, warmup=3, min_runs=5, budget_s=1.0)[0] * 1e3  # warms up too
    if device.type == "cuda":
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(steps):
            run()
        if device.type == "cuda":
            torch.cuda.synchronize()
    rows = []
    attr = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    for e in prof.key_averages(group_by_input_shape=True):
        rows.append(dict(name=e.key, shapes=str(e.input_shapes)[:160], calls=e.count // steps,
                         device_ms=getattr(e, "self_device_time_total", 0) / 1e3 / steps,
                         cpu_ms=e.self_cpu_time_total / 1e3 / steps, total_ms=getattr(e, attr, 0) / 1e3 / steps))
    return wall_ms, rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sizes = dict(B=2, T=16, layers=1, width=64, vocab=101) if args.smoke else dict(B=8, T=512, layers=12, width=768,
                                                                                 vocab=50257)
    w = workloads.build("gpt2", device, torch.float32, **sizes)
    methods = ["non-private"] + [m for m in workloads.method_names(device) if m.startswith("bk (")]
    report = dict(device=harness.machine(device), torch=torch.__version__, commit=harness.commit(), sizes=sizes,
                  methods={})
    for method in methods:
        try:
            wall_ms, rows = profile_method(w, method, device, args.steps)
        except Exception as err:
            report["methods"][method] = {"error": f"{type(err).__name__}: {err}"}
            print(method, "failed:", err)
            continue
        report["methods"][method] = dict(wall_ms=wall_ms, rows=rows)
        key = "device_ms" if device.type == "cuda" else "cpu_ms"
        total = sum(r[key] for r in rows)
        print(f"\n== {method}: {wall_ms:.2f} ms per step (timed); {total:.2f} ms of self {key} (profiled)")
        for r in sorted(rows, key=lambda r: -r[key])[:25]:
            print(f"  {r[key]:8.3f} ms {r['calls']:5d}x  {r['name'][:70]:70s} {r['shapes'][:90]}")
    with open(os.path.join(args.out, "gpu_profile.json"), "w") as f:
        json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
