"""`make bench`: microbenchmarks of every op against stock PyTorch, whole training steps against
non-private autograd, torch.func per-example gradients, Opacus (hooks and ghost clipping),
and the largest batch that fits a memory budget. Prints tables and a summary, appends rows to
bench/results/*.csv|jsonl, draws plots into bench/results/*.png.

    python bench/run.py                    # every scenario on the CPU, and on the GPU if there is one
    python bench/run.py --quick            # smaller sweeps and models, fewer rounds
    python bench/run.py --scenario models --config gpt2 --config vit
    python bench/run.py --scenario max_batch --memory-budget 4
    python bench/report.py                 # then: README's Benchmarks section from the latest rows
"""
import argparse
import inspect
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# --threads N must reach OpenMP (torch's and bk's) before torch loads, and the subprocesses too.
for i, arg in enumerate(sys.argv):
    if arg.startswith("--threads"):
        n = arg.split("=", 1)[1] if "=" in arg else (sys.argv[i + 1] if i + 1 < len(sys.argv) else "")
        if n.isdigit():
            os.environ["OMP_NUM_THREADS"] = n

import torch  # noqa: E402

from bench import (breakdown, clipped_sum, conv, embedding, example_rows, fsdp_memory, harness, maxbatch,  # noqa: E402
                   models, noise, norm_choice, norm_layer, norms, overhead, report)

SCENARIOS = {"norms": norms, "clipped_sum": clipped_sum, "norm_choice": norm_choice, "embedding": embedding,
             "noise": noise, "conv": conv, "norm_layer": norm_layer, "overhead": overhead, "models": models,
             "breakdown": breakdown, "example_rows": example_rows, "max_batch": maxbatch, "fsdp": fsdp_memory}
ORDER = ["norms", "clipped_sum", "norm_choice", "embedding", "noise", "conv", "norm_layer", "overhead", "models",
         "breakdown", "example_rows", "max_batch", "fsdp"]
# The default run leaves out norm_choice (a tuning study of the ghost-or-direct rule, ~1 min) and
# fsdp (sharded memory on 1, 2 and 4 gloo processes, ~2 min): `--scenario NAME` runs them.
DEFAULT = [s for s in ORDER if s not in ("norm_choice", "fsdp")]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", choices=ORDER, action="append",
                        help="scenarios to run (default: all but norm_choice)")
    parser.add_argument("--device", choices=["cpu", "cuda"], action="append",
                        help="devices (default: cpu, and cuda when available)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    parser.add_argument("--quick", action="store_true", help="smaller sweeps and models, fewer rounds")
    parser.add_argument("--config", action="append",
                        help=f"models / max_batch / example_rows: which models (models: {', '.join(models.CONFIGS)}; "
                             f"max_batch: {', '.join(maxbatch.CONFIGS)}; example_rows: "
                             f"{', '.join(example_rows.CONFIGS)}); default: the device's suite")
    parser.add_argument("--rounds", type=int, help="models: timed rounds (default 15, --quick 3)")
    parser.add_argument("--all-methods", action="store_true",
                        help="models: also the baselines left out for time (vmap and Opacus hooks at GPT-2 T=512)")
    parser.add_argument("--no-memory", action="store_true", help="models: skip the per-method memory subprocesses")
    parser.add_argument("--memory-budget", type=float,
                        help="max_batch: GiB a training step may add over the model and data (default: 2 on the "
                             "CPU, 90%% of the free memory on a GPU)")
    parser.add_argument("--threads", type=int,
                        help="CPU threads (OMP_NUM_THREADS, also for the subprocesses; default: torch's default). "
                             "On a machine shared with other work, 1 thread avoids OpenMP threads waiting on "
                             "each other")
    parser.add_argument("--no-save", action="store_true", help="do not append to bench/results/")
    parser.add_argument("--no-plots", action="store_true", help="do not draw bench/results/*.png")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    command = ("python bench/run.py " + " ".join(sys.argv[1:])).strip()
    dtype = getattr(torch, args.dtype)
    extra = dict(configs=None, memory=not args.no_memory, rounds=args.rounds, all_methods=args.all_methods,
                 budget_gib=args.memory_budget)
    results = {}
    for name in args.scenario or DEFAULT:
        scenario = SCENARIOS[name]
        accepted = inspect.signature(scenario.run).parameters
        kwargs = {k: v for k, v in extra.items() if k in accepted}
        if args.config and "configs" in accepted:
            kwargs["configs"] = [c for c in args.config if c in (scenario.CONFIGS if name in ("max_batch", "example_rows")
                                                                  else models.CONFIGS)] or None
            if kwargs["configs"] is None and not (args.scenario and name in args.scenario):
                continue  # none of the chosen models belongs to this scenario, not asked for by name
        for device in devices:
            if device == "cpu" and dtype in (torch.bfloat16, torch.float16):
                print(f"{name}: skipping {args.dtype} on the CPU (stock bmm in 16 bits is not a baseline)")
                continue
            rows = scenario.run(torch.device(device), dtype, args.quick, command, **kwargs)
            ctx = rows[0]
            print(f"\n{name} on {ctx['device']}, commit {ctx['commit']}, torch {ctx['torch']}, "
                  f"{ctx['date']}, {args.dtype}\n`{ctx['command']}`")
            print(harness.table(rows, scenario.COLUMNS))
            results[f"{name}_{device}"] = rows
            if not args.no_save:
                print("rows appended to", harness.append_rows(f"{name}_{device}", rows))
    if not args.no_plots:
        from bench import plots

        for path in plots.draw(results):
            print("plot:", path)
    summary = report.summary(results)
    if summary:
        print("\nSummary\n" + summary)


if __name__ == "__main__":
    main()
