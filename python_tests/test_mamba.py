"""transformers' Mamba, Falcon-Mamba and Mamba-2 mixers (and the Mamba-2 copies of Bamba,
Granite-MoE-hybrid and Zamba2) on bk's fused path (bk_kernels/nn/mamba.py): the mixer owns A_log
and D (Mamba-2: and dt_bias) and hands conv1d.weight (Mamba: and dt_proj.weight) to its scan
itself, so it took the generic path (the whole mixer recomputed per example). Against one backward per
example in float64, at B = 1 and 4: transformers casts A_log, D and dt_proj's bias to float32
even in a float64 model, so only a power-of-two batch scales the mean loss's gradient without
rounding differently from the reference (as test_models_zoo's docstring says for RMSNorm)."""
import copy

import pytest
import torch
import torch.nn.functional as F

import bk_kernels as bk
from python_tests.model_reference import per_example_grads
from python_tests.test_models import check_model

transformers = pytest.importorskip("transformers")
DT = torch.float64
VOCAB, T = 37, 7
NAMES = ["mamba", "falcon_mamba", "mamba2"]
HYBRID = dict(vocab_size=VOCAB, hidden_size=16, num_attention_heads=2, num_key_value_heads=1, intermediate_size=24,
              num_hidden_layers=2, use_cache=False)
MAMBA2 = dict(mamba_n_heads=4, mamba_d_head=8, mamba_n_groups=2, mamba_d_state=4, mamba_d_conv=3, mamba_expand=2,
              mamba_chunk_size=4)  # chunk 4 < T = 7: two chunks, the second padded


def _model(name, use_cache=False):
    torch.manual_seed(0)
    if name in ("mamba", "falcon_mamba"):
        prefix = {"mamba": "Mamba", "falcon_mamba": "FalconMamba"}[name]
        config = getattr(transformers, f"{prefix}Config")(vocab_size=VOCAB, hidden_size=16, state_size=4,
                                                          num_hidden_layers=2, expand=2, conv_kernel=3,
                                                          use_mambapy=False, use_cache=use_cache)
        return getattr(transformers, f"{prefix}ForCausalLM")(config).to(DT).train()
    if name == "mamba2":
        config = transformers.Mamba2Config(vocab_size=VOCAB, hidden_size=16, state_size=4, num_hidden_layers=2,
                                           expand=2, num_heads=4, head_dim=8, n_groups=2, conv_kernel=3, chunk_size=4,
                                           use_cache=use_cache)
        return transformers.Mamba2ForCausalLM(config).to(DT).train()
    if name == "bamba":
        config = transformers.BambaConfig(**HYBRID, attn_layer_indices=[1], **MAMBA2)
        return transformers.BambaForCausalLM(config).to(DT).train()
    if name == "granitemoehybrid":
        config = transformers.GraniteMoeHybridConfig(**HYBRID, layer_types=["mamba", "attention"], num_local_experts=4,
                                                     num_experts_per_tok=2, shared_intermediate_size=24, **MAMBA2)
        return transformers.GraniteMoeHybridForCausalLM(config).to(DT).train()
    if name.startswith("falcon_h1"):  # muP multipliers (not 1) around in_proj; gated RMSNorm or SiLU gate
        config = transformers.FalconH1Config(**HYBRID, head_dim=8, mamba_d_ssm=32, mamba_rms_norm=name.endswith("norm"),
                                             ssm_in_multiplier=0.7, ssm_multipliers=[0.5, 1.5, 0.8, 1.2, 0.9],
                                             **MAMBA2)
        return transformers.FalconH1ForCausalLM(config).to(DT).train()
    assert name == "zamba2"
    config = transformers.Zamba2Config(**HYBRID, layers_block_type=["mamba", "hybrid"], mamba_d_state=4, mamba_d_conv=3,
                                       mamba_expand=2, mamba_ngroups=2, n_mamba_heads=4, chunk_size=4, num_mem_blocks=1)
    return transformers.Zamba2ForCausalLM(config).to(DT).train()


def _mixers(model):
    return [m for m in model.modules() if type(m).__name__ in ("MambaMixer", "FalconMambaMixer", "Mamba2Mixer",
                                                                 "BambaMixer", "GraniteMoeHybridMambaLayer",
                                                                 "Zamba2MambaMixer", "FalconH1Mixer")]


def _batch(B, padded):
    ids = torch.randint(2, VOCAB, (B, T))
    lengths = torch.tensor([T - b % 3 for b in range(B)]) if padded else torch.full((B,), T)
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    return {"ids": ids.masked_fill(mask == 0, 1), "mask": mask}


def lm_loss(model, batch):
    """Next-token loss over each example's own tokens (padding masked in the model and the loss)."""
    ids, mask = batch["ids"], batch["mask"]
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    tokens = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view(len(ids), T - 1)
    kept = mask[:, 1:].to(tokens.dtype)
    return (tokens * kept).sum(1) / kept.sum(1)


def _median_norm(model, inputs):
    grads = per_example_grads(model, lm_loss, inputs)
    norms = sorted(sum(g.square().sum() for g in ex.values()).sqrt().item() for ex in grads)
    return norms[len(norms) // 2]


def _generic_types(model):
    return {t for _, t, _ in bk.generic_modules(bk.convert(copy.deepcopy(model)))}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("B", [1, 4])
@pytest.mark.parametrize("padded", [False, True])
def test_mixer_is_fused_and_exact(name, B, padded):
    model = _model(name)
    inputs = _batch(B, padded)
    generic = _generic_types(model)
    assert all(t.endswith(("RMSNorm", "RMSNormGated")) for t in generic), generic  # only the norms
    check_model(model, lm_loss, inputs, style="all-layer", backend="cpu", R=_median_norm(model, inputs))


@pytest.mark.parametrize("name", NAMES)
def test_frozen_scan_parameters(name):
    """A_log, D and dt_proj's bias (Mamba-2: dt_bias) frozen: the mixer's own forward still runs
    (it reads conv1d.weight, and Mamba's dt_proj.weight, itself, which train) and trains them
    exactly."""
    model = _model(name)
    for mixer in _mixers(model):
        for p in (mixer.A_log, mixer.D, mixer.dt_proj.bias if name != "mamba2" else mixer.dt_bias):
            p.requires_grad_(False)
    inputs = _batch(4, padded=True)
    check_model(model, lm_loss, inputs, style="layer-wise", backend="cpu", R=0.05)


@pytest.mark.parametrize("name", NAMES)
def test_private_forward_is_transformers_forward(name):
    model = _model(name)
    inputs = _batch(3, padded=True)
    want = model(input_ids=inputs["ids"], attention_mask=inputs["mask"]).logits
    private = bk.convert(copy.deepcopy(model))
    bk.PrivacyEngine(private, batch_size=3, sample_size=30, noise_multiplier=0.0, max_grad_norm=1.0).attach(
        torch.optim.SGD(private.parameters(), lr=0.0))
    got = private(input_ids=inputs["ids"], attention_mask=inputs["mask"]).logits
    assert all(isinstance(m, bk.nn.BKLayer) for m in _mixers(private))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_a_mixer_with_another_forward_keeps_the_generic_path():
    """A class named MambaMixer whose forward is not the one bk's copy reads: generic, and exact."""
    from transformers.models.mamba import modeling_mamba

    class MambaMixer(modeling_mamba.MambaMixer):
        def forward(self, hidden_states, cache=None, attention_mask=None, **kwargs):
            return super().forward(hidden_states, cache=cache, attention_mask=attention_mask, **kwargs) * 0.5

    MambaMixer.__module__ = modeling_mamba.__name__
    model = _model("mamba")
    for layer in model.backbone.layers:
        layer.mixer.__class__ = MambaMixer
    assert "MambaMixer" in _generic_types(model)
    report = bk.verify(model, lambda m, b: lm_loss(m, b).mean(), _batch(4, padded=False))
    assert report.ok, report


def test_empty_batch_takes_a_noise_only_step():
    model = bk.convert(_model("mamba"))
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    engine = bk.PrivacyEngine(model, batch_size=4, sample_size=40, noise_multiplier=1.0, max_grad_norm=1.0, seed=0)
    engine.attach(optimizer)
    before = [p.detach().clone() for p in model.parameters()]
    lm_loss(model, _batch(0, padded=False)).sum().backward()
    optimizer.step()
    assert engine.steps == 1
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


@pytest.mark.parametrize("name", ["bamba", "granitemoehybrid", "zamba2", "falcon_h1", "falcon_h1_norm"])
def test_mamba2_copies_in_hybrid_models(name):
    """Bamba, Granite-MoE-hybrid (Granite 4) and Zamba2 copy Mamba2Mixer's forward, Falcon-H1 adds
    muP multipliers around in_proj and gates by SiLU where it has no gated RMSNorm: the same
    book-kept mixer; padded batch, B = 4, under bk.verify."""
    model = _model(name)
    assert _mixers(model)
    generic = _generic_types(model)
    assert not generic & {"BambaMixer", "GraniteMoeHybridMambaLayer", "Zamba2MambaMixer", "FalconH1Mixer"}, generic
    report = bk.verify(model, lambda m, b: lm_loss(m, b).mean(), _batch(4, padded=True))
    assert report.ok, report
    assert report.update_error < 1e-12, report


@pytest.mark.parametrize("name", NAMES)
def test_eval_mode_prefill_into_a_cache(name):
    """In eval mode (bk.verify's copies; users who train in eval mode for no dropout) transformers
    makes a cache (use_cache on by default) and the mixers fill it: the prefill is book-kept (it
    was refused at the backward), its cache filled as transformers fills it."""
    model = _model(name, use_cache=True).eval()
    report = bk.verify(model, lambda m, b: lm_loss(m, b).mean(), _batch(4, padded=True))
    assert report.ok, report
    assert report.update_error < 1e-12, report
    inputs = _batch(2, padded=False)
    private = bk.convert(copy.deepcopy(model))
    bk.PrivacyEngine(private, batch_size=2, sample_size=20, noise_multiplier=0.0, max_grad_norm=1.0).attach(
        torch.optim.SGD(private.parameters(), lr=0.0))
    want, got = (m(input_ids=inputs["ids"], use_cache=True).cache for m in (model, private))
    assert got is not want
    for i in range(model.config.num_hidden_layers):
        assert isinstance(got.get_conv_state(i), torch.Tensor) and isinstance(got.get_recurrent_state(i), torch.Tensor)
        torch.testing.assert_close(got.get_conv_state(i), want.get_conv_state(i), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got.get_recurrent_state(i), want.get_recurrent_state(i), rtol=1e-12, atol=1e-12)
