"""One rank of a test_distributed.py scenario (gloo on the CPU), run as
`python -m python_tests.dist_worker SCENARIO RANK WORLD INIT_FILE OUT_DIR`.
It writes what the test checks to OUT_DIR/rank{RANK}.pt."""
import gc
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import bk_kernels as bk

DT = torch.float64
GLOBAL_BATCH = 8


def model_of_rank(rank):
    # Each rank builds a DIFFERENT model: the engine must start every rank from rank 0's.
    torch.manual_seed(100 + rank)
    return bk.convert(nn.Sequential(nn.Embedding(11, 6), nn.LayerNorm(6), nn.Flatten(), nn.Linear(18, 5),
                                    nn.Tanh(), nn.Linear(5, 3)).to(DT))


def data(step):
    """The global batch of a step: 7 examples, then 2 (rank 2's share is empty at world 3)."""
    gen = torch.Generator().manual_seed(step)
    n = 7 if step == 0 else 2
    return torch.randint(0, 11, (n, 3), generator=gen), torch.randint(0, 3, (n,), generator=gen)


def shard(batch, rank, world):
    return [t[rank::world] if world > 1 else t for t in batch]


def pair_loss(model, x, y):
    """Each example as two rows (its ids, and shifted by one), stacked: the mean over examples of
    their two rows' mean loss (engine.example_rows(bk.stacked_rows(2)))."""
    out = model(torch.cat([x, (x + 1) % 11]))
    n = len(x)
    return (0.5 * (F.cross_entropy(out[:n], y, reduction="none") + F.cross_entropy(out[n:], y, reduction="none"))).mean()


def train(model, opt, rank, world, steps=2, micro=None, pairs=False):
    for step in range(steps):
        x, y = shard(data(step), rank, world)
        for xm, ym in bk.data.micro_batches((x, y), micro or max(1, len(x))):  # accumulate, then one step
            (pair_loss(model, xm, ym) if pairs else F.cross_entropy(model(xm), ym)).backward()
        opt.step()
        opt.zero_grad()


def gpt2_of_rank(rank):
    """A tiny transformers GPT-2, DIFFERENT on each rank (the engine starts all from rank 0's);
    float64 throughout (Llama's RMSNorm runs in float32: 1e-7 between 1/3- and 1/7-scaled means)."""
    import transformers
    config = transformers.GPT2Config(vocab_size=11, n_positions=16, n_embd=8, n_layer=1, n_head=2, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(100 + rank)
    return bk.convert(transformers.GPT2LMHeadModel(config).to(DT))


def sequences(step):
    """A step's global batch of sequences (7, then 2: rank 2's share is empty at world 3)."""
    gen = torch.Generator().manual_seed(step)
    lengths = [3, 5, 2, 6, 4, 3, 5] if step == 0 else [4, 6]
    return [torch.randint(0, 11, (n,), generator=gen) for n in lengths]


def packed_train(model, opt, rank, world, steps=2):
    """Each rank packs its share of the sequences into one row (no padding, position_ids
    restarting); a rank with none runs an empty batch ([0, 4]: a flattening collator's)."""
    for step in range(steps):
        mine = sequences(step)[rank::world] if world > 1 else sequences(step)
        if mine:
            ids = torch.cat(mine)[None]
            positions = torch.cat([torch.arange(len(s)) for s in mine])[None]
        else:
            ids = positions = torch.zeros(0, 4, dtype=torch.long)
        logits = model(input_ids=ids, position_ids=positions, use_cache=False).logits
        # each sequence's mean next-token loss, in float64 (hf.example_losses computes in float32,
        # whose rounding of a 1/4- against a 1/7-scaled mean differs by 1e-8)
        ends = torch.cumsum(torch.tensor([len(s) for s in mine], dtype=torch.long), 0).tolist()
        losses = [F.cross_entropy(logits[0, a:b - 1], ids[0, a + 1:b]) for a, b in zip([0] + ends[:-1], ends)]
        (sum(losses) / len(losses) if losses else logits.sum() * 0).backward()
        opt.step()
        opt.zero_grad()


def engine_kwargs(noise):
    return dict(batch_size=GLOBAL_BATCH, sample_size=80, noise_multiplier=noise, max_grad_norm=0.3, seed=1234)


def main(scenario, rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    out = {}
    model = model_of_rank(rank)
    if scenario in ("exact", "noise", "micro", "pairs"):
        engine = bk.distributed.DistributedPrivacyEngine(model, **engine_kwargs(0.0 if scenario in ("exact", "pairs") else 1.0))
        opt = engine.attach(torch.optim.SGD(model.parameters(), lr=1.0))
        if scenario == "pairs":
            engine.example_rows(bk.stacked_rows(2))
        out["initial"] = {k: v.clone() for k, v in model.state_dict().items()}
        train(model, opt, rank, world, micro=1 if scenario == "micro" else None, pairs=scenario == "pairs")
        out["state"] = model.state_dict()
        out["epsilon"] = engine.epsilon()
        out["engine"] = engine.state_dict()
    elif scenario == "packed":
        model = gpt2_of_rank(rank)
        engine = bk.distributed.DistributedPrivacyEngine(model, **engine_kwargs(0.0))
        opt = engine.attach(torch.optim.SGD(model.parameters(), lr=1.0))
        engine.example_rows(bk.packed_sequences())
        out["initial"] = {k: v.clone() for k, v in model.state_dict().items()}
        packed_train(model, opt, rank, world)
        out["state"] = model.state_dict()
        out["epsilon"] = engine.epsilon()
        out["engine"] = engine.state_dict()
    elif scenario == "not-ready":
        engine = bk.distributed.DistributedPrivacyEngine(model, **engine_kwargs(1.0))
        opt = engine.attach(torch.optim.SGD(model.parameters(), lr=1.0))
        before = {k: v.clone() for k, v in model.state_dict().items()}
        x, y = shard(data(0), rank, world)
        if rank == 0:  # rank 1 forgets its backward
            F.cross_entropy(model(x), y).backward()
        try:
            opt.step()
            out["error"] = None
        except RuntimeError as err:
            out["error"] = str(err)
        out["unchanged"] = all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        out["epsilon"], out["steps"] = engine.epsilon(), engine.steps
    elif scenario == "refusals":
        errors = {}
        for name, make in {
            "ddp": lambda: bk.PrivacyEngine(nn.parallel.DistributedDataParallel(model), **engine_kwargs(1.0)),
            "mismatch": lambda: bk.distributed.DistributedPrivacyEngine(model, **dict(engine_kwargs(1.0),
                                                                                   max_grad_norm=0.3 + rank)),
            "scaler": lambda: bk.distributed.DistributedPrivacyEngine(model, **engine_kwargs(1.0)).attach(
                torch.optim.SGD(model.parameters(), lr=1.0), grad_scaler=torch.amp.GradScaler("cpu")),
        }.items():
            try:
                make()
                errors[name] = None
            except (TypeError, ValueError) as err:
                errors[name] = str(err)
        out["errors"] = errors
    else:
        raise ValueError(scenario)
    torch.save(out, f"{out_dir}/rank{rank}.pt")
    dist.barrier()  # no rank tears gloo down while another still talks to it
    dist.destroy_process_group()
    gc.collect()  # free the process group now: in the interpreter's final collection gloo's threads can abort


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
