"""transformers' RMSNorm classes (LlamaRMSNorm's forward and its copies, in the two arithmetic
forms of nn/hf_rmsnorm.py) with their weight through bk.nn.scale instead of a per-example
recompute (Gemma's 1 + weight through per-example copies of the weight); other forms (T5's)
keep the generic path. Against one backward per example in float64 (B = 4: see test_models_zoo.py)."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bk_kernels as bk
from python_tests import zoo
from python_tests.test_models import check_model

transformers = pytest.importorskip("transformers")
DT = torch.float64


def _lm(model_type, **extra):
    config = transformers.AutoConfig.for_model(model_type, **zoo._decoder_config(use_cache=False, **extra))
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).to(DT).train()


def _norm_types(model):
    return {type(m).__name__ for m in model.modules() if type(m).__name__.endswith("RMSNorm")}


@pytest.mark.parametrize("model_type", ["llama", "olmo2", "gemma", "gemma3_text"])
def test_rmsnorm_through_scale_is_exact(model_type):
    """Llama's weight * h.to(dtype), OLMo 2's (weight * h).to(dtype), Gemma's h * (1 + weight) in
    float32 (per-example copies of the weight); Gemma 3 has them on its queries and keys too."""
    model = _lm(model_type, head_dim=8)
    norm_types = _norm_types(model)
    assert norm_types, "the model has no RMSNorm class"
    generic = {t for _, t, _ in bk.generic_modules(bk.convert(copy.deepcopy(model)))}
    assert not generic & norm_types, generic
    with torch.no_grad():  # Gemma's weights start at 0: make them matter
        for m in model.modules():
            if type(m).__name__ in norm_types:
                m.weight.uniform_(-0.5, 0.5)
    inputs = zoo.ids_batch(4)
    check_model(model, zoo.causal_lm, inputs, style="all-layer", backend="cpu", R=0.5)
    check_model(model, zoo.causal_lm, inputs, style="layer-wise", backend="cpu", R=0.05)


def test_another_form_keeps_the_generic_path():
    """T5's layer norm (weight cast to half first, no float32 product): not a form read here, so
    generic (and exact)."""
    config = transformers.T5Config(vocab_size=37, d_model=16, d_kv=4, d_ff=24, num_layers=1, num_heads=4,
                                   dropout_rate=0.0, decoder_start_token_id=0)
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(config).to(DT).train()
    generic = {t for _, t, _ in bk.generic_modules(bk.convert(copy.deepcopy(model)))}
    assert "T5LayerNorm" in generic
    report = bk.verify(model, lambda m, b: zoo.seq2seq_lm(m, b).mean(), zoo.ids_batch(4))
    assert report.ok, report


class _FoldedNorm(nn.Module):
    """An RMSNorm fed the batch's rows folded ([B * T, d]), as reshape(-1, d) callers do."""

    def __init__(self, norm):
        super().__init__()
        from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
        from transformers.models.llama.modeling_llama import LlamaRMSNorm
        self.proj = nn.Linear(5, 6)
        self.norm = {"llama": LlamaRMSNorm, "gemma": GemmaRMSNorm}[norm](6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = self.proj(x)
        return self.head(self.norm(h.reshape(-1, 6)).view(h.shape)).mean(1)


@pytest.mark.parametrize("norm", ["llama", "gemma"])
@pytest.mark.parametrize("batch_first", [True, False])
def test_folded_rows_and_sequence_first_inputs(batch_first, norm):
    """Rows folded example-major go through bk.nn.scale as [B, T, d], and a sequence-first input
    (examples on dim 1) as bk's LayerNorm takes it (the generic path refused it): both exact."""
    torch.manual_seed(0)
    model = _FoldedNorm(norm).to(DT)
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
    x, y = torch.randn(4, 7, 5, dtype=DT), torch.randint(0, 3, (4,))
    if batch_first:
        loss = lambda m, b: F.cross_entropy(m(b["x"]), b["y"], reduction="none")  # noqa: E731
        check_model(model, loss, {"x": x, "y": y}, style="all-layer", backend="cpu", R=0.3)
    else:
        class SequenceFirst(nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, x):  # x [T, B, d]
                h = self.inner.proj(x)
                return self.inner.head(self.inner.norm(h)).mean(0)

        seq = SequenceFirst(model)
        report = bk.verify(seq, lambda m, b: F.cross_entropy(m(b[0]), b[1]), (x.transpose(0, 1), y),
                           batch_first=False)
        # Gemma sums its weight's gradient over the positions in float32 (even in a float64 model),
        # here over [B, T, d] rows against the reference's [T, 1, d]: another order, 1e-8 apart
        assert report.ok and report.update_error < (1e-12 if norm == "llama" else 1e-7), report


def test_frozen_weight_is_a_plain_norm():
    model = _lm("llama")
    for m in model.modules():
        if type(m).__name__ == "LlamaRMSNorm":
            m.weight.requires_grad_(False)
    converted = bk.convert(copy.deepcopy(model))
    assert not any(type(m).__name__ == "LlamaRMSNorm" and isinstance(m, bk.nn.BKLayer) for m in converted.modules())
    check_model(model, zoo.causal_lm, zoo.ids_batch(4), style="all-layer", backend="cpu", R=0.5)


@pytest.mark.parametrize("name", ["mamba2", "qwen3_5"])
def test_gated_rmsnorms_through_scale(name):
    """The gated RMSNorm after a Mamba-2 scan (gate first, normalised in groups) and after a
    gated delta rule (normalised, weighted, then gated; fed folded [B * T * H, d] rows): with
    the mixers and the plain RMSNorms, nothing of these models is left on the generic path."""
    build, loss, batch = zoo.ZOO[name]
    torch.manual_seed(0)
    model = build().train()
    gated = {type(m).__name__ for m in model.modules() if type(m).__name__.endswith("RMSNormGated")}
    assert gated
    with torch.no_grad():
        for m in model.modules():
            if type(m).__name__ in gated:
                m.weight.uniform_(0.5, 1.5)
    assert bk.generic_modules(bk.convert(copy.deepcopy(model))) == []
    check_model(model, loss, batch(4), style="all-layer", backend="cpu", R=0.5)



@pytest.mark.parametrize("norm", ["llama", "gemma"])
def test_one_example_and_an_empty_batch(norm):
    """B = 1 exact; Poisson sampling's empty batch: a noise-only step (the norms alone: transformers'
    attention layers cannot take an empty batch themselves)."""
    torch.manual_seed(0)
    model = _FoldedNorm(norm).to(DT)
    loss = lambda m, b: F.cross_entropy(m(b["x"]), b["y"], reduction="none")  # noqa: E731
    check_model(model, loss, {"x": torch.randn(1, 7, 5, dtype=DT), "y": torch.randint(0, 3, (1,))},
                style="all-layer", backend="cpu", R=0.3)
    private = bk.convert(copy.deepcopy(model))
    optimizer = torch.optim.SGD(private.parameters(), lr=1.0)
    engine = bk.PrivacyEngine(private, batch_size=4, sample_size=40, noise_multiplier=1.0, max_grad_norm=1.0, seed=0)
    engine.attach(optimizer)
    private(torch.randn(0, 7, 5, dtype=DT)).sum().backward()
    optimizer.step()
    assert engine.steps == 1
    assert not torch.equal(private.norm.weight, model.norm.weight)
