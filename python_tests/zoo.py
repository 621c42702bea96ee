"""Tiny-config models built from the classes of transformers, timm and peft, called the way
their users call them (no position_ids, no extra arguments), with their per-example losses.
Dropout is 0 everywhere so that the per-example reference and the private step see one forward."""
import torch
import torch.nn.functional as F

DT = torch.float64
VOCAB, T = 37, 6


def _lm_loss(logits, ids):
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view(
        len(ids), -1).mean(1)


def causal_lm(model, batch):
    ids = batch["ids"]
    return _lm_loss(model(input_ids=ids).logits, ids)


def prompted_lm(model, batch):
    """A PEFT prompt-tuned causal LM: its logits start with the virtual tokens' positions."""
    ids = batch["ids"]
    return _lm_loss(model(input_ids=ids).logits[:, -ids.shape[1]:], ids)


def masked_lm(model, batch):
    ids = batch["ids"]
    logits = model(input_ids=ids).logits
    return F.cross_entropy(logits.flatten(0, 1), ids.flatten(), reduction="none").view(len(ids), -1).mean(1)


def seq2seq_lm(model, batch):
    ids = batch["ids"]
    logits = model(input_ids=ids, decoder_input_ids=ids).logits
    return _lm_loss(logits, ids)


def classify_ids(model, batch):
    return F.cross_entropy(model(input_ids=batch["ids"]).logits, batch["y"], reduction="none")


def classify_padded(model, batch):
    """A sequence classifier fed right-padded ids and their attention mask, as users fine-tune."""
    logits = model(input_ids=batch["ids"], attention_mask=batch["mask"]).logits
    return F.cross_entropy(logits, batch["y"], reduction="none")


def classify_pixels(model, batch):
    out = model(pixel_values=batch["x"])
    return F.cross_entropy(out.logits, batch["y"], reduction="none")


def classify_images(model, batch):
    return F.cross_entropy(model(batch["x"]), batch["y"], reduction="none")


def classify_audio(model, batch):
    return F.cross_entropy(model(input_values=batch["wav"]).logits, batch["y"], reduction="none")


def audio_batch(B, samples=128, labels=3):
    return {"wav": torch.randn(B, samples, dtype=DT), "y": torch.randint(0, labels, (B,))}


def ids_batch(B, labels=3):
    return {"ids": torch.randint(0, VOCAB, (B, T)), "y": torch.randint(0, labels, (B,))}


def padded_ids_batch(B, labels=3, pad=1):
    """Example b keeps T - b % 3 tokens; the rest hold `pad` and are masked."""
    ids = torch.randint(2, VOCAB, (B, T))
    mask = (torch.arange(T)[None] < torch.tensor([T - b % 3 for b in range(B)])[:, None]).long()
    return {"ids": ids.masked_fill(mask == 0, pad), "mask": mask, "y": torch.randint(0, labels, (B,))}


def image_batch(B, size=16, labels=3):
    return {"x": torch.randn(B, 3, size, size, dtype=DT), "y": torch.randint(0, labels, (B,))}


def _hf(name, **config):
    import transformers
    cfg_cls, model_cls = name
    config = getattr(transformers, cfg_cls)(**config)
    return getattr(transformers, model_cls)(config).to(DT)


def _decoder_config(**extra):
    return dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=32, **extra)


def gpt2(tied=True):
    return _hf(("GPT2Config", "GPT2LMHeadModel"), vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=2, n_head=2,
               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=tied)


def gpt2_checkpointed():
    model = gpt2()
    model.gradient_checkpointing_enable()
    return model


def bert():
    return _hf(("BertConfig", "BertForSequenceClassification"), vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2,
               num_attention_heads=2, intermediate_size=24, max_position_embeddings=16, num_labels=3,
               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def roberta_mlm():
    return _hf(("RobertaConfig", "RobertaForMaskedLM"), vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2,
               num_attention_heads=2, intermediate_size=24, max_position_embeddings=16, pad_token_id=1,
               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def distilbert():
    return _hf(("DistilBertConfig", "DistilBertForSequenceClassification"), vocab_size=VOCAB, dim=16, n_layers=2,
               n_heads=2, hidden_dim=24, max_position_embeddings=16, num_labels=3, dropout=0.0, attention_dropout=0.0,
               seq_classif_dropout=0.0)


def mpnet():
    return _hf(("MPNetConfig", "MPNetForSequenceClassification"), vocab_size=VOCAB, hidden_size=16,
               num_hidden_layers=2, num_attention_heads=2, intermediate_size=24, max_position_embeddings=16,
               pad_token_id=1, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def wav2vec2():
    """Its positional conv is weight-normed (torch.nn.utils.parametrizations.weight_norm); the
    feature extractor uses GroupNorm."""
    return _hf(("Wav2Vec2Config", "Wav2Vec2ForSequenceClassification"), hidden_size=16, num_hidden_layers=2,
               num_attention_heads=2, intermediate_size=24, conv_dim=(8, 8), conv_stride=(4, 2), conv_kernel=(8, 4),
               num_feat_extract_layers=2, feat_extract_norm="group", num_conv_pos_embeddings=4,
               num_conv_pos_embedding_groups=2, hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
               feat_proj_dropout=0.0, layerdrop=0.0, final_dropout=0.0, mask_time_prob=0.0, num_labels=3,
               classifier_proj_size=8)


def hf_vit():
    return _hf(("ViTConfig", "ViTForImageClassification"), image_size=16, patch_size=8, num_channels=3, hidden_size=16,
               num_hidden_layers=2, num_attention_heads=2, intermediate_size=24, num_labels=3, hidden_dropout_prob=0.0,
               attention_probs_dropout_prob=0.0)


def llama():
    return _hf(("LlamaConfig", "LlamaForCausalLM"), **_decoder_config())


def mistral():
    return _hf(("MistralConfig", "MistralForCausalLM"), **_decoder_config())


def qwen2():
    return _hf(("Qwen2Config", "Qwen2ForCausalLM"), **_decoder_config())


def gemma():
    return _hf(("GemmaConfig", "GemmaForCausalLM"), head_dim=8, **_decoder_config())


def mixtral():
    """Mixtral's sparse MoE: a router (its own Parameter, generic path) on [B*T, d] rows, top-2
    of 4 experts stored as 3-D Parameters, each called on the rows routed to it."""
    return _hf(("MixtralConfig", "MixtralForCausalLM"), num_local_experts=4, num_experts_per_tok=2,
               router_jitter_noise=0.0, experts_implementation="eager", **_decoder_config())


def qwen2_moe():
    """Qwen2-MoE: routed experts as Mixtral's, plus a shared expert with a sigmoid gate."""
    return _hf(("Qwen2MoeConfig", "Qwen2MoeForCausalLM"), num_experts=4, num_experts_per_tok=2,
               moe_intermediate_size=8, shared_expert_intermediate_size=12, decoder_sparse_step=1,
               experts_implementation="eager", **_decoder_config())


def gpt_oss():
    """GPT-OSS: attention with learned sinks (its own Parameter: the generic path, which also gets
    the layer's DynamicCache), alternating sliding/full attention, experts with biases stored
    transposed and a clamped interleaved gate."""
    return _hf(("GptOssConfig", "GptOssForCausalLM"), num_local_experts=4, num_experts_per_tok=2, head_dim=8,
               sliding_window=8, layer_types=["sliding_attention", "full_attention"], experts_implementation="eager",
               **_decoder_config())


def deepseek_v3():
    """DeepSeek-V3: multi-head latent attention; a sigmoid router with group-limited top-k that
    flattens its [B, T, d] input itself (its rows checked in the forward); routed + shared experts.
    Not in ZOO: its router computes in float32 even in a float64 model (test_moe.py)."""
    return _hf(("DeepseekV3Config", "DeepseekV3ForCausalLM"), n_routed_experts=4, num_experts_per_tok=2,
               moe_intermediate_size=8, n_shared_experts=1, first_k_dense_replace=0, kv_lora_rank=8, q_lora_rank=8,
               qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, n_group=1, topk_group=1,
               experts_implementation="eager", **_decoder_config())


def llama4():
    """Llama 4's text model: every token's copy goes to every expert, scaled by its router score
    (sigmoid of its top-k logits, zero elsewhere), the experts one bmm; a shared expert beside.
    Not in ZOO: its router's sigmoid runs in float32 even in a float64 model (test_moe.py)."""
    return _hf(("Llama4TextConfig", "Llama4ForCausalLM"), num_local_experts=4, num_experts_per_tok=1,
               intermediate_size_mlp=24, head_dim=8, interleave_moe_layer_step=1, no_rope_layers=[1, 0],
               **{**_decoder_config(), "intermediate_size": 12})


def mamba():
    """HF Mamba: its mixer owns A_log and D and reads conv1d.weight and dt_proj.weight itself."""
    return _hf(("MambaConfig", "MambaForCausalLM"), vocab_size=VOCAB, hidden_size=16, state_size=4,
               num_hidden_layers=2, expand=2, conv_kernel=3, use_mambapy=False, use_cache=False)


def mamba2():
    """HF Mamba-2: its mixer owns A_log, D and dt_bias (per head) and reads conv1d.weight itself;
    a gated RMSNorm after the chunked scan (chunk 4 < T: two chunks, the second padded)."""
    return _hf(("Mamba2Config", "Mamba2ForCausalLM"), vocab_size=VOCAB, hidden_size=16, state_size=4,
               num_hidden_layers=2, expand=2, num_heads=4, head_dim=8, n_groups=2, conv_kernel=3, chunk_size=4,
               use_cache=False)


def qwen3_5():
    """HF Qwen 3.5 (text): a gated delta net (owns A_log and dt_bias, reads conv1d.weight itself)
    then a full attention layer."""
    return _hf(("Qwen3_5TextConfig", "Qwen3_5ForCausalLM"), **_decoder_config(
        head_dim=8, linear_key_head_dim=8, linear_value_head_dim=4, linear_num_key_heads=2, linear_num_value_heads=4,
        linear_conv_kernel_dim=3, layer_types=["linear_attention", "full_attention"], use_cache=False))


def falcon(new_decoder_architecture=False):
    """HF Falcon: every projection is a FalconLinear (nn.Linear with its own `x @ W.T + b`
    forward); the original layout (parallel attention, one LayerNorm) or the new one (grouped
    KV heads, two LayerNorms)."""
    return _hf(("FalconConfig", "FalconForCausalLM"), vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2,
               num_attention_heads=4, num_kv_heads=2, new_decoder_architecture=new_decoder_architecture, bias=True,
               hidden_dropout=0.0, attention_dropout=0.0)


def opt():
    return _hf(("OPTConfig", "OPTForCausalLM"), vocab_size=VOCAB, hidden_size=16, ffn_dim=24, num_hidden_layers=2,
               num_attention_heads=2, max_position_embeddings=32, word_embed_proj_dim=16, dropout=0.0,
               attention_dropout=0.0, layerdrop=0.0)


def t5():
    return _hf(("T5Config", "T5ForConditionalGeneration"), vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=24, num_layers=2,
               num_decoder_layers=2, num_heads=2, dropout_rate=0.0, decoder_start_token_id=0)


def bart():
    return _hf(("BartConfig", "BartForConditionalGeneration"), vocab_size=VOCAB, d_model=16, encoder_layers=2,
               decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=24,
               decoder_ffn_dim=24, max_position_embeddings=32, dropout=0.0, attention_dropout=0.0,
               activation_dropout=0.0, scale_embedding=True)


def timm_vit():
    import timm
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, embed_dim=16,
                             depth=2, num_heads=2, num_classes=3, init_values=1e-1).to(DT)


def timm_maxvit(name="maxvit_pico_rw_256"):
    """timm's MaxViT / CoAtNet (maxxvit.py; BatchNorm replaced): attention on window and grid
    partitions ([B * windows, h, w, C]) or on whole maps (CoAtNet's Attention2d), each with a
    relative position bias: a table (rw), TF's einsum lookups (tf) or an MLP (rmlp). The bias
    MLP's dropout (0.125) is set to 0 here only because the one-backward-per-example reference
    draws a mask per example, where the batch draws one (bk keeps the batch's mask)."""
    import timm

    import bk_kernels as bk

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=3, img_size=64)
    for module in model.modules():
        if type(module).__name__ == "RelPosMlp":
            module.mlp.drop1.p = 0.0
    return bk.replace_batchnorm(model).to(DT)


def timm_swin(version="swin_tiny_patch4_window7_224"):
    """timm Swin (v1 or v2): window attention on [B * windows, N, C] windows. 32 x 32 images, 4 x 4
    patches and windows of 2 x 2: 16 windows per image at stage 0, and 4 at stage 1 (whose second
    block shifts its windows), as many as the zoo's 4 examples: its [windows, N, N] shift mask has
    the batch size on dim 0 and holds no examples."""
    import timm
    return timm.create_model(version, pretrained=False, img_size=32, patch_size=4, window_size=2, embed_dim=8,
                             depths=(1, 2), num_heads=(1, 2), num_classes=3, drop_path_rate=0.0).to(DT)


def timm_swinv2_cr():
    """timm's Swin-V2-CR: the same windows as timm_swin; its meta MLP's dropout (0.125) set to 0 for
    the one-backward-per-example reference (which would draw a mask per example)."""
    import timm

    model = timm.create_model("swinv2_cr_tiny_ns_224", pretrained=False, img_size=32, window_size=2, embed_dim=8,
                              depths=(1, 2), num_heads=(1, 2), num_classes=3, drop_path_rate=0.0).to(DT)
    for module in model.modules():
        if hasattr(module, "meta_mlp"):
            module.meta_mlp.drop1.p = 0.0
    return model


def hf_swin(config="SwinConfig", model="SwinForImageClassification"):
    """HF Swin (v1 or v2), the same sizes as timm_swin."""
    return _hf((config, model), image_size=32, patch_size=4, embed_dim=8, depths=[1, 2], num_heads=[2, 2],
               window_size=2, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
               drop_path_rate=0.0)


def hf_bit(layer_type="preactivation", padding="SAME"):
    """HF BiT: weight-standardized convolutions (WeightStandardizedConv2d; "SAME": a dynamic padding
    module, which does not pickle: transformers' DynamicPad2d holds a local function) and
    BitGroupNormActivation, both on the generic path before session 13."""
    return _hf(("BitConfig", "BitForImageClassification"), embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
               layer_type=layer_type, num_groups=2, global_padding=padding, num_labels=3)


def hf_beit(relative=True, classes=("BeitConfig", "BeitForImageClassification")):
    """HF BEiT: each BeitLayer multiplies by its lambda_1 / lambda_2 inline (bk.nn.scale since session
    13; before, the whole layer was recomputed per example); relative position bias per layer.
    Data2Vec-vision (classes=...): BEiT's older layer forward, book-kept since session 15."""
    return _hf(classes, image_size=16, patch_size=4, hidden_size=16,
               num_hidden_layers=2, num_attention_heads=2, intermediate_size=24, use_relative_position_bias=relative,
               layer_scale_init_value=0.1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3,
               use_mean_pooling=True)


def hf_poolformer():
    """HF PoolFormer: each PoolFormerLayer scales its two branches by layer_scale_1/2 inline."""
    return _hf(("PoolFormerConfig", "PoolFormerForImageClassification"), hidden_sizes=[8, 16], depths=[1, 1],
               patch_sizes=[4, 2], strides=[4, 2], padding=[1, 0], num_encoder_blocks=2, num_labels=3)


def hf_convnext():
    """HF ConvNeXt: each ConvNextLayer multiplies by its layer_scale_parameter inline."""
    return _hf(("ConvNextConfig", "ConvNextForImageClassification"), num_channels=3, patch_size=4,
               hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_labels=3, layer_scale_init_value=0.5,
               drop_path_rate=0.0)


def timm_vit_relpos(shared=False):
    """timm's ViT with an MLP of relative coordinates (RelPosMlp) in each block, or one for the
    whole model (vit_srelpos): 32 px in patches of 8, so the coordinates are [7, 7, 2]. The
    MLP's dropout (timm fixes it at 0.125) is set to 0: the generic path cannot replay it."""
    import timm
    model = timm.create_model("vit_srelpos_small_patch16_224" if shared else "vit_relpos_small_patch16_224",
                              pretrained=False, img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2,
                              num_classes=3).to(DT)
    for module in model.modules():
        if type(module).__name__ == "RelPosMlp":
            module.mlp.drop1.p = 0.0
    return model


def timm_attention_reads_qkv_weight(name):
    """timm's BEiT and EVA-02: the attention owns its q/v biases and calls
    F.linear(x, self.qkv.weight, qkv_bias) itself (BEiT: its generic path absorbs qkv; EVA: bk's
    EvaAttention adds the biases after the bk Linear). EVA-02 with layer scales (init_values)."""
    import timm
    extra = dict(init_values=0.5) if name.startswith("eva") else {}
    return timm.create_model(name, pretrained=False, img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2,
                             num_classes=3, **extra).to(DT)


def timm_cait():
    """timm's CaiT: the root's cls_token / pos_embed used inline in forward_features and
    forward_cls, the blocks' inline gamma_1 / gamma_2, talking heads, class attention."""
    import timm
    return timm.create_model("cait_xxs24_224", pretrained=False, img_size=16, patch_size=8, embed_dim=16, depth=2,
                             num_heads=2, depth_token_only=1, num_classes=3).to(DT)


def timm_pit():
    """timm's PiT: the root's cls_token / pos_embed ([1, C, H, W]) used inline in forward_features."""
    from timm.models.pit import PoolingVisionTransformer
    return PoolingVisionTransformer(img_size=32, patch_size=8, stride=4, base_dims=[8, 8], depth=[1, 1], heads=[2, 2],
                                    mlp_ratio=2, num_classes=3).to(DT)


def timm_visformer():
    """timm's Visformer (BatchNorm replaced): a [1, C, H, W] position embedding of the root's
    added inline after each stage's patch embedding."""
    import bk_kernels as bk
    from timm.models.visformer import Visformer
    return bk.replace_batchnorm(Visformer(img_size=32, init_channels=8, embed_dim=16, depth=(1, 1, 1), num_heads=2,
                                          num_classes=3)).to(DT)


def timm_volo():
    """timm's VOLO (its stem's BatchNorm replaced): outlook attention, the root's [1, H, W, C]
    pos_embed (forward_tokens) and cls_token (forward_cls) used inline, class-attention blocks."""
    import bk_kernels as bk
    from timm.models.volo import VOLO
    return bk.replace_batchnorm(VOLO(layers=(1, 1, 1, 1), img_size=32, embed_dims=(16, 16, 16, 16),
                                     num_heads=(2, 2, 2, 2), num_classes=3, post_layers=("ca",))).to(DT)


def timm_crossvit():
    """timm's CrossViT: two branches, each with its class token and positions (cls_token_i,
    pos_embed_i) used inline in the root's _embed; cross-attention between the branches."""
    from timm.models.crossvit import CrossVit
    return CrossVit(img_size=48, img_scale=(1.0, 1.0), patch_size=(12, 16), embed_dim=(16, 32), depth=((1, 1, 0),),
                    num_heads=(2, 2), mlp_ratio=(2., 2., 1.), num_classes=3).to(DT)


def timm_xcit():
    """timm's XCiT (its BatchNorm replaced): cross-covariance attention with a per-head
    temperature, layer scales, class-attention blocks, the root's cls_token, and Fourier
    positions projected by a 1x1 convolution of one grid (bk's Conv2d expanded it to the batch,
    and timm's repeat then made B x B rows: XCiT failed with a shape error before session 12)."""
    import bk_kernels as bk
    from timm.models.xcit import Xcit
    return bk.replace_batchnorm(Xcit(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2, cls_attn_layers=1,
                                     eta=1.0, num_classes=3)).to(DT)


def timm_convit():
    """timm's ConViT: gated positional self-attention (GPSA: a per-head gating_param mixing the
    content and the position scores; pos_proj over relative indices expanded to the batch), the
    root's cls_token inserted mid-stack and pos_embed, used inline in forward_features."""
    from timm.models.convit import ConVit
    return ConVit(img_size=16, patch_size=4, embed_dim=8, num_heads=2, depth=2, local_up_to_layer=1,
                  num_classes=3).to(DT)


def timm_coat(parallel_depth=1):
    """timm's CoaT: each stage prepends its own cls_token (timm's module-level insert_cls in the
    root's forward_features); convolutional position and relative-position encodings; with
    parallel_depth > 0 the parallel blocks mixing the stages (CoaT, not CoaT-Lite)."""
    from timm.models.coat import CoaT
    return CoaT(img_size=32, patch_size=4, embed_dims=(16, 16, 16, 16), serial_depths=(1, 1, 1, 1),
                parallel_depth=parallel_depth, num_heads=8, mlp_ratios=(2, 2, 2, 2), num_classes=3).to(DT)


def hf_convnextv2():
    """HF ConvNeXt-V2: Global Response Norm (ConvNextV2GRN) in every layer, no layer scale."""
    return _hf(("ConvNextV2Config", "ConvNextV2ForImageClassification"), hidden_sizes=[8, 16], depths=[1, 1], num_stages=2,
               num_labels=3)


def timm_convnextv2():
    """timm's ConvNeXt-V2 (GlobalResponseNorm in each block's MLP, channels last)."""
    import timm
    return timm.create_model("convnextv2_atto", pretrained=False, num_classes=3, dims=(8, 16, 16, 16),
                             depths=(1, 1, 1, 1)).to(DT)


def timm_convnext():
    import timm
    return timm.create_model("convnext_atto", pretrained=False, num_classes=3, dims=(8, 16, 16, 16),
                             depths=(1, 1, 1, 1)).to(DT)


def timm_resnet_gn():
    import timm
    from functools import partial
    return timm.create_model("resnet18", pretrained=False, num_classes=3,
                             norm_layer=partial(timm.layers.GroupNorm, num_groups=2)).to(DT)


def timm_bit():
    """timm's BiT ResNet-V2: weight-standardized convolutions (StdConv2d) with GroupNormAct."""
    from functools import partial
    from timm.layers import GroupNormAct, StdConv2d
    from timm.models.resnetv2 import ResNetV2
    return ResNetV2(layers=(1, 1), channels=(8, 16), num_classes=3, stem_chs=8, stem_type="fixed",
                    conv_layer=partial(StdConv2d, eps=1e-8), norm_layer=partial(GroupNormAct, num_groups=4)).to(DT)


def timm_nf_resnet():
    """timm's normalizer-free ResNet: ScaledStdConv2d (a trained gain per output channel), no norm layer."""
    from timm.models.nfnet import NfCfg, NormFreeNet
    cfg = NfCfg(depths=(1, 1), channels=(8, 16), stem_chs=8, bottle_ratio=0.25, group_size=None, act_layer="relu",
                attn_layer=None, stem_type="")
    return NormFreeNet(cfg, num_classes=3).to(DT)


def timm_resnet_bn_replaced():
    """timm's ResNet as users create it (BatchNorm2d), with bk.replace_batchnorm's GroupNorm."""
    import timm
    import bk_kernels as bk
    return bk.replace_batchnorm(timm.create_model("resnet18", pretrained=False, num_classes=3).to(DT), groups=4)


def timm_mobilenetv3_bn_replaced():
    """timm's MobileNetV3 (BatchNormAct2d, timm's Linear head) after bk.replace_batchnorm: GroupNormAct."""
    import timm
    import bk_kernels as bk
    return bk.replace_batchnorm(timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=3).to(DT),
                                groups=4)


def tv_vit():
    """torchvision's VisionTransformer: the root owns class_token, its Encoder pos_embedding (both
    used inline; 16 x 16 images, 4 x 4 patches: 17 positions)."""
    from torchvision.models import VisionTransformer
    return VisionTransformer(image_size=16, patch_size=4, num_layers=2, num_heads=2, hidden_dim=8, mlp_dim=16,
                             num_classes=3).to(DT)


def tv_swin(v2=False):
    """torchvision's Swin (v1, or v2: cosine attention, cpb_mlp, a qkv bias whose key block it
    zeroes in every forward), the sizes of timm_swin: 32 x 32 images, 2 x 2 windows, 16 windows
    per image at stage 0 and 4 at stage 1 (whose second block shifts)."""
    from torchvision.models import swin_transformer as S
    blocks = dict(block=S.SwinTransformerBlockV2, downsample_layer=S.PatchMergingV2) if v2 else {}
    return S.SwinTransformer(patch_size=[4, 4], embed_dim=8, depths=[1, 2], num_heads=[1, 2], window_size=[2, 2],
                             stochastic_depth_prob=0.0, num_classes=3, **blocks).to(DT)


def tv_swin3d():
    """torchvision's video Swin (SwinTransformer3d): 3-d windows of 2 x 2 x 2 on [B, 3, 4, 32, 32]
    clips: 16 windows per clip at stage 0; at stage 1 the window's time extent is the input's
    (2), so that dim neither pads nor shifts."""
    from torchvision.models.video.swin_transformer import SwinTransformer3d
    return SwinTransformer3d(patch_size=[2, 4, 4], embed_dim=8, depths=[1, 2], num_heads=[1, 2],
                             window_size=[2, 2, 2], stochastic_depth_prob=0.0, num_classes=3).to(DT)


def clip_batch(B, frames=4, size=32, labels=3):
    """[B, 3, frames, size, size] clips (torchvision's video layout)."""
    return {"x": torch.randn(B, 3, frames, size, size, dtype=DT), "y": torch.randint(0, labels, (B,))}


def tv_convnext():
    """torchvision's ConvNeXt: CNBlock multiplies by its layer_scale inline; LayerNorm2d."""
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt
    return ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)], stochastic_depth_prob=0.0,
                    layer_scale=0.5, num_classes=3).to(DT)


def tv_maxvit():
    """torchvision's MaxViT (its MBConv BatchNorms replaced): window and grid attention adding their
    relative position table inline, on [B, groups, positions, C]."""
    import bk_kernels as bk
    from torchvision.models.maxvit import MaxVit
    return bk.replace_batchnorm(MaxVit(input_size=(32, 32), stem_channels=8, partition_size=2, block_channels=[8, 16],
                                       block_layers=[1, 1], head_dim=4, stochastic_depth_prob=0.0,
                                       num_classes=3).to(DT))


def with_batchnorm_statistics(model):
    """The model with its BatchNorms' running statistics and affine values other than 0 / 1 (a
    pretrained BatchNorm's), in place."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model


def tv_resnet_frozen_bn():
    """torchvision's ResNet (one BasicBlock a stage) with its BatchNorms frozen by
    bk.freeze_batchnorm (running statistics and affine values other than 0 / 1, as a pretrained
    network's): the normalisation by the statistics, the affine Parameters trained."""
    import bk_kernels as bk
    from torchvision.models.resnet import BasicBlock, ResNet
    return bk.freeze_batchnorm(with_batchnorm_statistics(ResNet(BasicBlock, [1, 1, 1, 1], num_classes=3).to(DT)))


def hf_resnet_bn_replaced():
    """HF ResNet (nn.BatchNorm2d in every conv layer) after bk.replace_batchnorm."""
    import bk_kernels as bk
    return bk.replace_batchnorm(_hf(("ResNetConfig", "ResNetForImageClassification"), embedding_size=8,
                                    hidden_sizes=[8, 16], depths=[1, 1], num_labels=3), groups=4)


def hf_mobilevit_bn_replaced():
    """HF MobileViT after bk.replace_batchnorm: its transformer runs attention on the examples'
    patches folded into [B * patch_area, patches, d] (views, permutes, batched matmuls)."""
    import bk_kernels as bk
    return bk.replace_batchnorm(_hf(("MobileViTConfig", "MobileViTForImageClassification"), image_size=32,
                                    patch_size=2, hidden_sizes=[16, 24, 32], neck_hidden_sizes=[8, 8, 16, 16, 24, 24, 32],
                                    num_labels=3, num_attention_heads=2, hidden_dropout_prob=0.0,
                                    attention_probs_dropout_prob=0.0, classifier_dropout_prob=0.0), groups=4)


def hf_timesformer():
    """HF TimeSformer: frames folded into the patch convolution's batch, divided space-time
    attention on [B * frames, patches, d] and [B * patches, frames, d] folds."""
    return _hf(("TimesformerConfig", "TimesformerForVideoClassification"), image_size=16, patch_size=8,
               num_frames=2, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
               num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, drop_path_rate=0)


def video_batch(B, frames=2, size=16, labels=3):
    return {"x": torch.randn(B, frames, 3, size, size, dtype=DT), "y": torch.randint(0, labels, (B,))}


def lora(base, targets):
    import peft
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets, lora_dropout=0.0))
    return model


def peft_prompt(kind):
    """PEFT prompt tuning or P-tuning (an MLP prompt encoder) of GPT-2: PEFT looks the prompts
    up once and repeats them to the batch."""
    import peft
    config = (peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3) if kind == "prompt" else
              peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, encoder_hidden_size=8))
    return peft.get_peft_model(gpt2(), config).to(DT)  # the prompt encoder is made in float32


def peft_adapter(kind):
    """PEFT adapters whose Parameters sit in ParameterDicts that the adapter layer uses itself
    (IA3's scaling vectors on Llama, LoRA on GPT-2's tied embedding): that layer takes the
    generic path."""
    import peft
    if kind == "ia3":
        return peft.get_peft_model(llama(), peft.IA3Config(
            task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "down_proj"],
            feedforward_modules=["down_proj"])).to(DT)
    if kind == "dora":  # its weight norm runs lora_B(lora_A(eye)) and uses the result detached
        return peft.get_peft_model(llama(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                            lora_dropout=0.0, use_dora=True)).to(DT)
    return peft.get_peft_model(gpt2(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["wte", "c_attn"],
                                                       lora_dropout=0.0)).to(DT)


def llama_classifier():
    """LlamaForSequenceClassification: it pools each example's last token that is not padding."""
    return _hf(("LlamaConfig", "LlamaForSequenceClassification"), **_decoder_config(num_labels=3, pad_token_id=1))


def peft_lora_roberta_classifier():
    """PEFT's sequence-classification LoRA: the classifier head trains in full, as a copy in a
    ModulesToSaveWrapper (task_type SEQ_CLS puts it in modules_to_save)."""
    import peft
    base = _hf(("RobertaConfig", "RobertaForSequenceClassification"), vocab_size=VOCAB, hidden_size=16,
               num_hidden_layers=2, num_attention_heads=2, intermediate_size=24, max_position_embeddings=16,
               pad_token_id=1, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return peft.get_peft_model(base, peft.LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=4,
                                                     target_modules=["query", "value"], lora_dropout=0.0)).to(DT)


def lora_gpt2():
    return lora(gpt2(), ["c_attn", "c_proj"])


def lora_llama():
    return lora(llama(), ["q_proj", "v_proj"])


# name: (builder, loss, batch)
ZOO = {
    "gpt2": (gpt2, causal_lm, ids_batch),
    "gpt2_untied": (lambda: gpt2(tied=False), causal_lm, ids_batch),
    "gpt2_checkpointed": (gpt2_checkpointed, causal_lm, ids_batch),
    "bert": (bert, classify_ids, ids_batch),
    "roberta_mlm": (roberta_mlm, masked_lm, ids_batch),
    "distilbert": (distilbert, classify_ids, ids_batch),
    "mpnet": (mpnet, classify_ids, ids_batch),
    "hf_vit": (hf_vit, classify_pixels, image_batch),
    "wav2vec2": (wav2vec2, classify_audio, audio_batch),
    "llama": (llama, causal_lm, ids_batch),
    "mistral": (mistral, causal_lm, ids_batch),
    "qwen2": (qwen2, causal_lm, ids_batch),
    "gemma": (gemma, causal_lm, ids_batch),
    "opt": (opt, causal_lm, ids_batch),
    "falcon": (falcon, causal_lm, ids_batch),
    "falcon_new": (lambda: falcon(new_decoder_architecture=True), causal_lm, ids_batch),
    "mamba": (mamba, causal_lm, ids_batch),
    "mamba2": (mamba2, causal_lm, ids_batch),
    "qwen3_5": (qwen3_5, causal_lm, ids_batch),
    "mixtral": (mixtral, causal_lm, ids_batch),
    "qwen2_moe": (qwen2_moe, causal_lm, ids_batch),
    "gpt_oss": (gpt_oss, causal_lm, ids_batch),
    "t5": (t5, seq2seq_lm, ids_batch),
    "bart": (bart, seq2seq_lm, ids_batch),
    "timm_vit": (timm_vit, classify_images, image_batch),
    "timm_vit_relpos": (timm_vit_relpos, classify_images, lambda B: image_batch(B, size=32)),
    "timm_vit_srelpos": (lambda: timm_vit_relpos(shared=True), classify_images, lambda B: image_batch(B, size=32)),
    "timm_beit": (lambda: timm_attention_reads_qkv_weight("beit_base_patch16_224"), classify_images, image_batch),
    "timm_eva02": (lambda: timm_attention_reads_qkv_weight("eva02_tiny_patch14_224"), classify_images, image_batch),
    "timm_cait": (timm_cait, classify_images, image_batch),
    "timm_pit": (timm_pit, classify_images, lambda B: image_batch(B, size=32)),
    "timm_visformer": (timm_visformer, classify_images, lambda B: image_batch(B, size=32)),
    "timm_volo": (timm_volo, classify_images, lambda B: image_batch(B, size=32)),
    "timm_crossvit": (timm_crossvit, classify_images, lambda B: image_batch(B, size=48)),
    "timm_xcit": (timm_xcit, classify_images, lambda B: image_batch(B, size=32)),
    "timm_convit": (timm_convit, classify_images, image_batch),
    "timm_coat": (timm_coat, classify_images, lambda B: image_batch(B, size=32)),
    "timm_coat_lite": (lambda: timm_coat(parallel_depth=0), classify_images, lambda B: image_batch(B, size=32)),
    "timm_convnext": (timm_convnext, classify_images, lambda B: image_batch(B, size=32)),
    "timm_maxvit": (timm_maxvit, classify_images, lambda B: image_batch(B, size=64)),
    "timm_maxvit_rmlp": (lambda: timm_maxvit("maxvit_rmlp_pico_rw_256"), classify_images, lambda B: image_batch(B, size=64)),
    "timm_coatnet": (lambda: timm_maxvit("coatnet_pico_rw_224"), classify_images, lambda B: image_batch(B, size=64)),
    "timm_swin": (timm_swin, classify_images, lambda B: image_batch(B, size=32)),
    "timm_swinv2": (lambda: timm_swin("swinv2_tiny_window8_256"), classify_images, lambda B: image_batch(B, size=32)),
    "timm_swinv2_cr": (timm_swinv2_cr, classify_images, lambda B: image_batch(B, size=32)),
    "hf_swin": (hf_swin, classify_pixels, lambda B: image_batch(B, size=32)),
    "hf_beit": (hf_beit, classify_pixels, image_batch),
    "hf_data2vec_vision": (lambda: hf_beit(classes=("Data2VecVisionConfig", "Data2VecVisionForImageClassification")),
                           classify_pixels, image_batch),
    "hf_poolformer": (hf_poolformer, classify_pixels, lambda B: image_batch(B, size=32)),
    "hf_bit": (hf_bit, classify_pixels, lambda B: image_batch(B, size=32)),
    "hf_bit_bottleneck": (lambda: hf_bit("bottleneck", padding=None), classify_pixels, lambda B: image_batch(B, size=32)),
    "hf_convnext": (hf_convnext, classify_pixels, lambda B: image_batch(B, size=32)),
    "hf_convnextv2": (hf_convnextv2, classify_pixels, lambda B: image_batch(B, size=32)),
    "timm_convnextv2": (timm_convnextv2, classify_images, lambda B: image_batch(B, size=32)),
    "hf_swinv2": (lambda: hf_swin("Swinv2Config", "Swinv2ForImageClassification"), classify_pixels,
                  lambda B: image_batch(B, size=32)),
    "timm_resnet_gn": (timm_resnet_gn, classify_images, image_batch),
    "timm_resnet_bn_replaced": (timm_resnet_bn_replaced, classify_images, image_batch),
    "timm_bit": (timm_bit, classify_images, lambda B: image_batch(B, size=32)),
    "timm_nf_resnet": (timm_nf_resnet, classify_images, lambda B: image_batch(B, size=32)),
    "timm_mobilenetv3_bn_replaced": (timm_mobilenetv3_bn_replaced, classify_images, lambda B: image_batch(B, size=32)),
    "tv_vit": (tv_vit, classify_images, image_batch),
    "tv_swin": (tv_swin, classify_images, lambda B: image_batch(B, size=32)),
    "tv_swinv2": (lambda: tv_swin(v2=True), classify_images, lambda B: image_batch(B, size=32)),
    "tv_swin3d": (tv_swin3d, classify_images, clip_batch),
    "tv_convnext": (tv_convnext, classify_images, lambda B: image_batch(B, size=32)),
    "tv_maxvit": (tv_maxvit, classify_images, lambda B: image_batch(B, size=32)),
    "tv_resnet_frozen_bn": (tv_resnet_frozen_bn, classify_images, lambda B: image_batch(B, size=32)),
    "hf_resnet_bn_replaced": (hf_resnet_bn_replaced, classify_pixels, lambda B: image_batch(B, size=32)),
    "hf_mobilevit_bn_replaced": (hf_mobilevit_bn_replaced, classify_pixels, lambda B: image_batch(B, size=32)),
    "hf_timesformer": (hf_timesformer, classify_pixels, video_batch),
    "lora_gpt2": (lora_gpt2, causal_lm, ids_batch),
    "peft_ia3_llama": (lambda: peft_adapter("ia3"), causal_lm, ids_batch),
    "peft_lora_embedding_gpt2": (lambda: peft_adapter("lora_embedding"), causal_lm, ids_batch),
    "peft_dora_llama": (lambda: peft_adapter("dora"), causal_lm, ids_batch),
    "peft_prompt_tuning": (lambda: peft_prompt("prompt"), prompted_lm, ids_batch),
    "peft_ptuning": (lambda: peft_prompt("ptuning"), prompted_lm, ids_batch),
    "lora_llama": (lora_llama, causal_lm, ids_batch),
    "llama_classifier_padded": (llama_classifier, classify_padded, padded_ids_batch),
    "peft_lora_roberta_classifier": (peft_lora_roberta_classifier, classify_padded, padded_ids_batch),
}
