"""The GPU part of `make gpu-check`: measured ceilings, each kernel's achieved fraction of its
roofline, and the GPT-2 124M private step against non-private. Writes a JSON report.

    python bench/gpu.py --out DIR            # on a GPU (what tools/gpu_check.sh runs)
    python bench/gpu.py --out DIR --smoke    # tiny shapes on whatever device (the CPU in CI)

Roofline: a kernel cannot beat max(FLOPs / matmul rate, bytes / copy bandwidth), with the
bytes it must move (inputs read once, outputs written once) and the arithmetic it must do;
both ceilings are measured here, on this device (a device-to-device copy, a large matmul in
the kernel's dtype with TF32 off for float32). `fraction` is that floor over the measured
median time: 1.0 would be at the roofline.
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import harness  # noqa: E402


def ceilings(device, smoke):
    """Copy bandwidth (bytes read + written per second) and matmul rates (FLOP/s) per dtype."""
    n = (1 << 20) if smoke else (1 << 28)  # 1 GiB of fp32 on a GPU
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    t = harness.time_call(lambda: dst.copy_(src), device, budget_s=0.5)[0]
    out = {"copy_bytes_per_s": 2 * src.numel() * 4 / t}
    m = 256 if smoke else 8192
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # our float32 kernels are IEEE: compare with IEEE
    try:
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            if device.type == "cpu" and dtype == torch.bfloat16:
                continue
            x, y = torch.randn(m, m, device=device, dtype=dtype), torch.randn(m, m, device=device, dtype=dtype)
            t = harness.time_call(lambda: x @ y, device, budget_s=0.5)[0]
            out[f"matmul_flops_{str(dtype)[6:]}"] = 2 * m**3 / t
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return out


def kernel_cases(smoke):
    """(op, dtype, sizes): shapes of a GPT-2-size layer (d = 768) at B = 16, T = 512."""
    B, T, d, p, V = (2, 16, 24, 40, 50) if smoke else (16, 512, 768, 3072, 50257)
    return [("ghost_norm", torch.bfloat16, dict(B=B, T=T, d=d, p=p)),
            ("direct_norm", torch.bfloat16, dict(B=B, T=T, d=d, p=p)),
            ("ghost_norm", torch.float32, dict(B=B, T=T, d=d, p=p)),
            ("clipped_sum", torch.bfloat16, dict(B=B, T=T, d=d, p=p)),
            ("clipped_sum", torch.float32, dict(B=B, T=T, d=d, p=p)),
            ("embedding_norm", torch.bfloat16, dict(B=B, T=T, d=d, V=V)),
            ("embedding_clipped_sum", torch.float32, dict(B=B, T=T, d=d, V=V)),
            ("norm_layer_grads", torch.bfloat16, dict(B=B, T=T, d=d)),
            ("add_noise_", torch.float32, dict(n=V * d))]


def _operands(op, dtype, s, device):
    gen = torch.Generator(device=device).manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, device=device, dtype=torch.float32, generator=gen).to(dtype)  # noqa: E731
    if op in ("ghost_norm", "direct_norm", "clipped_sum"):
        return rand(s["B"], s["T"], s["d"]), rand(s["B"], s["T"], s["p"])
    if op.startswith("embedding"):
        ids = torch.randint(0, s["V"], (s["B"], s["T"]), device=device, generator=gen)
        return ids, rand(s["B"], s["T"], s["d"])
    if op == "norm_layer_grads":
        return rand(s["B"], s["T"], s["d"]), rand(s["B"], s["T"], s["d"])
    return (torch.zeros(s["n"], device=device, dtype=dtype),)


def _work(op, dtype, s):
    """(FLOPs, bytes) the op must do and move at the least."""
    e = torch.finfo(dtype).bits // 8
    if op in ("ghost_norm", "direct_norm", "clipped_sum"):
        moved = s["B"] * s["T"] * (s["d"] + s["p"]) * e + (s["d"] * s["p"] * 4 if op == "clipped_sum" else 0)
        flops = s["B"] * s["T"] ** 2 * (s["d"] + s["p"]) if op == "ghost_norm" else 2 * s["B"] * s["T"] * s["d"] * s["p"]
        return flops, moved
    if op == "embedding_norm":
        return 2 * s["B"] * s["T"] * s["d"], s["B"] * s["T"] * (s["d"] * e + 8)
    if op == "embedding_clipped_sum":  # the [V, d] float32 result is written once
        return 2 * s["B"] * s["T"] * s["d"], s["B"] * s["T"] * (s["d"] * e + 8) + s["V"] * s["d"] * 4
    if op == "norm_layer_grads":
        return 4 * s["B"] * s["T"] * s["d"], 2 * s["B"] * s["T"] * s["d"] * e + 2 * s["B"] * s["d"] * 4
    return 20 * s["n"], 2 * s["n"] * e  # add_noise_: read and write the gradient


def _call(op, operands, s, backend):
    import bk_kernels as bk

    o = operands
    if op == "ghost_norm":
        return lambda: bk.ops.ghost_norm(*o, backend=backend)
    if op == "direct_norm":
        return lambda: bk.ops.direct_norm(*o, backend=backend)
    if op == "clipped_sum":
        c = torch.rand(o[0].shape[0], device=o[0].device)
        return lambda: bk.ops.clipped_sum(o[0], o[1], c, backend=backend)
    if op == "embedding_norm":
        return lambda: bk.ops.embedding_norm(*o, backend=backend)
    if op == "embedding_clipped_sum":
        c = torch.rand(o[0].shape[0], device=o[1].device)
        return lambda: bk.ops.embedding_clipped_sum(o[0], o[1], c, s["V"], deterministic=True, backend=backend)
    if op == "norm_layer_grads":
        return lambda: bk.ops.norm_layer_grads(o[0], o[1], True, backend=backend)
    return lambda: bk.ops.add_noise_(o[0], 1.0, 1.0, 1, 0, backend=backend)


def kernels(device, ceil, smoke):
    from bk_kernels import ops

    rows = []
    backends = [b for b in ops.available_backends(device) if b in ("cuda", "triton", "cpu")]
    if device.type == "cpu":
        backends = ["cpu"]
    for op, dtype, sizes in kernel_cases(smoke):
        operands = _operands(op, dtype, sizes, device)
        flops, moved = _work(op, dtype, sizes)
        rate = ceil.get(f"matmul_flops_{str(dtype)[6:]}", ceil.get("matmul_flops_float32"))
        floor = max(flops / rate, moved / ceil["copy_bytes_per_s"])
        for backend in backends:
            row = dict(op=op, dtype=str(dtype)[6:], backend=backend, **sizes)
            try:
                med, lo, hi = harness.time_call(_call(op, operands, sizes, backend), device, budget_s=0.5)
                row.update(ms=med * 1e3, ms_min=lo * 1e3, ms_max=hi * 1e3, floor_ms=floor * 1e3,
                           fraction=floor / med, bound="FLOPs" if flops / rate > moved / ceil["copy_bytes_per_s"]
                           else "bytes")
            except Exception as err:  # report and go on: the check's report shows every kernel
                row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            rows.append(row)
    return rows


def gpt2_step(device, smoke):
    """GPT-2 124M (12 layers, width 768, vocab 50257) at B = 8, T = 512, bf16 autocast on a GPU:
    bk's private step (noise included) against the non-private step, side by side."""
    from bench import workloads

    sizes = dict(B=2, T=16, layers=1, width=64, vocab=101) if smoke else dict(B=8, T=512, layers=12, width=768,
                                                                            vocab=50257)
    w = workloads.build("gpt2", device, torch.float32, **sizes)
    methods = ["non-private"] + [m for m in workloads.method_names(device) if m.startswith("bk (")]
    out = dict(sizes, rows=[])
    for method in methods:
        row = {"method": method}
        try:
            _, step = workloads.make_step(w, method)
            autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

            def run():
                with autocast:
                    step()
            med, lo, hi = harness.time_call(run, device, warmup=2, min_runs=5 if smoke else 10, budget_s=2.0)
            row.update(ms=med * 1e3, ms_min=lo * 1e3, ms_max=hi * 1e3,
                       peak_mib=harness.peak_extra_bytes(run, device) / 2**20)
        except Exception as err:
            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        out["rows"].append(row)
    base = next((r for r in out["rows"] if r["method"] == "non-private" and "ms" in r), None)
    for row in out["rows"]:
        if base and "ms" in row:
            row["ratio"] = row["ms"] / base["ms"]
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for gpu_bench.json")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (any device): checks the code path")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    os.makedirs(args.out, exist_ok=True)
    start = time.time()
    report = dict(device=harness.machine(device), torch=torch.__version__, commit=harness.commit(), smoke=args.smoke)
    report["ceilings"] = ceilings(device, args.smoke)
    report["kernels"] = kernels(device, report["ceilings"], args.smoke)
    report["gpt2"] = gpt2_step(device, args.smoke)
    report["seconds"] = time.time() - start
    with open(os.path.join(args.out, "gpu_bench.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(f"{report['device']}: copy {report['ceilings']['copy_bytes_per_s'] / 1e9:.0f} GB/s")
    for r in report["kernels"]:
        print(f"  {r['op']:>22} {r['dtype']:>8} {r['backend']:>6}: " + (
            f"{r['ms']:.3f} ms, {r['fraction']:.2f} of the {r['bound']} roofline" if "ms" in r else r["error"]))
    for r in report["gpt2"]["rows"]:
        print(f"  gpt2 {r['method']:>12}: " + (f"{r['ms']:.1f} ms" + (f", {r['ratio']:.3f}x non-private"
                                                                       if "ratio" in r else "") if "ms" in r
                                             else r["error"]))
    return report


if __name__ == "__main__":
    main()
