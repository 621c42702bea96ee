"""`make bench`: the microbenchmarks. Prints a table and appends rows to bench/results/.

    python bench/run.py                 # every scenario on the CPU, and on the GPU if there is one
    python bench/run.py --quick         # smaller sweep
    python bench/run.py --device cpu    # one device only
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench import clipped_sum, embedding, harness, models, noise, norm_choice, norms  # noqa: E402

SCENARIOS = {"norms": norms, "clipped_sum": clipped_sum, "norm_choice": norm_choice, "embedding": embedding,
             "noise": noise, "models": models}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), action="append",
                        help="scenarios to run (default: all)")
    parser.add_argument("--device", choices=["cpu", "cuda"], action="append",
                        help="devices (default: cpu, and cuda when available)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    parser.add_argument("--quick", action="store_true", help="a smaller sweep")
    parser.add_argument("--no-save", action="store_true", help="do not append to bench/results/")
    args = parser.parse_args()
    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    command = "python bench/run.py " + " ".join(sys.argv[1:])
    dtype = getattr(torch, args.dtype)
    for name in args.scenario or sorted(SCENARIOS):
        scenario = SCENARIOS[name]
        for device in devices:
            if device == "cpu" and dtype in (torch.bfloat16, torch.float16):
                print(f"{name}: skipping {args.dtype} on the CPU (stock bmm in 16 bits is not a baseline)")
                continue
            rows = scenario.run(torch.device(device), dtype, args.quick, command.strip())
            ctx = rows[0]
            print(f"\n{name} on {ctx['device']}, commit {ctx['commit']}, torch {ctx['torch']}, "
                  f"{ctx['date']}, {args.dtype}\n`{ctx['command']}`")
            print(harness.table(rows, scenario.COLUMNS))
            if not args.no_save:
                print("rows appended to", harness.append_rows(f"{name}_{device}", rows))


if __name__ == "__main__":
    main()
