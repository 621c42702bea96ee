"""Where the examples lie: the batch size of the model's forward now running, and the errors
for layer inputs that do not hold it where the engine reads them (docs/DESIGN.md).

The engine holds one BatchLayout. A forward pre-hook on the model (ModelProbe) hands it the
model's inputs; every bk layer checks its own input against `batch` in its forward
(BKLayer._bk_examples), so a wrong layout is refused before anything is recorded.
"""
import contextlib

import torch
from torch.nn.utils.rnn import PackedSequence
from torch.utils._pytree import tree_leaves, tree_map


class UnsupportedLayoutError(RuntimeError):
    """A bk layer's input does not hold the batch's examples where the engine reads them."""


class BatchLayout:
    def __init__(self, batch_first):
        if not isinstance(batch_first, bool):
            raise ValueError(f"PrivacyEngine: batch_first must be True or False, got {batch_first!r}")
        self.batch_first = batch_first
        self.batch = None         # examples in the model's forward now running
        self.input_shape = None   # the shape of the model's first tensor input
        self.input_device = None  # ... and its device
        self.guessed = False      # the batch came from a 1-D input: a guess that a layer may correct
        self.input_storages = set()  # storages of the model's tensor inputs in the forward now running
        self.state_storages = None
        self.expanded = []  # bk layers that expanded a batch-1 input to the batch in this forward
        self.row_maps = None  # inside a patch-rows vision tower: {rows: example of each row} (nn/patch_rows.py)
        self.row_serial = None  # ... and the serial of the model's forward it runs in
        self.tokens = None  # (R, T) of a forward whose rows pack several examples (packed.py): tokens are rows

    def take(self, args, kwargs):
        """The batch size of a forward of the model, from its first tensor input: dim 0, or dim 1
        with batch_first=False (dim 0 for a 1-D input); a PackedSequence's first step."""
        if not kwargs and all(isinstance(t, torch.Tensor) for t in args):  # model(x): no pytree walk
            leaves = args
        else:
            leaves = tree_leaves((args, kwargs), is_leaf=lambda t: isinstance(t, PackedSequence))
        self.input_storages = {_storage(t) for t in leaves if isinstance(t, torch.Tensor)}
        self.state_storages = None  # the model's buffers and Parameters, found when first asked (engine)
        self.expanded = []  # bk layers that expanded a batch-1 input to the batch in this forward
        self.row_maps = None  # no vision tower runs yet
        self.tokens = None  # rows hold one example each, unless the engine reads packed sequences
        first = next((t for t in leaves if isinstance(t, PackedSequence) or isinstance(t, torch.Tensor)
                      and t.dim() > 0), None)
        if isinstance(first, PackedSequence):
            self.input_shape, self.guessed, self.input_device = None, False, first.data.device
            self.batch = int(first.batch_sizes[0]) if first.batch_sizes.numel() else 0
            return
        self.input_shape = tuple(first.shape) if first is not None else None
        self.input_device = first.device if first is not None else None
        # A 1-D first input (a flat stream of ids with offsets, or one id per example) gives only a
        # guess, which an EmbeddingBag's bag count replaces.
        self.guessed = first is not None and first.dim() == 1
        self.batch = None if first is None else first.shape[self.example_dim(first)]

    def example_dim(self, x):
        """Where a model input or output holds the examples: dim 0, or dim 1 with batch_first=False
        (dim 0 for a 1-D tensor), as `take` reads the first input."""
        return 0 if self.batch_first or x.dim() < 2 else 1

    def empty_batch(self):
        """Whether the forward now starting has no example, and padding it is safe: a batch size
        read from a 1-D input is a guess (EmbeddingBag's flat ids may be empty while its bags
        are not), and a PackedSequence has no tensor to pad."""
        return self.batch == 0 and self.input_shape is not None and not self.guessed

    def pad(self, args, kwargs):
        """An empty batch's inputs with ONE all-zero example in place of none: every tensor input
        with no example gets one (models such as HF's attention cannot run zero examples:
        `view(B, T, -1, head_dim)` of 0 elements). The engine keeps nothing of its backward."""
        def one_example(t):
            if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[self.example_dim(t)] == 0:
                shape = list(t.shape)
                shape[self.example_dim(t)] = 1
                return t.new_zeros(shape)
            return t
        return tree_map(one_example, (args, kwargs))

    def unpad(self, output):
        """The padded forward's output as an empty batch's: each tensor's example dim (size 1)
        narrowed to 0 (a view, so a loss on it still backpropagates into the padding's graph),
        a 0-d float (a loss the model computed on the padding) times 0. Containers that pytree
        does not know (a cache object) pass unchanged."""
        def no_example(t):
            if not isinstance(t, torch.Tensor):
                return t
            if t.dim() == 0:
                return t * 0 if t.is_floating_point() else t
            dim = self.example_dim(t)
            return t.narrow(dim, 0, 0) if t.shape[dim] == 1 else t
        return tree_map(no_example, output)

    @contextlib.contextmanager
    def sequence_first(self):
        """Inside, layer inputs with a sequence dim hold the examples on dim 1 ([T, B, ...]), as
        with batch_first=False: a module that transposes its batch-first input to run its own
        layers sequence-first (Longformer's self-attention) declares it for that call only.
        Each layer reads its example dim in its forward, so the backward needs nothing of it."""
        outer = self.batch_first
        self.batch_first = False
        try:
            yield
        finally:
            self.batch_first = outer

    def feature_last_dim(self, x, features_dims):
        """The example dim of an input whose features are its trailing `features_dims` dims."""
        return 0 if self.batch_first or x.dim() - features_dims < 2 else 1

    def error(self, layer, path, x, dim, why=None):
        """The error for a bk layer whose input does not hold the batch's examples on `dim`."""
        B = self.batch
        if why is None:
            n = x.shape[dim] if x.dim() > dim else None
            why = (f"dim {dim} of its input of shape {tuple(x.shape)} should hold the examples, but has size "
                   f"{n if n is not None else 'none'} while the model's input has {B} (batch_first="
                   f"{self.batch_first}). Possible causes: " + "; or ".join(self._causes(x, n)) + ". A layer whose "
                   "input mixes or folds the examples of a batch is not supported; nothing was recorded and no "
                   "budget was spent.")
        return UnsupportedLayoutError(f"PrivacyEngine: {type(layer).__name__} ({path}): {why}")

    def _causes(self, x, n):
        B, shape = self.batch, self.input_shape or ()
        other = 1 if self.batch_first else 0  # the model input's dim the other layout reads
        causes = []
        if _storage(x) in self.input_storages and x.dim() and x.shape[0] != B:
            causes.append(f"this input is (a view of) one of the model's inputs, whose first dim ({x.shape[0]}) is "
                          "not the batch: the rows of all examples concatenated, which bk cannot split per example "
                          "(a vision tower whose pixel_values hold every image's patches, split by a grid_thw: bk "
                          "maps the rows of the towers listed in bk_kernels/nn/patch_rows.py, not yet this one's). Freeze the layers that read it (a vision tower: "
                          "model.model.visual.requires_grad_(False)); the layers after them train privately")
        if n is not None and len(shape) > 1 and shape[other] == n:
            causes.append(f"the model's input {shape} has {n} on dim {other}: " + (
                "if the model is sequence-first (inputs [T, B, ...], as torch's nn.Transformer* and "
                "nn.MultiheadAttention by default), pass batch_first=False to the engine (the layers before "
                "this one read a sequence dim as the examples)" if self.batch_first else
                "if the model is batch-first, leave batch_first=True"))
        if n is not None and B and n % B == 0 and n > B:
            causes.append("the examples are folded into rows in an order other than example-major (a "
                          "reshape(-1, d) of [B, T, d], as OPT's decoder layers do, is read as rows b*T .. b*T+T-1 "
                          "of example b when the layer is a Linear or a LayerNorm and only row-wise ops lie between; "
                          "a transpose, roll, gather or other mixing op before the reshape cannot be)")
        if B not in tuple(x.shape):
            causes.append("the input is shared by every example (as T5's relative position buckets), and its "
                          "per-example gradients live in a broadcast after the layer")
        elif not causes:
            causes.append("the examples lie on another dim of the input")
        return causes


def _storage(t):
    """The address of t's storage (a sharded DTensor's local one), or None where there is none."""
    try:
        return getattr(t, "_local_tensor", t).untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None


_SEQUENCE_FIRST_CONTAINERS = (torch.nn.TransformerEncoderLayer, torch.nn.TransformerDecoderLayer)


def check_declared_layouts(model, batch_first):
    """torch's Transformer layers say their layout: refuse the engine's other one up front."""
    for path, module in model.named_modules():
        if isinstance(module, _SEQUENCE_FIRST_CONTAINERS) and module.self_attn.batch_first != batch_first and any(
                p.requires_grad for p in module.parameters()):
            raise UnsupportedLayoutError(
                f"PrivacyEngine: {path or '<model>'} ({type(module).__name__}) is built with "
                f"batch_first={module.self_attn.batch_first}, so its linear and norm layers read examples on dim "
                f"{0 if module.self_attn.batch_first else 1}, but the engine has batch_first={batch_first}: pass "
                f"batch_first={module.self_attn.batch_first} to the engine (or build the layers to match)")


class ModelProbe:
    """The model's forward pre-hook (engine._forward_starts) or forward hook
    (engine._watch_outputs; after="always": engine._forward_ended, registered with always_call,
    so it runs even when the forward raises). Like the layers' engine link, it does nothing in a
    copy or a pickle of the model: those are not attached."""

    def __init__(self, engine, after=False):
        self.engine, self.after = engine, after

    def __call__(self, module, args, *rest):
        if self.engine is None:
            return None
        if self.after == "always":
            self.engine._forward_ended()
            return None
        if self.after:
            return self.engine._watch_outputs(rest[0])
        return self.engine._forward_starts(args, rest[0])

    def __deepcopy__(self, memo):
        return ModelProbe(None, self.after)

    def __reduce__(self):
        return (ModelProbe, (None, self.after))
