"""Private training of FSDP2-sharded models (fully_shard) with bk.distributed on the CPU with
gloo: each scenario runs python_tests/fsdp_worker.py in WORLD processes and is compared with one
process training on the union of the ranks' batches (float64)."""
import pytest
import torch

from python_tests import fsdp_worker
from python_tests.test_distributed import run_ranks


def assert_same_training(got, want, initial, rel=1e-9):
    """Every parameter moved as in the reference, to `rel` of how far it moved."""
    for k, w in want.items():
        moved = (w - initial[k]).norm().item()
        err = (got[k].to(w.dtype) - w).norm().item()
        assert err <= rel * max(moved, 1e-300), (k, err, moved)


def check_against_one_process(scenario, world, tmp_path):
    model_name, _, opts = scenario.partition(":")
    options = set(filter(None, opts.split(",")))
    ranks = run_ranks(scenario, world, tmp_path, worker="python_tests.fsdp_worker")
    want, engine = fsdp_worker.one_process(model_name, options)
    for out in ranks:
        assert out["engine"] == ranks[0]["engine"]
        assert out["epsilon"] == pytest.approx(engine.epsilon(), rel=1e-12)
        assert out["optimizer_state_is_sharded"]
        for k in want:
            assert torch.equal(out["state"][k], ranks[0]["state"][k]), k
    assert ranks[0]["engine"]["steps"] == 3
    assert_same_training(ranks[0]["state"], want, ranks[0]["initial"])
    return ranks, want


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("options", ["", "noise", "layer-wise,micro", "groups,noise,adam", "partial,noise,adam",
                                     "noise,micro,rs-backward"])
def test_sharded_mlp_takes_the_step_of_one_process(options, world, tmp_path):
    """Sharded steps equal one process's on the union of the batches, to float64 rounding: with
    noise too (each element gets the one draw a single process gives it), with a different
    number of backwards on each rank (micro: one per example; at world 4 one rank's batch is
    empty at step 1), for every clipping style, and with only some units sharded (the
    replicated parameters take the data-parallel path: all-reduced, noised once). With
    reduce_scatter="backward" nothing factored is held past a backward; by default the
    micro-batches' contributions wait for the step."""
    ranks, _ = check_against_one_process(f"mlp:{options}", world, tmp_path)
    if "micro" in options:
        held = max(out["held_after_backward"] for out in ranks)
        assert held == 0 if "rs-backward" in options else held > 0


@pytest.mark.parametrize("scenario, world", [("gpt2:noise", 2), ("gpt2:micro", 3), ("llama:layer-wise,ckpt", 2),
                                             ("llama:noise,adam", 4)])
def test_sharded_hf_models_take_the_step_of_one_process(scenario, world, tmp_path):
    """HF GPT-2 with its head tied to wte (one unit, the root); the same with one backward per
    example on 3 ranks holding 3, 3 and 2 examples (bk.distributed.micro_batches pads the last
    with a one-example zero chunk, which HF's attention can run and the engine ignores); HF
    Llama (RMSNorm on the generic path) with non-reentrant activation checkpointing inside each
    sharded block, and on 4 ranks with noise and AdamW."""
    check_against_one_process(scenario, world, tmp_path)


def test_resume_from_a_sharded_checkpoint_is_bit_identical(tmp_path):
    """torch.distributed.checkpoint of the model and AdamW state, with the engine's state: the
    resumed steps equal the uninterrupted run's bit for bit, on every rank."""
    ranks = run_ranks("mlp:noise,resume", 2, tmp_path, worker="python_tests.fsdp_worker")
    for out in ranks:
        for k, v in out["straight"].items():
            assert torch.equal(out["state"][k], v), k
        assert out["epsilon"] == out["straight_epsilon"]
        assert out["engine"]["steps"] == 4


def test_bf16_mixed_precision_policy(tmp_path):
    """FSDP2's MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32): the layers compute
    in bf16, the norms, reduction and noise in float32 on float32 shards. The update is compared
    with the float64 one; its error is at most 3x that of one process under bf16 autocast."""
    ranks = run_ranks("mlp:bf16", 2, tmp_path, worker="python_tests.fsdp_worker")
    exact, _ = fsdp_worker.one_process("mlp", set())
    autocast, _ = fsdp_worker.one_process("mlp", {"bf16"})
    initial = ranks[0]["initial"]
    for k, w in exact.items():
        if not w.is_floating_point():
            continue
        moved = (w - initial[k]).norm().item()
        err_sharded = (ranks[0]["state"][k].double() - w).norm().item()
        err_autocast = (autocast[k].double() - w).norm().item()
        assert ranks[0]["state"][k].dtype == torch.float32  # the shards keep the parameters' dtype
        assert err_sharded <= 3 * err_autocast + 1e-6 * moved, (k, err_sharded, err_autocast, moved)


@pytest.mark.parametrize("world", [2, 4])
def test_noise_is_drawn_once_per_element(world, tmp_path):
    """A zero loss: the gradient is noise / B. Each element holds the draw one process gives it
    (so none is drawn twice and no two ranks share draws), and the per-element std is sigma R / B."""
    ranks = run_ranks("noise_draws", world, tmp_path, worker="python_tests.fsdp_worker")
    model = fsdp_worker.bk.convert(torch.nn.Sequential(torch.nn.Linear(80, 96), torch.nn.Linear(96, 97)))
    engine = fsdp_worker.bk.PrivacyEngine(model, batch_size=4, sample_size=400, noise_multiplier=2.0,
                                          max_grad_norm=3.0, seed=77)
    opt = engine.attach(torch.optim.SGD(model.parameters(), lr=0.0))
    (0 * model(torch.randn(4, 80)).sum()).backward()
    opt.step()
    std = 2.0 * 3.0 / 4
    for name, p in model.named_parameters():
        full = ranks[0]["full"][name]
        assert torch.equal(full, p.grad), name  # exactly the single-process draws
        pieces = [out["local"][name].reshape(-1) for out in ranks]
        assert torch.equal(torch.cat(pieces), full.reshape(-1))  # the shards partition the elements
        if full.numel() > 1000:
            assert abs(full.std().item() / std - 1) < 0.03, name
        assert torch.unique(full).numel() == full.numel()  # no draw repeated
    for out in ranks[1:]:
        assert not any(torch.equal(out["local"][n], ranks[0]["local"][n]) for n in out["local"])


def test_refusals(tmp_path):
    for out in run_ranks("refusals", 2, tmp_path, worker="python_tests.fsdp_worker"):
        errors, unchanged = out["errors"], out["unchanged"]
        assert "bk.convert(model) first, then fully_shard" in errors["convert_after_shard"]
        assert "DistributedPrivacyEngine" in errors["plain_engine"]
        assert "Shard(dim=1)" in errors["shard_dim_1"] and "Shard(0)" in errors["shard_dim_1"]
        assert "differs from rank 0 in max_grad_norm" in errors["mismatch"]
        assert "CPUOffloadPolicy" in errors["offload"]
        assert "reduce_scatter must be one of ('step', 'backward'), got 'never'" in errors["reduce_scatter_value"]
        assert "make the engine after fully_shard" in errors["engine_before_shard_attach"]
        assert "Make the engine last" in errors["engine_before_shard_backward"]
        assert "FSDP1" in errors["fsdp1"] and "fully_shard" in errors["fsdp1"]
        assert unchanged["mismatch"] and unchanged["engine_before_shard"]
        assert unchanged["steps"] == 0


def test_a_failed_backward_stops_every_rank_when_reducing_each_backward(tmp_path):
    ranks = run_ranks("failed_backward", 2, tmp_path, worker="python_tests.fsdp_worker")
    assert "non-finite" in ranks[1]["backward"]
    assert "another rank could not finish this backward" in ranks[0]["backward"]
    for out in ranks:
        assert "without a backward" in out["step"]
        assert out["unchanged"] and out["steps"] == 1
    assert ranks[0]["epsilon"] == ranks[1]["epsilon"]
