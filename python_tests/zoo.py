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


def classify_pixels(model, batch):
    out = model(pixel_values=batch["x"])
    return F.cross_entropy(out.logits, batch["y"], reduction="none")


def classify_images(model, batch):
    return F.cross_entropy(model(batch["x"]), batch["y"], reduction="none")


def ids_batch(B, labels=3):
    return {"ids": torch.randint(0, VOCAB, (B, T)), "y": torch.randint(0, labels, (B,))}


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


def timm_convnext():
    import timm
    return timm.create_model("convnext_atto", pretrained=False, num_classes=3, dims=(8, 16, 16, 16),
                             depths=(1, 1, 1, 1)).to(DT)


def timm_resnet_gn():
    import timm
    from functools import partial
    return timm.create_model("resnet18", pretrained=False, num_classes=3,
                             norm_layer=partial(timm.layers.GroupNorm, num_groups=2)).to(DT)


def lora(base, targets):
    import peft
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets, lora_dropout=0.0))
    return model


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
    "hf_vit": (hf_vit, classify_pixels, image_batch),
    "llama": (llama, causal_lm, ids_batch),
    "mistral": (mistral, causal_lm, ids_batch),
    "qwen2": (qwen2, causal_lm, ids_batch),
    "gemma": (gemma, causal_lm, ids_batch),
    "opt": (opt, causal_lm, ids_batch),
    "t5": (t5, seq2seq_lm, ids_batch),
    "bart": (bart, seq2seq_lm, ids_batch),
    "timm_vit": (timm_vit, classify_images, image_batch),
    "timm_convnext": (timm_convnext, classify_images, lambda B: image_batch(B, size=32)),
    "timm_resnet_gn": (timm_resnet_gn, classify_images, image_batch),
    "lora_gpt2": (lora_gpt2, causal_lm, ids_batch),
    "lora_llama": (lora_llama, causal_lm, ids_batch),
}
