"""What a layer's backward keeps of one use of a parameter, and what the engine asks of it.

A use stands for example b's gradient G_b of one parameter from one call of one layer, kept in
the form that is cheapest to keep (book-keeping). Every use answers the same questions (the
protocol the engine sees):
  batch                       B
  sq_norm(mode, backend)      [B] ||G_b||^2, by the family's fused kernels
  factors()                   the common form for cross terms (below), or None
  dense()                     [B, *param_shape] per-example gradients, or None
  densify(mode)               itself, or a DenseUse where keeping per-example gradients is cheaper
  clipped(c, backend)         a new tensor sum_b c_b G_b in the parameter's layout (or None)
  add_clipped(grad, c, backend)   grad += sum_b c_b G_b
All in the accumulation dtype (float64 for float64, float32 otherwise).

The common form: G_b = sum_t L_bt (x) R_bt in the parameter's [rows, cols] layout, with L the
row factor ([B, T, n] dense vectors covering rows offset..offset+n, or ids [B, T] standing for
one-hot rows) and R the dense column factor [B, T, cols]. A linear weight is L = g, R = a (GPT-2's
transposed Conv1D: L = a, R = g); an embedding is L = ids, R = g. One function, cross(), gives
<G_b, G'_b> for any two uses of one parameter from these forms (tied embeddings, a layer called
twice, a Linear tied to a transposed Conv1D), and from dense per-example gradients otherwise.
"""
import math
from dataclasses import dataclass

import torch

from .. import ops
from ..ops._backend import resolve
from ..ops._norm_common import accumulation_dtype, example_chunks
from ..ops.clipped_sum import clipped_sum_3d
from ..ops.linear_norm import linear_norm_3d

# A direct-mode linear or conv layer keeps its per-example gradients when they fit this many
# elements: the clipped sum is then a cheap weighted sum instead of a second matmul.
DENSE_DIRECT_BUDGET = 1 << 24


class UnsupportedSharingError(RuntimeError):
    pass


@dataclass
class Factors:
    """G_b = sum_t L_bt (x) R_bt; see the module docstring."""

    left: torch.Tensor            # [B, T, n] dense rows, or [B, T] ids (one-hot rows)
    right: torch.Tensor           # [B, T, cols]
    offset: int = 0               # first parameter row that dense `left` covers
    mask: torch.Tensor = None     # [B, T] bool: ids that count (not padding), for ids only

    @property
    def ids(self):
        return not self.left.is_floating_point()


class DenseUse:
    """Per-example gradients kept as they are: [B, *param_shape] (biases, norm layers, small
    direct-mode linear layers, the generic path)."""

    def __init__(self, grads):
        acc = accumulation_dtype(grads.dtype)  # 16-bit squares overflow (fp16) or round
        self.grads = grads if grads.dtype == acc else grads.to(acc)

    @property
    def batch(self):
        return self.grads.shape[0]

    def sq_norm(self, mode, backend):
        # a reduction without the [B, n] temporary of squares (half the memory traffic)
        return torch.linalg.vector_norm(self.grads.flatten(1), dim=1).square()

    def factors(self):
        return None

    def dense(self, lo=0, hi=None):
        return self.grads[lo:hi]

    def densify(self, mode):
        return self

    def clipped(self, c, backend):
        # a vector-matrix product: tensordot's Python-side reshaping costs more than it on small layers
        c = c if c.dtype == self.grads.dtype else c.to(self.grads.dtype)
        if self.grads.dim() == 2:  # a bias: no reshapes
            return c @ self.grads
        return (c @ self.grads.flatten(1)).view(self.grads.shape[1:])

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
        # a and g come 3-D from the layer's backward: past the public op's argument checks
        return linear_norm_3d(self.a, self.g, mode, resolve(backend, self.a.device, "linear_norm"))

    def factors(self):
        if self.transposed:
            return Factors(self.a, self.g)
        return Factors(self.g, self.a, offset=self.rows.start if self.rows is not None else 0)

    def dense(self):
        return None

    def densify(self, mode):
        """Direct-mode layers whose per-example gradients are small keep them."""
        if self.rows is not None:
            return self
        B, T, d = self.a.shape
        p = self.g.shape[2]
        if ops.choose_mode(mode, T, d, p) != "direct" or B * d * p > DENSE_DIRECT_BUDGET:
            return self
        acc = accumulation_dtype(self.a.dtype)
        grads = torch.einsum("btp,btd->bpd", self.g.to(acc), self.a.to(acc))
        return DenseUse(grads.transpose(1, 2) if self.transposed else grads)

    def clipped(self, c, backend):
        if self.rows is not None or self.transposed:  # a block, or the [d, p] layout: add into zeros
            return None
        return clipped_sum_3d(self.a, self.g, c, False, None, None, resolve(backend, self.a.device, "clipped_sum"))[0]

    def add_clipped(self, grad, c, backend):
        target = grad[self.rows] if self.rows is not None else grad
        if self.transposed:
            target = target.T
        clipped_sum_3d(self.a, self.g, c, False, target, None, resolve(backend, self.a.device, "clipped_sum"))


class EmbeddingUse:
    """G_b[v] = sum_{t: ids_bt = v != padding_idx} g_bt, from ids:[B,T] and g:[B,T,d]."""

    def __init__(self, ids, g, num_embeddings, padding_idx):
        self.ids, self.g, self.V, self.padding_idx = ids, g, num_embeddings, padding_idx

    @property
    def batch(self):
        return self.ids.shape[0]

    def sq_norm(self, mode, backend):
        return ops.embedding_norm(self.ids, self.g, self.padding_idx, backend=backend)

    def factors(self):
        mask = torch.ones_like(self.ids, dtype=torch.bool) if self.padding_idx is None else self.ids != self.padding_idx
        return Factors(self.ids.long(), self.g, mask=mask)

    def dense(self):
        return None

    def densify(self, mode):
        return self

    def clipped(self, c, backend):
        return ops.embedding_clipped_sum(self.ids, self.g, c, self.V, padding_idx=self.padding_idx,
                                         deterministic=True, backend=backend)  # bitwise reproducible on GPUs too

    def add_clipped(self, grad, c, backend):
        ops.embedding_clipped_sum(self.ids, self.g, c, padding_idx=self.padding_idx, out=grad, deterministic=True,
                                  backend=backend)


class ConvUse:
    """A convolution's weight gradient from its input x:[B,C_in,*S] and output gradient g."""

    def __init__(self, x, g, weight_shape, stride, padding, dilation, groups):
        self.x, self.g = x, g
        self.args = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
        self.weight_shape = weight_shape
        self.output = None  # the forward's output, where the layer held it (held_output.py)

    @property
    def batch(self):
        return self.x.shape[0]

    def sq_norm(self, mode, backend):
        return ops.conv_norm(self.x, self.g, kernel_size=self.weight_shape[2:], mode=mode, backend=backend,
                             **self.args)

    def factors(self):
        return None

    def dense(self, lo=0, hi=None):
        """Formed on demand (a shared convolution weight): one grouped weight-gradient call
        (examples lo..hi only, when given)."""
        return ops.conv_per_example_grads(self.x[lo:hi], self.g[lo:hi], weight_shape=self.weight_shape, **self.args)

    def densify(self, mode):
        """A convolution's per-example gradients come from one weight-gradient call with the batch
        folded into the groups: cheaper than unfolding its patches for the direct norm, and the
        clipped sum is then a weighted sum instead of a second weight-gradient call."""
        positions = math.prod(self.g.shape[2:])
        if not keeps_conv_grads(mode, self.batch, positions, self.weight_shape, self.args["groups"]):
            return self
        return DenseUse(self.dense())

    def clipped(self, c, backend):
        return ops.conv_clipped_sum(self.x, self.g, c, weight_shape=self.weight_shape, **self.args)[0]

    def add_clipped(self, grad, c, backend):
        ops.conv_clipped_sum(self.x, self.g, c, weight_shape=self.weight_shape, out=grad, **self.args)


def keeps_conv_grads(mode, B, positions, weight_shape, groups):
    """Whether a convolution's use keeps its B per-example gradients (ConvUse.densify): a
    direct-mode layer (by linear_norm's rule per group) whose gradients fit DENSE_DIRECT_BUDGET."""
    C_out, width = weight_shape[0], math.prod(weight_shape[1:])
    return ops.choose_mode(mode, positions, width, C_out // groups) == "direct" and \
        B * C_out * width <= DENSE_DIRECT_BUDGET


class WeightTransform:
    """A layer's weight made from Parameters P_1..P_k by a map W = f(P_1..P_k) of the Parameters
    alone (timm's weight standardization: W = gain * (V - mean) / std per output channel). Example
    b's gradient of P_i is J_i^T G_b with G_b its gradient of W (the layer's own use, `inner`).
    J_i does not depend on b: so the clipped sum is J_i^T (sum_b c_b G_b), one map of one clipped
    sum, while the norms need J_i^T G_b for each example: formed over chunks of examples, for all
    the P_i at once and kept for their uses (TransformedUse).
    vjp([b, *W.shape]) -> [[b, *P_i.shape] for each i]: linear, the same J for every example.
    sq_norms(inner, mode, backend) -> [[B] for each i], or None: the norms without forming the
    per-example gradients, where the map has a formula for them (else, or on None, formed)."""

    def __init__(self, inner, vjp, numels, weight_numel, sq_norms=None):
        self.inner, self.vjp, self.numels, self.weight_numel = inner, vjp, numels, weight_numel
        self.norms_from_inner = sq_norms
        self._sq_norms, self._dense, self._clipped = None, None, (None, None)

    def dense(self):
        if self._dense is None:
            self._dense = self.vjp(self.inner.dense())
        return self._dense

    def sq_norms(self, mode, backend):
        """[B] squared norm of each P_i's per-example gradients."""
        if self._sq_norms is None and self._dense is None and self.norms_from_inner is not None:
            self._sq_norms = self.norms_from_inner(self.inner, mode, backend)
        if self._sq_norms is None:
            if self._dense is not None:
                self._sq_norms = [DenseUse(d).sq_norm(None, None) for d in self._dense]
            else:
                norms = [[] for _ in self.numels]
                # (0, 0) for an empty batch: empty norms of the right dtype and device
                for lo, hi in example_chunks(self.inner.batch, sum(self.numels) + self.weight_numel) or [(0, 0)]:
                    for out, d in zip(norms, self.vjp(self.inner.dense(lo, hi))):
                        out.append(DenseUse(d).sq_norm(None, None))
                self._sq_norms = [torch.cat(n) for n in norms]
        return self._sq_norms

    def clipped(self, c, backend):
        """[sum_b c_b (J_i^T G_b) for each i], from one clipped sum of the inner use."""
        if self._clipped[0] is not c:
            inner = self.inner.clipped(c, backend)
            self._clipped = (c, [d[0] for d in self.vjp(inner[None])])
        return self._clipped[1]


class TransformedUse:
    """Parameter i of a WeightTransform (its per-example gradients J_i^T G_b)."""

    def __init__(self, transform, index):
        self.transform, self.index = transform, index

    @property
    def batch(self):
        return self.transform.inner.batch

    def sq_norm(self, mode, backend):
        return self.transform.sq_norms(mode, backend)[self.index]

    def factors(self):
        return None

    def dense(self):
        return self.transform.dense()[self.index]

    def densify(self, mode):
        """Small enough, and the norms have no formula or the inner use would keep its own:
        every Parameter's per-example gradients formed once, kept as they are."""
        transform = self.transform
        if self.batch * sum(transform.numels) > DENSE_DIRECT_BUDGET or (
                transform.norms_from_inner is not None and transform.inner.densify(mode) is transform.inner):
            return self
        return DenseUse(self.dense())

    def clipped(self, c, backend):
        return self.transform.clipped(c, backend)[self.index]

    def add_clipped(self, grad, c, backend):
        grad.add_(self.clipped(c, backend).to(grad.dtype))


# ---------------------------------------------------------------- cross terms


def cross(u, v):
    """[B] <G_b, G'_b> of two uses of one parameter, from their common forms."""
    fu, fv = u.factors(), v.factors()
    if fu is not None and fv is not None:
        return _factor_cross(fu, fv, u.batch)
    du, dv = u.dense(), v.dense()
    if du is not None and fv is not None:
        return _contract(du, fv)
    if dv is not None and fu is not None:
        return _contract(dv, fu)
    if du is not None and dv is not None:
        return (du.flatten(1) * dv.to(du.dtype).flatten(1)).sum(1)
    raise UnsupportedSharingError(f"cross term between {type(u).__name__} and {type(v).__name__}")


def _acc(t, dtype):
    return t.to(dtype) if t.is_floating_point() else t


def _factor_cross(f1, f2, B):
    """sum_{s,t} <L1_s, L2_t> <R1_s, R2_t>, over chunks of examples."""
    acc = accumulation_dtype(f1.right.dtype)
    out = torch.empty(B, dtype=acc, device=f1.right.device)
    T1, T2 = f1.right.shape[1], f2.right.shape[1]
    for lo, hi in example_chunks(B, T1 * T2 * 3):
        part = lambda f: Factors(_acc(f.left[lo:hi], acc), _acc(f.right[lo:hi], acc), f.offset,  # noqa: E731
                                 f.mask[lo:hi] if f.mask is not None else None)
        a, b = part(f1), part(f2)
        out[lo:hi] = (_left_gram(a, b) * (a.right @ b.right.mT)).sum((1, 2))
    return out


def _left_gram(a, b):
    """[b, T1, T2] <L1_s, L2_t> of two row factors (dense blocks or one-hot ids)."""
    if a.ids and b.ids:
        return ((a.left[:, :, None] == b.left[:, None, :]) & a.mask[:, :, None] & b.mask[:, None, :]).to(
            a.right.dtype)
    if a.ids or b.ids:
        ids, dense = (a, b) if a.ids else (b, a)
        rows = ids.left - dense.offset  # the one-hot row inside the dense block, when it lies there
        inside = ids.mask & (rows >= 0) & (rows < dense.left.shape[2])
        picked = dense.left.gather(2, rows.clamp(0, dense.left.shape[2] - 1)[:, None, :].expand(
            -1, dense.left.shape[1], -1))  # [b, T_dense, T_ids]
        picked = picked * inside[:, None, :]
        return picked.mT if a.ids else picked
    lo, hi = max(a.offset, b.offset), min(a.offset + a.left.shape[2], b.offset + b.left.shape[2])
    if lo >= hi:  # disjoint blocks of rows
        return a.right.new_zeros(a.right.shape[0], a.right.shape[1], b.right.shape[1])
    return a.left[..., lo - a.offset:hi - a.offset] @ b.left[..., lo - b.offset:hi - b.offset].mT


def _contract(grads, f):
    """[B] <G_b, sum_t L_bt (x) R_bt> = sum_t L_bt^T G_b R_bt for dense G [B, rows, cols]."""
    G = grads.reshape(grads.shape[0], grads.shape[1], -1)
    R = f.right.to(G.dtype)
    if f.ids:
        picked = G.gather(1, f.left[:, :, None].expand(-1, -1, G.shape[2]))  # [B, T, cols]
        return ((picked * R).sum(2) * f.mask).sum(1)
    block = G[:, f.offset:f.offset + f.left.shape[2]]
    return torch.einsum("brc,btr,btc->b", block, f.left.to(G.dtype), R)
