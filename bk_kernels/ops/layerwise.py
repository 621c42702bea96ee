"""clipped_sum_layerwise: norm, clip factor and clipped sum of one layer in one call.

For layer-wise clipping each layer is its own clipping unit: as soon as its backward has g,
the layer can finish its clipped gradient and drop g (nothing to book-keep until the end).
"""
import torch

from . import _backend
from ._norm_common import check_norm_inputs
from .clipped_sum import clipped_sum
from .linear_norm import choose_mode, linear_norm


def clipped_sum_layerwise(a, g, *, bias, max_grad_norm, clip_fn="abadi", gamma=0.01, mode="auto",
                          backend="auto"):
    """(grad_weight [p,d], grad_bias [p] or None, sq_norms [B], c [B]) for one layer.

    sq_norms include the bias gradient's; c follows `clip_fn` (see torch.ops.bk.clip_factors).
    """
    a, g = check_norm_inputs(a, g, "clipped_sum_layerwise")
    mode = choose_mode(mode, a.shape[1], a.shape[2], g.shape[2])
    resolved = _backend.resolve(backend, a.device, "clipped_sum_layerwise")
    if resolved in ("cpu", "cuda"):
        w, b, sq_norms, c = torch.ops.bk.clipped_sum_layerwise(a, g, bias, float(max_grad_norm), clip_fn,
                                                               float(gamma), mode)
        return w, (b if bias else None), sq_norms, c
    sq_norms = linear_norm(a, g, mode=mode, backend=resolved)
    if bias:
        sq_norms = sq_norms + g.sum(1, dtype=sq_norms.dtype).square().sum(1)
    c = torch.ops.bk.clip_factors(sq_norms, float(max_grad_norm), clip_fn, float(gamma))
    w, b = clipped_sum(a, g, c, bias=bias, backend=resolved)
    return w, b, sq_norms, c
