"""What every bk.nn layer shares: the hand-off from a layer's backward to the privacy engine.

A bk layer's forward calls one autograd.Function. Its backward computes grad_input exactly as
torch does and, for the layer's trainable parameters, hands the engine one "use" per
parameter (see _uses.py) instead of a weight gradient. Without an engine attached, the same
backward returns the ordinary gradients, so a converted model still trains (non-privately)
and evaluates like the original.
"""
import math

import torch


class _EngineLink:
    """The engine a layer reports to. Copies and pickles of the layer are NOT attached: a
    deepcopy made for an EMA or evaluation model must not report into the training run."""

    def __init__(self, engine):
        self.engine = engine

    def __deepcopy__(self, memo):
        return None

    def __reduce__(self):
        return (type(None), ())


class BKLayer:
    """Mixin of the bk.nn layers. The engine sets `_bk_engine` while it is attached."""

    _bk_link = None

    @property
    def _bk_engine(self):
        return self._bk_link.engine if self._bk_link is not None else None

    @_bk_engine.setter
    def _bk_engine(self, engine):
        self._bk_link = _EngineLink(engine) if engine is not None else None

    def _bk_trainable(self, param):
        return param is not None and param.requires_grad

    def _bk_hand_off(self, uses):
        """Book-keeps [(param, use)] with the engine; True if it took them (private training)."""
        if self._bk_engine is None:
            return False
        self._bk_engine._record(self, [(p, u) for p, u in uses if self._bk_trainable(p)])
        return True


def examples_first(x, features_dims=1):
    """[B, *, f...] -> [B, T, prod(f)] with T the product of the middle dims (1 for [B, f])."""
    if x.dim() == features_dims:  # unbatched input: one example
        x = x.unsqueeze(0)
    middle = x.shape[1 : x.dim() - features_dims]
    features = x.shape[x.dim() - features_dims :]
    return x.reshape(x.shape[0], math.prod(middle), math.prod(features))


def autocast_input(x):
    """x as torch.autocast would feed a matmul-like op on its device (cast to the autocast dtype),
    or x unchanged outside autocast. A custom autograd.Function's backward runs outside autocast,
    so the bk layers save this cast copy, as autocast's own linear and conv do."""
    device = x.device.type
    if x.is_floating_point() and torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return x.to(torch.get_autocast_dtype(device))
    return x
