"""Sharded private training (FSDP2 + bk.distributed) on W = 1, 2, 4 gloo processes: memory per
rank for parameters, gradients and optimizer state, and the peak RSS a rank adds while training.

An HF Llama-style model (LlamaForCausalLM: RMSNorm, grouped-query attention, SwiGLU, untied head),
fully_shard on every decoder layer and on the root, AdamW; each rank trains on B / W examples of
a fixed global batch B (same shapes at every W). Every (W, method) runs in fresh processes:
bk (DistributedPrivacyEngine, noise included) and non-private FSDP2 on the same model. The bytes
of parameters, gradients and AdamW state are counted from each rank's local shards (exact); the
peak RSS is VmHWM minus the RSS before the model was built (it also holds activations, the
collectives' buffers and the allocator's slack). With W processes on a machine of fewer cores the
step times are not a speed measure. Then, at W = 2, micro-batching (MICRO): 4 backwards a step,
non-private FSDP2 against bk's two reduce_scatter modes ("step" keeps every chunk's factored a, g
until the step; "backward" reduces and frees them after each backward).

    python bench/run.py --scenario fsdp            # or: python -m bench.fsdp_memory (one table)
"""
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from bench import harness

WORLDS = (1, 2, 4)
QUICK_WORLDS = (1, 2)
CONFIG = dict(vocab_size=8192, hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
              num_key_value_heads=4, max_position_embeddings=128, tie_word_embeddings=False)
QUICK_CONFIG = dict(CONFIG, hidden_size=128, intermediate_size=344, num_hidden_layers=2, vocab_size=2048)
BATCH, SEQ, STEPS = 8, 64, 3
METHODS = ("non-private", "bk")
# Micro-batching at W = 2 (global batch 32 x 128, chunks of 4 examples: 4 backwards a step): bk's
# two reduce_scatter modes trade memory (factored a, g of every chunk kept to the step) for
# collectives (one reduce-scatter per parameter per backward, as non-private FSDP2 does).
MICRO = dict(batch=32, seq=128, chunk=4, world=2)
MICRO_METHODS = ("non-private", "bk", "bk rs=backward")


def _rank_main(method, rank, world, init_file, out_file, quick, micro=False):
    import torch.distributed as dist
    import torch.nn.functional as F
    import transformers
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import bk_kernels as bk

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    _ = transformers.LlamaForCausalLM  # transformers loads its modeling code lazily: before the baseline
    baseline = harness._status_kib("VmRSS") * 1024
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**(QUICK_CONFIG if quick else CONFIG))
    model = transformers.LlamaForCausalLM(config)
    private = method.startswith("bk")
    if private:
        model = bk.convert(model)
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch, seq, chunk = (MICRO["batch"], MICRO["seq"], MICRO["chunk"]) if micro else (BATCH, SEQ, BATCH)
    if private:
        engine = bk.distributed.DistributedPrivacyEngine(
            model, batch_size=batch, sample_size=1000 * batch, noise_multiplier=1.0, max_grad_norm=1.0, seed=0,
            reduce_scatter="backward" if method.endswith("rs=backward") else "step")
        opt = engine.attach(opt)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=gen)[rank::world]
    times, grad_bytes = [], 0
    for _ in range(STEPS):
        start = time.perf_counter()
        for (part,) in bk.distributed.micro_batches((ids,), chunk):
            logits = model(input_ids=part).logits
            F.cross_entropy(logits[:, :-1].flatten(0, 1), part[:, 1:].flatten()).backward()
        opt.step()
        times.append(time.perf_counter() - start)
        grad_bytes = sum(_local_bytes(p.grad) for p in model.parameters() if p.grad is not None)
        opt.zero_grad()
    row = dict(method=method, world=world, rank=rank,
               params=sum(p.numel() for p in model.parameters()),
               param_bytes=sum(_local_bytes(p) for p in model.parameters()), grad_bytes=grad_bytes,
               optim_bytes=sum(_local_bytes(t) for s in opt.state.values() for t in s.values()
                               if isinstance(t, torch.Tensor) and t.dim() > 0),
               peak_rss_extra=harness._status_kib("VmHWM") * 1024 - baseline,
               step_s=sorted(times)[len(times) // 2])
    with open(out_file, "w") as f:
        json.dump(row, f)
    dist.barrier()
    dist.destroy_process_group()


def _local_bytes(t):
    from bk_kernels._fsdp import local

    t = local(t)
    return t.numel() * t.element_size()


def _run_world(method, world, quick, micro=False):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    with tempfile.TemporaryDirectory() as tmp:
        procs = [subprocess.Popen([sys.executable, "-m", "bench.fsdp_memory", "--rank", method, str(r), str(world),
                                   f"{tmp}/init", f"{tmp}/rank{r}.json", "1" if quick else "0", "1" if micro else "0"],
                                  cwd=root, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for r in range(world)]
        logs = [p.communicate(timeout=1800)[0] for p in procs]
        for r, (p, log) in enumerate(zip(procs, logs)):
            if p.returncode:
                raise RuntimeError(f"fsdp_memory: {method} W={world} rank {r} failed:\n{log[-4000:]}")
        ranks = []
        for r in range(world):
            with open(f"{tmp}/rank{r}.json") as f:
                ranks.append(json.load(f))
    return ranks


def run(device, dtype, quick, command):
    if device.type != "cpu":
        raise SystemExit("fsdp: the sharded-memory scenario runs gloo processes on the CPU only")
    ctx = harness.context(device, command)
    worlds = QUICK_WORLDS if quick else WORLDS
    runs = [(method, world, False) for world in worlds for method in METHODS]
    if not quick:
        runs += [(method, MICRO["world"], True) for method in MICRO_METHODS]
    progress = harness.Progress(len(runs), "fsdp cpu")
    rows, one = [], {}
    for method, world, micro in runs:
        ranks = _run_world(method, world, quick, micro)
        worst = {k: max(r[k] for r in ranks) for k in ("param_bytes", "grad_bytes", "optim_bytes", "peak_rss_extra",
                                                      "step_s")}
        state = worst["param_bytes"] + worst["grad_bytes"] + worst["optim_bytes"]
        if not micro:
            one.setdefault(method, state)  # the W = 1 row comes first
        rows.append(dict(ctx, op="fsdp", model="llama" + ("-quick" if quick else ""), method=method, W=world,
                         batch=f"{MICRO['batch']}x{MICRO['seq']} in chunks of {MICRO['chunk']}" if micro
                         else f"{BATCH}x{SEQ}",
                         params_M=round(ranks[0]["params"] / 1e6, 2),
                         param_MiB=round(worst["param_bytes"] / 2**20, 1),
                         grad_MiB=round(worst["grad_bytes"] / 2**20, 1),
                         optim_MiB=round(worst["optim_bytes"] / 2**20, 1),
                         state_vs_W1="" if micro else round(state / one[method], 3),
                         peak_rss_extra_MiB=round(worst["peak_rss_extra"] / 2**20, 1),
                         step_ms=round(worst["step_s"] * 1e3, 1)))
        progress.step(f"{method} W={world}" + (" micro" if micro else ""))
    return rows


COLUMNS = ["method", "W", "batch", "params_M", "param_MiB", "grad_MiB", "optim_MiB", "state_vs_W1",
           "peak_rss_extra_MiB", "step_ms"]


if __name__ == "__main__":
    if sys.argv[1:2] == ["--rank"]:
        method, rank, world, init_file, out_file, quick, micro = sys.argv[2:]
        with harness.memory_allocator():  # its peak RSS is the point; its step time is not compared
            _rank_main(method, int(rank), int(world), init_file, out_file, quick == "1", micro == "1")
    else:
        quick = "--quick" in sys.argv
        result = run(torch.device("cpu"), torch.float32, quick, "python -m bench.fsdp_memory")
        print(harness.table(result, COLUMNS))
