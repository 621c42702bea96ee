"""The benchmark code paths on tiny shapes, in process: every model with every method, and the
private methods' updates against each other (noise 0, float64), so the baselines that bk is
timed against compute the same clipped step."""
import os
import sys
import time
import warnings

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import fresh, harness, maxbatch, models, workloads  # noqa: E402

CPU = torch.device("cpu")
TINY = {
    "mlp": dict(B=6, width=16, d_in=12),
    "cnn": dict(B=3, width=4, size=8),
    "vit": dict(B=3, width=32, layers=1, heads=2, size=8, patch=4),
    "gpt2": dict(B=3, T=8, layers=1, width=32, vocab=53),
}


def _flat_update(module, before):
    """The parameter change, in the order of `before`'s names (Opacus wraps the model as _module)."""
    after = {name.removeprefix("_module."): p.detach() for name, p in module.named_parameters()}
    return torch.cat([(after[n] - b).flatten() for n, b in before.items()])


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.mark.parametrize("name", sorted(TINY))
def test_every_method_steps(name):
    """Each method runs two steps on each model."""
    w = workloads.build(name, CPU, torch.float32, **TINY[name])
    ran = [method for method in workloads.method_names(CPU) if _two_steps_move(w, method)]
    assert {"non-private", "vmap", "opacus hooks", "opacus ghost", "bk (cpu)"} <= set(ran)


def _two_steps_move(w, method):
    """Two steps of `method` on workload w: finite parameters that moved."""
    module, step = workloads.make_step(w, method)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    step()
    step()
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert any(not torch.equal(before[n], p) for n, p in module.named_parameters()), f"{method} did not move"
    return True


@pytest.mark.parametrize("name", ["llama", "mixtral", "mamba2", "timm_vit", "timm_convnext", "timm_bit", "tv_vit", "tv_swin"])
def test_library_model_workloads_step(name):
    """The workloads built from transformers, timm and torchvision classes (bk against non-private only in the
    suite): two steps of each, on the sizes the memory subprocess warms up with."""
    pytest.importorskip("transformers")
    pytest.importorskip("timm")
    pytest.importorskip("torchvision")
    w = workloads.build(name, CPU, torch.float32, **models.TINY[name])
    for method in ("non-private", "bk (cpu)"):
        _two_steps_move(w, method)


@pytest.mark.parametrize("name", ["mlp", "cnn", "gpt2"])
def test_private_methods_agree_without_noise(name):
    """sigma = 0, float64: one step of vmap, Opacus (hooks, ghost) and bk give one update."""
    w = workloads.build(name, CPU, torch.float64, **TINY[name])
    before = {n: p.detach().clone() for n, p in w.model.named_parameters()}
    updates = {}
    for method in workloads.method_names(CPU)[1:]:
        if name == "gpt2" and method == "opacus ghost":
            continue  # it trains an untied copy of GPT-2: another model
        module, step = workloads.make_step(w, method, sigma=0.0, check=False)
        step()
        updates[method] = _flat_update(module, before)
    want = updates.pop("vmap")
    assert want.abs().max() > 0
    expected = {"opacus hooks", "bk (cpu)"} | ({"opacus ghost"} if name != "gpt2" else set())
    assert expected <= set(updates)
    # Clipping must be active, or the check would not see a wrong clip factor.
    w_np = workloads.make_step(w, "non-private", sigma=0.0)
    w_np[1]()
    assert not torch.allclose(_flat_update(w_np[0], before), want, rtol=1e-3)
    for method, got in updates.items():
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12 * want.abs().max().item(), msg=method)


def test_vit_bk_matches_vmap():
    """The ViT through bk's MultiheadAttention against torch.func (Opacus renames the attention's
    weights, so its update is compared through the model's outputs in the step test only)."""
    w = workloads.build("vit", CPU, torch.float64, **TINY["vit"])
    before = {n: p.detach().clone() for n, p in w.model.named_parameters()}
    got = {}
    for method in ("vmap", "bk (cpu)"):
        module, step = workloads.make_step(w, method, sigma=0.0, check=False)
        step()
        got[method] = _flat_update(module, before)
    torch.testing.assert_close(got["bk (cpu)"], got["vmap"], rtol=1e-9, atol=1e-12 * got["vmap"].abs().max().item())


def test_models_scenario_rows(monkeypatch):
    """The scenario itself: interleaved rounds, ratios and the row layout (memory off)."""
    monkeypatch.setitem(models.CONFIGS, "tiny-mlp", ("mlp", TINY["mlp"]))
    monkeypatch.setitem(models.CONFIGS, "tiny-gpt2", ("gpt2", TINY["gpt2"]))
    rows = models.run(CPU, torch.float32, False, "test", configs=["tiny-mlp", "tiny-gpt2"], memory=False,
                      rounds=2, warmup=1)
    by = {(r["config"], r["method"]): r for r in rows}
    assert by[("tiny-mlp", "non-private")]["ratio"] == 1.0
    assert by[("tiny-mlp", "bk (cpu)")]["rounds"] == 2 and by[("tiny-mlp", "bk (cpu)")]["median_ms"] > 0
    assert by[("tiny-gpt2", "opacus ghost")]["status"] .startswith("ok (lm_head untied")
    assert set(models.COLUMNS) <= set(rows[0])
    harness.table(rows, models.COLUMNS)


def test_step_memory_and_max_batch():
    """Step memory in this process (CPU RSS) grows with the batch; the search finds a batch."""
    small = models.step_memory("mlp", dict(TINY["mlp"], B=64, width=256), "non-private", CPU, torch.float32)
    big = models.step_memory("mlp", dict(TINY["mlp"], B=4096, width=256), "non-private", CPU, torch.float32)
    assert 0 <= small < big
    found = maxbatch.search("mlp", dict(TINY["mlp"], B=64, width=256), "bk (cpu)", CPU, torch.float32,
                            budget=big, cap=1 << 14)
    assert found["max_batch"] >= 64 and found["probes"]


def _square(x):
    return x * x


def _raise(x):
    raise ValueError(f"bad {x}")


def _exit(code):
    os._exit(code)


def _sleep(seconds):
    time.sleep(seconds)
    return seconds


def test_fresh_processes_return_results_in_order_and_report_failures():
    """bench/fresh.py: each call in its own process, two at a time; an exception, a process that
    dies without a result and one past its timeout each give an error string, not a hang."""
    assert fresh.run(_square, [2, 3, 4, 5], parallel=2) == [4, 9, 16, 25]
    assert fresh.run(_raise, [7]) == ["error: ValueError: bad 7"]
    assert fresh.run(_exit, [3]) == ["error: subprocess exited 3"]
    assert fresh.run(_sleep, [60], timeout=2) == ["error: subprocess timed out after 2 s"]


def test_step_memory_in_fresh_processes(monkeypatch):
    """The models scenario's memory columns (each method in a fresh process, two at a time)."""
    monkeypatch.setitem(models.CONFIGS, "tiny-mlp", ("mlp", dict(TINY["mlp"], B=64, width=256)))
    rows = models.run(CPU, torch.float32, False, "test", configs=["tiny-mlp"], rounds=1, warmup=1)
    by = {r["method"]: r for r in rows}
    assert by["non-private"]["mem_mib"] > 0 and by["non-private"]["mem_ratio"] == 1.0
    assert by["vmap"]["mem_ratio"] > 1  # B per-example gradients


def test_gpu_bench_smoke(tmp_path):
    """bench/gpu.py (what `make gpu-check` runs on a GPU) on tiny shapes here: every kernel is
    timed against its roofline and the GPT-2 step against non-private, into its JSON report."""
    from bench import gpu

    report = gpu.main(["--out", str(tmp_path), "--smoke"])
    assert (tmp_path / "gpu_bench.json").exists()
    assert report["ceilings"]["copy_bytes_per_s"] > 0
    assert all("error" not in r and r["fraction"] > 0 for r in report["kernels"]), report["kernels"]
    bk_method = "bk (cuda)" if torch.cuda.is_available() else "bk (cpu)"  # smoke runs on the GPU there
    assert {r["method"] for r in report["gpt2"]["rows"]} >= {"non-private", bk_method}
    assert all("ratio" in r for r in report["gpt2"]["rows"]), report["gpt2"]


def test_overhead_scenario_fits_per_step_and_per_layer_costs():
    from bench import overhead

    rows = overhead.run(CPU, torch.float32, True, "test")
    assert [r["layers"] for r in rows] == [2, 8]
    assert all(r["bk_us"] > 0 and r["non_private_us"] > 0 for r in rows)
    assert rows[0]["per_layer_us"] == rows[1]["per_layer_us"] != ""


def test_conv_scenario_rows(monkeypatch):
    """Every op on a 3x3, a pointwise and a depthwise layer (each checked against float64 inside
    run); per-example gradients only where the engine forms them."""
    from bench import conv

    monkeypatch.setattr(conv, "shapes", lambda quick: [(2, 3, 4, 6, 3, 1), (2, 8, 16, 4, 1, 1), (2, 6, 6, 5, 7, 6),
                                                       (2, 64, 64, 2, 3, 1)])
    rows = conv.run(CPU, torch.float32, True, "test")
    ops_of = {}
    for r in rows:
        ops_of.setdefault((r["C_in"], r["k"], r["groups"]), set()).add(r["op"])
    every = {"conv_norm", "conv_clipped_sum", "conv_per_example_grads"}
    assert ops_of[(3, 3, 1)] == ops_of[(8, 1, 1)] == ops_of[(6, 7, 6)] == every
    assert ops_of[(64, 3, 1)] == every - {"conv_per_example_grads"}  # ghost mode: never formed by the engine
    assert all(r["median_ms"] > 0 for r in rows)
    harness.table(rows, conv.COLUMNS)


def test_breakdown_scenario_rows(monkeypatch):
    from bench import breakdown

    monkeypatch.setitem(models.CONFIGS, "tiny-mlp", ("mlp", TINY["mlp"]))
    rows = breakdown.run(CPU, torch.float32, True, "test", configs=["tiny-mlp"])
    by = {r["variant"]: r for r in rows}
    assert list(by) == breakdown.VARIANTS
    assert by["bk"]["vs_bk"] == 1.0 and by["non-private"]["vs_np"] == 1.0
    assert all(r["rounds"] == 5 and r["median_ms"] > 0 for r in rows)
    harness.table(rows, breakdown.COLUMNS)


def test_breakdown_ablations_remove_their_part_and_are_undone():
    """Each ablation removes exactly its part while its block runs, and nothing after it."""
    from bench import breakdown
    from bk_kernels import engine as engine_module
    from bk_kernels.nn import _uses

    Engine = engine_module.PrivacyEngine
    methods = (Engine.__dict__["_noise_and_scale"], Engine.__dict__["_add_clipped"],
               _uses.LinearUse.__dict__["sq_norm"], _uses.DenseUse.__dict__["sq_norm"])
    w = workloads.build("mlp", CPU, torch.float64, **TINY["mlp"])

    def update(sigma, part=None):
        module, step = workloads.make_step(w, "bk (cpu)", sigma=sigma, check=False)
        before = {n: p.detach().clone() for n, p in module.named_parameters()}
        with breakdown._without(part, CPU) if part else breakdown.contextlib.nullcontext():
            step()
        return _flat_update(module, before), module

    noiseless, _ = update(0.0)
    noisy, _ = update(1.0)
    assert not torch.allclose(noisy, noiseless)
    torch.testing.assert_close(update(1.0, "noise")[0], noiseless, rtol=0, atol=0)
    assert update(0.0, "clipped sums")[0].abs().max() == 0  # zero gradients, no noise: nothing moves
    # No norms: every clip factor is 1 (norm 0 <= R), so the step is non-private training's
    plain, plain_step = workloads.make_step(w, "non-private", check=False)
    before = {n: p.detach().clone() for n, p in plain.named_parameters()}
    plain_step()
    unclipped = _flat_update(plain, before)
    assert not torch.allclose(unclipped, noiseless)  # the clipping matters at these sizes
    torch.testing.assert_close(update(0.0, "norms")[0], unclipped, rtol=1e-10, atol=1e-14)
    assert (Engine.__dict__["_noise_and_scale"], Engine.__dict__["_add_clipped"],
            _uses.LinearUse.__dict__["sq_norm"], _uses.DenseUse.__dict__["sq_norm"]) == methods
    torch.testing.assert_close(update(0.0)[0], noiseless, rtol=0, atol=0)  # the engine is whole again


def test_fsdp_memory_scenario_quick():
    """bench/fsdp_memory.py --quick: a tiny Llama on 1 and 2 gloo processes, bk and non-private;
    each rank's parameters, gradients and AdamW state are half of one process's at W = 2."""
    from bench import fsdp_memory

    rows = fsdp_memory.run(CPU, torch.float32, True, "test")
    by = {(r["method"], r["W"]): r for r in rows}
    assert set(by) == {(m, w) for m in fsdp_memory.METHODS for w in fsdp_memory.QUICK_WORLDS}
    for method in fsdp_memory.METHODS:
        one, two = by[(method, 1)], by[(method, 2)]
        assert one["grad_MiB"] == one["param_MiB"] > 0 and one["optim_MiB"] == 2 * one["param_MiB"]
        assert two["state_vs_W1"] <= 0.51 and two["peak_rss_extra_MiB"] > 0
