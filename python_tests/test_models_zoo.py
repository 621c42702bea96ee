"""Real model code as its users write it: tiny configs of transformers, timm and peft classes
(python_tests/zoo.py), converted with bk.convert and stepped once privately, against one
backward per example in float64 (noise 0, R below most per-example norms so examples clip).

B = 4 (a power of two) on purpose: HF's LLM RMSNorm classes compute in float32 even in a
float64 model, so a mean-reduced loss (the gradient scaled by 1/B) rounds differently in
float32 from the per-example reference's unscaled one unless 1/B is exact. With B = 3 the
difference is 1e-7 relative for Llama, and it is there for the non-private batched gradient
too (measured; see the note in the README's model table).
"""
import copy

import pytest
import torch

import bk_kernels as bk
from python_tests import zoo
from python_tests.model_reference import per_example_grads
from python_tests.test_models import check_model

pytest.importorskip("transformers")
pytest.importorskip("timm")
pytest.importorskip("peft")

EXACT = list(zoo.ZOO)
B = 4


def _build(name):
    build, loss, batch = zoo.ZOO[name]
    torch.manual_seed(0)
    model = build()
    model.train()
    return model, loss, batch(B)


def _median_norm(model, loss, inputs):
    """R at the median per-example norm, so that about half of the examples are clipped."""
    grads = per_example_grads(model, loss, inputs)
    norms = sorted(sum(g.double().square().sum() for g in ex.values()).sqrt().item() for ex in grads)
    return norms[len(norms) // 2]


@pytest.mark.parametrize("name", EXACT)
def test_full_fine_tuning_is_exact(name):
    model, loss, inputs = _build(name)
    check_model(model, loss, inputs, style="all-layer", backend="cpu", R=_median_norm(model, loss, inputs))


# Models whose folds, made from a frozen first half, have no gradient history to prove them by:
# refused (test_folds_without_gradient_history_are_refused).
NO_HISTORY_FOLDS = ["hf_mobilevit_bn_replaced", "hf_timesformer"]


@pytest.mark.parametrize("name", [n for n in EXACT if not n.startswith(("lora", "peft")) and n not in NO_HISTORY_FOLDS])
def test_frozen_base_is_exact(name):
    """The first half of the parameters frozen (embeddings, early blocks): what remains trains
    exactly, and frozen layers keep no activations for their weights."""
    model, loss, inputs = _build(name)
    params = [p for p in model.parameters()]
    for p in params[: len(params) // 2]:
        p.requires_grad_(False)
    check_model(model, loss, inputs, style="all-layer", backend="cpu", R=_median_norm(model, loss, inputs))


@pytest.mark.parametrize("name", ["gpt2", "llama", "hf_vit", "timm_vit"])
def test_layer_wise_clipping(name):
    model, loss, inputs = _build(name)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    converted = bk.convert(copy.deepcopy(model))
    engine = bk.PrivacyEngine(converted, batch_size=B, sample_size=40, noise_multiplier=0.0,
                              clipping_style="layer-wise")
    # The engine's units, by the names of the reference model (the same order of parameters).
    by_id = {id(p): n for n, p in zip(names, [p for p in converted.parameters() if p.requires_grad])}
    units = [[by_id[id(p)] for p in unit] for unit in engine._units]
    check_model(model, loss, inputs, style="layer-wise", backend="cpu", units=units, R=0.05)


def test_gpt2_reentrant_checkpointing_is_exact():
    model, loss, inputs = _build("gpt2")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    check_model(model, loss, inputs, style="all-layer", backend="cpu", R=_median_norm(model, loss, inputs))


def test_generic_path_modules_are_listed():
    model, _, _ = _build("timm_vit")
    generic = dict((path, n) for path, _, n in bk.generic_modules(bk.convert(model)))
    assert generic["<model>"] == model.cls_token.numel() + model.pos_embed.numel()  # the root owns them
    assert not any(path.endswith("ls1") for path in generic)  # timm's LayerScale: bk.nn.scale
    llama, _, _ = _build("llama")
    assert bk.generic_modules(bk.convert(llama)) == []  # LlamaRMSNorm: bk.nn.scale (nn/hf_rmsnorm.py)


@pytest.mark.parametrize("name", ["hf_convnextv2", "timm_convnextv2", "timm_bit", "timm_nf_resnet", "falcon", "falcon_new",
                                  "timm_maxvit", "timm_maxvit_rmlp", "timm_coatnet", "hf_bit", "hf_bit_bottleneck",
                                  "hf_poolformer"])
def test_convnextv2_and_weight_standardized_models_have_no_generic_module(name):
    """ConvNeXt-V2's Global Response Norm (bk.nn.scale and shift) and the weight-standardized
    convolutions of BiT and NF-ResNet (bk's Conv2d) were each recomputed per example before, as
    was every FalconLinear (nn.Linear with its own forward: 99.9% of a Falcon's Parameters).
    MaxViT's and CoAtNet's attention (relative position bias by table or MLP) were refused."""
    assert bk.generic_modules(bk.convert(_build(name)[0])) == []


@pytest.mark.parametrize("frozen_biases", [False, True])
def test_timm_eva02_recomputes_only_its_position_embedding(frozen_biases):
    """EvaAttention's q/v biases (added after the bk qkv Linear through shift) and EvaBlock's
    gamma_1/gamma_2 (bk.nn.scale) were recomputed per example; with the biases frozen the qkv
    weight still trains through bk (timm's F.linear would have read it unseen)."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    model, _, _ = _build("timm_eva02")
    assert model.blocks[0].gamma_1 is not None
    if frozen_biases:
        for block in model.blocks:
            block.attn.q_bias.requires_grad_(False)
            block.attn.v_bias.requires_grad_(False)
    converted = bk.convert(copy.deepcopy(model))
    assert [t for _, t, _ in bk.generic_modules(converted)] == ["Eva"]  # the root's _pos_embed
    report = bk.verify(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), (torch.randn(4, 3, 16, 16, dtype=torch.float64),
                                                                           torch.randint(0, 3, (4,))), rtol=1e-9)
    assert report.ok, str(report)


@pytest.mark.parametrize("name,frozen", [(name, frozen) for name in ["timm_cait", "timm_pit", "timm_volo"]
                                         for frozen in [None, "cls_token", "pos_embed"]] +
                         [("timm_visformer", None), ("timm_visformer", "pos_embed2"), ("timm_crossvit", None),
                          ("timm_crossvit", "cls_token_1"), ("timm_xcit", None), ("timm_xcit", "cls_token"),
                          ("timm_xcit", "pos_embed.token_projection.weight"), ("timm_convit", None),
                          ("timm_convit", "blocks.0.attn.gating_param"), ("timm_convit", "cls_token"),
                          ("timm_coat", None), ("timm_coat", "cls_token2"), ("timm_coat_lite", None)])
def test_timm_roots_owning_tokens_have_no_generic_module(name, frozen):
    """CaiT's, PiT's, VOLO's, Visformer's, CrossViT's, XCiT's, ConViT's and CoaT's roots own their class tokens and
    position embeddings and use them inline (forward_features, forward_cls, forward_tokens,
    _embed): the root, and
    so the whole model, was a per-example recompute (CaiT-XXS24 2.9x, PiT-Ti 2.8x non-private).
    Now they go through shifts; CaiT's layer scales through bk.nn.scale. PiT's and Visformer's
    position embeddings are [1, C, H, W], VOLO's [1, H, W, C]: shifts along every dim but the
    examples'."""
    import torch.nn.functional as F

    torch.manual_seed(3)
    model, _, inputs = _build(name)
    if frozen:
        model.get_parameter(frozen).requires_grad_(False)
    assert bk.generic_modules(bk.convert(copy.deepcopy(model))) == []
    report = bk.verify(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), (inputs["x"], inputs["y"]), rtol=1e-9)
    assert report.ok, str(report)


@pytest.mark.parametrize("frozen", [None, "relative_position_bias_table", "cls_token"])
def test_timm_beit_has_no_generic_module(frozen):
    """timm's BEiT: its attention (q/v biases, relative position table: one window), its blocks'
    layer scales and the root's cls_token / pos_embed (used inline in forward_features, which
    made the root, and so the whole model, a per-example recompute) are all book-kept."""
    import torch.nn.functional as F

    torch.manual_seed(3)
    model, _, _ = _build("timm_beit")
    assert model.blocks[0].gamma_1 is not None and model.blocks[0].attn.relative_position_bias_table is not None
    if frozen:
        for name, p in model.named_parameters():
            if name.endswith(frozen):
                p.requires_grad_(False)
    assert bk.generic_modules(bk.convert(copy.deepcopy(model))) == []
    report = bk.verify(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), (torch.randn(4, 3, 16, 16, dtype=torch.float64),
                                                                           torch.randint(0, 3, (4,))), rtol=1e-9)
    assert report.ok, str(report)


@pytest.mark.parametrize("name,prefix", [("hf_beit", "Beit"), ("hf_data2vec_vision", "Data2VecVision")])
def test_hf_beit_layers_scale_without_a_recompute(name, prefix):
    """HF BEiT's layers (lambda_1 / lambda_2 inline) were each recomputed per example, attention and
    MLP included; now only the relative position tables' lookups and the embeddings are.
    Data2VecVisionLayer (BEiT's older forward) likewise since session 15."""
    generic = {t for _, t, _ in bk.generic_modules(bk.convert(_build(name)[0]))}
    assert generic == {f"{prefix}Embeddings", f"{prefix}RelativePositionBias"}


@pytest.mark.parametrize("name", ["timm_swin", "hf_swin", "hf_swin_eager", "timm_swinv2", "hf_swinv2", "timm_swinv2_cr"])
@pytest.mark.parametrize("batch,frozen_table", [(4, False), (16, False), (4, True)])
def test_swin_window_attention_is_a_bk_layer(name, batch, frozen_table):
    """Swin (v1)'s window attention, timm's and transformers', adds its relative position bias
    through a bk Function ([B, rows, heads] per-example table gradients from each example's
    windows) and its projections are bk Linears on the windows folded from the examples: no
    per-example recompute. B = 16 is the first stage's window count (its shift mask [16, N, N]
    then has the batch's size). transformers' eager attention takes its softmax in float32.
    timm's and transformers' Swin-V2 (session 13; the generic path before): its per-head logit scale through a
    Function of its own, its position MLP's bias through the vector-Jacobian products of that
    MLP at each example's summed score gradients; frozen: the MLP and the logit scale."""
    import torch.nn.functional as F

    build, _, make_batch = zoo.ZOO[name.replace("_eager", "")]
    torch.manual_seed(1)
    model = build()
    if name.endswith("eager"):
        model.config._attn_implementation = "eager"
    if frozen_table:
        for m in model.modules():
            if hasattr(m, "relative_position_bias_table"):
                m.relative_position_bias_table.requires_grad_(False)
            for mlp in ("cpb_mlp", "continuous_position_bias_mlp", "meta_mlp"):
                if hasattr(m, mlp):
                    getattr(m, mlp).requires_grad_(False)
                    m.logit_scale.requires_grad_(False)
    assert bk.generic_modules(bk.convert(copy.deepcopy(model))) == []
    inputs = make_batch(batch)
    logits = (lambda m, x: m(x)) if name.startswith("timm") else (lambda m, x: m(pixel_values=x).logits)
    report = bk.verify(model, lambda m, b: F.cross_entropy(logits(m, b[0]), b[1]), (inputs["x"], inputs["y"]),
                       rtol=1e-9)
    assert report.ok, str(report)


class _Windows(torch.nn.Module):
    """One timm WindowAttention on 2 x 2 windows of an [B, 8, 8, 8] map, taken example-major or
    window-major (the examples' dim moved behind the windows' positions)."""

    def __init__(self, example_major):
        super().__init__()
        from timm.models.swin_transformer import WindowAttention

        self.example_major = example_major
        self.embed, self.attn = torch.nn.Linear(8, 8), WindowAttention(8, 2, window_size=2)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x):
        B = x.shape[0]
        grid = self.embed(x).view(B, 4, 2, 4, 2, 8)
        order = (0, 1, 3, 2, 4, 5) if self.example_major else (1, 3, 0, 2, 4, 5)
        windows = grid.permute(*order).reshape(-1, 4, 8)
        return self.head(self.attn(windows).view(B, -1, 8).mean(1) if self.example_major else
                         self.attn(windows).view(-1, B, 8).mean(0))


def test_timm_swin_window_attention_refuses_windows_that_are_not_the_examples():
    torch.manual_seed(2)
    x = torch.randn(3, 8, 8, 8, dtype=torch.float64)  # B = 3: no dim of the window-major layout has size B
    for example_major in (True, False):
        model = bk.convert(_Windows(example_major).double())
        engine = bk.PrivacyEngine(model, batch_size=3, sample_size=30, noise_multiplier=0.0, max_grad_norm=1.0)
        if example_major:
            model(x).sum().backward()
            assert engine._ready_for_step
        else:
            with pytest.raises(bk.UnsupportedLayoutError, match=r"WindowAttention \(attn\)"):
                model(x).sum().backward()


def test_timm_vit_recomputes_only_its_position_embedding():
    """The root owns cls_token and pos_embed and reads them only in _pos_embed: only that method
    is recomputed per example (it used to be the whole model: 2.4x non-private, bench timm-vit);
    timm's LayerNorm (F.layer_norm in its own forward) is bk's fused LayerNorm."""
    from bk_kernels.nn.attention import _PosEmbedOwner

    model = bk.convert(_build("timm_vit")[0])
    assert isinstance(model, _PosEmbedOwner)
    norms = [m for m in model.modules() if type(m).__name__ == "LayerNorm"]
    assert norms and all(isinstance(m, bk.nn.LayerNorm) for m in norms)
    assert not [path for path, t, _ in bk.generic_modules(model) if t == "LayerNorm"]


def test_timm_root_reading_its_parameters_elsewhere_is_recomputed_whole():
    """A timm-style root with a _pos_embed method whose own Parameter is also read in its forward:
    the whole forward takes the generic path, as for any module (and stays exact)."""
    class Root(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(3, 4)
            self.pos_embed = torch.nn.Parameter(torch.randn(1, 5, 4, dtype=zoo.DT))
            self.scale = torch.nn.Parameter(torch.ones(4, dtype=zoo.DT))
            self.head = torch.nn.Linear(4, 2)

        def _pos_embed(self, x):
            return x + self.pos_embed

        def forward(self, x):
            return self.head(self._pos_embed(self.proj(x)).mean(1) * self.scale)

    Root.__module__ = "timm.models.fake"
    from bk_kernels.nn.attention import _PosEmbedOwner

    torch.manual_seed(0)
    model = Root().to(zoo.DT)
    assert not isinstance(bk.convert(copy.deepcopy(model)), _PosEmbedOwner)
    inputs = {"x": torch.randn(B, 5, 3, dtype=zoo.DT), "y": torch.randint(0, 2, (B,))}
    check_model(model, lambda m, b: torch.nn.functional.cross_entropy(m(b["x"]), b["y"], reduction="none"), inputs,
                style="all-layer", backend="cpu")


def test_t5_with_as_many_examples_as_positions_is_exact():
    """T5's bias table is looked up with [q, k] bucket ids that hold no examples. With q == B a
    bk Embedding alone would read the rows as examples (silently wrong); the table is absorbed
    into its attention's generic path instead, whatever B is."""
    model, loss, _ = _build("t5")
    inputs = {"ids": torch.randint(0, zoo.VOCAB, (B, B))}
    converted = bk.convert(copy.deepcopy(model))
    assert [t for _, t, _ in bk.generic_modules(converted)].count("T5Attention") == 2  # encoder, decoder
    assert type(converted.encoder.block[0].layer[0].SelfAttention.relative_attention_bias) is torch.nn.Embedding
    check_model(model, loss, inputs, style="all-layer", backend="cpu", R=_median_norm(model, loss, inputs))


def test_mpnet_with_as_many_examples_as_positions_is_exact():
    """MPNet's encoder looks its bias table up with [T, T] buckets in compute_position_bias, then
    expands the bias to the batch. With T == B a bk Embedding would read the bucket rows as
    examples (found silently wrong: update error 0.16 relative); only that method takes the
    generic path, with the table absorbed, and the encoder's layers stay bk layers."""
    model, loss, _ = _build("mpnet")
    inputs = {"ids": torch.randint(0, zoo.VOCAB, (B, B)), "y": torch.randint(0, 3, (B,))}
    converted = bk.convert(copy.deepcopy(model))
    assert [(p, t) for p, t, _ in bk.generic_modules(converted)] == [("mpnet.encoder", "MPNetEncoder")]
    assert type(converted.mpnet.encoder.relative_attention_bias) is torch.nn.Embedding
    assert isinstance(converted.mpnet.encoder.layer[0].attention.attn.q, bk.nn.Linear)
    check_model(model, loss, inputs, style="all-layer", backend="cpu", R=_median_norm(model, loss, inputs))


@pytest.mark.parametrize("name", ["timm_vit_relpos", "timm_vit_srelpos"])
def test_timm_relpos_with_as_many_examples_as_coordinates_is_exact(name):
    """The MLP of timm's RelPosMlp runs on a [7, 7, 2] buffer of coordinates; at B = 7 its Linear
    read them as 7 examples (found silently wrong: update error 5e-3) and at other B it was
    refused. get_bias now takes the generic path with the MLP absorbed."""
    model, loss, _ = _build(name)
    inputs = zoo.image_batch(7, size=32)
    generic = [t for _, t, _ in bk.generic_modules(bk.convert(copy.deepcopy(model)))]
    assert generic.count("RelPosMlp") == (1 if name == "timm_vit_srelpos" else 2)
    check_model(model, loss, inputs, style="all-layer", backend="cpu", R=_median_norm(model, loss, inputs))


class _Gate(torch.nn.Module):
    """An MoE router's shape: its own weight, F.linear on [B*T, d] rows."""

    def __init__(self, d):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(d, d, dtype=zoo.DT))

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight)


class _GatedRows(torch.nn.Module):
    def __init__(self, interleave, d=8):
        super().__init__()
        self.interleave = interleave
        self.inp, self.gate, self.head = (torch.nn.Linear(d, d, dtype=zoo.DT), _Gate(d),
                                          torch.nn.Linear(d, 3, dtype=zoo.DT))

    def forward(self, x):
        B, T, d = x.shape
        h = self.inp(x)
        h = h.transpose(0, 1).reshape(-1, d) if self.interleave else h.reshape(-1, d)
        return self.head(self.gate(h).reshape(B, -1, d).mean(1))


def test_generic_path_takes_rows_folded_example_major():
    """A module on the generic path called on [B*T, d] rows folded example-major: each example's
    recompute takes its T rows. (It used to give the output a batch dim of its own, silently
    mixing the examples when the model reshaped it back.)"""
    torch.manual_seed(0)
    inputs = {"x": torch.randn(B, 6, 8, dtype=zoo.DT), "y": torch.randint(0, 3, (B,))}
    check_model(_GatedRows(False), lambda m, b: torch.nn.functional.cross_entropy(m(b["x"]), b["y"], reduction="none"),
                inputs, style="all-layer", backend="cpu")


def test_generic_path_refuses_rows_folded_in_another_order():
    """Rows folded position-major ([T, B, d] -> [T*B, d]): no proof that an example's rows are
    together, so refused in the forward, naming the module; nothing moves, no budget is spent."""
    model = bk.convert(_GatedRows(True))
    engine = bk.PrivacyEngine(model, batch_size=B, sample_size=40, noise_multiplier=1.0)
    opt = engine.attach(torch.optim.SGD(model.parameters(), lr=1.0))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(bk.nn.generic.GenericError, match=r"_Gate \(gate\).*shape \(24, 8\).*folded"):
        model(torch.randn(B, 6, 8, dtype=zoo.DT))
    with pytest.raises(RuntimeError, match="without a backward"):
        opt.step()
    assert engine.steps == 0 and engine.epsilon() == 0
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_moe_experts_with_frozen_routers_are_exact(name):
    """Routers frozen (a common MoE fine-tuning recipe): their weights reach the experts through
    plain softmax/top-k ops, proven row-wise; the experts train exactly."""
    model, loss, inputs = _build(name)
    for module_name, module in model.named_modules():
        if module_name.endswith(("mlp.gate", "shared_expert_gate")):
            module.requires_grad_(False)
    check_model(model, loss, inputs, style="all-layer", backend="cpu", R=_median_norm(model, loss, inputs))


def _deberta(version="v2", **config):
    names = {"v1": ("DebertaConfig", "DebertaForSequenceClassification"),
             "v2": ("DebertaV2Config", "DebertaV2ForSequenceClassification")}
    base = dict(vocab_size=zoo.VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
                max_position_embeddings=16, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                relative_attention=True, position_buckets=4, max_relative_positions=8, pos_att_type=["p2c", "c2p"])
    return zoo._hf(names[version], **{**base, **config})


@pytest.mark.parametrize("config", [dict(share_att_key=True, norm_rel_ebd="layer_norm"),  # DeBERTa-v3's
                                    dict(share_att_key=False, norm_rel_ebd="none"), dict(pos_att_type=["c2p"]),
                                    dict(relative_attention=False, pos_att_type=[])], ids=str)
@pytest.mark.parametrize("frozen_table", [False, True])
def test_deberta_v2_relative_attention_is_exact(config, frozen_table):
    """DeBERTa-v2/v3: the encoder's relative-position table is projected by every attention's
    query/key projections and repeated to the batch inside it. It is made per example where it is
    read (the encoder's get_rel_embedding on the generic path, or expanded in the attention when
    frozen), so the projections' and the table's per-example gradients stay apart. It used to be
    refused by bk.convert (before that, a shape error inside transformers)."""
    torch.manual_seed(0)
    model = _deberta(**config)
    if frozen_table:
        for name, child in model.deberta.encoder.named_children():
            if name in ("rel_embeddings", "LayerNorm"):
                child.requires_grad_(False)
    check_model(model, zoo.classify_ids, zoo.ids_batch(B), style="all-layer", backend="cpu", R=0.05)


@pytest.mark.parametrize("config", [dict(), dict(pos_att_type=["c2p"]), dict(talking_head=True),
                                    dict(relative_attention=False, pos_att_type=[])], ids=str)
@pytest.mark.parametrize("frozen_table", [False, True])
def test_deberta_v1_relative_attention_is_exact(config, frozen_table):
    """DeBERTa (v1): each attention projects the encoder's table with its own pos_proj/pos_q_proj
    and adds its own q_bias/v_bias to the heads. The table is made per example as for v2, the
    attention's forward book-keeps the two biases (no per-example recompute of the attention).
    Its DebertaLayerNorm is transformers' normalisation with weight and bias through bk.nn.scale
    and a shift. It was refused by bk.convert."""
    torch.manual_seed(0)
    model = _deberta("v1", **config)
    for layer in model.deberta.encoder.layer:  # transformers initialises them to zeros
        torch.nn.init.normal_(layer.attention.self.q_bias, std=0.1)
        torch.nn.init.normal_(layer.attention.self.v_bias, std=0.1)
    if frozen_table and config.get("relative_attention", True):
        model.deberta.encoder.rel_embeddings.requires_grad_(False)
    if frozen_table:  # and the norms' weights (their biases train): scale's frozen branch
        for name, p in model.named_parameters():
            if name.endswith("LayerNorm.weight"):
                p.requires_grad_(False)
    converted = bk.convert(copy.deepcopy(model))
    generic = [path for path, _, _ in bk.generic_modules(converted)]
    assert generic in ([], ["deberta.encoder"])  # only get_rel_embedding; attention and DebertaLayerNorm are bk
    check_model(model, zoo.classify_ids, zoo.ids_batch(B), style="all-layer", backend="cpu", R=0.05)


def test_deberta_v1_z_steps_query_states_are_refused_in_the_forward():
    """query_states (z_steps > 1: the last layer run again on its own output) multiplies by
    in_proj's weight read as a value: refused in the forward, nothing moved or spent."""
    torch.manual_seed(0)
    model = bk.convert(_deberta("v1"))
    model.deberta.z_steps = 2
    engine = bk.PrivacyEngine(model, batch_size=B, sample_size=40, noise_multiplier=1.0)
    opt = engine.attach(torch.optim.SGD(model.parameters(), lr=1.0))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(bk.UnsupportedLayoutError, match="query_states"):
        zoo.classify_ids(model, zoo.ids_batch(B)).sum().backward()
    with pytest.raises(RuntimeError, match="without a backward"):
        opt.step()
    assert engine.epsilon() == 0 and all(torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_generic_path_refuses_dropout_it_cannot_replay():
    import timm
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, embed_dim=16,
                              depth=1, num_heads=2, num_classes=3, drop_rate=0.5, pos_drop_rate=0.5).to(zoo.DT)
    model = bk.convert(model)
    engine = bk.PrivacyEngine(model, batch_size=B, sample_size=40, noise_multiplier=1.0)
    batch = zoo.image_batch(B)
    with pytest.raises(bk.nn.generic.GenericError, match="dropout"):
        zoo.classify_images(model, batch).mean().backward()
    assert engine.steps == 0


@pytest.mark.parametrize("name", ["hf_vit", "timm_vit", "llama"])
def test_agrees_with_opacus_hooks_mode(name):
    """Opacus 1.6 (hooks, its functorch fallback for the cls tokens and LlamaRMSNorm) and bk take
    the same step. (Opacus refuses GPT-2 and DistilBERT called without position_ids, and its step
    on this tiny BERT differs from the per-example reference, so those are not cross-checked.)"""
    opacus = pytest.importorskip("opacus")
    model, loss, inputs = _build(name)
    R = _median_norm(model, loss, inputs)
    ours = bk.convert(copy.deepcopy(model))
    engine = bk.PrivacyEngine(ours, batch_size=B, sample_size=40, noise_multiplier=0.0, max_grad_norm=R)
    opt = engine.attach(torch.optim.SGD(ours.parameters(), lr=1.0))
    loss(ours, inputs).mean().backward()
    opt.step()

    theirs = opacus.GradSampleModule(copy.deepcopy(model))
    dp_opt = opacus.optimizers.DPOptimizer(torch.optim.SGD(theirs.parameters(), lr=1.0), noise_multiplier=0.0,
                                           max_grad_norm=R, expected_batch_size=B)
    loss(theirs, inputs).mean().backward()
    dp_opt.step()
    for (name, a), b in zip(ours.named_parameters(), theirs._module.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("inplace", [False, True])
def test_timm_layer_scales_and_convnext_blocks_take_the_scale_path(inplace):
    """timm's LayerScale/LayerScale2d and ConvNeXt blocks (gamma multiplied inline) book-keep
    their gamma with bk.nn.scale, and timm's LayerNorm2d is bk's fused LayerNorm: no generic
    path (a timm ConvNeXt used to recompute every block per example); exact, in place or not."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("convnext_atto", pretrained=False, num_classes=3, dims=(8, 8, 8, 8),
                              depths=(1, 1, 1, 1)).to(zoo.DT)
    assert not bk.generic_modules(bk.convert(copy.deepcopy(model)))
    check_model(model, zoo.classify_images, zoo.image_batch(B, size=32), style="all-layer", backend="cpu")

    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = torch.nn.Conv2d(3, 4, 3)
            self.ls2d = timm.layers.LayerScale2d(4, init_values=0.5, inplace=inplace)
            self.mid = torch.nn.Linear(4, 4)
            self.ls = timm.layers.LayerScale(4, init_values=0.7, inplace=inplace)
            self.head = torch.nn.Linear(4, 3)

        def forward(self, x):  # (in place on outputs whose backward does not need them: conv, linear)
            h = torch.tanh(self.ls2d(self.inp(x))).flatten(2).transpose(1, 2)  # [B, N, 4]
            return self.head(torch.tanh(self.ls(self.mid(h))).mean(1))

    scaled = Scaled().to(zoo.DT)
    assert not bk.generic_modules(bk.convert(copy.deepcopy(scaled)))
    assert not bk.generic_modules(bk.convert(zoo.hf_convnext()))  # its ConvNextLayer's inline layer scale
    check_model(scaled, zoo.classify_images, zoo.image_batch(B, size=8), style="all-layer", backend="cpu")


@pytest.mark.parametrize("name", NO_HISTORY_FOLDS)
def test_folds_without_gradient_history_are_refused(name):
    """MobileViT folds each example's patches into [B * patch_area, patches, d], TimeSformer its
    frames and patches into [B * frames, patches, d], with transposes and copies. With the
    first half of the parameters frozen, a fold reaching a trained layer has no gradient
    history, so nothing proves its rows example-major: the backward is refused before
    anything is recorded (the fully trained models are exact, above)."""
    model, loss, inputs = _build(name)
    params = list(model.parameters())
    for p in params[: len(params) // 2]:
        p.requires_grad_(False)
    model = bk.convert(model)
    engine = bk.PrivacyEngine(model, batch_size=B, sample_size=10 * B, noise_multiplier=0.0, max_grad_norm=1.0)
    optimizer = engine.attach(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0))
    with pytest.raises(bk.UnsupportedLayoutError, match="should hold the examples"):
        loss(model, inputs).backward()
    with pytest.raises(RuntimeError, match="without a backward"):
        optimizer.step()
