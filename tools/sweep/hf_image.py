"""One transformers image-classification class (its default config, image_size 64 where it has
one, BatchNorms replaced) under bk.verify: prints one JSON line, as hf_text.py.

    python tools/sweep/hf_image.py MODEL_TYPE [B]
    bash tools/sweep/run.sh hf-image OUT.jsonl
"""
import json
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForImageClassification

import bk_kernels as bk

warnings.filterwarnings("ignore")
torch.set_num_threads(1)
name = sys.argv[1]
B = int(sys.argv[2]) if len(sys.argv) > 2 else 4
out = dict(model=name, B=B)
start = time.time()
try:
    config = AutoConfig.for_model(name)
    for key, value in dict(image_size=64, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                           drop_path_rate=0.0, layerdrop=0.0).items():
        if hasattr(config, key) and not isinstance(getattr(config, key), (list, tuple, dict)):
            setattr(config, key, value)
    torch.manual_seed(0)
    model = AutoModelForImageClassification.from_config(config)
    if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        model = bk.replace_batchnorm(model)
        out["bn_replaced"] = True
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
    out.update(stage="build", error=f"{type(err).__name__}: {str(err)[:300]}")
    print(json.dumps(out))
    sys.exit(0)
try:
    report = bk.verify(model, loss_fn, (x, y))
    out.update(stage="verify", ok=bool(report.ok), report=str(report)[:300])
    generic = bk.generic_modules(bk.convert(model))
    out["generic"] = sorted({t for _, t, _ in generic})
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    out["generic_share"] = round(sum(n for *_, n in generic) / max(1, trained), 3)
except Exception as err:
    out.update(stage="verify", error=f"{type(err).__name__}: {str(err)[:600]}")
out["s"] = round(time.time() - start, 1)
print(json.dumps(out))
