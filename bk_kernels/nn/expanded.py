"""The check on bk layers that expanded a batch-1 input to the batch.

A bk layer fed an input broadcast over the batch (size 1 on the example dim: Hugging Face's
[1, T] position ids) expands it to the B examples, so that its output, and the output's
gradient, are per example. That holds only while what follows treats the B copies as the [1,
...] tensor the model's code believes it has: broadcast against per-example tensors. Code that
indexes, reduces, repeats or reshapes that dim (`proj(grid)[0]`, `.mean(0)`, `.repeat(B, 1)`)
would read one example's copy for all, or mix them: example 0's "per-example gradient" would
then hold every example's, and its clipping would bound nothing. This walks the autograd graph
from the model's outputs once per forward in which a layer expanded, and names the first op
that does not keep the copies apart."""
from collections import defaultdict

import torch

from ._core import _BINARY_OPS, _ROW_WISE_NODES, _VIEW_NODES, _output_shape

# One-input nodes that keep dim 0 where it is when their output's dim 0 is still the batch
_KEEPS_DIM0 = (_ROW_WISE_NODES - _BINARY_OPS) | _VIEW_NODES | frozenset(
    {"UnsqueezeBackward0", "UnsqueezeBackward1", "SqueezeBackward0", "SqueezeBackward1", "SqueezeBackward2",
     "ExpandBackward0", "SoftmaxBackward0", "LogSoftmaxBackward0", "NativeLayerNormBackward0"})
# Nodes that work along one dim (saved as _saved_dim): fine when it is not dim 0
_ALONG_A_DIM = frozenset({"SelectBackward0", "SliceBackward0", "UnbindBackward0", "SplitBackward0",
                          "SplitWithSizesBackward0", "NarrowBackward0", "CatBackward0"})


def expanded_use_problem(outputs, layers, B):
    """None if every output of the bk layers in `layers` (which expanded an input this forward)
    reaches the model's outputs through ops that keep the B copies apart until a broadcasting
    op meets a per-example tensor; else what does not, in words."""
    consumers, starts = defaultdict(list), []
    ids = {id(layer) for layer in layers}
    stack = [t.grad_fn for t in outputs if isinstance(t, torch.Tensor) and t.grad_fn is not None]
    seen = set(stack)
    while stack:
        node = stack.pop()
        if id(getattr(node, "layer", None)) in ids:
            starts.append(node)
        for child, nr in node.next_functions:
            if child is None:
                continue
            consumers[child].append((node, nr))
            if child not in seen:
                seen.add(child)
                stack.append(child)
    done = set()
    stack = [(start, start) for start in starts]
    while stack:  # (node whose output holds the expanded copies on dim 0, the layer's node it came from)
        node, start = stack.pop()
        if node in done:
            continue
        done.add(node)
        for user, _ in consumers.get(node, ()):
            verdict = _follow(user, node, B)
            if isinstance(verdict, str):
                return f"{verdict}, fed by the output of {type(start.layer).__name__}"
            if verdict:
                stack.append((user, start))
    return None


def _follow(user, node, B):
    """True: user's output still holds the copies (follow it); False: they met a per-example
    tensor in a broadcast (done); a string: user mixes or moves the copies."""
    name = user.name()
    out = _output_shape(user, 0)
    if out is None or len(out) == 0 or out[0] != B:
        return f"{name} (output shape {out}) does not keep the examples on dim 0"
    if isinstance(getattr(user, "layer", None), torch.nn.Module):
        return True  # another bk layer: row-wise on the B rows it was given
    if name in _BINARY_OPS:
        for other, nr in user.next_functions:
            shape = None if other is None or other is node else _output_shape(other, nr)
            if shape is not None and len(shape) == len(out) and shape[0] == B:
                return False  # a [1, ...] operand would have broadcast here alike
        return True
    if name in _KEEPS_DIM0:
        return True
    if name in ("TransposeBackward0", "TransposeBackward1"):
        return True if 0 not in _dims(user, ("_saved_dim0", "_saved_dim1"), len(out)) else f"{name} moves dim 0"
    if name == "PermuteBackward0":
        dims = getattr(user, "_saved_dims", None)
        return True if dims is not None and dims[0] % len(out) == 0 else f"{name} moves dim 0"
    if name in _ALONG_A_DIM:  # (select and unbind drop the dim they work along)
        ndim = len(out) + (name in ("SelectBackward0", "UnbindBackward0"))
        return True if 0 not in _dims(user, ("_saved_dim",), ndim) else f"{name} along dim 0"
    return f"{name}, which may mix the examples' copies"


def _dims(node, attrs, ndim):
    dims = [getattr(node, a, None) for a in attrs]
    return {d % ndim for d in dims if isinstance(d, int)} if all(isinstance(d, int) for d in dims) else {0}
