"""What every sweep script shares: its arguments, and once its model is built, bk.verify and
one JSON line.

    name, B, out, start = begin(head)        # MODEL [B] from the command line
    verify_and_print(model, loss_fn, batch, out, start)

out gets stage, ok and the report (or the error and where it was raised), the generic-path
module types and their share of the trained Parameters, and the seconds since `start`.
"""
import json
import os
import sys
import time
import traceback
import warnings

import torch

import bk_kernels as bk


def begin(head=None):
    """(model name, B, the output record, the start time); one thread, warnings off."""
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    name = sys.argv[1]
    B = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    out = dict(model=name, B=B, **({"head": head} if head else {}))
    return name, B, out, time.time()


def build_from_config(auto_class, name, settings, out, architecture=None):
    """(config, model): transformers' default config of `name` with the scalar `settings` it has,
    built by `auto_class` (seed 0), its BatchNorms replaced or frozen (without_batchnorm)."""
    from transformers import AutoConfig
    config = AutoConfig.for_model(name)
    # the settings go to the model's config and to its vision sub-config (CLIP, SigLIP, AltCLIP...:
    # the image tower reads its image size there)
    for target in (config, getattr(config, "vision_config", None)):
        for key, value in settings.items():
            if target is not None and hasattr(target, key) and \
                    not isinstance(getattr(target, key), (list, tuple, dict)):
                setattr(target, key, value)
    if architecture:  # a mapping entry of several classes (DeiT's, with its teacher head): the first
        config.architectures = [architecture]
    torch.manual_seed(0)
    model = auto_class.from_config(config)
    return config, without_batchnorm(model, out)


def without_batchnorm(model, out):
    """The model with its BatchNorms replaced (bk.replace_batchnorm) or, with SWEEP_BATCHNORM=freeze
    in the environment, frozen (bk.freeze_batchnorm: running statistics made other than 0 / 1 first,
    as a pretrained network's); noted in `out`."""
    if not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return model
    if os.environ.get("SWEEP_BATCHNORM") == "freeze":
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
        try:
            model = bk.freeze_batchnorm(model)
        except bk.UnsupportedModuleError as err:  # a BatchNorm subclass it names: replaced instead
            out["bn_frozen_refused"] = str(err)[:200]
            return without_batchnorm_replaced(model, out)
        out["bn_frozen"] = True
        return model
    return without_batchnorm_replaced(model, out)


def without_batchnorm_replaced(model, out):
    out["bn_replaced"] = True
    return bk.replace_batchnorm(model)


def build_failed(out, err):
    """Prints the line of a model that did not build or run without bk (not bk's failure)."""
    out.update(stage="build", error=f"{type(err).__name__}: {str(err)[:300]}")
    print(json.dumps(out))


def verify_and_print(model, loss_fn, batch, out, start):
    try:
        report = bk.verify(model, loss_fn, batch)
        out.update(stage="verify", ok=bool(report.ok), report=str(report)[:600])
        generic = bk.generic_modules(bk.convert(model))  # the model is converted after the check
        out["generic"] = sorted({t for _, t, _ in generic})
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        out["generic_share"] = round(sum(n for *_, n in generic) / max(1, trained), 3)
    except Exception as err:
        lines = traceback.format_exc().strip().splitlines()
        out.update(stage="verify", error=f"{type(err).__name__}: {str(err)[:600]}",
                   where=lines[-3][:200] if len(lines) > 3 else "")
    out["s"] = round(time.time() - start, 1)
    print(json.dumps(out))
