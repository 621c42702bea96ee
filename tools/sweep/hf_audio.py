"""One transformers audio-classification class (a small config: 2 layers, width 32, its feature
extractor's convolutions kept) under bk.verify, with padded waveforms (example b's last b % 3
eighths masked where the model takes an attention mask): prints one JSON line, as hf_text.py.

    python tools/sweep/hf_audio.py MODEL_TYPE [B]
    bash tools/sweep/run.sh hf-audio OUT.jsonl
"""
import inspect
import json
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForAudioClassification

import bk_kernels as bk

warnings.filterwarnings("ignore")
torch.set_num_threads(1)
name = sys.argv[1]
B = int(sys.argv[2]) if len(sys.argv) > 2 else 4
SAMPLES = 1600
out = dict(model=name, B=B, head="audio-cls")
start = time.time()
try:
    config = AutoConfig.for_model(name)
    small = dict(hidden_size=32, d_model=32, num_hidden_layers=2, encoder_layers=2, num_attention_heads=4,
                 encoder_attention_heads=4, intermediate_size=64, encoder_ffn_dim=64, num_labels=3,
                 classifier_proj_size=16, num_conv_pos_embeddings=16, num_mel_bins=16, max_source_positions=50,
                 max_length=64, hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                 feat_proj_dropout=0.0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, dropout=0.0,
                 layerdrop=0.0, final_dropout=0.0)  # mask_time_prob kept: the root owns masked_spec_embed
    for key, value in small.items():
        if hasattr(config, key) and not isinstance(getattr(config, key), (list, tuple, dict)):
            setattr(config, key, value)
    torch.manual_seed(0)
    model = AutoModelForAudioClassification.from_config(config)
    if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        model = bk.replace_batchnorm(model)
        out["bn_replaced"] = True
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
    out.update(stage="build", error=f"{type(err).__name__}: {str(err)[:300]}")
    print(json.dumps(out))
    sys.exit(0)
try:
    report = bk.verify(model, loss_fn, (x, mask, y))
    out.update(stage="verify", ok=bool(report.ok), report=str(report)[:300])
    generic = bk.generic_modules(bk.convert(model))
    out["generic"] = sorted({t for _, t, _ in generic})
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    out["generic_share"] = round(sum(n for *_, n in generic) / max(1, trained), 3)
except Exception as err:
    out.update(stage="verify", error=f"{type(err).__name__}: {str(err)[:600]}")
out["s"] = round(time.time() - start, 1)
print(json.dumps(out))
