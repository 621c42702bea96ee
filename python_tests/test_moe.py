"""Mixture-of-experts layers: transformers' experts classes on the BK path (bk/nn/moe.py), and
the routers that feed them, against one backward per example in float64."""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bk_kernels as bk
from bk_kernels.nn.moe import ExpertsMixin
from python_tests import zoo
from python_tests.model_reference import expected_update
from python_tests.test_models import check_model

transformers = pytest.importorskip("transformers")
DT = torch.float64
BACKENDS = ["cpu", "torch"]


class MoEBlock(nn.Module):
    """[B, T, d] -> rows -> router -> experts -> [B, T, d] -> a classifier: an HF experts class and
    its router, as an HF sparse-MoE block calls them."""

    def __init__(self, router, experts, d):
        super().__init__()
        self.inp, self.router, self.experts, self.head = nn.Linear(3, d), router, experts, nn.Linear(d, 2)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        rows = h.reshape(-1, h.shape[-1])
        _, weights, index = self.router(rows)
        out = self.experts(rows, index, weights).view(h.shape)
        return self.head((h + out).mean(1))


def _loss(model, batch):
    return F.cross_entropy(model(batch["x"]), batch["y"], reduction="none")


def _inputs(B, T=5):
    return {"x": torch.randn(B, T, 3, dtype=DT), "y": torch.randint(0, 2, (B,))}


def _gpt_oss_block():
    """GPT-OSS's experts: weights stored transposed ([E, d, p]), biases, an interleaved gate
    with clamping (its own _apply_gate)."""
    from transformers.models.gpt_oss import modeling_gpt_oss as m

    config = transformers.GptOssConfig(hidden_size=8, intermediate_size=6, num_local_experts=4, num_experts_per_tok=2)
    config._experts_implementation = "eager"
    block = MoEBlock(m.GptOssTopKRouter(config), m.GptOssExperts(config), 8)
    for p in block.parameters():
        nn.init.normal_(p, std=0.5)
    return block.to(DT)


def _nemotron_block():
    """NemotronH's experts: no gate (up_proj, an activation, down_proj); GPT-OSS's router (Mixtral's
    computes its softmax in float32, whose rounding would show at this test's 1e-9)."""
    from transformers.models.gpt_oss import modeling_gpt_oss as gpt_oss
    from transformers.models.nemotron_h import modeling_nemotron_h as m

    config = transformers.NemotronHConfig(hidden_size=8, moe_intermediate_size=6, n_routed_experts=4,
                                          num_experts_per_tok=2, mlp_hidden_act="relu2")
    config._experts_implementation = "eager"
    router = gpt_oss.GptOssTopKRouter(transformers.GptOssConfig(hidden_size=8, num_local_experts=4,
                                                                num_experts_per_tok=2))
    block = MoEBlock(router, m.NemotronHExperts(config), 8)
    for p in block.parameters():
        nn.init.normal_(p, std=0.5)
    return block.to(DT)


BLOCKS = {"gpt_oss": _gpt_oss_block, "nemotron_h": _nemotron_block}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B", [1, 3, 4])
@pytest.mark.parametrize("name", BLOCKS)
def test_experts_are_exact(name, B, backend):
    torch.manual_seed(B)
    block = BLOCKS[name]()
    assert isinstance(bk.convert(copy.deepcopy(block)).experts, ExpertsMixin)
    check_model(block, _loss, _inputs(B), style="all-layer", backend=backend)


@pytest.mark.parametrize("name", BLOCKS)
def test_experts_layer_wise_and_frozen_router(name):
    torch.manual_seed(0)
    block = BLOCKS[name]()
    check_model(block, _loss, _inputs(4), style="layer-wise", backend="cpu")
    block.router.requires_grad_(False)
    check_model(block, _loss, _inputs(4), style="all-layer", backend="cpu")


def test_experts_no_engine_gives_the_ordinary_gradients():
    """Forward under an engine, backward after it is detached: plain summed gradients, as the
    unconverted module's."""
    torch.manual_seed(0)
    block = _gpt_oss_block()
    private = bk.convert(copy.deepcopy(block))
    engine = bk.PrivacyEngine(private, batch_size=4, sample_size=40, noise_multiplier=0.0)
    inputs = _inputs(4)
    loss = _loss(private, inputs).sum()
    engine.detach()
    loss.backward()
    _loss(block, inputs).sum().backward()
    for (name, p), q in zip(block.named_parameters(), private.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-12, atol=1e-12, msg=name)


def test_experts_take_the_bk_path_in_real_models():
    """The experts of a real Mixtral are bk layers (not the generic path, which would hold B copies
    of every expert's gradient); the zoo checks them exact (test_models_zoo.py)."""
    model = bk.convert(zoo.mixtral())
    experts = [m for n, m in model.named_modules() if n.endswith("mlp.experts")]
    assert experts and all(isinstance(m, ExpertsMixin) for m in experts)
    assert not [path for path, _, _ in bk.generic_modules(model) if "experts" in path]


class _InterleavedRouter(nn.Module):
    """A router whose weights come from rows folded position-major: row r is example r % B's."""

    def __init__(self, d, experts=4):
        super().__init__()
        self.proj = nn.Linear(d, experts)

    def forward(self, rows, B):
        logits = self.proj(rows.view(B, -1, rows.shape[-1]).transpose(0, 1).reshape(rows.shape))
        weights, index = logits.softmax(-1).topk(2, dim=-1)
        return logits, weights, index


def test_routing_weights_that_mix_examples_are_refused_in_the_forward():
    from transformers.models.mixtral import modeling_mixtral as m

    config = transformers.MixtralConfig(hidden_size=8, intermediate_size=6, num_local_experts=4,
                                        num_experts_per_tok=2)
    config._experts_implementation = "eager"
    experts = m.MixtralExperts(config)
    nn.init.normal_(experts.gate_up_proj)
    nn.init.normal_(experts.down_proj)

    class Block(MoEBlock):
        def forward(self, x):
            rows = torch.tanh(self.inp(x)).reshape(-1, 8)
            _, weights, index = self.router(rows, x.shape[0])
            return self.head(self.experts(rows, index, weights).view(x.shape[0], -1, 8).mean(1))

    router = _InterleavedRouter(8).requires_grad_(False)  # frozen: its own layer does not refuse first
    model = bk.convert(Block(router, experts, 8).to(DT))
    engine = bk.PrivacyEngine(model, batch_size=4, sample_size=40, noise_multiplier=1.0)
    opt = engine.attach(torch.optim.SGD(model.parameters(), lr=1.0))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(bk.UnsupportedLayoutError, match=r"MixtralExperts \(experts\).*shape \(20, 2\)"):
        model(_inputs(4)["x"])
    with pytest.raises(RuntimeError, match="without a backward"):
        opt.step()
    assert engine.steps == 0 and all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


class _FlattenGate(nn.Module):
    """A module on the generic path that flattens its [B, T, d] input into rows (DeepSeek's
    router does): example-major, or position-major (interleaved) when asked."""

    def __init__(self, d, interleave):
        super().__init__()
        self.scale, self.interleave = nn.Parameter(torch.ones(d, dtype=DT)), interleave

    def forward(self, h):
        h = h.transpose(0, 1) if self.interleave else h
        return (h * self.scale).reshape(-1, h.shape[-1])


class _FlattenModel(nn.Module):
    def __init__(self, interleave):
        super().__init__()
        self.inp, self.gate, self.out = nn.Linear(3, 4), _FlattenGate(4, interleave), nn.Linear(4, 2)

    def forward(self, x):
        rows = self.gate(torch.tanh(self.inp(x)))
        return self.out(rows).view(x.shape[0], -1, 2).mean(1)


def test_generic_module_flattening_its_batch_into_rows():
    """[B, T, d] in, [B*T, d] out: example-major rows are exact; rows in another order are refused
    in the forward (each example's recompute must reproduce its rows), before the layers after
    the module read them."""
    torch.manual_seed(0)
    check_model(_FlattenModel(False).to(DT), _loss, _inputs(3), style="all-layer", backend="cpu")
    model = bk.convert(_FlattenModel(True).to(DT))
    engine = bk.PrivacyEngine(model, batch_size=3, sample_size=30, noise_multiplier=1.0)
    engine.attach(torch.optim.SGD(model.parameters(), lr=1.0))
    with pytest.raises(bk.nn.generic.GenericError, match=r"_FlattenGate \(gate\).*\[\(15, 4\)\].*example-major"):
        model(_inputs(3)["x"])
    assert engine.steps == 0 and engine.epsilon() == 0


@pytest.mark.parametrize("B", [4, 5])
def test_deepseek_v3_under_verify(B):
    """DeepSeek-V3's router flattens its [B, T, d] input itself (checked in the forward) and casts
    its input and weight to float32 even in a float64 model, so bk and the one-backward-per-example
    reference agree to float32 rounding (measured: update within 8e-8 at B = 4, 2.4e-7 at B = 6),
    not to the zoo's 1e-9: checked here with bk.verify's 1e-6."""
    torch.manual_seed(B)
    model = zoo.deepseek_v3()
    batch = zoo.ids_batch(B)
    report = bk.verify(model, lambda m, b: zoo.causal_lm(m, b).mean(), batch)
    assert report.ok, str(report)
    generic = [path for path, _, _ in report.generic_modules]
    assert any(path.endswith("mlp.gate") for path in generic) and not any("experts" in path for path in generic)


@pytest.mark.parametrize("frozen", [None, "router", "shared_expert"])
@pytest.mark.parametrize("B", [1, 3, 8])
def test_llama4_moe_under_verify(B, frozen):
    """Llama 4's MoE sends every token to every expert ([E * tokens, d] copies scaled by the router
    scores, one bmm per projection): the block runs with the experts on the BK path, each
    (expert, example) group all of the example's tokens. Refused before as a generic module on
    rows it could not split per example. The router's sigmoid runs in float32 inside the
    float64 model, hence bk.verify's 1e-6 (as DeepSeek-V3's)."""
    torch.manual_seed(B)
    model = zoo.llama4()
    for layer in model.model.layers if frozen else ():
        getattr(layer.feed_forward, frozen).requires_grad_(False)
    report = bk.verify(model, lambda m, b: zoo.causal_lm(m, b).mean(), zoo.ids_batch(B))
    assert report.ok, str(report)
    assert [t for _, t, _ in report.generic_modules] == ["Llama4TextRMSNorm"] * len(report.generic_modules)


def test_minimax_m3_clamped_swiglu_shared_expert_under_verify():
    """MiniMax-M3's shared expert runs a clamped SwiGLU on the chunks of one projection of the
    [tokens, d] rows (chunk, clamp, sigmoid): its down projection was refused as rows folded in
    an unknown order until folded_rows followed chunks along the features and the clamps."""
    config = transformers.AutoConfig.for_model(
        "minimax_m3_vl_text", vocab_size=64, hidden_size=16, intermediate_size=8, dense_intermediate_size=24,
        shared_intermediate_size=8, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
        rotary_dim=4, num_local_experts=4, num_experts_per_tok=2, mlp_layer_types=["dense", "sparse"],
        layer_types=["full_attention"] * 2, max_position_embeddings=32, swiglu_limit=0.5, use_cache=False)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    report = bk.verify(model, lambda m, b: m(input_ids=b[0], labels=b[0]).loss, (torch.randint(0, 64, (3, 8)),))
    assert report.ok, str(report)
    assert {t for _, t, _ in report.generic_modules} <= {"MiniMaxM3VLRMSNorm", "MiniMaxM3VLTopKRouter"}


def test_llama4_experts_called_outside_their_block_are_refused():
    model = bk.convert(zoo.llama4())
    engine = bk.PrivacyEngine(model, batch_size=2, sample_size=20, noise_multiplier=1.0, max_grad_norm=1.0)
    experts = model.model.layers[0].feed_forward.experts
    model.register_forward_pre_hook(lambda m, args: experts(torch.randn(8, 16, dtype=DT)))
    with pytest.raises(bk.UnsupportedLayoutError, match="Llama4TextMoe"):
        model(zoo.ids_batch(2)["ids"])
    assert engine.steps == 0


@pytest.mark.parametrize("B", [3, 8])
def test_afmoe_routing_weights_gathered_by_the_top_k_ids(B):
    """AFMoE's router picks its experts by top-k of the biased sigmoid scores and gathers the
    weights with those ids (`scores.gather(1, ids)`): refused before as folding rows in an
    unknown order ((tokens, k) weights), now followed as row-wise (a gather along dim 1 with one
    index row per input row). B = 8 is also the sequence length. The router computes in float32
    inside the float64 model: update within 3.5e-7 at B = 3 (bk.verify's 1e-6), as DeepSeek-V3's."""
    config = transformers.AfmoeConfig(vocab_size=64, hidden_size=16, intermediate_size=32, moe_intermediate_size=8,
                                      num_hidden_layers=2, num_dense_layers=1, num_attention_heads=2,
                                      num_key_value_heads=1, head_dim=8, num_experts=4, num_experts_per_tok=2,
                                      num_shared_experts=1, use_cache=False)
    torch.manual_seed(B)
    model = transformers.AutoModelForCausalLM.from_config(config)
    ids = torch.randint(0, 64, (B, 8))
    report = bk.verify(model, lambda m, b: m(input_ids=b[0], labels=b[0]).loss, (ids,))
    assert report.ok, str(report)
    assert not any("experts" in path for path, _, _ in report.generic_modules)


def test_converted_moe_model_pickles():
    """torch.save of a whole converted model: the experts' bk class is found by pickle (it was
    not: made without a name in its module)."""
    import io

    model = bk.convert(zoo.mixtral())
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert isinstance(loaded.model.layers[0].mlp.experts, ExpertsMixin)


@pytest.mark.parametrize("name", BLOCKS)
def test_an_empty_batch_through_the_experts_is_a_noise_only_step(name):
    """An empty Poisson batch: no row reaches any expert; the step still adds noise and counts."""
    torch.manual_seed(0)
    model = bk.convert(BLOCKS[name]())
    engine = bk.PrivacyEngine(model, batch_size=4, sample_size=40, noise_multiplier=1.0, seed=3)
    opt = engine.attach(torch.optim.SGD(model.parameters(), lr=1.0))
    before = [p.detach().clone() for p in model.parameters()]
    _loss(model, _inputs(0)).mean().backward()  # a nan mean over no examples: no gradient at all
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())
    opt.step()
    assert engine.steps == 1
    for p, b in zip(model.parameters(), before):
        moved = p.detach() - b
        assert torch.isfinite(moved).all() and (moved != 0).all()  # noise, and nothing else


def _phimoe(seed):
    config = transformers.PhimoeConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                       num_experts_per_tok=2, attention_dropout=0.0, use_cache=False)
    config._experts_implementation = "eager"  # grouped_mm takes no float64
    torch.manual_seed(seed)
    return transformers.PhimoeForCausalLM(config).to(DT)


@pytest.mark.parametrize("B", [1, 4])
def test_phimoe_sparsemixer_under_verify(B):
    """PhiMoE's sparsemixer masks the router's scores (masked_fill), scatters -inf over the first
    pick and gathers each pick's softmax weight: refused before as rows folded in an unknown
    order (masked_fill was not known to keep rows apart). In eval mode (bk.verify's) its picks
    are the top two."""
    model = _phimoe(B)
    ids = torch.randint(0, 50, (B, 6), generator=torch.Generator().manual_seed(B))
    report = bk.verify(model, lambda m, b: m(input_ids=b[0], labels=b[0]).loss, (ids,))
    assert report.ok, str(report)
    assert not report.generic_modules


@pytest.mark.parametrize("R", [0.05, 100.0])
def test_phimoe_in_training_mode_is_exact_against_its_own_sampled_forward(R):
    """In training mode PhiMoE samples its experts (Gumbel noise) and its routing weight's
    backward is its own autograd Function (PhimoeMultiplier: a straight-through estimate that
    reaches the scores row by row). bk.verify cannot replay the sampling, so the reference is
    one backward per example through ONE sampled forward (the same seed for bk's): the clipped
    sum bk adds must equal the sum of those per-example gradients, each clipped."""
    from bk_kernels.hf import example_losses

    B, T = 4, 6
    reference, model = _phimoe(0).train(), bk.convert(_phimoe(0).train())
    ids = torch.randint(0, 50, (B, T), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(7)
    losses = example_losses(reference(input_ids=ids).logits, ids, causal=True)
    named = list(reference.named_parameters())
    grads = []
    for b in range(B):
        g = torch.autograd.grad(losses[b], [p for _, p in named], retain_graph=True, allow_unused=True)
        grads.append({n: x if x is not None else torch.zeros_like(p) for (n, p), x in zip(named, g)})
    norms = [math.sqrt(sum(x.square().sum().item() for x in g.values())) for g in grads]
    assert all(n > R for n in norms) if R < 1 else all(n < R for n in norms)  # the small R clips every example
    want = expected_update(grads, [list(grads[0])], R, "abadi", batch_size=1)  # minus the sum of the clipped
    engine = bk.PrivacyEngine(model, batch_size=B, sample_size=100, noise_multiplier=0.0, max_grad_norm=R)
    torch.manual_seed(7)
    example_losses(model(input_ids=ids).logits, ids, causal=True).mean().backward()
    assert engine._ready_for_step
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, -want[name], rtol=1e-9, atol=1e-12, msg=name)


class _OwnRowFunction(torch.autograd.Function):
    """A routing weight through an autograd Function bk does not know: it cannot tell whether its
    backward keeps rows apart."""

    @staticmethod
    def forward(ctx, x):
        return x * 1.0

    @staticmethod
    def backward(ctx, grad):
        return grad


def test_routing_weights_through_an_unknown_autograd_function_are_refused():
    from transformers.models.mixtral import modeling_mixtral as m

    config = transformers.MixtralConfig(hidden_size=8, intermediate_size=6, num_local_experts=4,
                                        num_experts_per_tok=2)
    config._experts_implementation = "eager"

    class Router(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 4)

        def forward(self, rows):
            weights, index = self.proj(rows).softmax(-1).topk(2, dim=-1)
            return None, _OwnRowFunction.apply(weights), index

    block = bk.convert(MoEBlock(Router(), m.MixtralExperts(config), 8).to(DT))
    engine = bk.PrivacyEngine(block, batch_size=2, sample_size=20, noise_multiplier=0.0)
    with pytest.raises(bk.UnsupportedLayoutError, match="MixtralExperts"):
        block(_inputs(2)["x"])
    assert engine.steps == 0


@pytest.mark.parametrize("name", ["Mixtral", "Qwen2Moe", "Qwen3Moe", "Olmoe"])
def test_top_k_routers_are_linear_maps_not_the_generic_path(name):
    """transformers' top-k routers of these forms are book-kept as bk linear maps of the tokens'
    rows (nn/hf_router.py): exact, and nothing left on the generic path."""
    import transformers
    extra = dict(num_local_experts=4) if name == "Mixtral" else dict(num_experts=4, moe_intermediate_size=12)
    if name == "Qwen2Moe":
        extra.update(shared_expert_intermediate_size=12)
    config = getattr(transformers, f"{name}Config")(
        vocab_size=zoo.VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32, num_experts_per_tok=2, **extra)
    config._experts_implementation = "eager"
    torch.manual_seed(0)
    model = getattr(transformers, f"{name}ForCausalLM")(config).to(DT)
    converted = bk.convert(copy.deepcopy(model))
    assert not bk.generic_modules(converted)
    assert any(type(m).__name__.endswith("TopKRouter") and isinstance(m, bk.nn.hf_router._HFTopKRouter)
               for m in converted.modules())
    ids = torch.randint(0, zoo.VOCAB, (4, 6), generator=torch.Generator().manual_seed(1))
    from bk_kernels.hf import example_losses
    report = bk.verify(model, lambda m, b: example_losses(m(input_ids=b[0]).logits, b[0], True).mean(), (ids,))
    assert report.ok and report.update_error < 1e-9, str(report)
