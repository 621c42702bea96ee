"""The generic exact path: per-example gradients of a module's OWN parameters by torch.func.

For trainable Parameters that no fused family takes: a cls token or position embedding used
directly in a module's forward, a layer-scale gamma, the RMSNorm class of an LLM family, a
subclass of a torch layer whose forward does its own thing. The module's class becomes a
subclass of itself with GenericLayer in front, so its Parameters, hooks and state_dict stay.

Forward: the module's own forward runs as usual with its own trainable Parameters swapped for
detached aliases (so they get no ordinary, summed gradient), and its floating outputs pass
through one identity autograd Function (`_GenericTap`) that holds its inputs.
Backward: the tap receives the outputs' gradients g, lets them through unchanged (the bk
layers inside the module book-keep in the ordinary backward), and computes every example's
gradient of the module's own Parameters as a vmap over the examples of a vjp of the module's
forward, recomputed with every bk layer inside it on its plain torch forward (recorded once).

Cost: one more forward and backward of the module (batched by vmap, in chunks of examples),
and B x (own parameter size) of per-example gradients, kept as DenseUses. Cheap for norms and
layer scales; for a model whose ROOT owns a Parameter (timm's ViT cls token) the recompute is
the whole model. Random ops in the module's forward (dropout with p > 0 in training mode)
cannot be replayed per example and are refused.
"""
import contextlib
import copy
import functools
import inspect
import itertools
import re
import warnings

import torch
from torch.nn.utils.stateless import _reparametrize_module
from torch.utils._pytree import tree_flatten, tree_unflatten

from ._core import BKLayer, folded_rows, in_plain_forward, plain_forward
from ._made import made_class
from ._uses import DenseUse

# Argument names that hold the batch size (Perceiver's forward(batch_size), XLNet's bsz)
_BATCH_SIZE_NAME = re.compile(r"batch_size|^bsz$|^batch$|^n_batch$")
# Examples per vmap chunk: their per-example gradients stay within this many elements.
CHUNK_ELEMENTS = 1 << 24
# Warn once per module when its per-example gradients exceed this many elements.
WARN_ELEMENTS = 1 << 26


class GenericError(RuntimeError):
    """A module on the generic path cannot give exact per-example gradients."""


class _GenericTap(torch.autograd.Function):
    """Identity on the module's floating outputs; its backward computes the module's own
    per-example parameter gradients. The own Parameters are inputs so that the outputs need
    grad even when nothing else of the module does."""

    @staticmethod
    def forward(ctx, layer, call, n_out, *tensors):
        ctx.layer, ctx.call, ctx.n_out = layer, call, n_out
        ctx.n_params = len(tensors) - n_out
        ctx.out_meta = [(t.shape, t.dtype, t.device) for t in tensors[:n_out]]
        # Outputs whose rows are the examples' rows folded example-major: folded_rows reads this
        # (an MoE router's weights feed its experts so).
        ctx._bk_folded_outputs = frozenset(k for k, layout in enumerate(call["layouts"]) if layout == "folded")
        return tuple(t.clone() for t in tensors[:n_out])  # not views: later in-place ops (ReLU) are allowed

    @staticmethod
    def backward(ctx, *grads):
        grads = [g if g is not None else torch.zeros(s, dtype=d, device=dev)
                 for g, (s, d, dev) in zip(grads, ctx.out_meta)]
        param_grads = ctx.layer._bk_generic_backward(ctx.call, grads)
        return (None, None, None, *grads, *param_grads)


class GenericLayer(BKLayer):
    """Mixin put in front of a module's own class (see generic_class)."""

    # Children whose Parameters this module uses directly (nn.MultiheadAttention hands
    # out_proj.weight to F.multi_head_attention_forward): left unconverted, their Parameters are
    # this module's own on the generic path.
    _bk_absorb = ()

    def forward(self, *args, **kwargs):
        return self._bk_generic_call("forward", *args, **kwargs)

    def _bk_generic_call(self, method, *args, **kwargs):
        """The module's own `method` (its forward, or one method that alone uses the own
        Parameters, as MPNet's compute_position_bias) on the generic path."""
        own = self._bk_own_trainable()
        engine = self._bk_engine
        original = getattr(super(GenericLayer, self), method)
        if in_plain_forward() or engine is None or not own or not torch.is_grad_enabled():
            return original(*args, **kwargs)
        if engine.layout.row_maps is not None:  # inside a patch-rows vision tower: its rows are not examples
            raise engine.layout.error(self, engine._module_path(self), args[0] if args else torch.empty(0), 0, why=(
                "it takes the generic path inside a vision tower that takes every image's patches as rows, whose "
                "rows the generic path cannot split per example. Freeze it; nothing was recorded and no budget "
                "was spent."))
        in_leaves, in_spec = tree_flatten((args, kwargs), is_leaf=_is_kv_cache)
        kept = [t.detach() if isinstance(t, torch.Tensor) else _snapshot(t) for t in in_leaves]  # before the call
        with _reparametrize_module(self, {n: p.detach() for n, p in own}):
            out = original(*args, **kwargs)
        out_leaves, out_spec = tree_flatten(out)
        B = engine.layout.batch
        passed = self._bk_passed_through(method, out_leaves)
        picked = [i for i, t in enumerate(out_leaves)
                  if isinstance(t, torch.Tensor) and t.is_floating_point() and i not in passed]
        out_dims = [self._bk_output_dim(k, out_leaves[i]) for k, i in enumerate(picked)]
        if B is None:  # called outside the model's forward: its first floating output says
            B = next((out_leaves[i].shape[d] for i, d in zip(picked, out_dims) if out_leaves[i].dim() > d), 1)
        in_dims = [self._bk_input_dim(t) if isinstance(t, torch.Tensor) else None for t in in_leaves]
        batched_in = [d is not None and t.dim() > d and t.shape[d] == B for t, d in zip(in_leaves, in_dims)]
        folds_in = self._bk_folded_inputs(in_leaves, in_dims, batched_in, B)
        self._bk_check_unbatched_inputs(in_leaves, in_dims, batched_in, folds_in, B)
        self._bk_check_batch_made_from_its_size(original, args, kwargs, batched_in, folds_in, out_leaves, picked,
                                                out_dims, B)
        fold_sizes = {k * B for k in folds_in if k}
        layouts, outs, folded_here = [], [], False
        for i, d in zip(picked, out_dims):
            layout = self._bk_output_layout(out_leaves[i], d, B, any(batched_in), fold_sizes)
            if layout == "folded_here":  # folded rows, to be checked below
                layout, folded_here = "folded", True
            layouts.append(layout)
            outs.append(_to_batch(out_leaves[i], layout, B, d))
        self._bk_warn_if_large(B, own)
        autocast = _autocast_state(next((t.device.type for t in outs), "cpu"))
        call = dict(method=method, in_leaves=kept, fingerprints=[_fingerprint(t, d, B) for t, d in zip(outs, out_dims)],
                    grad_history=[isinstance(t, torch.Tensor) and t.requires_grad for t in in_leaves],
                    in_spec=in_spec, in_dims=in_dims, batched_in=batched_in, folds_in=folds_in, picked=picked,
                    out_dims=out_dims,
                    layouts=layouts, B=B, own=[n for n, _ in own], autocast=autocast)
        if folded_here:
            self._bk_check_folded_outputs(call, outs, own)
        tapped = _GenericTap.apply(self, call, len(outs), *outs, *[p for _, p in own])
        for i, t in zip(picked, tapped):
            out_leaves[i] = t
        return tree_unflatten(out_leaves, out_spec)

    def _bk_passed_through(self, method, out_leaves):
        """Indices of outputs that hold no examples and depend on no own Parameter, returned as
        they are (not expanded to the batch, no gradient taken through them); none by default."""
        return ()

    def _bk_recompute_context(self):
        """Entered around each example's recompute (ParametrizedGeneric puts state updates off)."""
        return contextlib.nullcontext()

    def _bk_own_trainable(self):
        """[(name, Parameter)]: this module's own trainable Parameters and its absorbed children's."""
        own = [(n, p) for n, p in self.named_parameters(recurse=False) if p.requires_grad]
        for name, child in zip(self._bk_absorb, self._bk_absorbed_modules()):
            own += [(f"{name}.{n}", p) for n, p in child.named_parameters() if p.requires_grad]
        return own

    def _bk_owned_parameters(self):
        return list(self.parameters(recurse=False)) + [p for c in self._bk_absorbed_modules() for p in c.parameters()]

    def _bk_absorbed_modules(self):
        return [getattr(self, name) for name in self._bk_absorb]

    def _bk_input_dim(self, t):
        """The dim of an input tensor that holds the examples (dim 0; modules may say otherwise)."""
        return 0

    def _bk_output_dim(self, k, t):
        """The dim of the k-th floating output that holds the examples."""
        return 0

    def _bk_folded_inputs(self, in_leaves, in_dims, batched_in, B):
        """[k or None] per input: k for an input [k*B, ...] whose rows are the examples' rows folded
        example-major (proven from the autograd graph by folded_rows: OPT-style reshape(-1, d)
        of [B, T, d], or a reshape of such rows); an input with no gradient history and as many
        rows as such a fold (an index or mask per row) is split with it. Each example's recompute
        then takes its k rows, and the recompute check compares it with the forward."""
        folds = [None] * len(in_leaves)
        if not B or not self._bk_engine.layout.batch_first:
            return folds

        def rows(t, d, batched):
            return (not batched and isinstance(t, torch.Tensor) and d == 0 and t.dim() >= 1 and t.shape[0] > B
                    and t.shape[0] % B == 0)

        for i, (t, d, b) in enumerate(zip(in_leaves, in_dims, batched_in)):
            if rows(t, d, b) and t.is_floating_point() and t.dim() >= 2 and folded_rows(t, B):
                folds[i] = t.shape[0] // B
        sizes = {k for k in folds if k}
        for i, (t, d, b) in enumerate(zip(in_leaves, in_dims, batched_in)):
            if folds[i] is None and rows(t, d, b) and not t.requires_grad and t.shape[0] // B in sizes:
                folds[i] = t.shape[0] // B
        return folds

    def _bk_check_unbatched_inputs(self, in_leaves, in_dims, batched_in, folds_in, B):
        """An input that is neither the batch (size B on its example dim) nor broadcast over it
        (size 1) is given whole to every example's recompute, and an output made from no batched
        input is read as shared by all examples. Both are right only for values that hold no
        examples (ids of positions, T5's relative buckets); an input with a gradient history of
        another size may hold several examples' rows ([B*T, d] folded, as MoE routers and experts
        take them), whose per-example gradients would mix. Refused here, in the forward."""
        for t, d, batched, fold in zip(in_leaves, in_dims, batched_in, folds_in):
            if (batched or fold or not isinstance(t, torch.Tensor) or d is None or t.dim() <= d or t.shape[d] == 1
                    or not t.requires_grad):
                continue
            raise GenericError(
                f"PrivacyEngine: {type(self).__name__} ({self._bk_engine._module_path(self)}) takes the generic path "
                f"(its own Parameters {[n for n, _ in self._bk_own_trainable()]} are used in its forward) and is "
                f"called on a tensor of shape {tuple(t.shape)} that comes from trained values but does not hold the "
                f"batch's {B} examples on dim {d}: rows folded from several examples ([B*T, d], as MoE routers and "
                "experts take them) or another module's Parameter (a relative-position table) cannot be split per "
                "example on this path. Call the module on [B, ...] inputs, or let a bk layer own its Parameters "
                "(bk.register_layer); nothing was recorded and no budget was spent")

    def _bk_check_batch_made_from_its_size(self, method, args, kwargs, batched_in, folds_in, out_leaves, picked,
                                           out_dims, B):
        """A module given the batch size (an argument named batch_size, bsz, ...) and no per-example
        tensor, whose output has B rows (Perceiver's latents: `param.expand(batch_size, ...)`),
        makes the batch from one value: its output would be read as shared by all examples and
        given another batch dim ([B, B, ...]), which later ops may broadcast silently. Refused
        here, in the forward, naming the module. (A sequence length that happens to equal B is
        not a batch size: only the argument's name tells them apart.)"""
        if B is None or B < 2 or any(batched_in) or any(folds_in):
            return
        try:
            bound = inspect.signature(method).bind(*args, **kwargs).arguments
        except (TypeError, ValueError):
            return
        if not any(_BATCH_SIZE_NAME.search(name) and value == B and isinstance(value, int)
                   for name, value in bound.items()):
            return
        if not any(out_leaves[i].dim() > d and out_leaves[i].shape[d] == B for i, d in zip(picked, out_dims)):
            return
        raise GenericError(
            f"PrivacyEngine: {type(self).__name__} ({self._bk_engine._module_path(self)}) takes the generic path "
            f"(its own Parameters {[n for n, _ in self._bk_own_trainable()]} are used in its forward), is given the "
            f"batch size {B} as a number and no tensor holding the examples, and returns {B} rows: it makes the batch "
            "from one value (an expand to the batch size), which the per-example recompute cannot split. Make its "
            "rows per example with bk.nn.shift (a shift of zeros, as bk does for Perceiver's latents) in a bk layer "
            "(bk.register_layer); nothing was recorded and no budget was spent")

    def _bk_output_layout(self, t, dim, B, any_batched_input, fold_sizes=()):
        """How an output holds the examples on `dim`: "batched" (size B), "folded" (k*B rows, as
        a folded input), "folded_here" (k*B rows made from [B, ...] inputs: DeepSeek's router
        flattens its [B, T, d] input; checked in the forward), "broadcast" (size 1, expanded to
        the batch) or "shared" (made from no per-example input: given a batch dim)."""
        if dim == 0 and t.dim() > 0 and t.shape[0] in fold_sizes:
            return "folded"
        if not any_batched_input and not fold_sizes and B > 1:
            return "broadcast" if t.dim() > dim and t.shape[dim] == 1 else "shared"
        if t.dim() > dim and t.shape[dim] == B:
            return "batched"
        if t.dim() > dim and t.shape[dim] == 1:
            return "broadcast"
        if dim == 0 and any_batched_input and t.dim() > 0 and B and t.shape[0] > B and t.shape[0] % B == 0:
            return "folded_here"
        engine = self._bk_engine
        raise GenericError(
            f"PrivacyEngine: {type(self).__name__} ({engine._module_path(self)}) takes the generic path (its own "
            f"Parameters {[n for n, _ in self._bk_own_trainable()]} are used in its forward), but its output of "
            f"shape {tuple(t.shape)} does not hold the batch's {B} examples on dim {dim}: a module that mixes "
            "examples cannot be trained privately")

    def _bk_check_folded_outputs(self, call, outs, own):
        """Outputs of k*B rows made from [B, ...] inputs are read as each example's k rows in
        turn (example-major), which the layers after this module rely on in their own forward.
        So it is checked here, before them: each example's recompute must reproduce its rows."""
        _, ok = self._bk_recompute(call, [torch.zeros_like(o) for o in outs], dict(own), call["batched_in"],
                                   forward_only=True)
        if not ok:
            shapes = [tuple(o.shape) for o, layout in zip(outs, call["layouts"]) if layout == "folded"]
            raise GenericError(
                f"PrivacyEngine: {type(self).__name__} ({self._bk_engine._module_path(self)}) takes the generic path "
                f"and returns {shapes} from inputs holding the batch's {call['B']} examples, but one example's "
                "recomputed output is not its rows taken in turn (rows folded example-major): its rows mix or "
                "interleave the examples. Nothing was recorded and no budget was spent")

    def _bk_warn_if_large(self, B, own):
        elements = B * sum(p.numel() for _, p in own)
        if elements > WARN_ELEMENTS and not getattr(self, "_bk_warned", False):
            self._bk_warned = True
            warnings.warn(f"bk: {type(self).__name__} takes the generic path and holds {elements:,} elements of "
                          "per-example gradients of its own parameters per backward", stacklevel=3)

    def _bk_generic_backward(self, call, grads):
        """Per-example gradients of the own Parameters handed to the engine (DenseUses); the
        ordinary (summed) gradients when no engine is attached any more."""
        own = dict(self._bk_own_trainable())
        params = {n: own[n] for n in call["own"]}
        per_example = self._bk_per_example_grads(call, grads, params)
        uses = [(params[n], DenseUse(per_example[n])) for n in call["own"]]
        if self._bk_hand_off(uses):
            return [None] * len(uses)
        return [per_example[n].sum(0).to(params[n].dtype) for n in call["own"]]

    def _bk_per_example_grads(self, call, grads, params):
        """Per-example gradients from the recompute, checked against the forward: each example's
        recomputed outputs must match its part of the batch's outputs (a fingerprint of them).
        They do not when the module mixes examples, or when an input of size B on dim 0 holds
        no examples ([T, T] relative positions, found silently wrong when T == B): then the
        inputs with no gradient history are tried as shared by all examples, and the first split
        that reproduces the forward is used; if none does, the module is refused."""
        batched_in = call["batched_in"]
        per_example, ok = self._bk_recompute(call, grads, params, batched_in)
        if ok:
            return per_example
        candidates = [i for i, b in enumerate(batched_in) if b and not call["grad_history"][i]][:4]
        for size in range(1, len(candidates) + 1):
            for shared in itertools.combinations(candidates, size):
                trial = [b and i not in shared for i, b in enumerate(batched_in)]
                if not any(trial) and not any(call["folds_in"]):  # some input must still be split
                    continue
                try:
                    per_example, ok = self._bk_recompute(call, grads, params, trial)
                except GenericError:  # that split cannot even run (shapes): not it
                    continue
                if ok:
                    return per_example
        raise GenericError(
            f"PrivacyEngine: {type(self).__name__} ({self._bk_engine._module_path(self)}) takes the generic path (its "
            "own Parameters are used in its forward), and its forward recomputed for one example does not give that "
            "example's part of the batch's output: the module mixes the examples of the batch (a batch statistic, "
            "a reduction over dim 0), or one of its inputs with the batch size on dim 0 does not hold examples. "
            "Its per-example gradients cannot be computed this way; no gradient was recorded and no budget spent")

    def _bk_vmap_error(self, err, B, grads, out_dims):
        pairs = B > 1 and any(B in g.shape[d + 1:] or B in g.shape[:d] for g, d in zip(grads, out_dims))
        return GenericError(
            f"PrivacyEngine: {type(self).__name__} ({self._bk_engine._module_path(self)}) takes the generic path (it "
            "uses its own Parameters in its forward), which recomputes that forward per example under "
            f"torch.func.vmap, and the forward cannot be vmapped: {err}. "
            + (f"One of its outputs holds the batch's {B} examples on a second dim (shapes "
               f"{[tuple(g.shape) for g in grads]}): an output that pairs examples (contrastive logits [B, B], as "
               "CLIPModel's) has no per-example gradient: DP-SGD needs each example's loss to depend on that "
               "example alone. " if pairs else "")
            + "Move the Parameter into a small module of its own (so that only that module is recomputed)")

    def _bk_recompute(self, call, grads, params, batched_in, forward_only=False):
        """(per-example gradients, whether the recomputed outputs match the forward's), with the
        inputs flagged in batched_in split into examples and the others given whole to each.
        forward_only: only the check (no vjp; the gradients come back empty)."""
        B, layouts, out_dims = call["B"], call["layouts"], call["out_dims"]
        in_leaves, in_dims, folds_in = call["in_leaves"], call["in_dims"], call["folds_in"]
        split = [b or bool(k) for b, k in zip(batched_in, folds_in)]
        primal = {n: p.detach() for n, p in params.items()}
        module = self

        def forward_of(example_leaves):
            # example_leaves: the batched inputs of one example, each with its example dim of size 1
            it = iter(example_leaves)
            leaves = [next(it) if s else _snapshot(t) for t, s in zip(in_leaves, split)]
            args, kwargs = tree_unflatten(leaves, call["in_spec"])

            def forward(own):
                with plain_forward(), module._bk_recompute_context(), _reparametrize_module(module, own), \
                        torch.autocast(**call["autocast"]):
                    out = getattr(super(GenericLayer, module), call["method"])(*args, **kwargs)
                out_leaves = tree_flatten(out)[0]
                return tuple(_to_batch(out_leaves[i], layout, 1, d)
                             for i, layout, d in zip(call["picked"], layouts, out_dims))
            return forward

        def prints_of(out):
            return tuple(_fingerprint(o.detach(), d, 1)[0][0] for o, d in zip(out, out_dims))

        names = [] if forward_only else list(params)  # whose per-example gradients are computed

        def one_example(example_leaves, example_grads):
            if forward_only:
                return {}, prints_of(forward_of(example_leaves)(primal))
            out, vjp = torch.func.vjp(forward_of(example_leaves), primal)
            return vjp(tuple(example_grads))[0], prints_of(out)

        def looped(example_leaves, example_grads):
            """One example by ordinary autograd: for forwards vmap cannot run (data-dependent
            shapes, custom autograd Functions without vmap support)."""
            if forward_only:
                with torch.no_grad():
                    return {}, prints_of(forward_of(example_leaves)(primal))
            own = {n: p.detach().requires_grad_() for n, p in primal.items()}
            with torch.enable_grad():
                out = forward_of(example_leaves)(own)
            pairs = [(o, g) for o, g in zip(out, example_grads) if o.requires_grad]
            got = torch.autograd.grad([o for o, _ in pairs], list(own.values()), [g for _, g in pairs],
                                      allow_unused=True) if pairs else [None] * len(own)
            return {n: g if g is not None else torch.zeros_like(p) for (n, p), g in zip(own.items(), got)}, \
                prints_of(out)

        # Each example keeps a size-1 example dim (code that reads the batch size still works):
        # [.., B, ..] -> [.., B, 1, ..], vmapped over the B; folded rows [k*B, ..] -> [B, k, ..].
        batched = [(t.unflatten(0, (B, k)), 0) if k else (t.unsqueeze(d + 1), d)
                   for t, b, k, d in zip(in_leaves, batched_in, folds_in, in_dims) if b or k]
        per_grad = [(g.unflatten(0, (B, g.shape[0] // B)), 0) if layout == "folded" else (g.unsqueeze(d + 1), d)
                    for g, d, layout in zip(grads, out_dims, layouts)]
        in_vmap_dims = ([d for _, d in batched], [d for _, d in per_grad])
        width = max(1, sum(p.numel() for p in params.values()))
        step = max(1, CHUNK_ELEMENTS // width)
        chunks, ok, vmap_error = [], True, None
        for lo in range(0, B, step):
            hi = min(B, lo + step)
            if vmap_error is None:
                try:
                    grads_part, prints = torch.func.vmap(one_example, in_dims=in_vmap_dims, randomness="error")(
                        [t.narrow(d, lo, hi - lo) for t, d in batched], [g.narrow(d, lo, hi - lo) for g, d in per_grad])
                except RuntimeError as err:
                    if "randomness" in str(err):
                        raise GenericError(
                            f"PrivacyEngine: {type(self).__name__} ({self._bk_engine._module_path(self)}) takes the "
                            "generic path, which recomputes its forward per example, and its forward draws random "
                            "numbers (dropout with p > 0 in training mode?) that cannot be replayed: set its dropout "
                            "to 0") from None
                    vmap_error = err  # this chunk and the later ones loop over their examples
            if vmap_error is not None:  # the forward cannot be vmapped: one example at a time by ordinary autograd
                try:
                    per = [looped([t.select(d, b) for t, d in batched], [g.select(d, b) for g, d in per_grad])
                           for b in range(lo, hi)]
                except RuntimeError:
                    raise self._bk_vmap_error(vmap_error, B, grads, out_dims) from vmap_error
                grads_part = {n: torch.stack([grads_b[n] for grads_b, _ in per]) for n in names}
                prints = [torch.stack([prints_b[i] for _, prints_b in per]) for i in range(len(out_dims))]
            chunks.append(grads_part)
            ok = ok and all(_prints_match(got, want[lo:hi], scale[lo:hi], rtol)
                            for got, (want, scale, rtol) in zip(prints, call["fingerprints"]))
        if not chunks:
            return {n: params[n].new_zeros(0, *params[n].shape) for n in names}, True
        return {n: torch.cat([c[n] for c in chunks]) for n in names}, ok


# Relative tolerance of the recompute check, by output dtype: the recompute runs the same ops on
# one example (other kernels, other rounding); a wrong split of the examples changes the
# outputs at order one.
_PRINT_RTOL = {torch.float64: 1e-9, torch.float32: 1e-4}
_PRINT_RTOL_LOWP = 1e-2


def _fingerprint(t, dim, B):
    """([B] a fixed weighted sum of each example's elements, [B] the same sum of absolute values,
    the check's tolerance for t's dtype): what the recompute check compares, without keeping the
    outputs."""
    rtol = _PRINT_RTOL.get(t.dtype, _PRINT_RTOL_LOWP)
    x = t.detach().movedim(dim, 0).reshape(B, t.numel() // B if B else 0)  # example-major for folded rows too
    x = x.double() if x.dtype == torch.float64 else x.float()
    weights = _fingerprint_weights(x.shape[1], x.dtype, x.device)
    # in x's own precision: the forward's fingerprint is taken inside the model's autocast region,
    # which would run these products in 16 bits (and the recompute's outside it)
    with torch.autocast(x.device.type, enabled=False):
        return x @ weights, x.abs() @ weights.abs(), rtol


@functools.lru_cache(maxsize=64)
def _fingerprint_weights(n, dtype, device):
    """Fixed weights of the fingerprint, made once per size (the forward of every generic module
    computes one)."""
    return torch.cos(torch.arange(n, device=device, dtype=dtype) * 0.7548776662466927)


def _prints_match(got, want, scale, rtol):
    """Non-finite outputs (an fp16 overflow) are left to the engine, which skips such a step."""
    close = (got - want).abs() <= rtol * scale
    return bool((close | ~torch.isfinite(want) | ~torch.isfinite(got)).all())


class ParametrizedGeneric(GenericLayer):
    """A layer with a torch parametrization of a trained weight (weight_norm, spectral_norm,
    orthogonal): the layer is recomputed per example with the parametrizations' originals as its
    own Parameters. The recompute runs the parametrizations in eval mode: their training-time
    state updates (spectral_norm's power iteration) happened in the forward, whose weight the
    recompute must see again."""

    @contextlib.contextmanager
    def _bk_recompute_context(self):
        modes = [(m, m.training) for m in self.parametrizations.modules()]
        for m, _ in modes:
            m.training = False
        try:
            yield
        finally:
            for m, mode in modes:
                m.training = mode


_IMMUTABLE = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size,
              torch.memory_format, torch.layout)


def _is_kv_cache(x):
    """transformers' key/value caches (DynamicCache...): one leaf, snapshotted whole. Flattened as
    the pytree nodes transformers registers them as, their layers' tensors would be read back from
    the live cache, after the forward has appended this call's keys for all B examples."""
    cls = type(x)
    return cls.__module__.startswith("transformers.") and cls.__name__.endswith("Cache")


def _snapshot(leaf):
    """A copy of a mutable non-tensor argument (a key/value cache that the forward updates, as
    HF's DynamicCache): the recompute must see it as the call did, and must not update it."""
    if isinstance(leaf, (torch.Tensor, torch.nn.Module, _IMMUTABLE)) or callable(leaf):
        return leaf
    # Tensors inside with a gradient history (a cache's keys from trained projections) cannot be
    # deep-copied as they are: detached copies stand in for them.
    memo = {id(t): t.detach().clone() for t in _tensors_in(leaf)}
    try:
        return copy.deepcopy(leaf, memo)
    except Exception:  # not copyable: the recompute reads it as it is then
        return leaf


def _tensors_in(obj, depth=4):
    """The tensors held by obj's attributes, lists, tuples and dicts, a few levels deep."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if depth == 0 or isinstance(obj, (_IMMUTABLE, torch.nn.Module)):
        return []
    if isinstance(obj, (list, tuple)):
        items = obj
    elif isinstance(obj, dict):
        items = obj.values()
    else:
        items = getattr(obj, "__dict__", {}).values()
    return [t for item in items for t in _tensors_in(item, depth - 1)]


def _to_batch(t, layout, B, dim=0):
    if layout in ("batched", "folded"):
        return t
    if layout == "broadcast":
        return t.expand(*[B if i == dim else -1 for i in range(t.dim())])
    return t.unsqueeze(0).expand(B, *t.shape)  # shared (dim 0)


def _autocast_state(device_type):
    enabled = torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)
    state = dict(device_type=device_type, enabled=enabled)
    if enabled:
        state["dtype"] = torch.get_autocast_dtype(device_type)
    return state


def generic_class(cls, absorb=(), mixin=GenericLayer):
    """The generic-path subclass of `cls` (made once per class), absorbing the children named
    in `absorb` (their Parameters become the module's own; they stay unconverted). mixin: a
    GenericLayer subclass that puts only some method on the generic path."""
    absorb = tuple(absorb)
    return made_class(generic_class, (cls, absorb, mixin), cls.__name__, (mixin, cls),
                      {"__module__": __name__, "__qualname__": f"Generic_{cls.__qualname__}", "_bk_absorb": absorb})


def is_generic(module):
    return isinstance(module, GenericLayer)


__all__ = ["GenericError", "GenericLayer", "generic_class", "is_generic"]
