"""Data-parallel private training (bk.distributed) on the CPU with gloo: each scenario runs
python_tests/dist_worker.py in WORLD processes and compares with one process on the whole batch."""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import bk_kernels as bk
from python_tests import dist_worker

ROOT = Path(__file__).resolve().parents[1]


def run_ranks(scenario, world, tmp_path, worker="python_tests.dist_worker"):
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen([sys.executable, "-m", worker, scenario, str(rank), str(world),
                               str(tmp_path / "init"), str(tmp_path)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(world)]
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    for rank, (p, text) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"rank {rank} failed:\n{text}"
    return [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(world)]


def one_process(noise, pairs=False):
    """The same two steps in one process over the whole batches, from rank 0's model."""
    model = dist_worker.model_of_rank(0)
    engine = bk.PrivacyEngine(model, **dist_worker.engine_kwargs(noise))
    opt = engine.attach(torch.optim.SGD(model.parameters(), lr=1.0))
    if pairs:
        engine.example_rows(bk.stacked_rows(2))
    dist_worker.train(model, opt, rank=0, world=1, pairs=pairs)
    return model.state_dict(), engine


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("scenario", ["exact", "noise", "micro", "pairs"])
def test_ranks_take_the_step_of_one_process(scenario, world, tmp_path):
    """Without noise the ranks' step equals one process's step on the union of their batches (to
    float64 rounding); with noise too, which shows the noise is drawn once (by rank 0), not once per
    rank; with each rank accumulating one backward per example before the step ("micro"); and
    with each example as two stacked rows ("pairs": engine.example_rows on every rank, no noise).
    Every rank ends bit-identical, started from rank 0's parameters, and accounts the same."""
    ranks = run_ranks(scenario, world, tmp_path)
    noiseless = scenario in ("exact", "pairs")
    want_state, want_engine = one_process(0.0 if noiseless else 1.0, pairs=scenario == "pairs")
    rank0_initial = dist_worker.model_of_rank(0).state_dict()
    for r, out in enumerate(ranks):
        for k in want_state:
            assert torch.equal(out["initial"][k], rank0_initial[k]), (r, k)
            assert torch.equal(out["state"][k], ranks[0]["state"][k]), (r, k)
        assert out["engine"] == ranks[0]["engine"]
        assert out["engine"]["steps"] == 2 and out["engine"]["noise_seed"] == 1234
        assert out["epsilon"] == pytest.approx(want_engine.epsilon(), rel=1e-12)
    for k, want in want_state.items():
        moved = (want - rank0_initial[k]).norm()
        err = (ranks[0]["state"][k] - want).norm()
        assert err <= 1e-9 * max(moved, 1e-300), (k, err, moved)
    if not noiseless:  # the noise is what moved most coordinates: check it is there, once
        assert any((want_state[k] - rank0_initial[k]).abs().max() > 0.01 for k in want_state)


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_of_packed_sequences_take_the_step_of_one_process(world, tmp_path):
    """Each rank packs its share of the sequences into one row (bk.packed_sequences(), a tiny
    transformers GPT-2; at world 3 rank 2's share of the second step is empty): the ranks' step
    equals one process's on all the sequences packed (no noise), every rank bit-identical."""
    ranks = run_ranks("packed", world, tmp_path)
    model = dist_worker.gpt2_of_rank(0)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    engine = bk.PrivacyEngine(model, **dist_worker.engine_kwargs(0.0))
    opt = engine.attach(torch.optim.SGD(model.parameters(), lr=1.0))
    engine.example_rows(bk.packed_sequences())
    dist_worker.packed_train(model, opt, rank=0, world=1)
    for r, out in enumerate(ranks):
        for k in initial:
            assert torch.equal(out["initial"][k], initial[k]), (r, k)
            assert torch.equal(out["state"][k], ranks[0]["state"][k]), (r, k)
        assert out["engine"]["steps"] == 2
    for k, want in model.state_dict().items():
        moved = (want - initial[k]).norm()
        err = (ranks[0]["state"][k] - want).norm()
        assert moved > 0 and err <= 1e-9 * moved, (k, err, moved)


def test_a_rank_without_backward_stops_every_rank(tmp_path):
    ranks = run_ranks("not-ready", 2, tmp_path)
    assert "without a backward" in ranks[1]["error"]
    assert "another rank" in ranks[0]["error"]
    for out in ranks:
        assert out["unchanged"] and out["steps"] == 0 and out["epsilon"] == 0


def test_refusals(tmp_path):
    for out in run_ranks("refusals", 2, tmp_path):
        errors = out["errors"]
        assert "DistributedDataParallel" in errors["ddp"] and "bk.distributed" in errors["ddp"]
        assert "rank 1 differs from rank 0 in max_grad_norm" in errors["mismatch"]
        assert "GradScaler is not supported" in errors["scaler"]


def test_engine_needs_an_initialized_process_group():
    with pytest.raises(RuntimeError, match="init_process_group"):
        bk.distributed.DistributedPrivacyEngine(dist_worker.model_of_rank(0), **dist_worker.engine_kwargs(1.0))
    with pytest.raises(RuntimeError, match="init_process_group"):
        bk.distributed.poisson_loader(list(range(10)), batch_size=2)


def test_loader_shards_are_disjoint_poisson_samples():
    """Rank r samples dataset[r::W] at the global rate; ranks' draws are independent, and the union
    of their batches has the mean and variance of a Poisson sample of the whole dataset."""
    n, world, q, steps = 1000, 3, 0.05, 600
    data = torch.arange(n)
    loaders = [bk.distributed.poisson_loader(data, batch_size=50, rank=r, world_size=world, seed=7)
               for r in range(world)]
    assert all(len(ld) == round(1 / q) and ld.sample_rate == q for ld in loaders)
    sizes = torch.zeros(steps, world)
    first = [[] for _ in range(world)]
    for r, ld in enumerate(loaders):
        ld.batch_sampler.steps = steps
        for s, batch in enumerate(ld):
            assert bool((batch % world == r).all())  # only this rank's shard
            sizes[s, r] = len(batch)
            if s == 0:
                first[r] = batch.tolist()
    total = sizes.sum(1)
    se = math.sqrt(q * (1 - q) * n / steps)
    assert abs(total.mean().item() - q * n) < 6 * se
    assert abs(total.var().item() / (q * (1 - q) * n) - 1) < 6 * math.sqrt(2 / steps)
    # independent ranks: the shards' sizes are uncorrelated (same seed, different streams)
    corr = torch.corrcoef(sizes.T)
    assert (corr - torch.eye(world)).abs().max() < 6 / math.sqrt(steps)
    # the same seed reproduces; another seed differs
    again = next(iter(bk.distributed.poisson_loader(data, batch_size=50, rank=1, world_size=world, seed=7)))
    assert again.tolist() == first[1]
    other = next(iter(bk.distributed.poisson_loader(data, batch_size=50, rank=1, world_size=world, seed=8)))
    assert other.tolist() != first[1]


@pytest.mark.parametrize("kwargs, match", [
    (dict(rank=0), "both rank and world_size"),
    (dict(rank=3, world_size=3), "0 <= rank < world_size"),
    (dict(rank=0, world_size=2, generator=torch.Generator()), "give seed=, not generator="),
    (dict(rank=0, world_size=20), "cannot be shared by 20 ranks"),
])
def test_loader_refuses_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bk.distributed.poisson_loader(list(range(10)), batch_size=2, **kwargs)


def test_single_process_engine_refuses_data_parallel():
    """DataParallel hides the same problem as DDP: refused with the same message."""
    model = dist_worker.model_of_rank(0)
    with pytest.raises(TypeError, match="DataParallel"):
        bk.PrivacyEngine(torch.nn.DataParallel(model), **dist_worker.engine_kwargs(1.0))
    F.cross_entropy(model(dist_worker.data(0)[0]), dist_worker.data(0)[1]).backward()  # model still untouched by bk
    assert all(p.grad is not None for p in model.parameters())
