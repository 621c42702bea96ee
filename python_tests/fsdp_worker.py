"""One rank of a test_fsdp.py scenario: FSDP2 (fully_shard) over gloo on the CPU, run as
`python -m python_tests.fsdp_worker SCENARIO RANK WORLD INIT_FILE OUT_DIR`; SCENARIO is
"model:option,option" (see OPTIONS). It writes what the test checks to OUT_DIR/rank{RANK}.pt.
The test runs the same training in one process (`train` with world=1, no sharding) to compare."""
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import bk_kernels as bk
from python_tests import zoo

DT = torch.float64
# noise: sigma 1; layer-wise / groups: the clipping style; micro: one backward per example;
# ckpt: activation checkpointing inside the FSDP units; bf16: MixedPrecisionPolicy(bf16, fp32);
# adam: AdamW instead of SGD; resume: save after 2 steps, restore into a new model, go on;
# partial: only every other unit sharded, no root (the other parameters replicated);
# rs-backward: reduce_scatter="backward" (after every backward instead of once at the step).
OPTIONS = {"noise", "layer-wise", "groups", "micro", "ckpt", "bf16", "adam", "resume", "partial", "rs-backward"}


def build(model_name, options, seed=0):
    torch.manual_seed(seed)
    if model_name == "mlp":
        model = nn.Sequential(nn.Embedding(11, 6), nn.LayerNorm(6), nn.Flatten(), nn.Linear(18, 9), nn.Tanh(),
                              nn.Linear(9, 3)).to(torch.float32 if "bf16" in options else DT)
    else:
        model = zoo.ZOO[model_name][0]()
        if "ckpt" in options:
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's name
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return bk.convert(model)


def units(model_name, model):
    """The modules fully_shard wraps before the root: each layer, or each transformer block."""
    if model_name == "mlp":
        return [m for m in model if any(True for _ in m.parameters())]
    if model_name.startswith("gpt2"):
        return list(model.transformer.h)
    return list(model.model.layers)


def shard(model_name, model, options, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh("cpu", (world,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if "bf16" in options \
        else MixedPrecisionPolicy()
    if "partial" in options:  # every other unit sharded, the rest and the root replicated
        for unit in units(model_name, model)[::2]:
            fully_shard(unit, mesh=mesh, mp_policy=policy)
        return model
    for unit in units(model_name, model):
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def data(model_name, step):
    """The global batch of a step (for the MLP at world 4, step 1 leaves rank 3 empty)."""
    gen = torch.Generator().manual_seed(step)
    if model_name == "mlp":
        n = (7, 3, 6, 5)[step % 4]
        return {"x": torch.randint(0, 11, (n, 3), generator=gen), "y": torch.randint(0, 3, (n,), generator=gen)}
    # Powers of two, whole and per rank: HF's RMSNorm computes in float32 even in a float64 model,
    # and a mean loss's 1/B must then be exact for the shards to match one process (test_models_zoo.py)
    n = (8, 4, 8, 4)[step % 4]
    return {"ids": torch.randint(0, zoo.VOCAB, (n, zoo.T), generator=gen)}


def loss_of(model_name, model, batch):
    if model_name == "mlp":
        return F.cross_entropy(model(batch["x"]), batch["y"])
    return zoo.ZOO[model_name][1](model, batch).mean()


def engine_kwargs(model_name, options, model):
    style = "all-layer"
    if "layer-wise" in options:
        style = "layer-wise"
    elif "groups" in options:  # two groups: the first trainable parameter alone, and the rest
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        style = [names[:1], names[1:]]
    return dict(batch_size=8, sample_size=80, noise_multiplier=1.0 if "noise" in options else 0.0,
                max_grad_norm=0.05, clipping_style=style, seed=1234)


def sharded_engine(model_name, options, model):
    kwargs = engine_kwargs(model_name, options, model)
    if "rs-backward" in options:
        kwargs["reduce_scatter"] = "backward"
    return bk.distributed.DistributedPrivacyEngine(model, **kwargs)


def optimizer_of(model, options):
    if "adam" in options or "resume" in options:
        return torch.optim.AdamW(model.parameters(), lr=1e-2)
    return torch.optim.SGD(model.parameters(), lr=1.0)


def train(model_name, model, opt, options, rank, world, steps):
    for step in steps:
        batch = {k: v[rank::world] for k, v in data(model_name, step).items()}
        n = len(next(iter(batch.values())))
        size = 1 if "micro" in options else max(n, 1)
        # Sharded: every rank must run as many backwards (bk.distributed.micro_batches pads with empty ones)
        split = bk.distributed.micro_batches if dist.is_initialized() else bk.data.micro_batches
        for part in split(batch, size):
            loss_of(model_name, model, part).backward()
            held = getattr(opt, "_bk_held", 0)  # factored contributions the engine holds (sharded runs)
            engine = getattr(model, "_bk_test_engine", None)
            if engine is not None:
                opt._bk_held = max(held, sum(len(v) for v in engine._pending.values()))
        opt.step()
        opt.zero_grad()


def full_state(model):
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in model.state_dict().items()}


def run(model_name, options, rank, world, out_dir):
    model = shard(model_name, build(model_name, options), options, world)
    engine = sharded_engine(model_name, options, model)
    opt = engine.attach(optimizer_of(model, options))
    model._bk_test_engine = engine
    out = {"initial": full_state(model)}
    if "resume" not in options:
        train(model_name, model, opt, options, rank, world, range(3))
    else:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        train(model_name, model, opt, options, rank, world, range(2))
        model_state, optim_state = get_state_dict(model, opt)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=f"{out_dir}/ckpt")
        saved_engine = engine.state_dict()
        train(model_name, model, opt, options, rank, world, range(2, 4))
        out["straight"] = full_state(model)
        out["straight_epsilon"] = engine.epsilon()
        # A new run: another initial model, restored from the checkpoint, then the same two steps
        model = shard(model_name, build(model_name, options, seed=99), options, world)
        engine = sharded_engine(model_name, options, model)
        opt = engine.attach(optimizer_of(model, options))
        model_state, optim_state = get_state_dict(model, opt)
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=f"{out_dir}/ckpt")
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        engine.load_state_dict(saved_engine)
        train(model_name, model, opt, options, rank, world, range(2, 4))
    out["state"] = full_state(model)
    out["held_after_backward"] = getattr(opt, "_bk_held", 0)
    out["engine"] = engine.state_dict()
    out["epsilon"] = engine.epsilon()
    out["optimizer_state_is_sharded"] = all(
        type(t).__name__ == "DTensor" for p, s in opt.state.items() for t in s.values()
        if t.dim() > 0 and type(p).__name__ == "DTensor")
    return out


def one_process(model_name, options, steps=range(3)):
    """The same training in one process on the union of the batches (no sharding)."""
    model = build(model_name, options)
    engine = bk.PrivacyEngine(model, **engine_kwargs(model_name, options, model))
    opt = engine.attach(optimizer_of(model, options))
    if "bf16" in options:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            train(model_name, model, opt, options - {"micro"}, 0, 1, steps)
    else:
        train(model_name, model, opt, options - {"micro"}, 0, 1, steps)
    return full_state(model), engine


def noise_draws(rank, world, out_dir):
    """Pure noise (a zero loss): the noised gradients, each rank's shard and whole."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = bk.convert(nn.Sequential(nn.Linear(80, 96), nn.Linear(96, 97)))
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    engine = bk.distributed.DistributedPrivacyEngine(model, batch_size=4, sample_size=400, noise_multiplier=2.0,
                                                     max_grad_norm=3.0, seed=77)
    opt = engine.attach(torch.optim.SGD(model.parameters(), lr=0.0))
    (0 * model(torch.randn(4, 80)).sum()).backward()
    opt.step()
    return {"local": {n: p.grad.to_local().clone() for n, p in model.named_parameters()},
            "full": {n: p.grad.full_tensor() for n, p in model.named_parameters()}}


def failed_backward(rank, world):
    """reduce_scatter="backward": rank 1's backward fails (a NaN loss: non-finite norms); both
    ranks raise instead of one waiting in a reduce-scatter, and the next step is refused on
    both, with nothing moved and no budget spent."""
    model = shard("mlp", build("mlp", set()), set(), world)
    engine = bk.distributed.DistributedPrivacyEngine(model, reduce_scatter="backward",
                                                     **engine_kwargs("mlp", set(), model))
    opt = engine.attach(optimizer_of(model, set()))
    train("mlp", model, opt, set(), rank, world, range(1))
    before = full_state(model)
    out = {}
    batch = {k: v[rank::world] for k, v in data("mlp", 2).items()}
    loss = loss_of("mlp", model, batch)
    for key, fn in (("backward", lambda: (loss * (float("nan") if rank == 1 else 1.0)).backward()),
                    ("step", opt.step)):
        try:
            fn()
            out[key] = None
        except (RuntimeError, ValueError, FloatingPointError) as err:
            out[key] = str(err)
    out["unchanged"] = all(torch.equal(before[k], v) for k, v in full_state(model).items())
    out["steps"], out["epsilon"] = engine.steps, engine.epsilon()
    return out


def refusals(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    mesh = init_device_mesh("cpu", (world,))
    kw = dict(batch_size=4, sample_size=40, noise_multiplier=1.0)
    errors, unchanged = {}, {}

    def attempt(key, fn):
        try:
            fn()
            errors[key] = None
        except (TypeError, ValueError, RuntimeError) as err:
            errors[key] = str(err)

    def sharded(seed=0, **shard_kw):
        torch.manual_seed(seed)
        model = bk.convert(nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 4)))
        fully_shard(model[0], mesh=mesh, **shard_kw)
        fully_shard(model, mesh=mesh, **shard_kw)
        return model

    attempt("convert_after_shard", lambda: bk.convert(fully_shard(nn.Sequential(nn.Linear(5, 6)), mesh=mesh)))
    attempt("plain_engine", lambda: bk.PrivacyEngine(sharded(), **kw))
    try:  # FSDP1 (where this torch builds it on the CPU)
        from torch.distributed.fsdp import FullyShardedDataParallel
        fsdp1 = FullyShardedDataParallel(bk.convert(nn.Sequential(nn.Linear(6, 6))), device_id=torch.device("cpu"))
    except Exception as err:  # noqa: BLE001  (recorded: the test says why it could not check)
        errors["fsdp1_unavailable"] = repr(err)
    else:
        attempt("fsdp1", lambda: bk.distributed.DistributedPrivacyEngine(fsdp1, **kw))
    attempt("shard_dim_1", lambda: bk.distributed.DistributedPrivacyEngine(
        sharded(shard_placement_fn=lambda p: Shard(1) if p.dim() == 2 else Shard(0)), **kw))
    attempt("reduce_scatter_value", lambda: bk.distributed.DistributedPrivacyEngine(
        sharded(), reduce_scatter="never", **kw))
    from torch.distributed.fsdp import CPUOffloadPolicy
    attempt("offload", lambda: bk.distributed.DistributedPrivacyEngine(
        sharded(offload_policy=CPUOffloadPolicy(pin_memory=False)), **kw))
    model = sharded()
    before = full_state(model)
    attempt("mismatch", lambda: bk.distributed.DistributedPrivacyEngine(
        model, max_grad_norm=1.0 + rank, **kw))
    unchanged["mismatch"] = all(torch.equal(before[k], v) for k, v in full_state(model).items())

    # The engine made before fully_shard: the optimizer over the shards is refused at attach,
    # and a backward through the sharded model is refused too; nothing moves.
    torch.manual_seed(0)
    model = bk.convert(nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 4)))
    engine = bk.distributed.DistributedPrivacyEngine(model, **kw)
    fully_shard(model, mesh=mesh)
    attempt("engine_before_shard_attach", lambda: engine.attach(torch.optim.SGD(model.parameters(), lr=1.0)))
    attempt("engine_before_shard_backward", lambda: model(torch.randn(2, 6)).sum().backward())
    before = full_state(model)
    unchanged["engine_before_shard"] = all(torch.equal(before[k], v) for k, v in full_state(model).items())
    unchanged["steps"] = engine.steps
    return {"errors": errors, "unchanged": unchanged}


def main(scenario, rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model_name, _, opts = scenario.partition(":")
    options = set(filter(None, opts.split(",")))
    assert options <= OPTIONS, options - OPTIONS
    if model_name == "noise_draws":
        out = noise_draws(rank, world, out_dir)
    elif model_name == "refusals":
        out = refusals(rank, world)
    elif model_name == "failed_backward":
        out = failed_backward(rank, world)
    else:
        out = run(model_name, options, rank, world, out_dir)
    torch.save(out, f"{out_dir}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    scenario, rank, world, init_file, out_dir = sys.argv[1:]
    main(scenario, int(rank), int(world), init_file, out_dir)
