"""embedding_norm and embedding_clipped_sum: per-example clipping of an embedding layer.

An embedding with weight [V, d] looks up ids [B, T]; with g [B, T, d] the gradient of its
output, example b's weight gradient has row v = sum_{t: ids[b,t] = v} g[b,t] (zero for the
padding id). Its squared norm is sum_{s,t} [ids_s = ids_t] <g_s, g_t>, and the clipped sum of
the gradients is one scatter-add of c_b g[b,t] into the rows ids[b,t]. The kernels group
positions by id (sorting, O(T log T + T d) per example): neither a one-hot [B, T, V] nor the
per-example [B, V, d] gradients are formed, which stock PyTorch needs for per-example norms.
"""
import math

import torch

from . import _backend
from ._norm_common import NORM_DTYPES, accumulation_dtype, example_chunks, norm_dtype

ID_DTYPES = (torch.int32, torch.int64)


def _check_ids_g(ids, g, op):
    """ids [B, *] (int32/int64) and g [B, *, d] of one device; returns ids [B, T], g [B, T, d]."""
    if not isinstance(ids, torch.Tensor) or not isinstance(g, torch.Tensor):
        raise TypeError(f"{op}: ids and g must be tensors, got {type(ids).__name__} and {type(g).__name__}")
    if ids.dim() < 1 or g.dim() != ids.dim() + 1 or g.shape[:-1] != ids.shape:
        raise ValueError(
            f"{op}: expected ids:[B,T] and g:[B,T,d] (or ids:[B,*] and g:[B,*,d]), got shapes "
            f"{tuple(ids.shape)} and {tuple(g.shape)}"
        )
    if ids.dtype not in ID_DTYPES:
        raise ValueError(f"{op}: ids must be int64 or int32, got {ids.dtype}")
    if g.dtype not in NORM_DTYPES:
        raise ValueError(f"{op}: unsupported dtype {g.dtype} of g; supported: {NORM_DTYPES}")
    if ids.device != g.device:
        raise ValueError(f"{op}: ids and g must be on one device, got {ids.device} and {g.device}")
    if ids.dim() == 1:  # one position per example
        return ids.unsqueeze(1), g.unsqueeze(1)
    if ids.dim() > 2:  # [B, *] positions flattened
        B, d = ids.shape[0], g.shape[-1]
        T = math.prod(ids.shape[1:])
        return ids.reshape(B, T), g.reshape(B, T, d)
    return ids, g


def _check_padding_idx(padding_idx, op):
    if padding_idx is None:
        return None
    if isinstance(padding_idx, bool) or not isinstance(padding_idx, int):
        raise TypeError(f"{op}: padding_idx must be an int or None, got {type(padding_idx).__name__}")
    if padding_idx < 0:
        raise ValueError(
            f"{op}: padding_idx must be non-negative (nn.Embedding.padding_idx is), got {padding_idx}"
        )
    return padding_idx


def embedding_norm(ids, g, padding_idx=None, *, backend="auto"):
    """[B] squared norms of each example's embedding-weight gradient.

    ids: [B, T] int32/int64 (or [B, *]), g: [B, T, d] (or [B, *, d]) the gradient of the
    embedding's output. Positions whose id is padding_idx contribute nothing. Returns float64
    for float64 g, float32 otherwise.
    """
    ids, g = _check_ids_g(ids, g, "embedding_norm")
    padding_idx = _check_padding_idx(padding_idx, "embedding_norm")
    backend = _backend.resolve(backend, g.device, "embedding_norm")
    if backend in ("cpu", "cuda"):
        return torch.ops.bk.embedding_norm(ids, g, padding_idx)
    if backend == "triton":
        from . import triton_embedding  # noqa: F401  (registers torch.ops.bk.embedding_norm_triton)

        return torch.ops.bk.embedding_norm_triton(ids, g, padding_idx)
    return _embedding_norm_torch(ids, g, padding_idx)


def embedding_clipped_sum(ids, g, c, num_embeddings=None, padding_idx=None, *, out=None,
                          deterministic=False, backend="auto"):
    """sum_b c_b * (example b's embedding-weight gradient): [V, d].

    grad[v] = sum_{b,t: ids[b,t] = v != padding_idx} c[b] g[b,t], summed in float32 (float64
    for float64 g). Without `out`, returns a new [num_embeddings, d] tensor in that dtype.
    With `out` ([V, d], float32/float64/bfloat16/float16), ADDS the sum into it, rounding once,
    and returns it. Every id must lie in [0, V). deterministic=True: bit-identical results run
    to run (the cpu kernel always is).
    """
    op = "embedding_clipped_sum"
    ids, g = _check_ids_g(ids, g, op)
    padding_idx = _check_padding_idx(padding_idx, op)
    if not isinstance(c, torch.Tensor):
        raise TypeError(f"{op}: c must be a tensor, got {type(c).__name__}")
    if c.shape != (g.shape[0],):
        raise ValueError(f"{op}: c must have shape [B] = [{g.shape[0]}], got {tuple(c.shape)}")
    if not c.is_floating_point():
        raise ValueError(f"{op}: c must be floating point, got {c.dtype}")
    if c.device != g.device:
        raise ValueError(f"{op}: c must be on the device of g ({g.device}), got {c.device}")
    if out is None:
        if num_embeddings is None:
            raise ValueError(f"{op}: pass num_embeddings (the V of the [V, d] result) or out=")
        V = num_embeddings
    else:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"{op}: out must be a tensor, got {type(out).__name__}")
        if out.dim() != 2 or out.shape[1] != g.shape[-1]:
            raise ValueError(f"{op}: out must be [V, d] with d = {g.shape[-1]}, got {tuple(out.shape)}")
        if out.dtype not in NORM_DTYPES:
            raise ValueError(f"{op}: unsupported dtype {out.dtype} of out; supported: {NORM_DTYPES}")
        if out.device != g.device:
            raise ValueError(f"{op}: out must be on the device of g ({g.device}), got {out.device}")
        if num_embeddings is not None and num_embeddings != out.shape[0]:
            raise ValueError(f"{op}: num_embeddings={num_embeddings} but out has {out.shape[0]} rows")
        V = out.shape[0]
    if isinstance(V, bool) or not isinstance(V, int) or V < 0:
        raise ValueError(f"{op}: num_embeddings must be a non-negative int, got {V!r}")
    if padding_idx is not None and padding_idx >= V:
        raise ValueError(f"{op}: padding_idx {padding_idx} is out of range for {V} embeddings")
    backend = _backend.resolve(backend, g.device, op)
    if backend in ("cpu", "cuda"):
        if out is None:
            return torch.ops.bk.embedding_clipped_sum(ids, g, c, V, padding_idx, deterministic)
        torch.ops.bk.embedding_clipped_sum_(out, ids, g, c, padding_idx, deterministic)
        return out
    if backend == "triton":
        from . import triton_embedding  # noqa: F401  (registers torch.ops.bk.embedding_clipped_sum_triton)

        total = torch.ops.bk.embedding_clipped_sum_triton(ids, g, c, V, padding_idx, deterministic)
        if out is None:
            return total
        return _add_rounding_once(out, total)
    if out is None:
        out = torch.zeros(V, g.shape[-1], dtype=accumulation_dtype(g.dtype), device=g.device)
    _embedding_clipped_sum_torch_(out, ids, g, c, padding_idx)
    return out


def _add_rounding_once(out, total):
    """out += total, summed in the wider of the two dtypes and rounded into out once."""
    wide = torch.promote_types(out.dtype, total.dtype)
    out.copy_(out.to(wide) + total.to(wide))
    return out


def _check_id_range(ids, V, op):
    """The torch backend's version of the kernels' range check (it synchronises on a GPU)."""
    bad = (ids < 0) | (ids >= V)
    if bad.any():
        b, t = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{op}: ids[{b}, {t}] = {int(ids[b, t])} is out of range for {V} embeddings "
            f"(expected 0 <= id < {V})"
        )


def _embedding_norm_torch(ids, g, padding_idx):
    """Pure PyTorch without one-hot: in chunks of examples, unique (example, id) pairs, the
    group sums by index_add_, and their squared norms added per example."""
    B, T, d = g.shape
    acc = accumulation_dtype(g.dtype)
    out = torch.zeros(B, dtype=norm_dtype(g.dtype), device=g.device)
    if B * T == 0:
        return out
    lo_id, hi_id = int(ids.min()), int(ids.max())
    span = hi_id - lo_id + 1
    for lo, hi in example_chunks(B, 2 * T * d):
        idc = ids[lo:hi].long()
        example = torch.arange(hi - lo, device=g.device).unsqueeze(1).expand_as(idc)
        keys = example * span + (idc - lo_id)
        rows = g[lo:hi].reshape(-1, d)
        keys = keys.reshape(-1)
        if padding_idx is not None:
            keep = idc.reshape(-1) != padding_idx
            keys, rows = keys[keep], rows[keep]
        groups, inverse = torch.unique(keys, return_inverse=True)
        sums = torch.zeros(groups.numel(), d, dtype=acc, device=g.device).index_add_(0, inverse, rows.to(acc))
        out[lo:hi].index_add_(0, groups // span, sums.square().sum(1).to(out.dtype))
    return out


def _embedding_clipped_sum_torch_(out, ids, g, c, padding_idx):
    """Pure PyTorch without one-hot or per-example gradients; deterministic on every device:
    rows sorted by id (stable) and summed per id by segment_reduce, never by atomics."""
    op = "embedding_clipped_sum"
    B, T, d = g.shape
    V = out.shape[0]
    acc = accumulation_dtype(g.dtype)
    flat = ids.reshape(-1).long()
    keep = flat != padding_idx if padding_idx is not None else torch.ones_like(flat, dtype=torch.bool)
    _check_id_range(torch.where(keep, flat, 0).view(B, T), V, op)
    if d == 0 or not bool(keep.any()):
        return out
    rows_of, inverse = torch.unique(flat[keep], return_inverse=True)  # the ids present, sorted
    slot = torch.full_like(flat, -1)
    slot[keep] = inverse  # position -> row of `sums`
    sums = torch.zeros(rows_of.numel(), d, dtype=acc, device=g.device)
    c = c.to(acc)
    for lo, hi in example_chunks(B, T * d):
        s = slot[lo * T : hi * T]
        sel = s >= 0
        if not bool(sel.any()):
            continue
        rows = (g[lo:hi].to(acc) * c[lo:hi, None, None]).reshape(-1, d)[sel]
        s = s[sel]
        s, order = torch.sort(s, stable=True)
        seg, counts = torch.unique_consecutive(s, return_counts=True)
        # seg holds distinct rows: index_add_ adds each once, deterministic even with atomics.
        sums.index_add_(0, seg, torch.segment_reduce(rows[order], "sum", lengths=counts, axis=0))
    wide = torch.promote_types(out.dtype, acc)
    out.index_copy_(0, rows_of, (out.index_select(0, rows_of).to(wide) + sums.to(wide)).to(out.dtype))
    return out


@torch.library.register_fake("bk::embedding_norm")
def _embedding_norm_fake(ids, g, padding_idx):
    torch._check(ids.dim() == 2 and g.dim() == 3, lambda: "embedding_norm: ids must be 2-D, g 3-D")
    return g.new_empty((g.shape[0],), dtype=norm_dtype(g.dtype))


@torch.library.register_fake("bk::embedding_clipped_sum")
def _embedding_clipped_sum_fake(ids, g, c, num_embeddings, padding_idx, deterministic):
    torch._check(ids.dim() == 2 and g.dim() == 3, lambda: "embedding_clipped_sum: ids must be 2-D, g 3-D")
    return g.new_empty((num_embeddings, g.shape[2]), dtype=accumulation_dtype(g.dtype))


@torch.library.register_fake("bk::embedding_clipped_sum_")
def _embedding_clipped_sum__fake(grad_weight, ids, g, c, padding_idx, deterministic):
    torch._check(ids.dim() == 2 and g.dim() == 3, lambda: "embedding_clipped_sum_: ids must be 2-D, g 3-D")
    return None


def _one_hot_float64(ids, g, V, padding_idx):
    """[B, T, V] float64 one-hot of ids, zero rows at padding positions (reference only)."""
    ids, g = _check_ids_g(ids, g, "reference")
    one_hot = torch.nn.functional.one_hot(ids.long(), V).double()
    if padding_idx is not None:
        one_hot[ids == padding_idx] = 0
    return one_hot, g.double()


def embedding_grads_ref(ids, g, num_embeddings, padding_idx=None):
    """Reference: every example's embedding-weight gradient [B, V, d] in float64 (one-hot^T g)."""
    one_hot, g = _one_hot_float64(ids, g, num_embeddings, padding_idx)
    return one_hot.mT @ g


def embedding_norm_ref(ids, g, padding_idx=None):
    """Reference: [B] float64 squared norms of the dense per-example gradients."""
    ids, g = _check_ids_g(ids, g, "embedding_norm_ref")
    V = int(ids.max()) + 1 if ids.numel() else 1
    return embedding_grads_ref(ids, g, V, padding_idx).square().sum((1, 2))


def embedding_clipped_sum_ref(ids, g, c, num_embeddings, padding_idx=None):
    """Reference: [V, d] float64 sum_b c_b * (example b's dense gradient)."""
    grads = embedding_grads_ref(ids, g, num_embeddings, padding_idx)
    return (c.double()[:, None, None] * grads).sum(0)
