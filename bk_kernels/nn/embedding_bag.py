"""bk.nn.EmbeddingBag: bags of lookups, summed or averaged (optionally weighted per lookup).

Each bag is one example. Bag b's weight gradient has row v = sum over its lookups t with id v
of w_t * g_b, where g_b is the gradient of the bag's output and w_t the lookup's weight (its
per_sample_weight, 1 / (lookups in the bag) for mode="mean", 1 otherwise). That is an
embedding's gradient with one output gradient per lookup, w_t * g_b, so the bags are laid out
as ids [B, longest bag] (the padding slots carry a zero gradient) and the embedding family's
kernels do the rest: the ghost norm from the ids and the clipped sum as one scatter-add.
mode="max" (the gradient follows each feature's argmax) is refused.
"""
import torch
import torch.nn.functional as F

from ._core import BKLayer, in_plain_forward
from ._uses import EmbeddingUse
from .embedding import embedding_unsupported_reason
from .families import register_layer


def _bags(ids, offsets, weights, include_last_offset):
    """(ids [B, L], weights [B, L] or None, valid [B, L] bool, where [N] or None) from 2-D ids or 1-D
    ids with offsets; `where` maps each 1-D lookup to its flat slot in [B, L]."""
    if ids.dim() == 2:
        return ids, weights, torch.ones_like(ids, dtype=torch.bool), None
    N = ids.shape[0]
    starts = offsets[:-1] if include_last_offset else offsets
    ends = torch.cat([starts[1:], offsets.new_tensor([offsets[-1] if include_last_offset else N])]) \
        if starts.numel() else starts
    lengths = ends - starts
    B = starts.shape[0]
    L = int(lengths.max()) if B else 0
    bag = torch.repeat_interleave(torch.arange(B, device=ids.device), lengths)
    position = torch.arange(bag.shape[0], device=ids.device) - starts[bag]
    where = bag * L + position
    padded = ids.new_zeros(B * L).index_copy_(0, where, ids[: bag.shape[0]]).view(B, L)
    valid = torch.zeros(B * L, dtype=torch.bool, device=ids.device).index_fill_(0, where, True).view(B, L)
    w = None
    if weights is not None:
        w = weights.new_zeros(B * L).index_copy_(0, where, weights[: bag.shape[0]]).view(B, L)
    return padded, w, valid, where


class _EmbeddingBagFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, offsets, per_sample_weights, weight, layer):
        ctx.layer, ctx.weight = layer, weight
        ctx.save_for_backward(ids, offsets, per_sample_weights)
        return F.embedding_bag(ids, weight, offsets, layer.max_norm, layer.norm_type, layer.scale_grad_by_freq,
                               layer.mode, layer.sparse, per_sample_weights, layer.include_last_offset,
                               layer.padding_idx)

    @staticmethod
    def backward(ctx, g):
        ids, offsets, psw = ctx.saved_tensors
        layer, weight = ctx.layer, ctx.weight
        bag_ids, bag_w, valid, where = _bags(ids, offsets, psw, layer.include_last_offset)
        if layer.padding_idx is not None:
            valid = valid & (bag_ids != layer.padding_idx)
        scale = valid.to(g.dtype)
        if bag_w is not None:
            scale = scale * bag_w.to(g.dtype)
        if layer.mode == "mean":
            scale = scale / valid.sum(1, keepdim=True).clamp_min(1).to(g.dtype)
        grad_psw = None
        if psw is not None and ctx.needs_input_grad[2]:  # d out_b / d w_t = <weight[id_t], g_b>
            per_slot = (weight.detach()[bag_ids].to(g.dtype) * g[:, None, :]).sum(-1) * valid
            grad_psw = per_slot.reshape(-1)[where] if where is not None else per_slot
            grad_psw = grad_psw.to(psw.dtype)
        if not ctx.needs_input_grad[3]:
            return None, None, grad_psw, None, None
        lookups = g[:, None, :] * scale[:, :, None]  # [B, L, d]: each lookup's share of its bag's gradient
        use = EmbeddingUse(bag_ids, lookups, weight.shape[0], None)  # padding slots carry zeros
        if layer._bk_hand_off([(weight, use)]):
            return None, None, grad_psw, None, None
        grad_w = torch.zeros_like(weight, dtype=lookups.dtype).index_add_(
            0, bag_ids.reshape(-1), lookups.reshape(-1, lookups.shape[-1]))
        return None, None, grad_psw, grad_w.to(weight.dtype), None


class EmbeddingBag(BKLayer, torch.nn.EmbeddingBag):
    """torch.nn.EmbeddingBag (modes sum and mean, per_sample_weights, offsets, padding_idx) whose
    backward book-keeps for the privacy engine. Each bag is one example."""

    def forward(self, input, offsets=None, per_sample_weights=None):
        if in_plain_forward():
            return super().forward(input, offsets, per_sample_weights)
        if input.dim() == 1 and offsets is None:
            raise ValueError("bk.nn.EmbeddingBag: 1-D input needs offsets")
        bags = input.shape[0] if input.dim() == 2 else offsets.shape[0] - int(self.include_last_offset)
        self._bk_claim_batch(bags)
        self._bk_count_call()
        return _EmbeddingBagFn.apply(input, offsets, per_sample_weights, self.weight, self)

    def _bk_claim_batch(self, bags):
        """Bags are the examples. A model called as model(text, offsets) has a flat 1-D first
        input, which the engine could only read as a guess of the batch size: the bags set it."""
        layout = self._bk_layout()
        if layout is None or not self.weight.requires_grad:
            return
        if layout.batch is None or layout.guessed:
            layout.batch, layout.guessed = bags, False
        elif layout.batch != bags:
            raise self._bk_layout_error(torch.empty(bags), 0, why=f"it holds {bags} bags (one bag is one example) "
                                        f"while the model's input has {layout.batch} examples")


def embedding_bag_unsupported_reason(module):
    if module.mode == "max":
        return "mode='max' (the gradient follows each feature's argmax) is not supported"
    return embedding_unsupported_reason(module)  # max_norm, scale_grad_by_freq, sparse: as Embedding


register_layer(torch.nn.EmbeddingBag, EmbeddingBag, unsupported_reason=embedding_bag_unsupported_reason)
