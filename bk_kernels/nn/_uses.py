"""What a layer's backward keeps of one use of a parameter, and what the engine asks of it.

A use stands for example b's gradient G_b of one parameter from one call of one layer, in
the form that is cheapest to keep (book-keeping): the layer input and output gradient of a
linear map, the ids and output gradient of an embedding, or, where they are small, the
per-example gradients themselves. The engine asks each use for
  sq_norm()       [B] ||G_b||^2,
  cross(other)    [B] <G_b, G'_b> with another use of the same parameter (tied weights,
                  a layer called twice), computed from the kept factors (cross-Gram), and
  add_clipped(grad, c)   grad += sum_b c_b G_b, and
  clipped(c)             a new tensor sum_b c_b G_b in the parameter's layout (or None where
                         only add_clipped applies): the first use of a parameter writes its
                         gradient instead of zero-filling one and adding to it.
All in the accumulation dtype (float64 for float64, float32 otherwise).
"""
import torch

from .. import ops
from ..ops._norm_common import accumulation_dtype, example_chunks


class UnsupportedSharingError(RuntimeError):
    pass


class DenseUse:
    """Per-example gradients kept as they are: [B, *param_shape] (biases, norm layers, small
    direct-mode linear layers)."""

    def __init__(self, grads):
        self.grads = grads.to(accumulation_dtype(grads.dtype))  # 16-bit squares overflow (fp16) or round

    @property
    def batch(self):
        return self.grads.shape[0]

    def sq_norm(self, mode, backend):
        # a reduction without the [B, n] temporary of squares (half the memory traffic)
        return torch.linalg.vector_norm(self.grads.flatten(1), dim=1).square()

    def per_example(self):
        return self.grads

    def cross(self, other):
        mine = self.grads
        if isinstance(other, LinearUse) and other.rows is None:
            # <G, g^T a> = sum_t g_t . (G a_t), G in the parameter's layout
            weight = mine.transpose(1, 2) if other.transposed else mine  # [B, p, d]
            return torch.einsum("bpd,btd,btp->b", weight, other.a.to(mine.dtype), other.g.to(mine.dtype))
        if isinstance(other, EmbeddingUse):
            # <G, E> = sum_t [ids_t valid] G[ids_t] . g_t
            ids = other.ids.long()
            picked = mine.gather(1, ids[:, :, None].expand(-1, -1, mine.shape[2]))  # [B, T, d]
            return ((picked * other.g.to(mine.dtype)).sum(2) * other._mask(ids)).sum(1)
        theirs = other.per_example()
        if theirs is None:
            raise UnsupportedSharingError(f"cross term between {type(self).__name__} and {type(other).__name__}")
        return (mine.flatten(1) * theirs.to(mine.dtype).flatten(1)).sum(1)

    def clipped(self, c, backend):
        return torch.tensordot(c.to(self.grads.dtype), self.grads, dims=1)

    def add_clipped(self, grad, c, backend):
        grad.add_(self.clipped(c, backend).to(grad.dtype))


class LinearUse:
    """G_b = g_b^T a_b ([p, d]) of a linear map, from a:[B,T,d] and g:[B,T,p].

    transposed: the parameter is stored [d, p] (Hugging Face's GPT-2 Conv1D).
    rows: the slice of the parameter's first dim that this use covers (MultiheadAttention's
    q/k/v blocks of in_proj_weight); None for the whole parameter.
    """

    def __init__(self, a, g, transposed=False, rows=None):
        self.a, self.g, self.transposed, self.rows = a, g, transposed, rows

    @property
    def batch(self):
        return self.a.shape[0]

    def sq_norm(self, mode, backend):
        return ops.linear_norm(self.a, self.g, mode=mode, backend=backend)

    def per_example(self):
        return None

    def _block(self):
        return (self.rows.start, self.rows.stop) if self.rows is not None else None

    def cross(self, other):
        if isinstance(other, LinearUse):
            if self.transposed != other.transposed:
                raise UnsupportedSharingError("a parameter used as both a Linear and a transposed Conv1D")
            if self._block() != other._block():
                if self.rows is not None and other.rows is not None and (
                        self.rows.stop <= other.rows.start or other.rows.stop <= self.rows.start):
                    return torch.zeros(self.batch, dtype=accumulation_dtype(self.a.dtype), device=self.a.device)
                raise UnsupportedSharingError("overlapping but different blocks of one parameter")
            # <g1^T a1, g2^T a2> = sum_{s,t} <a1_s, a2_t> <g1_s, g2_t>
            return _chunked_cross(self, other, lambda a1, g1, a2, g2: ((a1 @ a2.mT) * (g1 @ g2.mT)).sum((1, 2)))
        if isinstance(other, EmbeddingUse):
            return other.cross(self)
        if isinstance(other, DenseUse):
            return other.cross(self)
        raise UnsupportedSharingError(f"cross term between a linear use and {type(other).__name__}")

    def clipped(self, c, backend):
        if self.rows is not None or self.transposed:  # a block, or the [d, p] layout: add into zeros
            return None
        return ops.clipped_sum(self.a, self.g, c, backend=backend)[0]

    def add_clipped(self, grad, c, backend):
        target = grad[self.rows] if self.rows is not None else grad
        if self.transposed:
            target = target.T
        ops.clipped_sum(self.a, self.g, c, out=target, backend=backend)


class EmbeddingUse:
    """G_b[v] = sum_{t: ids_bt = v != padding_idx} g_bt, from ids:[B,T] and g:[B,T,d]."""

    def __init__(self, ids, g, num_embeddings, padding_idx):
        self.ids, self.g, self.V, self.padding_idx = ids, g, num_embeddings, padding_idx

    @property
    def batch(self):
        return self.ids.shape[0]

    def sq_norm(self, mode, backend):
        return ops.embedding_norm(self.ids, self.g, self.padding_idx, backend=backend)

    def per_example(self):
        return None

    def _mask(self, ids):
        return torch.ones_like(ids, dtype=torch.bool) if self.padding_idx is None else ids != self.padding_idx

    def cross(self, other):
        if isinstance(other, EmbeddingUse):
            def pair(i1, g1, i2, g2):
                same = (i1[:, :, None] == i2[:, None, :]) & self._mask(i1)[:, :, None] & other._mask(i2)[:, None, :]
                return ((g1 @ g2.mT) * same).sum((1, 2))
            return _chunked_cross(self, other, pair, first=("ids", "g"), second=("ids", "g"))
        if isinstance(other, LinearUse):
            if other.transposed or other.rows is not None:
                raise UnsupportedSharingError("an embedding tied to a transposed or sliced linear weight")
            # <G_emb, g_l^T a_l> = sum_t [ids_t valid] sum_s g_l[s, ids_t] <a_l_s, g_emb_t>
            def pair(ids, ge, a, gl):
                picked = gl.gather(2, ids[:, None, :].expand(-1, gl.shape[1], -1))  # [b, T_l, T_e]
                return ((a @ ge.mT) * picked * self._mask(ids)[:, None, :]).sum((1, 2))
            return _chunked_cross(self, other, pair, first=("ids", "g"), second=("a", "g"))
        if isinstance(other, DenseUse):
            return other.cross(self)
        raise UnsupportedSharingError(f"cross term between an embedding use and {type(other).__name__}")

    def clipped(self, c, backend):
        return ops.embedding_clipped_sum(self.ids, self.g, c, self.V, padding_idx=self.padding_idx, backend=backend)

    def add_clipped(self, grad, c, backend):
        ops.embedding_clipped_sum(self.ids, self.g, c, padding_idx=self.padding_idx, out=grad, backend=backend)


class ConvUse:
    """A convolution's weight gradient from its input x:[B,C_in,*S] and output gradient g."""

    def __init__(self, x, g, weight_shape, stride, padding, dilation, groups):
        self.x, self.g = x, g
        self.args = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
        self.weight_shape = weight_shape

    @property
    def batch(self):
        return self.x.shape[0]

    def sq_norm(self, mode, backend):
        return ops.conv_norm(self.x, self.g, kernel_size=self.weight_shape[2:], mode=mode, backend=backend,
                             **self.args)

    def per_example(self):
        return None

    def cross(self, other):
        raise UnsupportedSharingError("a convolution weight shared with another use")

    def clipped(self, c, backend):
        return ops.conv_clipped_sum(self.x, self.g, c, weight_shape=self.weight_shape, **self.args)[0]

    def add_clipped(self, grad, c, backend):
        ops.conv_clipped_sum(self.x, self.g, c, weight_shape=self.weight_shape, out=grad, **self.args)


def _chunked_cross(use1, use2, pair, first=("a", "g"), second=("a", "g")):
    """[B] of pair(x1, y1, x2, y2) over chunks of examples, in the accumulation dtype."""
    x1, y1 = (getattr(use1, n) for n in first)
    x2, y2 = (getattr(use2, n) for n in second)
    acc = accumulation_dtype(y1.dtype)
    B = use1.batch
    T1, T2 = x1.shape[1], x2.shape[1]
    out = torch.empty(B, dtype=acc, device=y1.device)
    cast = lambda t: t if not t.is_floating_point() else t.to(acc)  # noqa: E731
    for lo, hi in example_chunks(B, T1 * T2 * 3):
        out[lo:hi] = pair(cast(x1[lo:hi]), cast(y1[lo:hi]), cast(x2[lo:hi]), cast(y2[lo:hi]))
    return out
