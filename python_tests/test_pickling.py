"""A whole converted model saved with torch.save and loaded in ANOTHER process (a fresh python,
which has only imported bk_kernels): the same classes, the same outputs, and the same private
step. Every zoo model whose unconverted original pickles at all is checked.

bk makes classes while converting (a bk mixin before the user's class: generic path, subclass
adapters, transformers' Conv1D, MoE experts, DeBERTa's attention, timm's LayerScale); they
pickle as the call that makes them (bk_kernels/nn/_made.py). Before, some were named in no
module, or named as the user's original class, and torch.save(model) failed."""
import io
import os
import subprocess
import sys

import pytest
import torch

import bk_kernels as bk
from bk_kernels.nn.generic import is_generic
from python_tests import zoo

pytest.importorskip("transformers")
pytest.importorskip("timm")
pytest.importorskip("peft")

B = 2
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _deberta(version):
    from python_tests.test_models_zoo import _deberta
    return _deberta(share_att_key=True, norm_rel_ebd="layer_norm") if version == "v3" else _deberta("v1")


MODELS = {**zoo.ZOO, "deberta_v3": (lambda: _deberta("v3"), zoo.classify_ids, zoo.ids_batch),
          "deberta_v1": (lambda: _deberta("v1"), zoo.classify_ids, zoo.ids_batch)}


def _pickles(model):
    try:
        torch.save(model, io.BytesIO())
        return True
    except Exception:  # noqa: BLE001  (torch or the model's library refuses it: not ours to check)
        return False


def _structure(model):
    return [(path, type(m).__name__, isinstance(m, bk.nn.BKLayer), is_generic(m))
            for path, m in model.named_modules()]


def private_step(model, loss, inputs):
    """The clipped, summed gradients of one backward under an engine (noise 0), by name."""
    torch.manual_seed(1)  # dropout, if any, draws the same masks in both processes
    engine = bk.PrivacyEngine(model, batch_size=B, sample_size=100, noise_multiplier=0.0, max_grad_norm=0.5)
    loss(model, inputs).sum().backward()
    engine.detach()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _load_and_step(path):
    """Run in the fresh process: load each saved model and step it as the parent did."""
    bk.ops.set_cpu_norm_impl("kernel")
    saved = torch.load(path, weights_only=False)
    out = {}
    for name, (model, inputs) in saved.items():
        loss = MODELS[name][1]
        out[name] = (_structure(model), private_step(model, loss, inputs))
    torch.save(out, path + ".out")


def test_converted_zoo_models_load_and_train_in_a_fresh_process(tmp_path):
    saved, expected = {}, {}
    for name, (build, loss, batch) in MODELS.items():
        torch.manual_seed(0)
        original = build()
        if not _pickles(original):
            continue  # wav2vec2's weight_norm parametrization, HF's checkpointing closure hook, BiT's DynamicPad2d
        model = bk.convert(original)
        torch.manual_seed(0)
        inputs = batch(B)
        saved[name] = (model, inputs)
    path = str(tmp_path / "models.pt")
    torch.save(saved, path)  # before any engine touched them
    # Bitwise comparison: both processes use the hand-written norm kernels ("auto" times them
    # against BLAS in each process, and may pick differently).
    previous = bk.ops.cpu_norm_impl()
    bk.ops.set_cpu_norm_impl("kernel")
    try:
        for name, (model, inputs) in saved.items():
            expected[name] = (_structure(model), private_step(model, MODELS[name][1], inputs))
    finally:
        bk.ops.set_cpu_norm_impl(previous)
    assert len(saved) >= len(MODELS) - 3, sorted(set(MODELS) - set(saved))

    code = f"from python_tests.test_pickling import _load_and_step; _load_and_step({path!r})"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, env={**os.environ, "PYTHONPATH": ROOT})
    loaded = torch.load(path + ".out", weights_only=False)
    for name, (structure, grads) in expected.items():
        assert loaded[name][0] == structure, name
        assert loaded[name][1].keys() == grads.keys(), name
        for p in grads:
            torch.testing.assert_close(loaded[name][1][p], grads[p], rtol=0, atol=0, msg=f"{name}: {p}")
