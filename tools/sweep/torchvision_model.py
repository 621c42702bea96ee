"""One torchvision model (random weights, num_classes 3, BatchNorms replaced or frozen) under bk.verify:
prints one JSON line, as hf_text.py. Classification at 64 x 64 where the model takes it,
video classification on 8 frames, segmentation with a per-pixel loss averaged per example.

    python tools/sweep/torchvision_model.py MODEL_NAME [B]
    bash tools/sweep/run.sh torchvision OUT.jsonl       the smallest model of each family
    SWEEP_BATCHNORM=freeze bash tools/sweep/run.sh ...   BatchNorms frozen, not replaced (any sweep)
"""
import torch
import torch.nn.functional as F
from torchvision import models

from report import begin, build_failed, verify_and_print, without_batchnorm

# the smallest of each family (torchvision.models.list_models(module=...))
PICKS = {
    "": "alexnet convnext_tiny densenet121 efficientnet_b0 efficientnet_v2_s googlenet inception_v3 "
        "maxvit_t mnasnet0_5 mobilenet_v2 mobilenet_v3_small regnet_x_400mf regnet_y_400mf resnet18 resnet50 "
        "resnext50_32x4d shufflenet_v2_x0_5 squeezenet1_1 swin_t swin_v2_t vgg11 vgg11_bn vit_b_32 "
        "wide_resnet50_2",
    "video": "mc3_18 r3d_18 r2plus1d_18 s3d mvit_v2_s swin3d_t",
    "segmentation": "lraspp_mobilenet_v3_large fcn_resnet50 deeplabv3_mobilenet_v3_large",
}
SIZE = {"inception_v3": 96, "maxvit_t": 224, "mvit_v2_s": 224, "s3d": 224}  # their smallest inputs
FRAMES = {"mvit_v2_s": 16, "s3d": 16}


def family(name):
    return next(k for k, v in PICKS.items() if name in v.split())


def build(name):
    kind = family(name)
    builder = getattr(getattr(models, kind) if kind else models, name)
    kw = dict(weights=None, num_classes=3)
    if kind == "segmentation":
        kw.update(weights_backbone=None, aux_loss=False)
    if name.startswith("vit_"):
        kw["image_size"] = 64
    if name in ("googlenet", "inception_v3"):
        kw.update(aux_logits=False, init_weights=True)
    return kind, builder(**kw)


if __name__ == "__main__":
    if __import__("sys").argv[1:] == ["--list"]:
        print(" ".join(" ".join(v.split()) for v in PICKS.values())); raise SystemExit
    name, B, out, start = begin()
    try:
        torch.manual_seed(0)
        kind, model = build(name)
        model = model.double()
        model = without_batchnorm(model, out)
        size = SIZE.get(name, 64)
        shape = (B, 3, FRAMES.get(name, 8), size, size) if kind == "video" else (B, 3, size, size)
        x = torch.randn(shape, dtype=torch.float64)
        if kind == "segmentation":
            y = torch.randint(0, 3, (B, size, size))
        else:
            y = torch.randint(0, 3, (B,))

        def loss_fn(model, batch):
            logits = model(batch[0])
            if isinstance(logits, dict):
                logits = logits["out"]
            elif isinstance(logits, tuple):
                logits = logits[0]
            if logits.dim() == 4:  # each example's loss: the mean over its own pixels
                return F.cross_entropy(logits, batch[1], reduction="none").flatten(1).mean(1).mean()
            return F.cross_entropy(logits, batch[1])

        model.train()
        loss_fn(model, (x, y)).backward()
        model.zero_grad(set_to_none=True)
        out.update(size=size, params=sum(p.numel() for p in model.parameters()))
    except Exception as err:
        build_failed(out, err); raise SystemExit
    verify_and_print(model, loss_fn, (x, y), out, start)
