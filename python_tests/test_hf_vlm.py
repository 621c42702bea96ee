"""Hugging Face vision-language models with images, as users fine-tune them (session 17): tiny
configs, float64. LLaVA, PaliGemma, Gemma 3 and Idefics3 take pixel_values [B, ...] and train
whole (vision tower, projector, language model) under bk.verify. Qwen2-VL and Qwen2.5-VL take
every image's patches concatenated ([patches, D], split by image_grid_thw): their vision tower
is refused with an error that says to freeze it, and with it frozen the rest is exact against
one backward per example."""
import copy

import pytest
import torch
import torch.nn.functional as F

import bk_kernels as bk
from python_tests.model_reference import expected_update

tf = pytest.importorskip("transformers")
DT = torch.float64
V, T = 64, 10
IMAGE = V - 1  # the image token id


def _text(**extra):
    return dict(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, head_dim=8, **extra)


def _vision(**extra):
    return dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, **extra)


def _llava():
    return tf.LlavaForConditionalGeneration(tf.LlavaConfig(
        vision_config=tf.CLIPVisionConfig(**_vision(image_size=16, patch_size=8)), text_config=tf.LlamaConfig(**_text()),
        image_token_index=IMAGE, vision_feature_layer=-1))


def _paligemma():
    return tf.PaliGemmaForConditionalGeneration(tf.PaliGemmaConfig(
        vision_config=tf.SiglipVisionConfig(**_vision(image_size=16, patch_size=8), projection_dim=16),
        text_config=tf.GemmaConfig(**_text()), image_token_index=IMAGE, projection_dim=16))


def _gemma3():
    return tf.Gemma3ForConditionalGeneration(tf.Gemma3Config(
        vision_config=tf.SiglipVisionConfig(**_vision(image_size=16, patch_size=4)),
        text_config=tf.Gemma3TextConfig(**_text(sliding_window=4)), mm_tokens_per_image=4, image_token_index=IMAGE,
        boi_token_index=V - 2, eoi_token_index=V - 3))


def _idefics3():
    return tf.Idefics3ForConditionalGeneration(tf.Idefics3Config(
        vision_config=tf.Idefics3VisionConfig(**_vision(image_size=16, patch_size=4)),
        text_config=tf.LlamaConfig(**_text()), scale_factor=2, image_token_id=IMAGE))


# model, its image tokens per image, the pixel_values of B images
VLMS = {"llava": (_llava, 4, lambda B: torch.randn(B, 3, 16, 16, dtype=DT)),
        "paligemma": (_paligemma, 4, lambda B: torch.randn(B, 3, 16, 16, dtype=DT)),
        "gemma3": (_gemma3, 4, lambda B: torch.randn(B, 3, 16, 16, dtype=DT)),
        "idefics3": (_idefics3, 4, lambda B: torch.randn(B, 1, 3, 16, 16, dtype=DT))}


def _ids(B, tokens, image_token=IMAGE):
    ids = torch.randint(0, V - 4, (B, T), generator=torch.Generator().manual_seed(B))
    ids[:, 1:1 + tokens] = image_token
    return ids


@pytest.mark.parametrize("frozen_vision", [False, True])
@pytest.mark.parametrize("name", VLMS)
def test_vlm_with_images_under_verify(name, frozen_vision):
    build, tokens, pixels = VLMS[name]
    torch.manual_seed(0)
    model = build().to(DT).train()
    if frozen_vision:
        for path, p in model.named_parameters():
            if "vision" in path:
                p.requires_grad_(False)
    B = 3
    batch = (_ids(B, tokens), pixels(B))
    report = bk.verify(model, lambda m, b: m(input_ids=b[0], pixel_values=b[1], labels=b[0]).loss, batch)
    assert report.ok, str(report)


def _qwen_vl(name):
    text = _text(rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0})
    text.pop("head_dim")
    ids = dict(image_token_id=IMAGE, vision_start_token_id=V - 2, vision_end_token_id=V - 3)
    if name == "qwen2_vl":
        config = tf.Qwen2VLConfig(text_config=text, vision_config=dict(
            depth=1, embed_dim=16, hidden_size=16, num_heads=2, patch_size=2, spatial_merge_size=2,
            temporal_patch_size=2, in_channels=3, mlp_ratio=2), **ids)
        return tf.Qwen2VLForConditionalGeneration(config)
    config = tf.Qwen2_5_VLConfig(text_config=text, vision_config=dict(
        depth=1, hidden_size=16, intermediate_size=32, num_heads=2, patch_size=2, spatial_merge_size=2,
        temporal_patch_size=2, in_channels=3, out_hidden_size=16, fullatt_block_indexes=[0], window_size=8), **ids)
    return tf.Qwen2_5_VLForConditionalGeneration(config)


def _qwen_batch(B):
    """One image of 4 x 4 patches per example (grid t, h, w = 1, 4, 4): 16 patch rows each,
    merged 2 x 2 into 4 image tokens."""
    ids = _ids(B, 4)
    ids[:, 0], ids[:, 5] = V - 2, V - 3  # vision start and end around the image tokens
    pixels = torch.randn(B * 16, 3 * 2 * 2 * 2, dtype=DT, generator=torch.Generator().manual_seed(1))
    return ids, pixels, torch.tensor([[1, 4, 4]] * B)


def _qwen_losses(model, ids, pixels, grid):
    """Each example's mean next-token cross-entropy, in float64 (HF's own loss runs in float32)."""
    logits = model(input_ids=ids, pixel_values=pixels, image_grid_thw=grid,
                   mm_token_type_ids=(ids == IMAGE).long()).logits
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none").mean(1)


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_vl_trains_privately_with_its_vision_tower_frozen(name):
    torch.manual_seed(0)
    reference = _qwen_vl(name).to(DT).train()
    model = copy.deepcopy(reference)
    # B = 4: the engine recovers each example's gradient from the mean loss's (times B), and HF's
    # RMSNorm rounds gradients to float32 inside the float64 model, exactly only for a power of 2
    B, R = 4, 0.5
    ids, pixels, grid = _qwen_batch(B)

    engine = bk.PrivacyEngine(bk.convert(model), batch_size=B, sample_size=30, noise_multiplier=0.0, max_grad_norm=R)
    with pytest.raises(bk.UnsupportedLayoutError, match=r"Freeze the layers that read it .*visual"):
        _qwen_losses(model, ids, pixels, grid)
    assert all(p.grad is None for p in model.parameters()) and engine.steps == 0
    engine.detach()

    for m in (model, reference):
        m.model.visual.requires_grad_(False)
    named = [(n, p) for n, p in reference.named_parameters() if p.requires_grad]
    grads = []
    for b in range(B):  # one backward per example: its own ids, its own image's 16 patch rows
        g = torch.autograd.grad(_qwen_losses(reference, ids[b:b + 1], pixels[16 * b:16 * b + 16], grid[b:b + 1]),
                                [p for _, p in named], allow_unused=True)
        grads.append({n: x if x is not None else torch.zeros_like(p) for (n, p), x in zip(named, g)})
    want = expected_update(grads, [list(grads[0])], R, "abadi", batch_size=1)  # minus the sum of the clipped
    engine = bk.PrivacyEngine(model, batch_size=B, sample_size=30, noise_multiplier=0.0, max_grad_norm=R)
    _qwen_losses(model, ids, pixels, grid).mean().backward()
    assert not bk.generic_modules(model)
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, -want[name], rtol=1e-9, atol=1e-12, msg=name)
