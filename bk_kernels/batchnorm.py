"""bk.replace_batchnorm(model): every BatchNorm swapped for a GroupNorm, which normalises each
example on its own, so that the model can be trained privately. bk.freeze_batchnorm(model): every
BatchNorm swapped for a bk.nn.FrozenBatchNorm, which normalises with its running statistics in
train mode too (a pretrained model keeps its function; its affine Parameters still train).

BatchNorm normalises with the statistics of the whole batch: no example has a gradient of its
own, so bk.convert refuses a trainable BatchNorm and the engine refuses a frozen one that runs
in train mode. GroupNorm is the usual replacement in DP training (Opacus' ModuleValidator.fix
makes the same swap). It is a different function: the model changes, and a pretrained model's
running statistics are dropped.
"""
import torch

from .convert import UnsupportedModuleError

_BATCHNORM = torch.nn.modules.batchnorm._BatchNorm
# Classes whose forward is BatchNorm's own (the swap keeps what the forward does, bar the
# statistics): torch's, and subclasses that do not override forward.
_PLAIN_FORWARDS = {_BATCHNORM.forward, torch.nn.SyncBatchNorm.forward}


def _groups_for(channels, groups):
    """The largest divisor of `channels` that is at most `groups` (GroupNorm needs a divisor)."""
    return max(g for g in range(1, min(groups, channels) + 1) if channels % g == 0)


def _timm_norm_act(module):
    """timm's BatchNorm followed by its own drop and act modules (EfficientNet, MobileNetV3,
    RegNet...): swapped for timm's GroupNormAct with the same drop and act."""
    cls = type(module)
    return cls.__module__.startswith("timm.") and cls.__name__ in ("BatchNormAct2d", "SyncBatchNormAct")


def _problem(module, frozen=False):
    if frozen and not module.track_running_stats:
        return "it keeps no running statistics (track_running_stats=False): there is nothing to freeze"
    if _timm_norm_act(module):
        return None
    if type(module).forward not in _PLAIN_FORWARDS:
        return (f"{type(module).__name__} has a forward of its own (an activation or other work around the "
                "normalisation), which a GroupNorm would drop: replace it yourself")
    if isinstance(module, torch.nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
        return "a lazy BatchNorm before its first forward has no channel count yet: run one forward first"
    return None


def _group_norm(bn, groups):
    """The GroupNorm for `bn`: its channels, eps and affine setting; its own weight and bias
    Parameter objects (so an optimizer made before, and requires_grad, carry over)."""
    C, with_act = bn.num_features, _timm_norm_act(bn)
    factory = torch.nn.GroupNorm
    if with_act:
        from timm.layers import GroupNormAct as factory
    gn = factory(num_groups=_groups_for(C, groups), num_channels=C, eps=bn.eps, affine=bn.affine,
                 device=bn.weight.device if bn.affine else None, dtype=bn.weight.dtype if bn.affine else None)
    if bn.affine:
        gn.weight, gn.bias = bn.weight, bn.bias
    if with_act:
        gn.drop, gn.act = bn.drop, bn.act
    gn.train(bn.training)
    return gn


def _swap_batchnorms(model, make, frozen=False, caller="replace_batchnorm"):
    """Every BatchNorm of model (or model itself) swapped for make(bn), shared ones once; the
    problems named in one error before anything changes."""
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, _BATCHNORM)]
    problems = [f"  {name or '<model>'} ({type(m).__name__}): {why}" for name, m in found
                if (why := _problem(m, frozen))]
    if problems:
        raise UnsupportedModuleError(f"{caller}: these BatchNorm modules cannot be swapped (nothing was "
                                     "changed):\n" + "\n".join(problems))
    if isinstance(model, _BATCHNORM):
        return make(model)
    swapped = {}  # a BatchNorm reached twice (shared) gets one replacement
    for parent in list(model.modules()):
        for child_name, child in list(parent._modules.items()):
            if isinstance(child, _BATCHNORM):
                if id(child) not in swapped:
                    swapped[id(child)] = make(child)
                parent._modules[child_name] = swapped[id(child)]
    return model


def _frozen(bn):
    from .nn.frozen_batchnorm import FrozenBatchNorm, FrozenBatchNormAct

    if not _timm_norm_act(bn):
        return FrozenBatchNorm.from_batchnorm(bn)
    frozen = FrozenBatchNormAct.from_batchnorm(bn)
    frozen.drop, frozen.act = bn.drop, bn.act
    return frozen


def freeze_batchnorm(model):
    """Swaps every BatchNorm1d/2d/3d and SyncBatchNorm of `model` (in place; timm's BatchNormAct2d
    too, keeping its drop and act) for a bk.nn.FrozenBatchNorm: the normalisation by the running
    statistics that eval mode uses, in train mode too, and its affine weight and bias (the same
    Parameter objects) trainable privately. Returns the model (or the FrozenBatchNorm, when
    `model` itself is a BatchNorm).

    For fine-tuning a pretrained BatchNorm network (torchvision's and timm's ResNets,
    EfficientNets...): the model computes what it computed in eval mode, where
    bk.replace_batchnorm's GroupNorm would be another function. The statistics are the
    checkpoint's and are never updated (an update from the private data would be outside the DP
    guarantee); freeze the affine Parameters too (requires_grad_(False)) to train only the rest.
    The state_dict keeps the BatchNorm's keys: load a checkpoint before or after. BatchNorms
    without running statistics, and subclasses with a forward of their own, are named in one
    UnsupportedModuleError before anything changes.
    """
    return _swap_batchnorms(model, _frozen, frozen=True, caller="freeze_batchnorm")


def replace_batchnorm(model, groups=32):
    """Swaps every BatchNorm1d/2d/3d and SyncBatchNorm of `model` (in place) for a GroupNorm
    over the same channels (timm's BatchNormAct2d and SyncBatchNormAct for timm's GroupNormAct,
    keeping their drop and act modules), with the largest number of groups that divides the
    channel count and is at most `groups` (32 groups is the GroupNorm paper's default and
    Opacus' choice).
    Returns the model (or the GroupNorm, when `model` itself is a BatchNorm).

    The GroupNorm keeps the BatchNorm's eps and its affine weight and bias (the same Parameter
    objects); the running statistics and momentum are dropped, and so are hooks on the
    BatchNorm module. Call it before loading a checkpoint saved after the swap, and before
    bk.convert. Other subclasses of BatchNorm that change its forward are named in one
    UnsupportedModuleError, before anything is changed.

    A BatchNorm1d on [B, C] inputs becomes a normalisation over each example's C / groups
    channels: with C <= groups each group holds one value and the output is just the bias.
    """
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"replace_batchnorm: groups must be a positive int, got {groups!r}")
    return _swap_batchnorms(model, lambda bn: _group_norm(bn, groups))
