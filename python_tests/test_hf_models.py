"""Hugging Face models (tiny configs, no downloads) and a cross-check against Opacus."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bk_kernels as bk
from python_tests.test_models import BACKENDS, check_model

transformers = pytest.importorskip("transformers")
DT = torch.float64


def tiny_gpt2():
    config = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).to(DT)


def gpt2_loss(model, batch):
    ids = batch["ids"]
    positions = torch.arange(ids.shape[1]).expand(ids.shape[0], -1)
    logits = model(input_ids=ids, position_ids=positions).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view(
        len(ids), -1).mean(1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("style", ["all-layer", "layer-wise"])
def test_gpt2_with_tied_embeddings(style, backend):
    model = tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    inputs = {"ids": torch.randint(0, 40, (3, 7))}
    units = None
    if style == "layer-wise":  # wte and lm_head share their weight: one unit
        by_module = {}
        for name, p in model.named_parameters():
            by_module.setdefault(name.rsplit(".", 1)[0], []).append(name)
        units = list(by_module.values())
    check_model(model, gpt2_loss, inputs, style=style, backend=backend, units=units)


def test_gpt2_conversion_keeps_parameters_and_state_dict():
    model = tiny_gpt2()
    params = {n: p for n, p in model.named_parameters()}
    keys = list(model.state_dict())
    assert bk.convert(model) is model
    assert {n: p for n, p in model.named_parameters()} == params  # the same Parameter objects
    assert list(model.state_dict()) == keys
    c_attn = model.transformer.h[0].attn.c_attn
    assert isinstance(c_attn, bk.nn.BKLayer) and isinstance(c_attn, transformers.pytorch_utils.Conv1D)
    assert c_attn.weight.shape == (16, 48)  # still [in, out]
    bk.convert(model)  # idempotent
    assert {n: p for n, p in model.named_parameters()} == params


def gpt2_plain_loss(model, batch):
    """As users call it: no position_ids, so GPT-2 looks positions up with a [1, T] buffer."""
    ids = batch["ids"]
    logits = model(input_ids=ids).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view(
        len(ids), -1).mean(1)


@pytest.mark.parametrize("B", [1, 2, 4])
def test_gpt2_without_position_ids_is_exact(B):
    """The [1, T] position ids are broadcast over the batch: the position embedding's output is
    expanded to the batch, so its per-example gradients are exact."""
    torch.manual_seed(B)
    check_model(tiny_gpt2(), gpt2_plain_loss, {"ids": torch.randint(0, 40, (B, 7))}, style="all-layer",
                backend="cpu")


def bert_loss(model, batch):
    ids = batch["ids"]
    positions = torch.arange(ids.shape[1]).expand(ids.shape[0], -1)
    logits = model(input_ids=ids, position_ids=positions, token_type_ids=torch.zeros_like(ids)).logits
    return F.cross_entropy(logits, batch["y"], reduction="none")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("style", ["all-layer", "layer-wise"])
def test_bert(style, backend):
    config = transformers.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=24, max_position_embeddings=16, type_vocab_size=2,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3)
    torch.manual_seed(1)
    model = transformers.BertForSequenceClassification(config).to(DT)
    inputs = {"ids": torch.randint(0, 30, (3, 6)), "y": torch.randint(0, 3, (3,))}
    check_model(model, bert_loss, inputs, style=style, backend=backend)


class TinyViT(nn.Module):
    """Patch embedding by Conv2d; class token and positions as Embeddings (one row per example)."""

    def __init__(self, d=16, patches=4, classes=3):
        super().__init__()
        self.patch = nn.Conv2d(3, d, kernel_size=4, stride=4)
        self.cls = nn.Embedding(1, d)
        self.pos = nn.Embedding(patches + 1, d)
        self.blocks = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(d, 2, dim_feedforward=2 * d, dropout=0.0, batch_first=True,
                                       norm_first=True), num_layers=2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, images):
        B = images.shape[0]
        x = self.patch(images).flatten(2).transpose(1, 2)  # [B, patches, d]
        zeros = torch.zeros(B, 1, dtype=torch.long)
        x = torch.cat([self.cls(zeros), x], 1)
        x = x + self.pos(torch.arange(x.shape[1]).expand(B, -1))
        return self.head(self.norm(self.blocks(x)[:, 0]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("style", ["all-layer", "layer-wise"])
def test_small_vit(style, backend):
    torch.manual_seed(2)
    model = TinyViT().to(DT)
    inputs = {"x": torch.randn(3, 3, 8, 8, dtype=DT), "y": torch.randint(0, 3, (3,))}
    loss = lambda m, b: F.cross_entropy(m(b["x"]), b["y"], reduction="none")  # noqa: E731
    check_model(model, loss, inputs, style=style, backend=backend)


def test_agrees_with_opacus_hooks_mode():
    """Opacus 1.6 (hooks, flat clipping, no noise) and bk take the same step on a CNN."""
    opacus = pytest.importorskip("opacus")
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3))
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 3, (6,))
    R, batch_size = 0.5, 8

    ours = bk.convert(copy.deepcopy(model)).double()
    engine = bk.PrivacyEngine(ours, batch_size=batch_size, sample_size=80, noise_multiplier=0.0, max_grad_norm=R)
    opt = engine.attach(torch.optim.SGD(ours.parameters(), lr=1.0))
    F.cross_entropy(ours(x.double()), y).backward()
    opt.step()

    theirs = opacus.GradSampleModule(copy.deepcopy(model).double())  # the hooks implementation
    dp_opt = opacus.optimizers.DPOptimizer(torch.optim.SGD(theirs.parameters(), lr=1.0), noise_multiplier=0.0,
                                           max_grad_norm=R, expected_batch_size=batch_size)
    F.cross_entropy(theirs(x.double()), y).backward()
    dp_opt.step()
    for (name, a), b in zip(ours.named_parameters(), theirs._module.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=name)


# --- the model's own loss (outputs.loss) with token labels ------------------------------------


def _private(model):
    model = bk.convert(model)
    engine = bk.PrivacyEngine(model, batch_size=3, sample_size=30, noise_multiplier=0.0, max_grad_norm=0.1)
    return model, engine, engine.attach(torch.optim.SGD(model.parameters(), lr=1.0))


def test_own_token_mean_loss_with_unequal_token_counts_is_refused_and_changes_nothing():
    """Hugging Face's LM loss averages over all the batch's labelled tokens: with padding (-100)
    one example's gradient is scaled by the others' token counts, so clipping bounds nothing.
    The backward through outputs.loss is refused before anything is recorded."""
    model, engine, optimizer = _private(tiny_gpt2())
    ids = torch.randint(0, 40, (3, 7))
    labels = ids.clone()
    labels[0, 4:] = -100  # a shorter first example
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"own loss \(outputs.loss\).*3 to 6, after the causal shift.*example_losses"):
        model(input_ids=ids, labels=labels).loss.backward()
    with pytest.raises(RuntimeError, match="without a backward"):
        optimizer.step()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()) and engine.steps == 0
    # the same batch through each example's own mean loss trains (labels passed for logging only)
    from bk_kernels.hf import example_losses
    out = model(input_ids=ids, labels=labels)
    example_losses(out.logits, labels, causal=True).mean().backward()
    optimizer.step()
    assert engine.steps == 1


@pytest.mark.parametrize("B", [1, 3])
def test_own_loss_divided_by_a_num_items_in_batch_of_other_examples_is_refused(B):
    """Trainer passes num_items_in_batch, the labelled tokens of ALL of a step's micro-batches:
    the model's loss is then this batch's token sum divided by a count the other micro-batches'
    examples set (even at B = 1). Refused before anything is recorded, unless it is exactly this
    batch's count with every example holding as many tokens (the mean of the examples' means)."""
    model, engine, optimizer = _private(tiny_gpt2())
    ids = torch.randint(0, 40, (B, 7))
    with pytest.raises(ValueError, match=r"num_items_in_batch=40.*Do not pass num_items_in_batch"):
        model(input_ids=ids, labels=ids, num_items_in_batch=40).loss.backward()
    assert all(p.grad is None for p in model.parameters()) and engine.steps == 0
    model(input_ids=ids, labels=ids, num_items_in_batch=6 * B).loss.backward()  # 6 labelled tokens each
    optimizer.step()
    assert engine.steps == 1


def test_own_token_mean_loss_with_equal_token_counts_is_exact():
    """Without padding the token mean is the mean of the examples' own token means: exact, at the
    precision of the loss itself: ForCausalLMLoss casts the logits to float32 (logits.float()) in
    a float64 model, so the batch's and each example's loss gradients are rounded to float32
    (measured 3e-8 of the update apart): float32's tolerance, not float64's."""
    from python_tests.model_reference import (assert_updates_close, expected_update, per_example_grads,
                                              private_update)
    from python_tests.tolerances import REL_TOL

    model = tiny_gpt2()
    inputs = {"ids": torch.randint(0, 40, (3, 7))}
    own_loss = lambda m, b: m(input_ids=b["ids"], labels=b["ids"]).loss  # noqa: E731
    grads = per_example_grads(model, own_loss, inputs)
    names = [n for n, p in model.named_parameters()]
    want = expected_update(grads, [names], 0.1, "abadi", 3)
    got, _ = private_update(model, own_loss, inputs, 3, max_grad_norm=0.1)
    assert_updates_close(got, want, rtol=REL_TOL[torch.float32])


def test_own_loss_of_masked_lm_with_unequal_masks_is_refused_and_class_labels_are_not():
    config = transformers.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    ids = torch.randint(0, 30, (3, 6))
    labels = torch.full_like(ids, -100)
    labels[0, 1], labels[1, 2], labels[1, 4], labels[2, 0] = 5, 6, 7, 8  # 1, 2 and 1 masked tokens
    model, engine, _ = _private(transformers.BertForMaskedLM(config).to(DT))
    with pytest.raises(ValueError, match=r"1 to 2\)"):
        model(input_ids=ids, labels=labels).loss.backward()
    model, engine, optimizer = _private(transformers.BertForSequenceClassification(config).to(DT))
    model(input_ids=ids, labels=torch.tensor([0, 1, 0])).loss.backward()  # a mean over examples: fine
    optimizer.step()
    assert engine.steps == 1


def _padded_ids(B, T, vocab, lengths):
    ids = torch.randint(3, vocab, (B, T))
    mask = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).long()
    return ids.masked_fill(mask == 0, 1), mask


@pytest.mark.parametrize("B", [1, 3, 8])
@pytest.mark.parametrize("global_tokens", [None, "cls+2"])
def test_longformer_runs_its_self_attention_sequence_first(B, global_tokens):
    """Longformer's self-attention transposes [B, T, d] to [T, B, d] before its query, key and
    value Linears (and the global ones on [G, B, d]): those layers read the examples on dim 1
    inside that module (bk.nn.sequence_first). Before, refused (dim 0 held the positions); at
    B = 8 = T (the window pads T to 8) the shapes alone could not tell."""
    config = transformers.LongformerConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                           intermediate_size=24, max_position_embeddings=40, attention_window=4,
                                           num_labels=3, pad_token_id=1, hidden_dropout_prob=0.0,
                                           attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = transformers.LongformerForSequenceClassification(config)
    ids, mask = _padded_ids(B, 7, 40, [7 - b % 3 for b in range(B)])
    glob = None
    if global_tokens:  # the class token and each example's third token attend globally
        glob = torch.zeros_like(ids)
        glob[:, 0] = glob[:, 2] = 1
    y = torch.randint(0, 3, (B,))

    def loss(m, batch):
        ids, mask, glob, y = batch
        return F.cross_entropy(m(input_ids=ids, attention_mask=mask, global_attention_mask=glob).logits, y)

    report = bk.verify(model, loss, (ids, mask, glob, y))
    assert report.ok, report
    assert not bk.generic_modules(bk.convert(model))
    assert isinstance(model.longformer.encoder.layer[0].attention.self, bk.nn.sequence_first.SequenceFirstInside)


def test_led_encoder_runs_its_self_attention_sequence_first():
    config = transformers.LEDConfig(vocab_size=40, d_model=16, encoder_layers=1, decoder_layers=1,
                                    encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=24,
                                    decoder_ffn_dim=24, max_encoder_position_embeddings=32,
                                    max_decoder_position_embeddings=32, attention_window=4, pad_token_id=1,
                                    dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    torch.manual_seed(0)
    model = transformers.LEDForConditionalGeneration(config)
    # example 1 padded by 2 of the 8 (7 + the window's padding): LED's own backward gives NaN
    # gradients, without bk, when padding fills a query's whole window (5 of 8)
    ids, mask = _padded_ids(3, 7, 40, [7, 6, 7])
    labels = torch.randint(3, 40, (3, 5))
    loss = lambda m, b: m(input_ids=b[0], attention_mask=b[1], labels=b[2]).loss  # noqa: E731  (5 labels each)
    report = bk.verify(model, loss, (ids, mask, labels))
    assert report.ok, report


def _speech_config(name, **extra):
    """A small config of a transformers speech encoder, its SpecAugment on (mask_time_prob > 0, as
    in the pretrained checkpoints: the root owns masked_spec_embed)."""
    return transformers.AutoConfig.for_model(
        name, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24, num_labels=3,
        conv_dim=(8, 8), conv_stride=(4, 2), conv_kernel=(8, 4), num_feat_extract_layers=2, num_conv_pos_embeddings=4,
        num_conv_pos_embedding_groups=2, classifier_proj_size=8, mask_time_prob=0.3, mask_time_length=2,
        mask_time_min_masks=1, hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        feat_proj_dropout=0.0, final_dropout=0.0, layerdrop=0.0, **extra)


def _audio_batch(B, samples=200):
    wav = torch.randn(B, samples, dtype=DT)
    mask = (torch.arange(samples)[None] < torch.tensor([samples - 40 * (b % 3) for b in range(B)])[:, None]).long()
    return wav * mask, mask, torch.randint(0, 3, (B,))


@pytest.mark.parametrize("name", ["wav2vec2", "hubert", "wavlm", "data2vec-audio", "wav2vec2-conformer"])
@pytest.mark.parametrize("B", [1, 3])
def test_speech_encoders_with_spec_augment_mask_embedding(name, B):
    """The root owns masked_spec_embed (SpecAugment): it used to take the generic path, the whole
    model recomputed per example, and refused in training (the recompute drew other masks).
    Now only _mask_hidden_states is book-kept. bk.verify runs in eval mode, where transformers
    applies a mask only when given one: given here, [B, frames], split per example with the batch.
    wav2vec2-conformer's relative positions ([1, 2T-1, d], viewed by their own leading dims after
    linear_pos) are expanded to the batch first: refused before (a shape error)."""
    torch.manual_seed(0)
    model = transformers.AutoModelForAudioClassification.from_config(_speech_config(name)).to(DT)
    if name == "wav2vec2-conformer":  # its convolution module's BatchNorm
        model = bk.replace_batchnorm(model)
    wav, mask, y = _audio_batch(B)
    frames = model._get_feat_extract_output_lengths(torch.tensor(wav.shape[1])).item()
    time_mask = torch.zeros(B, frames, dtype=torch.bool)
    time_mask[:, 1] = True
    time_mask[-1, 2:4] = True

    def loss(m, batch):
        wav, mask, time_mask, y = batch
        return F.cross_entropy(m(input_values=wav, attention_mask=mask, mask_time_indices=time_mask).logits, y)

    report = bk.verify(model, loss, (wav, mask, time_mask, y))
    assert report.ok, report
    base = getattr(model, model.base_model_prefix)
    assert not any(path == model.base_model_prefix for path, _, _ in bk.generic_modules(bk.convert(model)))
    assert isinstance(base, bk.nn.speech._SpecAugmentOwner)


def test_spec_augment_in_training_draws_the_masks_transformers_draws():
    """In training the masks are drawn at random (numpy): the private forward draws what
    transformers' own forward draws from the same seed, and the step trains masked_spec_embed."""
    import numpy as np
    torch.manual_seed(0)
    plain = transformers.AutoModelForAudioClassification.from_config(_speech_config("wav2vec2")).to(DT).train()
    model = bk.convert(copy.deepcopy(plain))
    engine = bk.PrivacyEngine(model, batch_size=4, sample_size=100, noise_multiplier=0.0, max_grad_norm=1.0)
    optimizer = engine.attach(torch.optim.SGD(model.parameters(), lr=1.0))
    wav, mask, y = _audio_batch(4)
    np.random.seed(0)
    want = plain(input_values=wav, attention_mask=mask).logits
    np.random.seed(0)
    got = model(input_values=wav, attention_mask=mask).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    before = model.wav2vec2.masked_spec_embed.detach().clone()
    F.cross_entropy(got, y).backward()
    optimizer.step()
    assert engine.steps == 1 and not torch.equal(model.wav2vec2.masked_spec_embed, before)


@pytest.mark.parametrize("B", [1, 3])
def test_wavlm_attention_and_sew_d_relative_attention(B):
    """WavLM's attention hands its projections' weights to F.multi_head_attention_forward in a
    helper (refused at the backward before: 'ordinary gradient'); SEW-D's is an older copy of
    DeBERTa-v2's (its position table refused by a LayerNorm before). Both exact now, with padding."""
    for name, extra in (("wavlm", dict(num_buckets=16, max_bucket_distance=32)),
                        ("sew-d", dict(squeeze_factor=1, position_buckets=8, max_position_embeddings=16))):
        torch.manual_seed(0)
        model = transformers.AutoModelForAudioClassification.from_config(_speech_config(name, **extra)).to(DT)
        wav, mask, y = _audio_batch(B)
        loss = lambda m, b: F.cross_entropy(m(input_values=b[0], attention_mask=b[1]).logits, b[2])  # noqa: E731
        report = bk.verify(model, loss, (wav, mask, y))
        assert report.ok, (name, report)
        generic = {t for _, t, _ in bk.generic_modules(bk.convert(model))}
        # the weight-normed positional convolution; SEW-D's encoder for get_rel_embedding only (as DeBERTa-v2's)
        assert generic <= {"ParametrizedConv1d", "SEWDTransformerEncoder"}, (name, generic)


def _xlnet_config(**extra):
    return transformers.XLNetConfig(vocab_size=40, d_model=16, n_layer=2, n_head=2, d_inner=24, dropout=0.0,
                                    pad_token_id=1, num_labels=3, **extra)


@pytest.mark.parametrize("B", [1, 3, 8])
def test_xlnet_runs_sequence_first_inside(B):
    """XLNetModel transposes its input to [T, B] for the whole transformer: its forward runs in
    the sequence-first scope, and its relative attention (Parameters of its own in einsums) takes
    the generic path with its inputs read on the sequence-first dims. Refused before (dim 0 of the
    word embedding's ids held the positions); B = 8 = T."""
    torch.manual_seed(0)
    model = transformers.XLNetForSequenceClassification(_xlnet_config()).to(DT)
    ids, mask = _padded_ids(B, 8, 40, [8 - b % 3 for b in range(B)])
    y = torch.randint(0, 3, (B,))
    loss = lambda m, b: F.cross_entropy(m(input_ids=b[0], attention_mask=b[1]).logits, b[2])  # noqa: E731
    report = bk.verify(model, loss, (ids, mask, y))
    assert report.ok, report
    assert {t for _, t, _ in bk.generic_modules(bk.convert(model))} == {"XLNetRelativeAttention"}


def test_xlnet_causal_lm_and_its_mask_embedding():
    """The uni-directional LM (a causal [T, T] mask that holds no examples) is exact. Two-stream
    pretraining (target_mapping: mask_emb used outside any bk layer, the query stream's
    data-dependent control flow in the attention's recompute) is refused at the backward."""
    torch.manual_seed(0)
    model = transformers.XLNetLMHeadModel(_xlnet_config(attn_type="uni")).to(DT)
    ids = torch.randint(2, 40, (3, 7))
    report = bk.verify(model, lambda m, b: m(input_ids=b[0], labels=b[0]).loss, (ids,))
    assert report.ok, report
    model = bk.convert(transformers.XLNetLMHeadModel(_xlnet_config()))  # float32: its two-stream path fails in float64
    engine = bk.PrivacyEngine(model, batch_size=3, sample_size=30, noise_multiplier=1.0)
    optimizer = engine.attach(torch.optim.SGD(model.parameters(), lr=0.1))
    target_mapping = torch.zeros(3, 1, 7)
    target_mapping[:, 0, -1] = 1.0
    perm_mask = torch.zeros(3, 7, 7)
    perm_mask[:, :, -1] = 1.0
    out = model(input_ids=ids, perm_mask=perm_mask, target_mapping=target_mapping).logits
    with pytest.raises(RuntimeError, match="mask_emb.*ordinary|XLNetRelativeAttention.*cannot be vmapped"):
        F.cross_entropy(out[:, 0], ids[:, -1]).backward()
    assert engine.steps == 0


@pytest.mark.parametrize("B", [1, 3])
def test_siglip_pooling_head_keeps_its_layers_fused(B):
    """SigLIP's attention-pooling head repeats its probe to the batch: the head took the generic
    path (its attention and MLP recomputed per example). Now the probe is made per example by a
    shift and nothing of the vision tower is generic."""
    config = transformers.SiglipVisionConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                             num_attention_heads=2, image_size=16, patch_size=4)
    torch.manual_seed(0)

    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.vision = transformers.SiglipVisionModel(config)
            self.head = nn.Linear(16, 3)

        def forward(self, x):
            return self.head(self.vision(pixel_values=x).pooler_output)

    model = Classifier().to(DT)
    x, y = torch.randn(B, 3, 16, 16, dtype=DT), torch.randint(0, 3, (B,))
    report = bk.verify(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), (x, y))
    assert report.ok, report
    assert not bk.generic_modules(bk.convert(model))


@pytest.mark.parametrize("B", [2, 4])
def test_funnel_with_padding(B):
    """Funnel's relative attention (generic path, block sizes 2) gets its position embeddings and cls_mask,
    which hold no examples, with its masks: after pooling T = 8 to 4 and 2 they have B rows, and
    read as the batch they were split per example (with a padding mask refused at the backward).
    Now they are given whole to each example's recompute."""
    config = transformers.FunnelConfig(vocab_size=40, d_model=16, n_head=2, d_head=8, d_inner=24, block_sizes=[2, 2, 2],
                                       num_labels=3, hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                                       pad_token_id=1)
    torch.manual_seed(0)
    model = transformers.FunnelForSequenceClassification(config).to(DT)
    ids, mask = _padded_ids(B, 8, 40, [8 - b % 3 for b in range(B)])
    y = torch.randint(0, 3, (B,))
    loss = lambda m, b: F.cross_entropy(m(input_ids=b[0], attention_mask=b[1]).logits, b[2])  # noqa: E731
    report = bk.verify(model, loss, (ids, mask, y))
    assert report.ok, report


@pytest.mark.parametrize("B", [1, 3])
def test_dinov2_layer_scale_through_bk_scale(B):
    """DINOv2's LayerScale (`hidden_state * self.lambda1`) took the generic path, one recompute per
    block and example; now bk.nn.scale. Only the embeddings (class token, positions) stay generic."""
    config = transformers.Dinov2Config(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                                       image_size=16, patch_size=4, num_labels=3, layerscale_value=0.5)
    torch.manual_seed(0)
    model = transformers.Dinov2ForImageClassification(config).to(DT)
    x, y = torch.randn(B, 3, 16, 16, dtype=DT), torch.randint(0, 3, (B,))
    report = bk.verify(model, lambda m, b: F.cross_entropy(m(pixel_values=b[0]).logits, b[1]), (x, y))
    assert report.ok, report
    assert {t for _, t, _ in bk.generic_modules(bk.convert(model))} == {"Dinov2Embeddings"}


@pytest.mark.parametrize("B", [1, 3])
def test_vit_embeddings_fused_and_their_fallbacks(B):
    """HF ViT's embeddings (cls_token, position_embeddings) took the generic path, the patch
    convolution recomputed per example: now shifts around a bk Conv2d. Calls with interpolated
    positions (another image size) or a mask (bool_masked_pos) take the generic path: exact too."""
    config = transformers.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
                                    image_size=16, patch_size=4, encoder_stride=4, num_labels=3, hidden_dropout_prob=0.0,
                                    attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(config).to(DT)
    y = torch.randint(0, 3, (B,))
    for size, interpolate in ((16, False), (24, True)):
        x = torch.randn(B, 3, size, size, dtype=DT)
        loss = lambda m, b: F.cross_entropy(  # noqa: E731
            m(pixel_values=b[0], interpolate_pos_encoding=interpolate).logits, b[1])
        report = bk.verify(model, loss, (x, y))
        assert report.ok, (size, report)
    assert not bk.generic_modules(bk.convert(copy.deepcopy(model)))
    masked = transformers.ViTForMaskedImageModeling(config).to(DT)
    x = torch.randn(B, 3, 16, 16, dtype=DT)
    positions = torch.zeros(B, 16, dtype=torch.bool)
    positions[:, ::3] = True
    report = bk.verify(masked, lambda m, b: m(pixel_values=b[0], bool_masked_pos=b[1]).loss, (x, positions))
    assert report.ok, report


@pytest.mark.parametrize("B", [1, 3, 4])
def test_perceiver_latents_and_learned_positions_per_example(B):
    """Perceiver's latents (PerceiverEmbeddings) and learned image positions
    (PerceiverTrainablePositionEncoding) are expanded to the batch from the batch size alone
    (`forward(batch_size)`): on the generic path each example's recompute returned all B rows and
    the model failed with a shape error. Now the rows are made per example by shifts; neither
    module is generic. B = 4 is the number of latents."""
    config = transformers.PerceiverConfig(num_latents=4, d_latents=16, d_model=16, num_blocks=1,
                                          num_self_attends_per_block=1, num_self_attention_heads=2,
                                          num_cross_attention_heads=1, image_size=8, num_labels=3,
                                          qk_channels=8, v_channels=16)
    torch.manual_seed(0)
    model = transformers.PerceiverForImageClassificationLearned(config).to(DT)
    x, y = torch.randn(B, 3, 8, 8, dtype=DT), torch.randint(0, 3, (B,))
    report = bk.verify(model, lambda m, b: F.cross_entropy(m(pixel_values=b[0]).logits, b[1]), (x, y))
    assert report.ok, report
    generic = {t for _, t, _ in bk.generic_modules(bk.convert(copy.deepcopy(model)))}
    assert not generic & {"PerceiverEmbeddings", "PerceiverTrainablePositionEncoding"}, generic
