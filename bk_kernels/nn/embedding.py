"""bk.nn.Embedding: its per-example gradient norm from the ids alone (no one-hot), its clipped
sum by scaled scatter-add."""
import math

import torch
import torch.nn.functional as F

from ._core import BKLayer, in_plain_forward
from .families import register_layer
from ._uses import EmbeddingUse


class _EmbeddingFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, weight, layer, batch_dim=0):
        ctx.layer, ctx.weight, ctx.batch_dim = layer, weight, batch_dim
        ctx.save_for_backward(ids if ctx.needs_input_grad[1] else None)
        ctx.num_weights = weight.shape[0]
        return F.embedding(ids, weight, layer.padding_idx)

    @staticmethod
    def backward(ctx, g):
        (ids,) = ctx.saved_tensors
        layer = ctx.layer
        if ids is None:
            return None, None, None, None
        d = g.shape[-1]
        if ctx.batch_dim:  # sequence-first ids [T, B, ...]
            ids, g = ids.movedim(ctx.batch_dim, 0), g.movedim(ctx.batch_dim, 0)
        # [examples, lookups per example]. 1-D ids [N] are N examples of one lookup each (user or
        # class ids), as the [N, d] output reads to the layers after it. Sizes spelled out so that
        # a batch of 0 examples reshapes too.
        if ids.dim() <= 1:
            ids2 = ids.reshape(ids.numel(), 1)
        else:
            ids2 = ids.reshape(ids.shape[0], math.prod(ids.shape[1:]))
        g3 = g.reshape(ids2.shape[0], ids2.shape[1], d)
        use = EmbeddingUse(ids2, g3, ctx.num_weights, layer.padding_idx)
        if layer._bk_hand_off([(ctx.weight, use)]):
            return None, None, None, None
        grad_w = torch.ops.aten.embedding_dense_backward(g, ids, ctx.num_weights,
                                                         -1 if layer.padding_idx is None else layer.padding_idx,
                                                         False)
        return None, grad_w, None, None


class Embedding(BKLayer, torch.nn.Embedding):
    """torch.nn.Embedding whose backward book-keeps for the privacy engine.

    max_norm (renormalises the weight in the forward), scale_grad_by_freq and sparse
    gradients have no private equivalent here: bk.convert refuses such layers.
    """

    _bk_token_features = 0  # ids [R, T]

    def forward(self, ids):
        if in_plain_forward():
            return super().forward(ids)
        bdim = self._bk_batch_dim(ids, features_dims=0)
        ids = self._bk_shared_1d_ids(ids)
        rows = self._bk_examples(ids, bdim)
        y = _EmbeddingFn.apply(rows, self.weight, self, bdim)
        return y.reshape(*ids.shape, y.shape[-1]) if self._bk_on_token_rows() else y

    def _bk_shared_1d_ids(self, ids):
        """1-D ids [N] are N examples of one lookup each (user or class ids). When N differs
        from the batch size they can only be lookups shared by every example (nanoGPT's
        `wpe(torch.arange(T))`, added to [B, T, d]): they become [1, N] ids, broadcast over the
        batch (the output is [B, N, d]). N equal to the batch size with ids 0..N-1 in order
        reads both ways, so it is refused rather than guessed."""
        layout = self._bk_layout()
        if ids.dim() != 1 or layout is None or layout.batch is None or not self.weight.requires_grad:
            return ids
        B = layout.batch
        if ids.shape[0] != B:
            return ids.unsqueeze(0)
        if B > 1 and torch.equal(ids, torch.arange(B, device=ids.device, dtype=ids.dtype)):
            raise self._bk_layout_error(
                ids, 0, why="its 1-D ids are 0..N-1 with N equal to the batch size: per-example ids, or "
                "positions shared by every example? Give shared positions as [1, T] (or [B, T]) ids, per-example "
                "ids as [B, 1]")
        return ids

def embedding_unsupported_reason(module):
    if module.max_norm is not None:
        return "max_norm renormalises the weight inside the forward: no private equivalent"
    if module.scale_grad_by_freq:
        return "scale_grad_by_freq scales gradients by counts over the whole batch: no private equivalent"
    if module.sparse:
        return "sparse gradients: no private equivalent"
    return None


register_layer(torch.nn.Embedding, Embedding, unsupported_reason=embedding_unsupported_reason)
