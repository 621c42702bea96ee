"""One timm model (random weights, BatchNorms replaced, 64 x 64 where it takes an image size)
under bk.verify: prints one JSON line, as hf_text.py.

    python tools/sweep/timm_model.py MODEL_NAME [B]
    python tools/sweep/timm_pick.py              the smallest model of each timm module -> timm_picks.json
    bash tools/sweep/run.sh timm OUT.jsonl       every pick
"""
import sys, time, warnings
warnings.filterwarnings("ignore")
import torch, timm
import torch.nn.functional as F
from report import build_failed, verify_and_print, without_batchnorm
torch.set_num_threads(1)
name = sys.argv[1]; B = int(sys.argv[2]) if len(sys.argv) > 2 else 4
out = dict(model=name, B=B); t0 = time.time()
try:
    torch.manual_seed(0)
    kw = dict(pretrained=False, num_classes=3)
    m = None
    for extra in (dict(img_size=64), dict(img_size=(64, 64)), {}):
        try:
            m = timm.create_model(name, **kw, **extra); used = extra; break
        except Exception: continue
    if m is None: m = timm.create_model(name, **kw); used = {}
    m = m.double()
    m = without_batchnorm(m, out)
    cfg = m.pretrained_cfg if hasattr(m, "pretrained_cfg") else {}
    size = 64 if used else cfg.get("input_size", (3, 224, 224))[-1]
    chans = cfg.get("input_size", (3,))[0] if cfg else 3
    x = torch.randn(B, chans, size, size, dtype=torch.float64); y = torch.randint(0, 3, (B,))
    m.train()
    def loss_fn(model, b):
        o = model(b[0]); o = o[0] if isinstance(o, (tuple, list)) else o
        return F.cross_entropy(o, b[1])
    loss_fn(m, (x, y)).backward(); m.zero_grad(set_to_none=True)
    out["size"] = size; out["params"] = sum(p.numel() for p in m.parameters())
except Exception as e:
    build_failed(out, e); sys.exit(0)
verify_and_print(m, loss_fn, (x, y), out, t0)
