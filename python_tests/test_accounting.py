"""Privacy accounting: epsilon against dp-accounting computed here independently and against
Opacus' RDP accountant; noise calibration meets its target from below; bad targets refused."""
import math
import os

import pytest
import torch

if os.environ.get("BK_GPU_CHECK") == "1":  # the GPU check's machine has none of our pins
    pytest.importorskip("dp_accounting")
from dp_accounting import dp_event  # noqa: E402
from dp_accounting.pld import pld_privacy_accountant  # noqa: E402
from dp_accounting.rdp import rdp_privacy_accountant  # noqa: E402

import bk_kernels as bk  # noqa: E402
from bk_kernels import accounting  # noqa: E402


def independent_epsilon(sigma, q, steps, delta, name):
    acc = rdp_privacy_accountant.RdpAccountant() if name == "rdp" else pld_privacy_accountant.PLDAccountant()
    for _ in range(steps):  # composed step by step, not as one self-composed event
        acc.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)))
    return acc.get_epsilon(delta)


# PLD composes step by step slowly: fewer steps for it.
STEPS = {"rdp": 60, "pld": 8}


@pytest.mark.parametrize("name", ["rdp", "pld"])
def test_epsilon_matches_dp_accounting(name):
    got = accounting.epsilon(1.1, 0.02, STEPS[name], 1e-5, name)
    want = independent_epsilon(1.1, 0.02, STEPS[name], 1e-5, name)
    assert abs(got / want - 1) < 0.01


@pytest.mark.parametrize("history", [[[1.0, 0.01, 100]], [[0.7, 0.004, 3000], [1.3, 0.01, 17]], [[5.0, 1.0, 1]],
                                     [[0.3, 0.5, 10], [0.0, 0.5, 0]]])
def test_cached_rdp_curves_give_the_accountants_epsilon(history):
    """epsilon_of_history composes RDP curves cached per (q, sigma): the same number as
    dp-accounting's RdpAccountant composing the whole history (non-converging orders included)."""
    acc = rdp_privacy_accountant.RdpAccountant()
    acc.compose(dp_event.ComposedDpEvent([
        dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(s)), n)
        for s, q, n in history if n]))
    for _ in range(2):  # the second call reads the cache
        assert accounting.epsilon_of_history(history, 1e-5) == pytest.approx(acc.get_epsilon(1e-5), rel=1e-12)


def test_epsilon_matches_opacus_rdp():
    opacus = pytest.importorskip("opacus")
    acc = opacus.accountants.RDPAccountant()
    for _ in range(200):
        acc.step(noise_multiplier=0.9, sample_rate=0.01)
    assert abs(accounting.epsilon(0.9, 0.01, 200, 1e-5, "rdp") / acc.get_epsilon(1e-5) - 1) < 0.05


@pytest.mark.parametrize("name", ["rdp", "pld"])
def test_calibration_meets_the_target_from_below(name):
    sigma = accounting.calibrate_noise_multiplier(2.0, 0.02, STEPS[name], 1e-5, name)
    spent = independent_epsilon(sigma, 0.02, STEPS[name], 1e-5, name)
    assert 0.99 * 2.0 <= spent <= 2.0 + 1e-9


def test_engine_reports_what_its_steps_spent():
    model = bk.convert(torch.nn.Linear(3, 2))
    engine = bk.PrivacyEngine(model, batch_size=10, sample_size=500, epochs=2, target_epsilon=4.0, seed=0)
    assert engine.target_delta == pytest.approx(1 / 500 ** 1.1)
    assert engine.epsilon() == 0.0
    opt = engine.attach(torch.optim.SGD(model.parameters(), lr=0.1))
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(10, 3)).sum().backward()
        opt.step()
    assert engine.steps == 3
    want = independent_epsilon(engine.noise_multiplier, 10 / 500, 3, engine.target_delta, "rdp")
    assert engine.epsilon() == pytest.approx(want, rel=0.01)
    assert engine.epsilon(delta=1e-2) < engine.epsilon()  # a larger delta buys a smaller epsilon
    # The planned 2 epochs = 100 steps spend (just under) the target.
    assert accounting.epsilon(engine.noise_multiplier, 10 / 500, 100, engine.target_delta) <= 4.0


def test_impossible_or_ill_formed_targets_are_refused():
    model = bk.convert(torch.nn.Linear(3, 2))
    with pytest.raises(ValueError, match="cannot be reached"):
        bk.PrivacyEngine(model, batch_size=100, sample_size=1000, steps=10**6, target_epsilon=1e-4)
    with pytest.raises(ValueError, match="exactly one of epochs and steps"):
        bk.PrivacyEngine(model, batch_size=10, sample_size=1000, target_epsilon=1.0)
    with pytest.raises(ValueError, match="target_epsilon must be a positive"):
        bk.PrivacyEngine(model, batch_size=10, sample_size=1000, steps=10, target_epsilon=-1.0)
    with pytest.raises(ValueError, match="accountant must be one of"):
        bk.PrivacyEngine(model, batch_size=10, sample_size=1000, noise_multiplier=1.0, accountant="gdp")
    assert math.isinf(accounting.epsilon(0.0, 0.1, 5, 1e-5))


def test_bk_imports_and_steps_without_dp_accounting():
    """The GPU check's bare machine has torch and Triton but none of our pins: bk_kernels
    imports and takes a noise-0 step there; dp-accounting is imported only by accounting, and
    not for the epsilon of no steps (0)."""
    import subprocess
    import sys
    code = """
import builtins, sys
real = builtins.__import__
def refuse(name, *args, **kwargs):
    if name.startswith("dp_accounting"):
        raise ImportError("no dp_accounting on this machine")
    return real(name, *args, **kwargs)
builtins.__import__ = refuse
import torch, bk_kernels as bk
model = bk.convert(torch.nn.Linear(3, 2))
engine = bk.PrivacyEngine(model, batch_size=4, sample_size=40, noise_multiplier=0.0, max_grad_norm=1.0)
opt = engine.attach(torch.optim.SGD(model.parameters(), lr=0.1))
assert engine.epsilon() == 0.0  # nothing spent yet: no accountant needed
model(torch.randn(4, 3)).sum().backward()
opt.step()
assert "dp_accounting" not in sys.modules
try:
    bk.accounting.epsilon(1.0, 0.1, 10, 1e-5)
except ImportError as err:
    print(err)
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "dp-accounting" in run.stdout
