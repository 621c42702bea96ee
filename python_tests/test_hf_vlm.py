"""Hugging Face vision-language models with images, as users fine-tune them (session 17): tiny
configs, float64. LLaVA, PaliGemma, Gemma 3 and Idefics3 take pixel_values [B, ...] and train
whole (vision tower, projector, language model) under bk.verify. Qwen2-VL and Qwen2.5-VL take
every image's patches concatenated ([patches, D], split by image_grid_thw): since session 18 their
vision tower maps its rows to the examples through the placeholder tokens (nn/patch_rows.py) and
trains exactly, whatever the number of images per example."""
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
    if name in ("qwen3_5", "qwen3_5_moe"):  # Qwen3-VL's tower on a hybrid (gated delta net) language model
        moe = name == "qwen3_5_moe"
        text.update(num_hidden_layers=2, layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2,
                    linear_num_value_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
                    linear_conv_kernel_dim=2, head_dim=8)
        text["rope_parameters"].update(mrope_interleaved=True, partial_rotary_factor=1.0)
        if moe:
            text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
                        shared_expert_intermediate_size=8, experts_implementation="eager")
        config_cls = tf.Qwen3_5MoeConfig if moe else tf.Qwen3_5Config
        model_cls = tf.Qwen3_5MoeForConditionalGeneration if moe else tf.Qwen3_5ForConditionalGeneration
        return model_cls(config_cls(text_config=text, vision_config=dict(
            depth=2, hidden_size=16, intermediate_size=32, num_heads=2, patch_size=2, spatial_merge_size=2,
            temporal_patch_size=2, in_channels=3, out_hidden_size=16, num_position_embeddings=16),
            **(dict(experts_implementation="eager") if moe else {}), **ids))
    if name in ("glm4v", "glm4v_moe"):  # a learned position table resampled per image (grid_sample), a downsampling conv
        text["rope_parameters"]["partial_rotary_factor"] = 1.0
        moe = name == "glm4v_moe"  # GLM-4.5V: the same tower before an MoE language model
        if moe:
            text.update(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=8, n_shared_experts=1,
                        first_k_dense_replace=0, n_group=1, topk_group=1, experts_implementation="eager")
        config_cls = tf.Glm4vMoeConfig if moe else tf.Glm4vConfig
        model_cls = tf.Glm4vMoeForConditionalGeneration if moe else tf.Glm4vForConditionalGeneration
        return model_cls(config_cls(text_config=text, vision_config=dict(
            depth=1, hidden_size=16, intermediate_size=32, num_heads=2, patch_size=2, spatial_merge_size=2,
            temporal_patch_size=2, in_channels=3, out_hidden_size=16, image_size=8), image_token_id=IMAGE,
            image_start_token_id=V - 2, image_end_token_id=V - 3, video_token_id=V - 4, video_start_token_id=V - 5,
            video_end_token_id=V - 6, **(dict(experts_implementation="eager") if moe else {})))
    if name == "qwen3_vl":  # a learned position table (an Embedding) and deepstack mergers in the tower
        text["rope_parameters"]["mrope_interleaved"] = True
        return tf.Qwen3VLForConditionalGeneration(tf.Qwen3VLConfig(text_config=text, vision_config=dict(
            depth=2, hidden_size=16, intermediate_size=32, num_heads=2, patch_size=2, spatial_merge_size=2,
            temporal_patch_size=2, in_channels=3, out_hidden_size=16, num_position_embeddings=16,
            deepstack_visual_indexes=[0]), **ids))
    if name == "qwen2_vl":
        config = tf.Qwen2VLConfig(text_config=text, vision_config=dict(
            depth=1, embed_dim=16, hidden_size=16, num_heads=2, patch_size=2, spatial_merge_size=2,
            temporal_patch_size=2, in_channels=3, mlp_ratio=2), **ids)
        return tf.Qwen2VLForConditionalGeneration(config)
    config = tf.Qwen2_5_VLConfig(text_config=text, vision_config=dict(
        depth=1, hidden_size=16, intermediate_size=32, num_heads=2, patch_size=2, spatial_merge_size=2,
        temporal_patch_size=2, in_channels=3, out_hidden_size=16, fullatt_block_indexes=[0], window_size=8), **ids)
    return tf.Qwen2_5_VLForConditionalGeneration(config)


def _qwen_losses(model, ids, pixels, grid):
    """Each example's mean next-token cross-entropy, in float64 (HF's own loss runs in float32)."""
    logits = model(input_ids=ids, pixel_values=pixels, image_grid_thw=grid,
                   mm_token_type_ids=(ids == IMAGE).long()).logits
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none").mean(1)


def _ragged_qwen_batch():
    """4 examples with 1, 0, 2 and 1 images of 4 x 4 or 2 x 4 patches (4 or 2 image tokens after
    the 2 x 2 merge), each image's tokens between a vision start and end token: (ids [4, 12],
    pixel rows of all images [56, 24], grid_thw [4, 3], the images of each example)."""
    images = {0: [(1, 4, 4)], 1: [], 2: [(1, 4, 4), (1, 2, 4)], 3: [(1, 2, 4)]}
    ids = torch.randint(0, V - 4, (4, 12), generator=torch.Generator().manual_seed(7))
    grids, of_example = [], {}
    for b, grid in images.items():
        at = 1
        of_example[b] = []
        for t, h, w in grid:
            tokens = t * h * w // 4
            ids[b, at], ids[b, at + 1:at + 1 + tokens], ids[b, at + 1 + tokens] = V - 2, IMAGE, V - 3
            at += tokens + 2
            of_example[b].append(len(grids))
            grids.append((t, h, w))
    grid = torch.tensor(grids)
    pixels = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 2 * 2, dtype=DT, generator=torch.Generator().manual_seed(1))
    return ids, pixels, grid, of_example


def _example_inputs(ids, pixels, grid, of_example, b):
    """Example b alone: its ids, its images' patch rows and grid rows (None without an image)."""
    if not of_example[b]:
        return ids[b:b + 1], None, None
    starts = torch.cumsum(grid.prod(-1), 0) - grid.prod(-1)
    rows = torch.cat([torch.arange(int(starts[i]), int(starts[i] + grid[i].prod())) for i in of_example[b]])
    return ids[b:b + 1], pixels[rows], grid[of_example[b]]


@pytest.fixture
def glm4v_in_float64(monkeypatch):
    """GLM-4V resamples its position table in float32 even in a float64 model (transformers'
    choice, 3e-8 from a float64 sample here): both sides resample in float64 for the comparison
    at 1e-9 (bk's own float32 default is checked against grid_sample in test_glm4v_bicubic_taps)."""
    import inspect
    import textwrap

    from bk_kernels.nn.patch_rows import _Glm4vPositions
    for module, name in (("glm4v", "Glm4vVisionEmbeddings"), ("glm4v_moe", "Glm4vMoeVisionEmbeddings")):
        glm = pytest.importorskip(f"transformers.models.{module}.modeling_{module}")
        cls = getattr(glm, name)
        source = textwrap.dedent(inspect.getsource(cls.forward)).replace("float32", "float64")
        namespace = dict(vars(glm))
        exec(source, namespace)  # noqa: S102  (transformers' own forward, one dtype changed)
        monkeypatch.setattr(cls, "forward", namespace["forward"])
    monkeypatch.setattr(_Glm4vPositions, "sample_dtype", torch.float64)


def _reference_update(reference, losses_of, B):
    """(want, R): minus the sum of the clipped per-example gradients of one backward per example
    (losses_of(model, b): example b's loss alone), R between the 2nd and 3rd smallest norms."""
    named = [(n, p) for n, p in reference.named_parameters() if p.requires_grad]
    grads = []
    for b in range(B):
        g = torch.autograd.grad(losses_of(reference, b), [p for _, p in named], allow_unused=True)
        grads.append({n: x if x is not None else torch.zeros_like(p) for (n, p), x in zip(named, g)})
    norms = sorted(sum(x.square().sum() for x in g.values()).sqrt().item() for g in grads)
    R = (norms[1] + norms[2]) / 2  # two clipped, two not
    return expected_update(grads, [list(grads[0])], R, "abadi", batch_size=1), R


def _assert_update(model, want):
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, -want[name], rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("frozen_vision", [False, True])
@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5", "qwen3_5_moe", "glm4v", "glm4v_moe"])
def test_qwen_vl_trains_privately_with_images_of_any_number_per_example(name, frozen_vision, request):
    """The vision tower's rows are every image's patches (nn/patch_rows.py): exact against one
    backward per example, whose own images alone run through the tower, with 1, 0, 2 and 1
    images in the 4 examples, the tower trained or frozen."""
    if name.startswith("glm4v"):
        request.getfixturevalue("glm4v_in_float64")
    torch.manual_seed(0)
    reference = _qwen_vl(name).to(DT).train()
    if frozen_vision:
        reference.model.visual.requires_grad_(False)
    model = copy.deepcopy(reference)
    # B = 4: the engine recovers each example's gradient from the mean loss's (times B), and HF's
    # RMSNorm rounds gradients to float32 inside the float64 model, exactly only for a power of 2
    B = 4
    batch = _ragged_qwen_batch()
    # one backward per example: its own ids, its own images' patch rows
    want, R = _reference_update(reference, lambda m, b: _qwen_losses(m, *_example_inputs(*batch, b)), B)
    engine = bk.PrivacyEngine(bk.convert(model), batch_size=B, sample_size=30, noise_multiplier=0.0, max_grad_norm=R)
    _qwen_losses(model, *batch[:3]).mean().backward()
    # the MoE routers (Qwen3.5-MoE's, GLM-4.5V's) own the weight they apply inline: the generic path, outside the tower
    assert all(path.endswith("mlp.gate") for path, _, _ in bk.generic_modules(model)) and engine._examples == B
    _assert_update(model, want)


def test_qwen_vl_patch_rows_that_cannot_be_matched_are_refused():
    """The tower's rows are mapped through the placeholder tokens of input_ids: a count that does
    not match, or no input_ids, is refused when the tower starts (before HF's own check)."""
    torch.manual_seed(0)
    model = bk.convert(_qwen_vl("qwen2_vl").to(DT).train())
    engine = bk.PrivacyEngine(model, batch_size=4, sample_size=30, noise_multiplier=0.0)
    ids, pixels, grid, _ = _ragged_qwen_batch()
    short = ids.clone()
    short[0, 2] = 5  # one image token of example 0 made text
    with pytest.raises(bk.UnsupportedLayoutError, match=r"model.visual .*hold 11 placeholder tokens for its 12 merged rows"):
        _qwen_losses(model, short, pixels, grid)
    embeds = model.model.get_input_embeddings()(ids)
    with pytest.raises(bk.UnsupportedLayoutError, match="not given its input_ids"):
        model(inputs_embeds=embeds, pixel_values=pixels, image_grid_thw=grid, mm_token_type_ids=(ids == IMAGE).long())
    assert engine.steps == 0 and all(p.grad is None for p in model.parameters())
    model.model.visual.requires_grad_(False)  # frozen: nothing to map
    engine = bk.PrivacyEngine(model, batch_size=4, sample_size=30, noise_multiplier=0.0)
    _qwen_losses(model, ids, pixels, grid).mean().backward()


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_vl_with_images_and_videos_in_one_batch(name):
    """The tower runs twice in one forward (the images, then the videos): each call's rows are
    mapped through its own placeholder tokens (told apart by their numbers of rows)."""
    video = V - 4
    torch.manual_seed(0)
    reference = _qwen_vl(name).to(DT).train()
    reference.config.video_token_id = video
    model = copy.deepcopy(reference)
    B = 4
    ids = torch.randint(0, V - 5, (B, 12), generator=torch.Generator().manual_seed(3))
    kinds = ["video", "image", None, "video"]  # a video of 2 frames of 2 x 4 patches, an image of 4 x 4
    grids, media = {"image": [], "video": []}, []
    for b, kind in enumerate(kinds):
        media.append(None)
        if kind is not None:
            t, h, w = (1, 4, 4) if kind == "image" else (2, 2, 4)
            tokens = t * h * w // 4
            ids[b, 1], ids[b, 2:2 + tokens], ids[b, 2 + tokens] = V - 2, IMAGE if kind == "image" else video, V - 3
            media[b] = (kind, len(grids[kind]))
            grids[kind].append((t, h, w))
    grids = {k: torch.tensor(g) for k, g in grids.items()}
    pixels = {k: torch.randn(int(g.prod(-1).sum()), 24, dtype=DT, generator=torch.Generator().manual_seed(len(k)))
              for k, g in grids.items()}
    starts = {k: torch.cumsum(g.prod(-1), 0) - g.prod(-1) for k, g in grids.items()}

    def losses(m, examples):
        inputs = {}
        for kind, (pixel_key, grid_key) in {"image": ("pixel_values", "image_grid_thw"),
                                            "video": ("pixel_values_videos", "video_grid_thw")}.items():
            own = [media[b][1] for b in examples if media[b] is not None and media[b][0] == kind]
            if own:
                rows = torch.cat([torch.arange(int(starts[kind][i]), int(starts[kind][i] + grids[kind][i].prod()))
                                  for i in own])
                inputs[pixel_key], inputs[grid_key] = pixels[kind][rows], grids[kind][own]
        x = ids[examples]
        logits = m(input_ids=x, mm_token_type_ids=(x == IMAGE).long() + 2 * (x == video).long(), **inputs).logits
        return F.cross_entropy(logits[:, :-1].transpose(1, 2), x[:, 1:], reduction="none").mean(1)

    want, R = _reference_update(reference, lambda m, b: losses(m, [b]), B)
    bk.PrivacyEngine(bk.convert(model), batch_size=B, sample_size=30, noise_multiplier=0.0, max_grad_norm=R)
    losses(model, list(range(B))).mean().backward()
    _assert_update(model, want)


def test_verify_checks_a_qwen_vl_batch_through_split():
    """bk.verify splits a batch on dim 0 of its tensors; a Qwen-VL batch's pixel rows are not its
    examples: split= gives each example's own ids, patch rows and grid rows."""
    torch.manual_seed(0)
    model = _qwen_vl("qwen2_5_vl").train()
    ids, pixels, grid, of_example = _ragged_qwen_batch()

    def loss_fn(m, batch):
        return _qwen_losses(m, *batch).mean()

    def split(batch):
        return [_example_inputs(*batch, of_example, b) for b in range(len(batch[0]))]
    report = bk.verify(model, loss_fn, (ids, pixels.float(), grid), split=split)
    assert report.ok and report.batch_size == 4, str(report)
    with pytest.raises(ValueError, match="give split="):
        bk.verify(model, loss_fn, (ids, pixels.float(), grid))


def test_qwen_vl_empty_batch_and_private_trainer():
    """An empty Poisson batch collated from an example with an image has 0-row pixel_values and
    image_grid_thw: its padding example runs without them (no image); PrivateTrainer trains the
    tower through a collator that concatenates the examples' patch rows."""
    from bk_kernels.hf import PrivateTrainer

    torch.manual_seed(0)
    model = _qwen_vl("qwen2_vl")
    ids, pixels, grid, of_example = _ragged_qwen_batch()
    engine = bk.PrivacyEngine(bk.convert(model), batch_size=4, sample_size=40, noise_multiplier=1.0)
    optimizer = engine.attach(torch.optim.SGD(model.parameters(), lr=0.1))
    losses = _qwen_losses(model, ids[:0], pixels[:0].float(), grid[:0])
    assert losses.shape == (0,)
    losses.sum().backward()
    optimizer.step()
    assert engine.steps == 1
    engine.detach()

    def collate(items):
        out = {"input_ids": torch.stack([e["input_ids"] for e in items])}
        out["labels"], out["mm_token_type_ids"] = out["input_ids"].clone(), (out["input_ids"] == IMAGE).long()
        with_image = [e for e in items if e["pixel_values"] is not None]
        if with_image:
            out["pixel_values"] = torch.cat([e["pixel_values"] for e in with_image])
            out["image_grid_thw"] = torch.cat([e["image_grid_thw"] for e in with_image])
        return out
    examples = []
    for b in range(4):
        x, p, g = _example_inputs(ids, pixels.float(), grid, of_example, b)
        examples += [dict(input_ids=x[0], pixel_values=p, image_grid_thw=g)] * 10
    args = tf.TrainingArguments(output_dir="/tmp/bk-test-qwen-vl-trainer", per_device_train_batch_size=4,
                                gradient_accumulation_steps=2, max_steps=3, learning_rate=1e-3, report_to=[],
                                remove_unused_columns=False, use_cpu=True, save_strategy="no")
    trainer = PrivateTrainer(model=model, args=args, train_dataset=examples, data_collator=collate,
                             noise_multiplier=1.0, seed=0)
    before = model.model.visual.blocks[0].attn.qkv.weight.detach().clone()
    trainer.train()
    assert trainer.engine.steps == 3
    assert not torch.equal(model.model.visual.blocks[0].attn.qkv.weight, before)


@pytest.mark.parametrize("reentrant", [False, True])
def test_qwen_vl_tower_under_activation_checkpointing(reentrant):
    """The tower's blocks recomputed in the backward (outside the tower's forward) read their rows
    through the maps of the forward they recompute; the reference runs without checkpointing."""
    torch.manual_seed(0)
    reference = _qwen_vl("qwen2_5_vl").to(DT).train()
    model = copy.deepcopy(reference)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    batch = _ragged_qwen_batch()
    want, R = _reference_update(reference, lambda m, b: _qwen_losses(m, *_example_inputs(*batch, b)), 4)
    bk.PrivacyEngine(bk.convert(model), batch_size=4, sample_size=30, noise_multiplier=0.0, max_grad_norm=R)
    _qwen_losses(model, *batch[:3]).mean().backward()
    _assert_update(model, want)


def test_glm4v_bicubic_taps():
    """bk's GLM-4V position sample (16 weighted table rows per point) is grid_sample's bicubic,
    border-padded sample, in float32 (transformers' precision) and float64, points outside the
    grid included."""
    from bk_kernels.nn.patch_rows import bicubic_taps
    torch.manual_seed(0)
    for dtype, tol in ((torch.float32, 2e-6), (torch.float64, 1e-13)):
        for side in (3, 4, 7):
            table = torch.randn(side * side, 5, dtype=dtype)
            y, x = torch.rand(200, dtype=dtype) * 2.4 - 1.2, torch.rand(200, dtype=dtype) * 2.4 - 1.2
            image = table.view(side, side, 5).permute(2, 0, 1).unsqueeze(0)
            want = F.grid_sample(image, torch.stack((x, y), -1)[None, :, None], mode="bicubic", align_corners=False,
                                 padding_mode="border")[0, :, :, 0].T
            ids, weights = bicubic_taps(y, x, side, dtype)
            got = (table[ids] * weights.unsqueeze(-1)).sum(1)
            assert (got - want).abs().max() <= tol * want.abs().max(), (dtype, side)


def test_glm4v_with_its_float32_sample():
    """GLM-4V as transformers runs it (the table resampled in float32 inside the float64 model):
    within float32 rounding of the reference (3e-8 measured; exact in float64, above)."""
    torch.manual_seed(0)
    reference = _qwen_vl("glm4v").to(DT).train()
    model = copy.deepcopy(reference)
    batch = _ragged_qwen_batch()
    want, R = _reference_update(reference, lambda m, b: _qwen_losses(m, *_example_inputs(*batch, b)), 4)
    bk.PrivacyEngine(bk.convert(model), batch_size=4, sample_size=30, noise_multiplier=0.0, max_grad_norm=R)
    _qwen_losses(model, *batch[:3]).mean().backward()
    for name, p in model.named_parameters():
        scale = want[name].abs().max()
        assert (p.grad + want[name]).abs().max() <= 1e-6 * scale, name


def test_qwen_vl_with_peft_lora_on_the_tower_and_the_language_model():
    """PEFT LoRA adapters on the tower's qkv/proj/MLP and the language model's projections: the
    adapters' bk Linears read the patch rows like the tower's own layers."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                             target_modules=["qkv", "proj", "up_proj", "down_proj", "gate_proj", "q_proj", "v_proj"])
    reference = peft.get_peft_model(_qwen_vl("qwen2_5_vl"), config).to(DT).train()
    model = copy.deepcopy(reference)
    batch = _ragged_qwen_batch()
    want, R = _reference_update(reference, lambda m, b: _qwen_losses(m, *_example_inputs(*batch, b)), 4)
    assert any("visual" in n and "lora_A" in n for n in want)
    bk.PrivacyEngine(bk.convert(model), batch_size=4, sample_size=30, noise_multiplier=0.0, max_grad_norm=R)
    _qwen_losses(model, *batch[:3]).mean().backward()
    _assert_update(model, want)


def test_qwen_vl_tower_called_on_its_own_is_refused():
    """Outside a forward of the model there are no input_ids to map the tower's rows through:
    its layers refuse the patch rows (the maps of an earlier forward are not reused)."""
    torch.manual_seed(0)
    model = bk.convert(_qwen_vl("qwen2_vl").to(DT).train())
    bk.PrivacyEngine(model, batch_size=4, sample_size=30, noise_multiplier=0.0)
    ids, pixels, grid, _ = _ragged_qwen_batch()
    _qwen_losses(model, ids, pixels, grid).mean().backward()  # a forward of the model first
    with pytest.raises(bk.UnsupportedLayoutError, match="patches"):
        model.model.visual(pixels, grid_thw=grid)
