"""bk.nn.Embedding: its per-example gradient norm from the ids alone (no one-hot), its clipped
sum by scaled scatter-add."""
import math

import torch
import torch.nn.functional as F

from ._core import BKLayer
from ._uses import EmbeddingUse


class _EmbeddingFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, weight, layer):
        ctx.layer = layer
        ctx.save_for_backward(ids if ctx.needs_input_grad[1] else None)
        ctx.num_weights = weight.shape[0]
        return F.embedding(ids, weight, layer.padding_idx)

    @staticmethod
    def backward(ctx, g):
        (ids,) = ctx.saved_tensors
        layer = ctx.layer
        if ids is None:
            return None, None, None
        d = g.shape[-1]
        # [examples, lookups per example]. 1-D ids [N] are N examples of one lookup each (user or
        # class ids), as the [N, d] output reads to the layers after it. Sizes spelled out so that
        # a batch of 0 examples reshapes too.
        if ids.dim() <= 1:
            ids2 = ids.reshape(ids.numel(), 1)
        else:
            ids2 = ids.reshape(ids.shape[0], math.prod(ids.shape[1:]))
        g3 = g.reshape(ids2.shape[0], ids2.shape[1], d)
        use = EmbeddingUse(ids2, g3, ctx.num_weights, layer.padding_idx)
        if layer._bk_hand_off([(layer.weight, use)]):
            return None, None, None
        grad_w = torch.ops.aten.embedding_dense_backward(g, ids, ctx.num_weights,
                                                         -1 if layer.padding_idx is None else layer.padding_idx,
                                                         False)
        return None, grad_w, None


class Embedding(BKLayer, torch.nn.Embedding):
    """torch.nn.Embedding whose backward book-keeps for the privacy engine.

    max_norm (renormalises the weight in the forward), scale_grad_by_freq and sparse
    gradients have no private equivalent here: bk.convert refuses such layers.
    """

    def forward(self, ids):
        return _EmbeddingFn.apply(ids, self.weight, self)


def embedding_unsupported_reason(module):
    if module.max_norm is not None:
        return "max_norm renormalises the weight inside the forward"
    if module.scale_grad_by_freq:
        return "scale_grad_by_freq scales gradients by batch statistics"
    if module.sparse:
        return "sparse gradients"
    return None
