"""One example laid out as several rows of the batch: the rows of an example clipped together.

DP-SGD bounds each EXAMPLE's influence. Some training lays one example out as several rows of
the model's batch: a DPO batch concatenates every pair's chosen and rejected sequences along the
batch (TRL's concatenated forward: rows b and B + b are example b), augmentation multiplicity
runs K augmentations of each image (rows b*K .. b*K + K - 1). Clipped row by row, an example's
influence is bounded by K x max_grad_norm, not by max_grad_norm. Told which example each row
belongs to (PrivacyEngine.example_rows), the engine clips the SUM of an example's rows' gradients:

    G_e = sum over rows r of example e of G_r

Every use of a parameter (nn/_uses.py) is regrouped as it is recorded, into a use over the
examples:
  - a linear map's a [R, T, d] and g [R, T, p] become [E, K*T, d] and [E, K*T, p] (example e's rows
    side by side along T, K its number of rows at most, missing rows zeros): G_e = g_e^T a_e is the
    sum of its rows' gradients, and the fused norms and clipped sums run on it unchanged (a view
    when each example's rows are consecutive already: interleaved copies);
  - when every example's k-th row lies in one slice of the rows (stacked copies: DPO's chosen
    rows, then its rejected rows), a linear map or embedding becomes K uses of the parameter over
    the E examples instead, one per slice (views, no copy): the engine adds their cross terms as
    for a layer called K times (the copies cost more than the cross terms: in one side-by-side
    script at 064cce2, a DPO step of GPT-2, 4 layers, width 256, vocabulary 8192, 16 pairs of 64
    tokens, 2-core AMD EPYC: 1.285x non-private gathered, 1.232x as K uses, 1.166x rows alone);
  - an embedding's ids and g the same way (zero rows of g add nothing);
  - per-example gradients [R, ...] are summed per example (index_add);
  - a convolution's rows go side by side as the folded inputs of one example (the fold of
    conv_per_example_grads), or, for a convolution that is a linear map of each row (a patch
    embedding on pre-cut patches), as that linear map's;
  - stacked MoE experts re-label the example of each routed row.
"""
import torch

from .layout import UnsupportedLayoutError
from .nn._uses import ConvUse, DenseUse, EmbeddingUse, LinearUse
from .ops.conv import conv_per_example_grads


def stacked_rows(copies):
    """Example b is rows b, B + b, 2B + b, ... of a batch of copies x B rows: each example's
    rows concatenated along the batch one copy after the other (TRL's DPO concatenation of the
    chosen then the rejected sequences)."""
    copies = _check_copies(copies, "stacked_rows")

    def example_of_row(rows):
        _check_divisible(rows, copies, "stacked_rows")
        return torch.arange(rows) % (rows // copies)
    example_of_row.__qualname__ = f"stacked_rows({copies})"
    return example_of_row


def interleaved_rows(copies):
    """Example b is rows b*copies .. b*copies + copies - 1 (x.repeat_interleave(copies, 0):
    augmentation multiplicity)."""
    copies = _check_copies(copies, "interleaved_rows")

    def example_of_row(rows):
        _check_divisible(rows, copies, "interleaved_rows")
        return torch.arange(rows) // copies
    example_of_row.__qualname__ = f"interleaved_rows({copies})"
    return example_of_row


def _check_copies(copies, name):
    if isinstance(copies, bool) or not isinstance(copies, int) or copies < 1:
        raise ValueError(f"bk.{name}: copies must be a positive int, got {copies!r}")
    return copies


def _check_divisible(rows, copies, name):
    if rows % copies:
        raise UnsupportedLayoutError(
            f"bk.{name}({copies}): the model's batch has {rows} rows, not a multiple of {copies}, so its rows "
            "cannot be the examples' copies; nothing was recorded and no budget was spent.")


def check_spec(spec):
    """What PrivacyEngine.example_rows takes: None (one row per example), a callable
    rows -> [rows] example ids, or the ids themselves (a 1-D integer tensor, list or tuple)."""
    from .packed import PackedSequences  # packed.py builds on this module
    if spec is None or callable(spec) or isinstance(spec, PackedSequences):
        return spec
    ids = torch.as_tensor(spec) if isinstance(spec, (list, tuple)) else spec
    if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.is_floating_point() or ids.is_complex() or \
            ids.dtype == torch.bool:
        raise TypeError("PrivacyEngine.example_rows: give a 1-D integer tensor (the example of each row of the model's "
                        "batch), a callable rows -> such a tensor (bk.stacked_rows(k), bk.interleaved_rows(k)), "
                        "bk.packed_sequences() or None, "
                        f"got {type(spec).__name__}" + (f" of shape {tuple(ids.shape)} and dtype {ids.dtype}"
                                                        if isinstance(ids, torch.Tensor) else ""))
    return ids.detach()


def resolve(spec, rows, device=None):
    """The RowGroups of a forward of `rows` rows under spec, or None (one row per example)."""
    if spec is None:
        return None
    ids = check_spec(spec(rows)) if callable(spec) else spec
    if ids is None:
        return None
    if ids.shape[0] != rows:
        raise UnsupportedLayoutError(
            f"PrivacyEngine.example_rows: {ids.shape[0]} example ids for a batch of {rows} rows (one id per row of the "
            "model's input, on its example dim); nothing ran, nothing was recorded and no budget was spent.")
    return RowGroups(ids, device)


def same(groups, other):
    """Whether two forwards' rows belong to their examples alike (None: one row each)."""
    if groups is None or other is None:
        return groups is other
    return groups is other or (groups.rows == other.rows and torch.equal(groups.example, other.example))


class RowGroups:
    """Which example each of a forward's R rows belongs to: the ids, relabelled 0..E-1 in the
    order of their values (any labels do: dataset indices, repeats); or, with `examples`, the
    ids 0..examples-1 as they are (an example may have no row: a vision tower's, without image)."""

    def __init__(self, ids, device=None, examples=None):
        ids = ids.to(device) if device is not None else ids
        if examples is None:
            _, example = torch.unique(ids, return_inverse=True)
        else:
            example = ids.long()
        self.rows = ids.shape[0]
        self.example = example                                   # [R] example of each row
        sizes = torch.bincount(example, minlength=examples or 0)
        self.examples = int(sizes.shape[0])
        self.most = int(sizes.max()) if self.rows else 0         # rows of the largest example
        order = torch.argsort(example, stable=True)              # rows example by example, in row order
        first = torch.cumsum(sizes, 0) - sizes
        position = torch.empty_like(example)
        position[order] = torch.arange(self.rows, device=example.device) - first[example[order]]
        self.slot = example * self.most + position               # row r's place among [E * most] rows
        # every example the same number of rows: a gather of the rows (no zeros to fill), or
        # nothing when each example's rows are consecutive already (a reshape)
        self.uniform = self.examples * self.most == self.rows
        self.gather = torch.argsort(self.slot) if self.uniform else None  # the row in each slot
        self.in_place = self.uniform and bool((self.slot == torch.arange(self.rows, device=example.device)).all())
        # every example's k-th row together a slice of the rows (stacked copies: rows kE .. kE + E - 1)
        self.copies = None
        if self.uniform and not self.in_place:
            by_copy = self.gather.view(self.examples, self.most).T  # [K, E]
            starts = by_copy[:, 0]
            if bool((by_copy == starts[:, None] + torch.arange(self.examples, device=example.device)).all()):
                self.copies = [(int(s), int(s) + self.examples) for s in starts]

    def side_by_side(self, t, fill=0):
        """[R, T, ...] -> [E, most * T, ...]: example e's rows one after the other along dim 1,
        zeros (or `fill`) where it has fewer rows than the largest example."""
        t = self.folds(t, fill)
        return t.reshape(self.examples, self.most * t.shape[1], *t.shape[2:])

    def folds(self, t, fill=0):
        """[R, C, ...] -> [E * most, C, ...]: example e's rows at e*most .. (`fill` where missing)."""
        if self.in_place:
            return t
        if self.uniform:
            return t.index_select(0, self.gather.to(t.device))
        out = t.new_full((self.examples * self.most, *t.shape[1:]), fill)
        out[self.slot.to(t.device)] = t
        return out

    def summed(self, grads):
        """[R, ...] per-row gradients -> [E, ...] per-example."""
        out = grads.new_zeros((self.examples, *grads.shape[1:]))
        return out.index_add_(0, self.example.to(grads.device), grads)

    def regroup(self, use, where):
        """`use` (over the R rows) as a use over the examples. where(): the layer, for errors."""
        if use.batch != self.rows:
            raise UnsupportedLayoutError(
                f"PrivacyEngine.example_rows: {where()} read {use.batch} rows from its input while the model's forward "
                f"had {self.rows}: its rows cannot be matched to the examples they belong to; nothing was recorded "
                "and no budget was spent.")
        if self.copies is not None and isinstance(use, (LinearUse, EmbeddingUse)):
            return [_rows(use, lo, hi) for lo, hi in self.copies]  # one use per copy, views (cross terms)
        if isinstance(use, LinearUse):
            return LinearUse(self.side_by_side(use.a), self.side_by_side(use.g), use.transposed, use.rows)
        if isinstance(use, EmbeddingUse):
            fill = use.padding_idx if use.padding_idx is not None else 0
            return EmbeddingUse(self.side_by_side(use.ids, fill), self.side_by_side(use.g), use.V, use.padding_idx)
        if isinstance(use, DenseUse):
            return DenseUse(self.summed(use.grads))
        if isinstance(use, ConvUse) and _linear_conv(use):  # a patch embedding on pre-cut patches
            x, g = use.x, use.g
            as_linear = self.regroup(LinearUse(x.reshape(len(x), 1, -1), g.reshape(len(g), 1, -1)), where)
            if isinstance(as_linear, list):
                return [_AsWeight(u, use.weight_shape) for u in as_linear]
            return _AsWeight(as_linear, use.weight_shape)
        if isinstance(use, ConvUse):
            return DenseUse(conv_per_example_grads(self.folds(use.x), self.folds(use.g), weight_shape=use.weight_shape,
                                                   fold=self.most, **use.args))
        regrouped = getattr(use, "regrouped", None)  # a layer family's own (MoE experts)
        if regrouped is not None:
            return regrouped(self.example, self.examples)
        dense = use.dense()
        if dense is None:
            raise UnsupportedLayoutError(
                f"PrivacyEngine.example_rows: {where()} keeps its per-example gradients as {type(use).__name__}, which "
                "cannot be summed over an example's rows yet; nothing was recorded and no budget was spent.")
        return DenseUse(self.summed(dense))


def _linear_conv(use):
    """Whether a convolution is a linear map of each row's whole input: its kernel covers the
    input exactly (no padding, no dilation, one group, one output position), as the patch
    embedding of a vision tower fed pre-cut patches ([P, C, t, p, p] by a t x p x p kernel)."""
    args, x, g = use.args, use.x, use.g
    n = x.dim() - 2

    def all_equal(value, to):
        return all(v == to for v in (value if isinstance(value, (tuple, list)) else [value] * n))
    return args["groups"] == 1 and not isinstance(args["padding"], str) and all_equal(args["padding"], 0) and \
        all_equal(args["dilation"], 1) and tuple(x.shape[2:]) == tuple(use.weight_shape[2:]) and \
        all(s == 1 for s in g.shape[2:])


class _AsWeight:
    """A use computed on a convolution weight's [C_out, C_in * kernel] view (a linear
    convolution, above): its norms as they are, its sums reshaped to the weight's shape."""

    def __init__(self, use, weight_shape):
        self.use, self.weight_shape = use, weight_shape

    @property
    def batch(self):
        return self.use.batch

    def sq_norm(self, mode, backend):
        return self.use.sq_norm(mode, backend)

    def factors(self):  # the [C_out, C_in * kernel] layout is the weight's row-major order: cross terms hold
        return self.use.factors()

    def dense(self):
        return self.use.dense()

    def densify(self, mode):
        return _AsWeight(self.use.densify(mode), self.weight_shape)

    def clipped(self, c, backend):
        sums = self.use.clipped(c, backend)
        return sums.view(self.weight_shape) if sums is not None else None

    def add_clipped(self, grad, c, backend):
        self.use.add_clipped(grad.view(self.weight_shape[0], -1), c, backend)


def _rows(use, lo, hi):
    if isinstance(use, LinearUse):
        return LinearUse(use.a[lo:hi], use.g[lo:hi], use.transposed, use.rows)
    return EmbeddingUse(use.ids[lo:hi], use.g[lo:hi], use.V, use.padding_idx)
