"""What every bk.nn layer shares: the hand-off from a layer's backward to the privacy engine.

A bk layer's forward calls one autograd.Function. Its backward computes grad_input exactly as
torch does and, for the layer's trainable parameters, hands the engine one "use" per
parameter (see _uses.py) instead of a weight gradient. Without an engine attached, the same
backward returns the ordinary gradients, so a converted model still trains (non-privately)
and evaluates like the original.
"""
import math


class BKLayer:
    """Mixin of the bk.nn layers. The engine sets `_bk_engine` while it is attached."""

    _bk_engine = None

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
