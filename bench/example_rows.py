"""One example as several rows (PrivacyEngine.example_rows): what clipping an example's rows
together costs over clipping each row alone, side by side with the non-private step.

- gpt2-dpo: a DPO step as TRL batches it (chosen then rejected sequences in one forward, the
  loss a mean over pairs of -logsigmoid of the reward margin) on Hugging Face GPT-2;
  bk.stacked_rows(2): linear maps and embeddings become two uses over the pairs (cross terms);
- cnn-multiplicity: augmentation multiplicity on the bench's GroupNorm CNN (K copies of each
  image as consecutive rows, each example's loss the mean over its copies);
  bk.interleaved_rows(K): the rows side by side, views of the layers' own tensors;
- qwen2-vl: a Qwen2-VL step (vision tower 4 x 256, patch 14, language model 4 x 256) on 8
  examples with 1 or 2 images of 16 x 16 patches each: the tower's patch rows summed per example
  (nn/patch_rows.py), with the tower trained and frozen.
- llama-packed: a Llama step (4 x 256, vocabulary 8192) on 16 sequences of 16 to 128 tokens,
  padded to 128 with an attention_mask (one row each), or packed into one row without padding
  (position_ids restarting: bk.packed_sequences(), each sequence clipped as one example);
  `ratio` is over the padded non-private step.
"rows alone" is bk without the setting (each row clipped as an example: NOT private for these
batches, timed only as the cost to compare with). Rounds interleave one step of each method;
`ratio` is the median per-round time over non-private (which trains the whole model). Noise
multiplier 1, SGD.
"""
import copy
import statistics

import torch
import torch.nn.functional as F

from bench import harness, workloads

CONFIGS = {"gpt2-dpo": dict(pairs=16, T=64, layers=4, width=256, vocab=8192),
           "cnn-multiplicity": dict(examples=16, copies=4, size=32),
           "qwen2-vl": dict(examples=8, T=192, width=256, layers=4, images=(1, 2, 1, 1, 2, 1, 1, 1)),
           "llama-packed": dict(examples=16, shortest=16, longest=128, layers=4, width=256, vocab=8192)}


def _rows_methods(spec):
    """method -> (example_rows setting, a function freezing part of the model) for bk, None for non-private."""
    return {"non-private": None, "bk (rows alone)": (None, None), "bk (examples whole)": (spec, None)}


def _dpo(sizes, device, dtype):
    import transformers

    P, T = sizes["pairs"], sizes["T"]
    config = transformers.GPT2Config(vocab_size=sizes["vocab"], n_positions=T, n_embd=sizes["width"],
                                     n_layer=sizes["layers"], n_head=max(1, sizes["width"] // 64), resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).to(device, dtype)
    rows = torch.randint(0, sizes["vocab"], (2 * P, T), device=device)  # [chosen; rejected]
    reference = torch.zeros(2 * P, device=device, dtype=dtype)  # a frozen reference's log-probs (constant here)

    def loss(m):
        logits = m(input_ids=rows).logits[:, T // 2 - 1:-1]
        logp = F.log_softmax(logits.float(), -1).gather(2, rows[:, T // 2:, None]).squeeze(2).sum(1) - reference
        return -F.logsigmoid(0.1 * (logp[:P] - logp[P:])).mean()
    return model, loss, P, _rows_methods(bk_rows(2, "stacked")), dict(B=P, rows=2 * P, T=T)


def _multiplicity(sizes, device, dtype):
    E, K = sizes["examples"], sizes["copies"]
    w = workloads.build("cnn", device, dtype, B=E * K, size=sizes["size"])
    x = w.inputs[0]
    y = w.targets[::K].repeat_interleave(K)  # the copies of an example share its label

    def loss(m):
        return F.cross_entropy(m(x), y)  # the mean over all rows = the mean over examples of their copies' mean
    return w.model, loss, E, _rows_methods(bk_rows(K, "interleaved")), dict(B=E, rows=E * K, T=sizes["size"] ** 2)


def _qwen2_vl(sizes, device, dtype):
    import transformers

    V, B, T, width = 2048, sizes["examples"], sizes["T"], sizes["width"]
    image = V - 1
    text = dict(vocab_size=V, hidden_size=width, intermediate_size=688, num_hidden_layers=sizes["layers"],
                num_attention_heads=4, num_key_value_heads=2,
                rope_parameters={"rope_type": "default", "mrope_section": [8, 12, 12], "rope_theta": 10000.0})
    config = transformers.Qwen2VLConfig(text_config=text, vision_config=dict(
        depth=sizes["layers"], embed_dim=width, hidden_size=width, num_heads=4, patch_size=14, spatial_merge_size=2,
        temporal_patch_size=2, in_channels=3, mlp_ratio=4), image_token_id=image, vision_start_token_id=V - 2,
        vision_end_token_id=V - 3)
    torch.manual_seed(0)
    model = transformers.Qwen2VLForConditionalGeneration(config).to(device, dtype)
    ids, grids = torch.randint(0, V - 4, (B, T)), []
    for b, n in enumerate(sizes["images"]):  # each image: 16 x 16 patches, 64 image tokens after the 2 x 2 merge
        for k in range(n):
            at = 1 + 66 * k
            ids[b, at], ids[b, at + 1:at + 65], ids[b, at + 65] = V - 2, image, V - 3
            grids.append((1, 16, 16))
    grid = torch.tensor(grids, device=device)
    ids = ids.to(device)
    pixels = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 14 * 14, device=device, dtype=dtype)

    def loss(m):
        logits = m(input_ids=ids, pixel_values=pixels, image_grid_thw=grid, mm_token_type_ids=(ids == image).long()).logits
        return F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), ids[:, 1:], reduction="none").mean(1).mean()

    def freeze_tower(m):
        m.model.visual.requires_grad_(False)
    methods = {"non-private": None, "bk (whole model)": (None, None), "bk (tower frozen)": (None, freeze_tower)}
    return model, loss, B, methods, dict(B=B, rows=pixels.shape[0], T=T)


def _llama_packed(sizes, device, dtype):
    import transformers

    import bk_kernels as bk
    from bk_kernels.hf import example_losses

    B, T, V = sizes["examples"], sizes["longest"], sizes["vocab"]
    config = transformers.LlamaConfig(vocab_size=V, hidden_size=sizes["width"], intermediate_size=688,
                                      num_hidden_layers=sizes["layers"], num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=T)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(device, dtype)
    lengths = torch.randint(sizes["shortest"], T + 1, (B,)).tolist()
    sequences = [torch.randint(0, V, (n,)) for n in lengths]
    padded = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    for b, s in enumerate(sequences):
        padded[b, :len(s)], mask[b, :len(s)] = s, 1
    padded, mask = padded.to(device), mask.to(device)
    labels = padded.masked_fill(mask == 0, -100)
    packed = torch.cat(sequences)[None].to(device)
    positions = torch.cat([torch.arange(n) for n in lengths])[None].to(device)

    def padded_loss(m):
        logits = m(input_ids=padded, attention_mask=mask, use_cache=False).logits
        return example_losses(logits, labels, True).mean()

    def packed_loss(m):
        logits = m(input_ids=packed, position_ids=positions, use_cache=False).logits
        return example_losses(logits, packed, True, position_ids=positions).mean()
    methods = {"non-private": None, "non-private (packed)": dict(loss=packed_loss, bk=None),
               "bk (padded)": (None, None), "bk (packed sequences)": dict(loss=packed_loss,
                                                                          bk=(bk.packed_sequences(), None))}
    return model, padded_loss, B, methods, dict(B=B, rows=packed.shape[1], T=T)


def bk_rows(copies, order):
    import bk_kernels as bk

    return bk.stacked_rows(copies) if order == "stacked" else bk.interleaved_rows(copies)


def _step(model, loss, examples, method):
    """One training step of `method`: None (non-private) or (example_rows setting, freeze); or
    dict(loss=its own loss, bk=one of those)."""
    import bk_kernels as bk

    if isinstance(method, dict):
        loss, method = method["loss"], method["bk"]
    model = copy.deepcopy(model)
    if method is None:
        opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    else:
        rows, freeze = method
        bk.convert(model)
        if freeze is not None:
            freeze(model)
        engine = bk.PrivacyEngine(model, batch_size=examples, sample_size=100 * examples, noise_multiplier=1.0,
                                  max_grad_norm=1.0, seed=0)
        opt = engine.attach(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4))
        engine.example_rows(rows)

    def step():
        loss(model).backward()
        opt.step()
        opt.zero_grad()
    return step


def run(device, dtype, quick, command, configs=None):
    import warnings

    from bk_kernels import SamplingWarning
    warnings.filterwarnings("ignore", category=SamplingWarning)  # fixed synthetic batches, on purpose
    ctx = harness.context(device, command)
    rounds = 3 if quick else 11
    rows = []
    for config in [c for c in (configs or CONFIGS) if c in CONFIGS]:
        build = {"gpt2-dpo": _dpo, "cnn-multiplicity": _multiplicity, "qwen2-vl": _qwen2_vl,
                 "llama-packed": _llama_packed}[config]
        model, loss, examples, methods, shape = build(CONFIGS[config], device, dtype)
        steps = {name: _step(model, loss, examples, method) for name, method in methods.items()}
        for fn in steps.values():
            fn()  # warm-up
        times = {m: [] for m in steps}
        with harness.progress(rounds * len(steps), f"example rows {config}") as bar:
            for _ in range(rounds):
                for m, fn in steps.items():
                    times[m].append(harness.timed(fn, device))
                    bar.update(1)
        for m in steps:
            ratios = [t / b for t, b in zip(times[m], times["non-private"])]
            rows.append(dict(ctx, config=config, **shape, method=m, rounds=rounds,
                             median_ms=round(statistics.median(times[m]) * 1e3, 2),
                             ratio=round(statistics.median(ratios), 3), ratio_min=round(min(ratios), 3),
                             ratio_max=round(max(ratios), 3)))
    return rows


COLUMNS = ["config", "B", "rows", "T", "method", "rounds", "median_ms", "ratio", "ratio_min", "ratio_max"]
