"""bk.nn.Linear, and Hugging Face GPT-2's Conv1D (a linear layer stored [in, out]) on the
same path."""
import torch
import torch.nn.functional as F

from ..ops._norm_common import accumulation_dtype
from ._core import BKLayer, autocast_input, examples_first, in_plain_forward
from ._made import made_class
from .families import register_layer
from ._uses import DenseUse, LinearUse


class _LinearFn(torch.autograd.Function):
    """y = x W^T + b, W = weight (or weight^T when `transposed`, GPT-2's Conv1D layout).

    rows: use only weight[rows] and bias[rows] (a block of a larger parameter, as attention's
    q/k/v blocks of in_proj_weight); the engine is told which block.
    batch_dim: the dim of x that holds the examples (1 for sequence-first inputs).
    The parameters are kept as ctx attributes for their identity: under non-reentrant
    activation checkpointing a saved tensor comes back as a recomputed alias.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, layer, transposed, rows, batch_dim=0):
        ctx.layer, ctx.transposed, ctx.weight, ctx.bias, ctx.rows = layer, transposed, weight, bias, rows
        ctx.batch_dim = batch_dim
        if batch_dim == 0:  # row r of the output is a map of row r of x (folded_rows reads this)
            ctx._bk_row_wise_input = (0, x.numel())
        x = autocast_input(x)
        # Frozen weights (bias-only fine-tuning) keep no activation.
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight)
        w = weight[rows] if rows is not None else weight
        b = bias[rows] if rows is not None and bias is not None else bias
        return _not_a_view(F.linear(x, w.T if transposed else w, b))

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        layer, transposed, weight, bias, rows, bdim = ctx.layer, ctx.transposed, ctx.weight, ctx.bias, ctx.rows, \
            ctx.batch_dim
        w = w[rows] if rows is not None else w
        if w.dtype != g.dtype:  # under autocast g is 16-bit while the weight is float32
            w = w.to(g.dtype)
        grad_x = g @ (w.T if transposed else w) if ctx.needs_input_grad[0] else None
        bias_grads = None
        g3 = examples_first(g, batch_dim=bdim)
        if bias is not None and bias.requires_grad:
            acc = accumulation_dtype(g.dtype)
            if g3.shape[1] == 1:  # [B, p]; one position: g itself, not a reduction into a zero-filled buffer
                one = g if g.dim() == 2 and bdim == 0 else g3[:, 0]  # a 2-D g: not even a select of g3
                bias_grads = one if one.dtype == acc else one.to(acc)
            else:
                bias_grads = g3.sum(1, dtype=acc)
            if rows is not None:  # place the block inside the whole bias
                bias_grads = bias_grads.new_zeros(bias_grads.shape[0], *bias.shape).index_copy_(
                    1, torch.arange(rows.start, rows.stop, device=g.device), bias_grads)
        uses = []
        if x is not None:
            uses.append((weight, LinearUse(examples_first(x, batch_dim=bdim), g3, transposed=transposed, rows=rows)))
        if bias_grads is not None:
            uses.append((bias, DenseUse(bias_grads)))
        if layer._bk_hand_off(uses):
            return grad_x, None, None, None, None, None, None
        # No engine: the ordinary gradients.
        grad_w = grad_b = None
        if x is not None and ctx.needs_input_grad[1]:
            gw = g.reshape(-1, g.shape[-1]).T @ x.reshape(-1, x.shape[-1])
            gw = gw.T if transposed else gw
            grad_w = gw if rows is None else weight.new_zeros(weight.shape).index_copy_(
                0, torch.arange(rows.start, rows.stop, device=g.device), gw)
        if bias_grads is not None and ctx.needs_input_grad[2]:
            grad_b = bias_grads.sum(0)
        return grad_x, grad_w, grad_b, None, None, None, None


def _not_a_view(y):
    """y as a tensor of its own. F.linear with a bias on a 3-D input returns a view of its 2-D
    addmm result, and autograd forbids in-place ops on a view made inside a custom Function
    (Falcon's `mlp_output += attention_output`, a Linear then ReLU(inplace=True)): the same
    storage under a shape of its own (as matmul's _unsafe_view), a copy only if the view is
    not the whole base in order."""
    base = y._base
    if base is None:
        return y
    if base.is_contiguous() and y.is_contiguous() and y.numel() == base.numel() and \
            y.storage_offset() == base.storage_offset():
        return torch.ops.aten._unsafe_view(base, y.shape)
    return y.clone()


class Linear(BKLayer, torch.nn.Linear):
    """torch.nn.Linear whose backward book-keeps for the privacy engine."""

    _bk_token_features = 1

    def forward(self, x):
        if in_plain_forward():
            return super().forward(x)
        return linear(self, x, self.weight, self.bias)


def linear_with(layer, x, weight, bias, rows=None):
    """The BK linear map x weight[rows]^T + bias[rows], parameters owned by `layer`; x holds
    the examples on dim 0 (the caller has checked it against the batch)."""
    return _LinearFn.apply(x, weight, bias, layer, False, rows, 0)


class _GPT2Conv1DMixin(BKLayer):
    """Forward of transformers' Conv1D (weight [nx, nf]: y = x @ W + b) on the BK path; the
    Parameter keeps its [in, out] layout."""

    _bk_token_features = 1

    def forward(self, x):
        if in_plain_forward():
            return super().forward(x)
        return linear(self, x, self.weight, self.bias, transposed=True)


def is_gpt2_conv1d(cls):
    """Detects transformers' Conv1D class without importing transformers."""
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers.")


def gpt2_conv1d_class(cls):
    """The bk subclass of transformers' Conv1D class `cls` (made once, on first use)."""
    return made_class(gpt2_conv1d_class, (cls,), "Conv1D", (_GPT2Conv1DMixin, cls), {"__module__": __name__})


def linear(layer, x, weight, bias=None, *, transposed=False):
    """x weight^T + bias on the BK path, book-kept as a use of `weight` (and `bias`) owned by
    `layer` (a bk.nn.BKLayer): the forward of bk.nn.Linear and of users' own layer families
    (bk.register_layer). x is checked against the batch like every bk layer's input (a
    [1, T, d] input is expanded to the batch). transposed: weight stored [in, out] (GPT-2's Conv1D)."""
    if layer._bk_rows_as_given(x):  # _bk_row_wise's own shortcut, less its batch-dim lookup and lambda (~1.5 us)
        return _LinearFn.apply(x, weight, bias, layer, transposed, None, 0)
    bdim = layer._bk_batch_dim(x)
    return layer._bk_row_wise(x, bdim, lambda xe: _LinearFn.apply(xe, weight, bias, layer, transposed, None, bdim))


def plain_linear_class(cls):
    """An nn.Linear subclass whose forward is the linear map itself, written its own way: timm's
    Linear (torch's forward, plus a cast under TorchScript only), transformers' FalconLinear
    (`x @ W.T + b`). bk's Linear in front, its plain forward the class's (made once, on first use)."""
    return made_class(plain_linear_class, (cls,), cls.__name__, (Linear, cls), {"__module__": __name__})


# (module, class name) of the nn.Linear subclasses whose forward is x W^T + b and nothing else
_PLAIN_LINEAR_CLASSES = {("timm.layers.linear", "Linear"), ("transformers.models.falcon.modeling_falcon", "FalconLinear")}

register_layer(torch.nn.Linear, Linear)
register_layer(None, lambda module: plain_linear_class(type(module)),
               matches=lambda cls: (cls.__module__, cls.__name__) in _PLAIN_LINEAR_CLASSES)
register_layer(None, lambda module: gpt2_conv1d_class(type(module)), matches=is_gpt2_conv1d)
