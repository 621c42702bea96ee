"""transformers' gated delta nets (Qwen3-Next's fused projections, Qwen 3.5's separate ones,
OLMo-hybrid's q/k/v/b/a/g projections) on
bk's fused path (bk_kernels/nn/gated_delta_net.py): the layer owns A_log and dt_bias and hands
conv1d.weight to its convolution itself, so the whole linear-attention layer was recomputed per
example. Against one backward per example in float64 at B = 1 and 4 (see test_mamba.py on B)."""
import copy

import pytest
import torch

import bk_kernels as bk
from python_tests.test_mamba import _batch, _generic_types, _median_norm, lm_loss
from python_tests.test_models import check_model

transformers = pytest.importorskip("transformers")
DT = torch.float64
NAMES = ["qwen3_next", "qwen3_5", "olmo_hybrid", "olmo_hybrid_neg"]


def _model(name, use_cache=False):
    common = dict(vocab_size=37, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=8, linear_key_head_dim=8, linear_value_head_dim=4,
                  linear_num_key_heads=2, linear_num_value_heads=4, linear_conv_kernel_dim=3,
                  layer_types=["linear_attention", "full_attention"], use_cache=use_cache)
    torch.manual_seed(0)
    if name == "qwen3_next":
        config = transformers.Qwen3NextConfig(**common, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
                                              shared_expert_intermediate_size=8, experts_implementation="eager")
        return transformers.Qwen3NextForCausalLM(config).to(DT).train()
    if name.startswith("olmo_hybrid"):  # q/k/v/b/a/g projections; beta doubled where eigenvalues may be negative
        common = dict(common, linear_num_value_heads=2, linear_value_head_dim=8,
                      linear_allow_neg_eigval=name.endswith("neg"), pad_token_id=0)
        return transformers.OlmoHybridForCausalLM(transformers.OlmoHybridConfig(**common)).to(DT).train()
    config = transformers.Qwen3_5TextConfig(**common)
    return transformers.Qwen3_5ForCausalLM(config).to(DT).train()


def _delta_nets(model):
    return [m for m in model.modules() if type(m).__name__.endswith("GatedDeltaNet")]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("B", [1, 4])
@pytest.mark.parametrize("padded", [False, True])
def test_gated_delta_net_is_fused_and_exact(name, B, padded):
    model = _model(name)
    assert _delta_nets(model)
    inputs = _batch(B, padded)
    generic = _generic_types(model)
    assert not any(t.endswith("GatedDeltaNet") for t in generic), generic
    check_model(model, lm_loss, inputs, style="all-layer", backend="cpu", R=_median_norm(model, inputs))


@pytest.mark.parametrize("name", NAMES)
def test_frozen_decay_parameters(name):
    """A_log and dt_bias frozen: the layer's forward still runs (conv1d trains through it)."""
    model = _model(name)
    for net in _delta_nets(model):
        net.A_log.requires_grad_(False)
        net.dt_bias.requires_grad_(False)
    check_model(model, lm_loss, _batch(4, padded=True), style="layer-wise", backend="cpu", R=0.05)


@pytest.mark.parametrize("name", NAMES)
def test_eval_mode_prefill_into_a_cache(name):
    model = _model(name, use_cache=True).eval()
    report = bk.verify(model, lambda m, b: lm_loss(m, b).mean(), _batch(4, padded=True))
    assert report.ok and report.update_error < 1e-12, report
    inputs = _batch(2, padded=False)
    private = bk.convert(copy.deepcopy(model))
    bk.PrivacyEngine(private, batch_size=2, sample_size=20, noise_multiplier=0.0, max_grad_norm=1.0).attach(
        torch.optim.SGD(private.parameters(), lr=0.0))
    outputs = [m(input_ids=inputs["ids"], use_cache=True) for m in (model, private)]
    torch.testing.assert_close(outputs[1].logits, outputs[0].logits, rtol=1e-12, atol=1e-12)
    want, got = (out.past_key_values for out in outputs)
    assert isinstance(got.get_recurrent_state(0), torch.Tensor)
    torch.testing.assert_close(got.get_conv_state(0), want.get_conv_state(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.get_recurrent_state(0), want.get_recurrent_state(0), rtol=1e-12, atol=1e-12)


def test_packed_sequences_are_left_to_transformers():
    """Packed sequences (cu_seq_lens_q): transformers' torch delta rule cannot keep them apart and
    its wrapper says so; bk's forward, which calls the unwrapped rule, must not run them silently."""
    model = bk.convert(_model("qwen3_5"))
    bk.PrivacyEngine(model, batch_size=1, sample_size=10, noise_multiplier=0.0, max_grad_norm=1.0).attach(
        torch.optim.SGD(model.parameters(), lr=0.0))
    net = _delta_nets(model)[0]
    x = torch.randn(1, 6, 16, dtype=DT)
    with pytest.raises(ValueError, match="packed sequences"):
        net(x, cu_seq_lens_q=torch.tensor([0, 3, 6]))
