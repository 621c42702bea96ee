"""One transformers audio-classification class (a small config: 2 layers, width 32, its feature
extractor's convolutions kept) under bk.verify, with padded waveforms (example b's last b % 3
eighths masked where the model takes an attention mask): prints one JSON line, as hf_text.py.

    python tools/sweep/hf_audio.py MODEL_TYPE [B]
    bash tools/sweep/run.sh hf-audio OUT.jsonl
"""
import inspect
import sys

import torch
import torch.nn.functional as F
from transformers import AutoModelForAudioClassification

from report import begin, build_failed, build_from_config, verify_and_print

name, B, out, start = begin("audio-cls")
SAMPLES = 1600
try:
    small = dict(hidden_size=32, d_model=32, num_hidden_layers=2, encoder_layers=2, num_attention_heads=4,
                 encoder_attention_heads=4, intermediate_size=64, encoder_ffn_dim=64, num_labels=3,
                 classifier_proj_size=16, num_conv_pos_embeddings=16, num_mel_bins=16, max_source_positions=50,
                 max_length=64, hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                 feat_proj_dropout=0.0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, dropout=0.0,
                 layerdrop=0.0, final_dropout=0.0, mask_time_length=2)  # mask_time_prob kept: the root owns masked_spec_embed
    config, model = build_from_config(AutoModelForAudioClassification, name, small, out)
    params = inspect.signature(model.forward).parameters
    if name == "audio-spectrogram-transformer":   # input_values are log-mel frames [B, frames, mels]
        x = torch.randn(B, config.max_length, config.num_mel_bins)
        key = "input_values"
    elif "input_values" in params:    # raw waveforms
        x = torch.randn(B, SAMPLES)
        key = "input_values"
    else:                             # log-mel features [B, mels, frames] (Whisper) or [B, frames, mels] (AST)
        mels = getattr(config, "num_mel_bins", 16)
        frames = 2 * getattr(config, "max_source_positions", 50) if name == "whisper" else getattr(config, "max_length", 64)
        x = torch.randn(B, mels, frames) if name == "whisper" else torch.randn(B, frames, mels)
        key = "input_features"
    length = x.shape[1]
    mask = (torch.arange(length)[None] < torch.tensor([length - (b % 3) * length // 8 for b in range(B)])[:, None]).long()
    use_mask = "attention_mask" in params and key == "input_values"
    if use_mask:
        x = x * mask
    y = torch.randint(0, 3, (B,))

    def loss_fn(m, batch):
        x, mask, y = batch
        kw = {key: x, **({"attention_mask": mask} if use_mask else {})}
        return F.cross_entropy(m(**kw).logits, y)

    model.train()
    loss_fn(model, (x, mask, y)).backward()
    model.zero_grad(set_to_none=True)
    out["params"] = sum(p.numel() for p in model.parameters())
except Exception as err:
    build_failed(out, err)
    sys.exit(0)
verify_and_print(model, loss_fn, (x, mask, y), out, start)
