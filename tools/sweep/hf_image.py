"""One transformers image-classification class (its default config, image_size 64 where it has
one, BatchNorms replaced) under bk.verify: prints one JSON line, as hf_text.py.

    python tools/sweep/hf_image.py MODEL_TYPE [B]
    bash tools/sweep/run.sh hf-image OUT.jsonl
"""
import sys

import torch
import torch.nn.functional as F
from transformers import AutoModelForImageClassification
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

from report import begin, build_failed, build_from_config, verify_and_print

name, B, out, start = begin()
try:
    settings = dict(image_size=64, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                    drop_path_rate=0.0, layerdrop=0.0)
    classes = MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES.get(name)
    config, model = build_from_config(AutoModelForImageClassification, name, settings, out,
                                      architecture=classes[0] if isinstance(classes, (list, tuple)) else None)
    size = getattr(config, "image_size", 64)
    size = size if isinstance(size, int) else 64
    channels = getattr(config, "num_channels", 3)
    x = torch.randn(B, channels, size, size)
    y = torch.randint(0, 3, (B,))

    def loss_fn(m, batch):
        return F.cross_entropy(m(pixel_values=batch[0]).logits, batch[1])

    model.train()
    loss_fn(model, (x, y)).backward()
    model.zero_grad(set_to_none=True)
    out["params"] = sum(p.numel() for p in model.parameters())
except Exception as err:
    build_failed(out, err)
    sys.exit(0)
verify_and_print(model, loss_fn, (x, y), out, start)
