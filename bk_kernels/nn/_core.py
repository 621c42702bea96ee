"""What every bk.nn layer shares: the hand-off from a layer's backward to the privacy engine.

A bk layer's forward calls one autograd.Function. Its backward computes grad_input exactly as
torch does and, for the layer's trainable parameters, hands the engine one "use" per
parameter (see _uses.py) instead of a weight gradient. Without an engine attached, the same
backward returns the ordinary gradients, so a converted model still trains (non-privately)
and evaluates like the original.
"""
import contextlib
import math
import threading

import torch

from ..layout import UnsupportedLayoutError

_plain = threading.local()


@contextlib.contextmanager
def plain_forward():
    """Inside, bk layers run their torch parent's forward and book-keep nothing: the generic
    path's recompute of a module (generic.py) must not record the bk layers inside it twice."""
    _plain.depth = getattr(_plain, "depth", 0) + 1
    try:
        yield
    finally:
        _plain.depth -= 1


def in_plain_forward():
    return getattr(_plain, "depth", 0) > 0


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
    _bk_calls = 0
    # Layers that act on each token alone set the number of trailing feature dims of their input
    # (Linear, norms: 1; Embedding ids: 0): on packed sequences (bk_kernels/packed.py) their
    # input [R, T, ...] is taken as R*T rows of one token each. None: the family reads examples
    # per row only (convolutions, attention tables, the generic path), refused on packed rows.
    _bk_token_features = None

    @property
    def _bk_engine(self):
        return self._bk_link.engine if self._bk_link is not None else None

    @_bk_engine.setter
    def _bk_engine(self, engine):
        self._bk_link = _EngineLink(engine) if engine is not None else None

    def _bk_owned_parameters(self):
        """The Parameters this layer book-keeps: its own (the generic path adds its absorbed
        children's)."""
        return list(self.parameters(recurse=False))

    def _bk_absorbed_modules(self):
        """Children whose Parameters this layer book-keeps as its own (they stay unconverted)."""
        return []

    def _bk_trainable(self, param):
        return param is not None and param.requires_grad

    def _bk_count_call(self):
        """Every bk forward passes here (the subclass check of convert.py counts); set in the
        instance's __dict__, past nn.Module.__setattr__'s lookups (a few us per layer call)."""
        self.__dict__["_bk_calls"] = self._bk_calls + 1

    def _bk_layout(self):
        """The engine's BatchLayout (layout.py) while one is attached and a backward will follow."""
        engine = self._bk_engine
        if engine is None or not torch.is_grad_enabled() or in_plain_forward():
            return None
        return engine.layout

    def _bk_layout_error(self, x, dim, why=None):
        return self._bk_engine.layout.error(self, self._bk_engine._module_path(self), x, dim, why)

    def _bk_batch_dim(self, x, features_dims=1):
        """The dim of x that holds the examples, for a layer whose features are the trailing
        `features_dims` dims (Linear, Embedding ids with features_dims=0, LayerNorm): dim 0, or
        dim 1 for inputs with a sequence dim when the engine was made with batch_first=False.
        An input with no dim before its features is one unbatched example (dim 0 after
        examples_first's unsqueeze)."""
        engine = self._bk_engine
        return engine.layout.feature_last_dim(x, features_dims) if engine is not None else 0

    def _bk_examples(self, x, dim, fold_rows=False):
        """x, checked against the batch size of the model's forward now running (taken by the
        engine from the model's input): the examples must lie on `dim`. An input broadcast over
        the batch (size 1 there, as Hugging Face's [1, T] position ids) is expanded to the batch
        so that this layer's output, and so its output gradient, is per example. Anything else
        is refused here, in the forward, before any gradient or budget is touched.

        fold_rows (row-wise layers: Linear, LayerNorm; convolutions): an input [k*B, d] whose rows are the
        examples' rows folded example-major (OPT's reshape(-1, d) of [B, T, d]), proven by
        folded_rows, comes back as [B, k, d]; the caller flattens its output back."""
        self._bk_count_call()
        layout = self._bk_layout()
        if layout is None or layout.batch is None:
            return x
        if layout.row_maps is not None:  # inside a vision tower whose rows are all images' patches
            return self._bk_patch_rows(x, dim, layout)
        if layout.tokens is not None:  # rows packing several examples: each token a row of its own
            return self._bk_token_rows(x, dim, layout)
        B = layout.batch
        if x.dim() > dim and x.shape[dim] == B:  # the common case, first: one compare per forward
            if B > 1 and x.grad_fn is None and x.stride(dim) != 0 and self._bk_reads_model_state(x):
                raise self._bk_layout_error(x, dim, why=(
                    f"its input of shape {tuple(x.shape)} is (a view of) a buffer or Parameter of the model, which "
                    f"holds no examples, although its dim {dim} has the batch size {B} (a table of relative positions "
                    "or learned queries of that length): its per-example gradients live in a broadcast after the "
                    "layer, where this layer cannot see them. Freeze the layer, or let the module that owns the "
                    "table take the generic path (bk.register_layer); nothing was recorded and no budget was spent."))
            return x
        if not self._bk_trains():
            return x  # frozen: nothing to book-keep
        if x.dim() <= dim:  # an unbatched input: one example
            if B == 1:
                return x
            raise self._bk_layout_error(x, dim)
        n = x.shape[dim]
        if n == B:
            return x
        if n == 1:  # what follows must keep the B copies apart: checked at the forward's end (expanded.py)
            layout.expanded.append(self)
            return x.expand(*[B if i == dim else -1 for i in range(x.dim())])
        if dim == 0 and self._bk_engine._towers.noted and self._bk_engine._towers.known(self, n):
            return x  # a vision tower's layer recomputed in the backward (activation checkpointing)
        if fold_rows and dim == 0 and layout.batch_first and folded_rows(x, B):
            return x.unflatten(0, (B, n // B))
        raise self._bk_layout_error(x, dim)

    def _bk_rows_as_given(self, x):
        """Whether x passes _bk_examples unchanged on its most common path, told here at a few
        attribute reads (tens of microseconds less per layer call than the general checks): a
        batch-first forward with one example per row (no packed tokens, no patch rows), x's dim 0
        the batch, and x made inside the forward (a gradient history: not the model's input, nor
        a buffer or Parameter of the model). Counts the call as _bk_examples does."""
        link = self._bk_link
        if link is None or x.grad_fn is None:
            return False
        layout = link.engine.layout
        if not (layout.batch_first and layout.row_maps is None and layout.tokens is None and x.dim() > 0 and
                x.shape[0] == layout.batch and torch.is_grad_enabled() and not in_plain_forward()):
            return False
        self._bk_count_call()
        return True

    def _bk_patch_rows(self, x, dim, layout):
        """x inside a vision tower that takes every image's patches as rows (nn/patch_rows.py): its
        rows on dim 0 must be the patches, or the merged patches, whose examples the tower's call
        gave; the engine sums each example's rows when it records this layer's uses."""
        if not self._bk_trains():
            return x
        n = x.shape[dim] if x.dim() > dim else None
        if dim != 0 or n not in layout.row_maps:
            raise self._bk_layout_error(x, dim, why=(
                f"inside a vision tower that takes every image's patches as rows, its input of shape "
                f"{tuple(x.shape)} should hold on dim 0 the {' or '.join(map(str, layout.row_maps))} rows whose "
                "examples the tower's grid_thw and the placeholder tokens give; nothing was recorded and no budget "
                "was spent."))
        return x

    def _bk_token_rows(self, x, dim, layout):
        """x [R, T, ...] of a forward whose rows pack several sequences, as [R*T, ...] token rows
        ([R*T, 1, d] for a single feature dim); the engine sums each sequence's tokens when it
        records. Anything else is refused: a row-level input (a pooled [R, d]) mixes examples."""
        R, T = layout.tokens
        if self.__dict__.get("_bk_token_rows_taken") and x.dim() > dim and x.shape[0] == R * T:
            return x  # the token rows this layer made of its input, in its own ops
        features = self._bk_token_features
        if features is not None and dim == 0 and R * T != R and x.dim() >= 1 + features and x.shape[0] == R * T \
                and folded_rows(x, R):  # already token rows: a reshape(-1, d) of [R, T, d] (OPT, MoE blocks)
            return x.reshape(x.shape[0], 1, *x.shape[1:]) if x.dim() == 1 + features else x  # a view folded_rows reads
        if features == 1 and dim == 0 and x.dim() == 4 and x.shape[0] == R and x.shape[1] == x.shape[2] == T:
            raise self._bk_layout_error(x, dim, why=(
                f"the model's rows pack several sequences (example_rows(bk.packed_sequences())), and this layer's "
                f"input {tuple(x.shape)} has the number of tokens {T} on dims 1 and 2: bk cannot tell which one holds "
                "the tokens (and which the heads); nothing was recorded and no budget was spent."))
        if features == 1 and dim == 0 and _heads_first(x, R, T):  # [R, H, T, D]: Gemma 3's q/k norms
            return x.transpose(1, 2).reshape(R * T, x.shape[1], x.shape[3])
        if features is None or dim != 0 or x.dim() < 2 + features or tuple(x.shape[:2]) != (R, T):
            raise self._bk_layout_error(x, dim, why=(
                f"the model's rows pack several sequences (example_rows(bk.packed_sequences())), so this layer's "
                f"input should be [{R}, {T}, ...] (rows, tokens, then its features), each token then a row of its "
                f"own; it got {tuple(x.shape)}" + ("" if features is not None else
                                                   " and its family reads examples per row only") +
                ". A layer fed a row-level input (a pooled output) mixes the packed examples; nothing was recorded "
                "and no budget was spent."))
        if x.dim() == 2 + features:
            return x.reshape(R * T, 1, *x.shape[2:])
        return x.flatten(0, 1)

    def _bk_reads_model_state(self, x):
        """A trainable layer fed (a view of) a buffer or Parameter of the model (checked only for
        inputs with no gradient history: the model's own inputs pass at one set lookup)."""
        return self._bk_trains() and self._bk_engine._is_model_state(x)

    def _bk_trains(self):
        """Whether any of this layer's own Parameters trains."""
        return any(p.requires_grad for p in self._parameters.values() if p is not None)

    def _bk_bypassed(self):
        """Whether the library's own forward runs instead of bk's: outside private training (a
        plain forward, no engine, no grad), or none of the layer's own Parameters trains."""
        return in_plain_forward() or self._bk_layout() is None or not self._bk_trains()

    def _bk_row_wise(self, x, dim, apply):
        """apply(x checked against the batch) for a row-wise layer (Linear, LayerNorm): rows
        folded example-major come in as [B, k, ...] and the output goes back as the caller
        gave them."""
        if dim == 0 and self._bk_rows_as_given(x):  # the common case, past the general checks
            return apply(x)
        try:
            xe = self._bk_examples(x, dim, fold_rows=True)
        except UnsupportedLayoutError as err:
            deferred_input = isinstance(x.grad_fn, _RefusedAtBackward._backward_cls)
            if (x.grad_fn is not None and not deferred_input) or (x.grad_fn is None and x.requires_grad) or \
                    self._bk_engine._is_model_input(x):
                raise
            # An input made inside the forward from no examples (PEFT DoRA's lora_A(torch.eye(d)),
            # then lora_B of that, whose result is used only detached): the refusal waits until a
            # gradient reaches this call's output, if one ever does.
            return _RefusedAtBackward.apply(apply(x), err)
        if self._bk_on_token_rows():  # [R*T, 1, d] or [R*T, h, d], and back to x's layout
            self.__dict__["_bk_token_rows_taken"] = True  # the layer's own ops on xe (bk.nn.scale) take it as is
            try:
                y = apply(xe)
            finally:
                self.__dict__["_bk_token_rows_taken"] = False
            if xe.shape[0] == x.shape[0]:  # x was token rows already ([R*T, d]: unsqueezed)
                return y.flatten(0, 1) if xe.dim() > x.dim() else y
            R, T = self._bk_layout().tokens
            if _heads_first(x, R, T):
                return y.reshape(R, T, *y.shape[1:]).transpose(1, 2)
            return y.reshape(*x.shape[:2], *y.shape[2 if xe.dim() == x.dim() else 1:])
        y = apply(xe)
        return y.flatten(0, 1) if xe.dim() > x.dim() else y

    def _bk_on_token_rows(self):
        """Whether _bk_examples took the input as token rows (packed sequences)."""
        layout = self._bk_layout()
        return layout is not None and layout.batch is not None and layout.row_maps is None and \
            layout.tokens is not None

    def _bk_hold_output(self, y):
        """y, this layer's forward output, held for its backward while something else keeps it
        (held_output.py), or None outside a recorded forward of the model. Called inside the
        layer's autograd Function, where grad mode is off: the engine noted it at the forward's start."""
        engine = self._bk_engine
        if engine is None or not engine._in_forward or in_plain_forward():
            return None
        return engine._output_holds.hold(y)

    def _bk_hand_off(self, uses):
        """Book-keeps [(param, use)] with the engine; True if it took them (private training)."""
        if self._bk_engine is None:
            return False
        self._bk_engine._record(self, [(p, u) for p, u in uses if self._bk_trainable(p)])
        return True


class _RefusedAtBackward(torch.autograd.Function):
    """Identity on a layer's output whose input holds no examples; raises the layer's layout
    error when a gradient reaches it, before the layer's backward records anything."""

    @staticmethod
    def forward(ctx, y, error):
        ctx.error = error
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g):
        raise ctx.error


# Autograd nodes that keep rows apart: row r of the output depends only on row r of each input
# (elementwise, with a shared operand at most broadcast). Dropout is elementwise too.
_ROW_WISE_NODES = frozenset(
    f"{op}Backward{v}" for op in ("Relu", "Gelu", "Silu", "Tanh", "Sigmoid", "Elu", "LeakyRelu", "Hardtanh",
                                  "Hardswish", "Mish", "Softplus", "NativeDropout", "Clone", "ToCopy", "Neg",
                                  "Add", "Sub", "Mul", "Div") for v in (0, 1)) | frozenset(
    # one-operand elementwise maps (a SwiGLU's clamps, exp/log/pow of a row's values)
    f"{op}Backward0" for op in ("ClampMin", "ClampMax", "Exp", "Expm1", "Log", "Log1p", "Sqrt", "Rsqrt", "Pow",
                                "Abs", "Sin", "Cos", "Erf", "LogSigmoid", "Reciprocal", "Hardsigmoid",
                                # x.masked_fill(mask, value): the output has x's shape (a broadcast x
                                # fails the shape check below); the mask holds no gradient
                                "MaskedFill")) | {
    "ClampBackward1"}
# Of _ROW_WISE_NODES, the tensor-tensor ops, whose operands may be broadcast (the *Backward1
# nodes are the tensor-scalar ops: one operand, of the output's shape)
_BINARY_OPS = frozenset({"AddBackward0", "SubBackward0", "MulBackward0", "DivBackward0"})
_VIEW_NODES = frozenset({"ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0"})
# Nodes that keep rows apart when they work along dims other than 0 (an MoE router's softmax,
# top-k and renormalisation): node name -> where the input's sizes are read.
_ROW_WISE_ALONG = {"SoftmaxBackward0": "_saved_result", "LogSoftmaxBackward0": "_saved_result",
                   "TopkBackward0": "_saved_self_sym_sizes", "SumBackward1": "_saved_self_sym_sizes",
                   "MeanBackward1": "_saved_self_sym_sizes", "GatherBackward0": "_saved_self",
                   # a chunk, split or slice of the features (gate_up.chunk(2, -1), x[..., :d])
                   "SplitBackward0": "_saved_self_sym_sizes", "SplitWithSizesBackward0": "_saved_self_sym_sizes",
                   "SliceBackward0": "_saved_self_sym_sizes"}
# x @ W with W a Parameter (a linear map of the rows; a frozen router's F.linear): node name ->
# (the index in next_functions of the rows operand, of W)
_ROWS_TIMES_WEIGHT = {"MmBackward0": (0, 1), "AddmmBackward0": (1, 2)}
_MAX_NODES = 64


def _heads_first(x, R, T):
    """x [R, H, T, D] of a packed forward: the tokens on dim 2 (a norm of the heads after their
    transpose), where dim 1 cannot be them."""
    return x.dim() == 4 and x.shape[0] == R and x.shape[2] == T and x.shape[1] != T


def folded_rows(x, B):
    """Whether x [k*B, ...] holds the examples' rows folded example-major: x is (through
    row-wise ops only) a reshape of a tensor with the B examples on dim 0 and x's number of
    elements, whose row-major order puts example b's elements in rows b*k .. b*k+k-1, or a
    reshape of such a fold (a reshape keeps the elements' order), or an output of a module on
    the generic path that it laid out as such a fold (its rows split per example in the
    recompute, which checks each example's rows against the forward). As everywhere in a
    batch-first model, a size-B dim 0 is read as the examples."""
    if B == 0 or x.dim() < 2 or x.shape[0] % B:
        return False
    numel = x.numel()
    if x.grad_fn is None:  # no graph (nothing before it trains): a view of the tensor itself
        base = x._base
        return (base is not None and base.dim() >= 2 and base.shape[0] == B and base.numel() == numel
                and base.is_contiguous() and x.is_contiguous() and x.storage_offset() == base.storage_offset())
    # (node, which of its outputs, that output's number of elements, its number of dims, the
    # dim that holds the fold): the fold's dim is 0 but between a permute or select that moved
    # it and the one that moves it back (attention's q/k/v split `permute(2, 0, 3, 1, 4)[i]`).
    # Each node's output shape is read from the graph and must be the claimed one: a tensor
    # broadcast into the claim (fewer elements, or a dim of 1 where the fold is) mixes rows, so
    # every claim is checked where it lands, and a tensor-tensor op pushes each operand's own.
    # Views, matmuls and leaves are only read with the fold on dim 0.
    stack, seen = [(x.grad_fn, x.output_nr, x.numel(), x.dim(), 0)], set()
    while stack:
        node, output_nr, numel, ndim, fold = stack.pop()
        if node is None or (node, output_nr, numel, fold) in seen:
            continue
        seen.add((node, output_nr, numel, fold))
        if len(seen) > _MAX_NODES:
            return False
        shape = _output_shape(node, output_nr)
        if shape is None or (numel is not None and math.prod(shape) != numel) or \
                (ndim is not None and len(shape) != ndim) or fold >= len(shape) or shape[fold] % B:
            return False
        numel, ndim = math.prod(shape), len(shape)
        name = node.name()
        folded_outputs = getattr(node, "_bk_folded_outputs", None)
        # a bk layer's map of the rows (a frozen bk Linear router), or a library's known one
        row_wise_input = getattr(node, "_bk_row_wise_input", None) or _library_row_wise_input(node)
        if name in _BINARY_OPS:
            pushed = _binary_operands(node, shape, fold)
            if pushed is None:
                return False
            stack.extend(pushed)
        elif name in _ROW_WISE_NODES:  # one operand, of the output's shape
            stack.extend((f, nr, numel, ndim, fold) for f, nr in node.next_functions)
        elif name == "CatBackward0":  # inputs of one shape but along the cat dim: the fold's rows kept
            if _signed(node._saved_dim) % ndim == fold:
                return False
            # each input's number of elements is not saved: read where it lands
            stack.extend((f, nr, None, ndim, fold) for f, nr in node.next_functions if f is not None)
        elif name in _ROW_WISE_ALONG:
            if fold != 0 or not _along_other_dims(node, _ROW_WISE_ALONG[name]):
                return False
            if name == "GatherBackward0" and node._saved_index.shape[0] != node._saved_self.shape[0]:
                return False  # fewer (or more) rows out than in: row r would change examples
            sizes = getattr(node, _ROW_WISE_ALONG[name])
            input_numel = sizes.numel() if isinstance(sizes, torch.Tensor) else math.prod(sizes)
            input_ndim = sizes.dim() if isinstance(sizes, torch.Tensor) else len(sizes)
            stack.extend((f, nr, input_numel, input_ndim, 0) for f, nr in node.next_functions)
        elif name in ("ScatterBackward0", "ScatterBackward1"):  # Llama 4's router: top-k values into -inf
            # along dims other than 0, one index row per output row: row r is written from row r
            # of src (ScatterBackward0; index-shaped, as top-k values or a gather) into row r of self
            index = node._saved_index
            if fold != 0 or _signed(node._saved_dim) % ndim == 0 or index.shape[0] != shape[0]:
                return False
            f, nr = node.next_functions[0]
            stack.append((f, nr, numel, ndim, 0))
            if name == "ScatterBackward0":  # src is at least index's size along every dim: equal numel, equal shape
                f, nr = node.next_functions[1]
                stack.append((f, nr, index.numel(), index.dim(), 0))
        elif name in _FOLD_MOVED:  # attention on folds: the fold's dim followed through
            pushed = _fold_moved_inputs(node, name, numel, ndim, fold, B)
            if pushed is None:
                return False
            stack.extend(pushed)
        elif fold != 0:  # everything below reads the fold on dim 0
            return False
        elif folded_outputs is not None:  # a generic-path module's output (an MoE router's weights)
            if output_nr not in folded_outputs:
                return False
        elif row_wise_input is not None:
            i, input_numel = row_wise_input
            f, nr = node.next_functions[i]
            stack.append((f, nr, input_numel, None, 0))
        elif name in _VIEW_NODES:
            sizes = node._saved_self_sym_sizes
            if not (len(sizes) >= 2 and math.prod(sizes) == numel and sizes[0] % B == 0):
                return False
            if sizes[0] > B:  # a reshape of rows folded already (Swin's windows [B*nW, ws, ws, C] -> [B*nW, N, C])
                stack.extend((f, nr, numel, len(sizes), 0) for f, nr in node.next_functions)
        elif name == "torch::autograd::AccumulateGrad":  # a leaf holding the fold's rows: not the examples'
            return False
        elif name in _ROWS_TIMES_WEIGHT:
            rows, weight = _ROWS_TIMES_WEIGHT[name]
            if not _is_weight(node, node.next_functions[weight][0]):
                return False
            if name == "AddmmBackward0" and node.next_functions[0][0] is not None:  # a trained bias: 1-D
                bias = node.next_functions[0][0]
                if bias.name() != "torch::autograd::AccumulateGrad" or bias.variable.dim() != 1:
                    return False
            sizes = node._saved_self_sym_sizes if name == "MmBackward0" else node._saved_mat1_sym_sizes
            f, nr = node.next_functions[rows]
            stack.append((f, nr, math.prod(sizes), len(sizes), 0))
        else:
            return False
    return True


_SDPA_NODES = frozenset({"ScaledDotProductFlashAttentionForCpuBackward0", "ScaledDotProductFlashAttentionBackward0",
                         "ScaledDotProductEfficientAttentionBackward0", "ScaledDotProductCudnnAttentionBackward0"})
# Nodes through which the fold is followed: entry r of the fold's dim (k*B long) of the output
# is made from entry r of the fold's dim of each traced input only. Permutes and transposes
# move that dim, a select (or unbind) of another dim removes one before or after it, expands broadcast
# other dims; batched matmuls and fused attention take the fold on dim 0 as their batch.
_FOLD_MOVED = frozenset({"PermuteBackward0", "TransposeBackward0", "SelectBackward0", "UnbindBackward0",
                         "ExpandBackward0", "BmmBackward0"}) | _SDPA_NODES


def _signed(d):
    return d - 2**64 if d >= 2**63 else d  # negative dims come back as 2^64 + d


def _fold_moved_inputs(node, name, numel, ndim, fold, B):
    """The (node, output_nr, numel, ndim, fold dim) entries of a _FOLD_MOVED node's inputs, or
    None when the node selects from, broadcasts or contracts the fold (numel and ndim: the
    node's output's, read from the graph)."""
    if name == "PermuteBackward0":  # output dim i is input dim dims[i]
        dims = [_signed(d) % len(node._saved_dims) for d in node._saved_dims]
        if fold >= len(dims):  # the fold claimed on a dim this tensor does not have
            return None
        f, nr = node.next_functions[0]
        return [(f, nr, numel, len(dims), dims[fold])]
    if name == "TransposeBackward0":
        d0, d1 = (_signed(d) % ndim for d in (node._saved_dim0, node._saved_dim1))
        f, nr = node.next_functions[0]
        return [(f, nr, numel, ndim, d1 if fold == d0 else d0 if fold == d1 else fold)]
    if name in ("SelectBackward0", "UnbindBackward0"):  # input [..., n (dim d), ...] -> output without dim d
        # (unbind: each output one select; its input's sizes are not saved, but read from the graph)
        sizes = node._saved_self_sym_sizes if name == "SelectBackward0" else _output_shape(*node.next_functions[0])
        if sizes is None:
            return None
        d = _signed(node._saved_dim) % len(sizes)
        if len(sizes) != ndim + 1 or math.prod(sizes) != numel * sizes[d]:
            return None
        f, nr = node.next_functions[0]
        # the fold is input dim fold (before d) or fold + 1: never d itself, which holds no fold
        return [(f, nr, math.prod(sizes), len(sizes), fold if fold < d else fold + 1)]
    if name == "ExpandBackward0":
        sizes = node._saved_self_sym_sizes
        # only dims of size 1 expand: a fold dim of k*B entries did not; a new leading dim moves it
        if len(sizes) != ndim or sizes[fold] % B or (sizes[fold] == 1 and B > 1):
            return None
        f, nr = node.next_functions[0]
        return [(f, nr, math.prod(sizes), ndim, fold)]
    if fold != 0:  # a batched matmul's batch is dim 0
        return None
    if name == "BmmBackward0":  # [kB, n, m] @ [kB, m, p] = [kB, n, p] (numel); an operand is saved
        a, b = node._saved_self, node._saved_mat2  # only where the other one needs a gradient
        if a is None and b is None:
            return None
        a_shape = tuple(a.shape) if a is not None else (b.shape[0], numel // (b.shape[0] * b.shape[2]), b.shape[1])
        b_shape = tuple(b.shape) if b is not None else (a.shape[0], a.shape[2], numel // (a.shape[0] * a.shape[1]))
        shapes = (a_shape, b_shape)
        out_numel = a_shape[0] * a_shape[1] * b_shape[2]
    else:  # fused attention: query, key and value are always saved
        shapes = tuple(tuple(t.shape) for t in (node._saved_query, node._saved_key, node._saved_value))
        out_numel = math.prod(shapes[0][:-1]) * shapes[2][-1]
    # the output is the traced tensor itself (not a broadcast operand of fewer elements), and
    # every operand's batch is the fold's
    if out_numel != numel or any(shape[0] != shapes[0][0] or shape[0] % B for shape in shapes):
        return None
    if any(f is not None for f, _ in node.next_functions[len(shapes):]):  # a trained mask or bias
        return None
    return [(f, nr, math.prod(shape), len(shape), 0) for (f, nr), shape in zip(node.next_functions, shapes)]


# Libraries' own autograd Functions that map rows to rows (each output row's gradient goes to
# the same row of one input only): (module, class) -> node -> (that input's index in
# next_functions, its number of elements).
_LIBRARY_ROW_WISE_FUNCTIONS = {
    # PhiMoE's sparsemixer: the routing weight of the sampled expert, whose backward (a
    # straight-through estimate) goes to the router's scores only: per row, through the saved
    # softmax of the masked scores (the scores' shape) and a scatter_add along the experts.
    ("transformers.models.phimoe.modeling_phimoe", "PhimoeMultiplier"): lambda node: (0, node.saved_tensors[2].numel()),
}


def _library_row_wise_input(node):
    cls = getattr(type(node), "_forward_cls", None)  # a custom Function's node: the Function class
    if cls is None:
        return None
    rule = _LIBRARY_ROW_WISE_FUNCTIONS.get((cls.__module__, cls.__qualname__))
    return rule(node) if rule is not None else None


def _output_shape(node, output_nr):
    """The shape of a graph node's output (None where this torch does not say)."""
    try:
        return tuple(node._input_metadata[output_nr].shape)
    except (AttributeError, IndexError, RuntimeError):
        return None


def _binary_operands(node, shape, fold):
    """The claims of a tensor-tensor op's traced operands: an operand that holds the output's
    fold dim (broadcast along other dims at most: a router's `top / top.sum(-1, keepdim=True)`)
    gets its own shape's claim; one broadcast along the fold dim is shared by every row, which
    keeps rows apart only when it is a function of parameters alone. None if it is not."""
    pushed = []
    for f, nr in node.next_functions:
        if f is None:  # a constant
            continue
        operand = _output_shape(f, nr)
        if operand is None:
            return None
        at = fold - (len(shape) - len(operand))  # broadcasting aligns the trailing dims
        if at >= 0 and operand[at] == shape[fold]:
            pushed.append((f, nr, math.prod(operand), len(operand), at))
        elif not _of_parameters_only(f):
            return None
    return pushed


def _times_a_scalar(node):
    """Whether a product or quotient has one traced operand and a one-element constant other
    (`gamma * 2` records MulBackward0 with the 2 as a saved tensor)."""
    traced = [i for i, (f, _) in enumerate(node.next_functions) if f is not None]
    if node.name() not in ("MulBackward0", "DivBackward0") or len(traced) != 1 or len(node.next_functions) != 2:
        return False
    other = getattr(node, "_saved_other" if traced[0] == 0 else "_saved_self", None)
    return isinstance(other, torch.Tensor) and other.numel() == 1


# Nodes that are a function of their one input alone (no other operand, saved or traced)
_ONE_INPUT_NODES = (_ROW_WISE_NODES - _BINARY_OPS) | _VIEW_NODES | frozenset(
    {"UnsqueezeBackward0", "SqueezeBackward0", "SqueezeBackward1", "ExpandBackward0", "TBackward0",
     "PermuteBackward0", "TransposeBackward0"})


def _of_parameters_only(node, depth=8):
    """Whether a node's output is a function of a trained Parameter alone (`sigmoid(gate)`,
    `gamma.view(1, -1, 1, 1) * 2`): a chain of one-input nodes down to its AccumulateGrad."""
    for _ in range(depth):
        if node.name() == "torch::autograd::AccumulateGrad":  # a Parameter, not an input that asks for a gradient
            return isinstance(node.variable, torch.nn.Parameter)
        if node.name() not in _ONE_INPUT_NODES and not _times_a_scalar(node):
            return False
        traced = [f for f, _ in node.next_functions if f is not None]
        if len(traced) != 1:
            return False
        node = traced[0]
    return False


def _along_other_dims(node, sizes_from):
    """Whether a softmax/top-k/reduction/gather node works along dims other than dim 0."""
    sizes = getattr(node, sizes_from)
    ndim = sizes.dim() if isinstance(sizes, torch.Tensor) else len(sizes)
    dims = node._saved_dim if isinstance(node._saved_dim, tuple) else (node._saved_dim,)
    # an empty dim list is a full reduction
    return bool(dims) and all(_signed(d) % ndim != 0 for d in dims)


def _is_weight(node, fn):
    """Whether the second operand of a matmul node is a Parameter (or its transpose): trained
    (its gradient goes to an AccumulateGrad) or frozen (no gradient; the saved operand's storage
    is a Parameter's)."""
    if fn is not None and fn.name() == "TBackward0":
        fn = fn.next_functions[0][0]
    if fn is not None:
        return fn.name() == "torch::autograd::AccumulateGrad" and isinstance(fn.variable, torch.nn.Parameter)
    mat2 = node._saved_mat2
    return isinstance(mat2, torch.nn.Parameter) or isinstance(mat2._base, torch.nn.Parameter)


def examples_first(x, features_dims=1, batch_dim=0):
    """[B, *, f...] -> [B, T, prod(f)] with T the product of the middle dims (1 for [B, f]);
    batch_dim=1 reads a sequence-first [T, B, *, f...] input."""
    if batch_dim == 0 and features_dims == 1 and x.dim() <= 3:  # the common cases, without the shape arithmetic
        if x.dim() == 3:
            return x
        if x.dim() == 2:
            return x.unsqueeze(1)
    if x.dim() == features_dims:  # unbatched input: one example
        x = x.unsqueeze(0)
    if batch_dim:
        x = x.movedim(batch_dim, 0)
    middle = x.shape[1 : x.dim() - features_dims]
    features = x.shape[x.dim() - features_dims :]
    return x.reshape(x.shape[0], math.prod(middle), math.prod(features))


def autocast_input(x):
    """x as torch.autocast would feed a matmul-like op on its device (cast to the autocast dtype),
    or x unchanged outside autocast. A custom autograd.Function's backward runs outside autocast,
    so the bk layers save this cast copy, as autocast's own linear and conv do. Like autocast,
    it leaves float64 alone (a float64 model under autocast runs in float64)."""
    device = x.device.type
    if x.is_floating_point() and x.dtype != torch.float64 and torch.amp.is_autocast_available(device) and \
            torch.is_autocast_enabled(device):
        return x.to(torch.get_autocast_dtype(device))
    return x
