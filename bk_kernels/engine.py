"""PrivacyEngine: per-example clipping, noise and the 1/B scale around any torch optimizer.

Flow of one step (docs/DESIGN.md):
1. forward as usual through bk.nn layers;
2. loss.backward(): every bk layer hands the engine one "use" per trainable parameter and the
   use's per-example squared norm is computed right there; the layer returns no weight
   gradient;
3. when the backward is over (an autograd callback), the clip factors C_b of every clipping
   unit follow from the summed norms, and each parameter's clipped sum sum_b C_b G_b is ADDED
   into p.grad (so several backwards before one step accumulate);
4. optimizer.step(): Gaussian noise N(0, (sigma R)^2) is added to every trainable parameter's
   summed gradient and the result divided by the logical batch size, then the optimizer steps.
"""
import functools
import math
import os
import types
import weakref
from collections import defaultdict

import torch

from . import _fsdp, accounting, example_rows, ops, packed
from .clipping import CLIPPING_FNS, clipping_units
from .convert import UnsupportedModuleError
from .layout import BatchLayout, ModelProbe, UnsupportedLayoutError, _storage, check_declared_layouts
from .nn import patch_rows
from .nn.held_output import OutputHolds
from .nn._core import BKLayer
from .nn.expanded import expanded_use_problem
from .nn._uses import UnsupportedSharingError, cross
from .ops._norm_common import accumulation_dtype
from .ops.add_noise import counters
from .ops.linear_norm import MODES
from .sampling_check import SamplingCheck

LOSS_REDUCTIONS = ("mean", "sum")


class PrivacyEngine:
    _shards_parameters = False  # DistributedPrivacyEngine takes FSDP2-sharded models

    def __init__(self, model, *, batch_size, sample_size, epochs=None, steps=None, target_epsilon=None,
                 noise_multiplier=None, target_delta=None, max_grad_norm=1.0, clipping_fn="abadi",
                 clipping_style="all-layer", clipping_mode="auto", backend="auto", loss_reduction="mean",
                 accountant="rdp", gamma=0.01, seed=None, batch_first=True):
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            raise TypeError(
                f"PrivacyEngine: the model is wrapped in {type(model).__name__}, which averages the ordinary "
                "gradients that bk layers never produce. Give the unwrapped module; for data-parallel training "
                "use bk.distributed.DistributedPrivacyEngine, which sums the clipped gradients across ranks")
        if _fsdp.is_fsdp1(model):
            raise TypeError(
                "PrivacyEngine: the model holds FullyShardedDataParallel (FSDP1) wrappers, which reduce the ordinary "
                "gradients that bk layers never produce. Use FSDP2 instead: bk.convert(model), then "
                "torch.distributed.fsdp.fully_shard on the blocks and the root, then "
                "bk.distributed.DistributedPrivacyEngine(model, ...)")
        if _fsdp.is_fsdp2(model) and not self._shards_parameters:
            raise TypeError(
                "PrivacyEngine: the model is sharded by fully_shard (FSDP2); use "
                "bk.distributed.DistributedPrivacyEngine, which reduce-scatters the clipped gradients into the shards")
        _check_positive_int(batch_size, "batch_size")
        _check_positive_int(sample_size, "sample_size")
        if batch_size > sample_size:
            raise ValueError(f"PrivacyEngine: batch_size ({batch_size}) exceeds sample_size ({sample_size})")
        if (target_epsilon is None) == (noise_multiplier is None):
            raise ValueError("PrivacyEngine: give exactly one of target_epsilon and noise_multiplier")
        if not (isinstance(max_grad_norm, (int, float)) and math.isfinite(max_grad_norm) and max_grad_norm > 0):
            raise ValueError(f"PrivacyEngine: max_grad_norm must be a positive number, got {max_grad_norm!r}")
        if clipping_fn not in CLIPPING_FNS:
            raise ValueError(f"PrivacyEngine: clipping_fn must be one of {CLIPPING_FNS}, got {clipping_fn!r}")
        if clipping_fn == "automatic" and not (gamma > 0):
            raise ValueError(f"PrivacyEngine: automatic clipping needs gamma > 0, got {gamma!r}")
        if clipping_mode not in MODES:
            raise ValueError(f"PrivacyEngine: clipping_mode must be one of {MODES}, got {clipping_mode!r}")
        if backend not in ops.BACKENDS:
            raise ValueError(f"PrivacyEngine: backend must be one of {ops.BACKENDS}, got {backend!r}")
        if loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"PrivacyEngine: loss_reduction must be one of {LOSS_REDUCTIONS}, got {loss_reduction!r}")
        if noise_multiplier is not None and not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
            raise ValueError(f"PrivacyEngine: noise_multiplier must be >= 0, got {noise_multiplier!r}")
        if accountant not in accounting.ACCOUNTANTS:
            raise ValueError(f"PrivacyEngine: accountant must be one of {accounting.ACCOUNTANTS}, got {accountant!r}")
        if target_delta is not None and not 0 < target_delta < 1:
            raise ValueError(f"PrivacyEngine: target_delta must lie in (0, 1), got {target_delta!r}")
        self.sample_rate = batch_size / sample_size
        if target_epsilon is not None:
            if (epochs is None) == (steps is None):
                raise ValueError("PrivacyEngine: with target_epsilon, give exactly one of epochs and steps")
            # An epoch of bk.data.poisson_loader is round(1/q) steps.
            planned = steps if steps is not None else epochs * max(1, round(sample_size / batch_size))
            delta = target_delta if target_delta is not None else 1.0 / sample_size ** 1.1
            try:
                noise_multiplier = accounting.calibrate_noise_multiplier(target_epsilon, self.sample_rate, planned,
                                                                         delta, accountant)
            except ValueError as err:
                raise ValueError(f"PrivacyEngine: {err}") from None

        self.model = model
        self.batch_size, self.sample_size = batch_size, sample_size
        self.epochs, self.planned_steps = epochs, steps
        self.noise_multiplier = float(noise_multiplier)
        self.target_delta = target_delta if target_delta is not None else 1.0 / sample_size ** 1.1
        self.max_grad_norm = float(max_grad_norm)
        self.clipping_fn, self.gamma = clipping_fn, float(gamma)
        self.clipping_style, self.clipping_mode = clipping_style, clipping_mode
        self.backend, self.loss_reduction, self.accountant = backend, loss_reduction, accountant
        # Where the examples lie: dim 0 of the model's input and of every layer input (True), or
        # dim 1 of the model's input and of every layer input with a sequence dim (False:
        # [T, B, ...], torch's nn.Transformer*/MultiheadAttention default). layout.py.
        self.layout = BatchLayout(batch_first)
        check_declared_layouts(model, batch_first)
        self._last_unit_sq_norms = {}

        self._params, self._names, self._owners = self._trainable_parameters(model)
        self._units = clipping_units(clipping_style, self._params, self._names, self._owners)  # [[param]]
        self._unit_of = {id(p): i for i, unit in enumerate(self._units) for p in unit}
        self._param_of = {id(p): p for p in self._params}
        self._threshold = self.max_grad_norm / math.sqrt(len(self._units))
        self._shared = {id(p) for p in self._params if len(self._owners[id(p)]) > 1}

        self._seed = seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        self._noise_offset = 0
        self.steps = 0
        self.skipped_steps = 0  # fp16 steps a GradScaler skipped for overflow (counted as spent)
        self._history = []      # [[noise_multiplier, sample_rate, steps]] segments, for the accountant
        self._sampling = SamplingCheck(batch_size, sample_size)  # do the steps' sizes look Poisson?
        self._examples = 0  # examples in the backwards since the last step
        self._optimizer, self._grad_scaler = None, None
        self._reset_backward_state()
        self._ready_for_step = False
        self._forward_labels = None  # a forward's `labels` keyword, until its outputs are seen
        self._forward_items = None  # ... and its `num_items_in_batch` (Hugging Face's loss divisor)
        self._forward_serial = 0  # numbers the model's forwards
        self._summed_forwards = set()  # the forwards whose backward was summed since the last step
        self._padding_forward = False  # the forward now running is a padding example's (no example of the batch)
        self._unpad_outputs = False  # ... an empty batch's: its outputs get their 0 examples back
        self._overflow = False  # an fp16 backward overflowed: the GradScaler will skip this step
        self._example_rows = None  # which example each row of the batch is (example_rows); None: one row each
        self._forward_groups = None  # ... resolved for the forward now running (example_rows.RowGroups)
        self._watch = None  # a packed forward's watch (packed.Watch) until its end
        self._output_holds = OutputHolds()  # layers' outputs kept for their backward (held_output.py)
        self._in_forward = False  # a recorded forward of the model is running (grad mode on at its start)
        self._forward_starts_of = None  # ... and where its sequences start ([R, T] bool)
        self._towers = patch_rows.TowerRows(self)  # vision towers whose rows are all images' patches
        self._hooks = []
        self._grad_nodes = {}  # id(param a layer saw) -> (weakref to it, its AccumulateGrad node)
        self._attach_to_modules()

    # ---------------------------------------------------------------- set-up

    def _trainable_parameters(self, model):
        """(params in model order, name of each (first name for tied), bk modules owning each)."""
        names, owners = {}, defaultdict(list)
        params = []
        for name, p in model.named_parameters():  # tied parameters appear once, by their first name
            if p.requires_grad:
                names[id(p)] = name
                params.append(p)
        if not params:
            raise ValueError("PrivacyEngine: the model has no trainable parameters")
        absorbed = {id(m) for module in model.modules() if isinstance(module, BKLayer)
                    for child in module._bk_absorbed_modules() for m in child.modules()}
        for path, module in model.named_modules(remove_duplicate=False):
            if id(module) in absorbed:  # book-kept by a generic parent, as its own
                continue
            owned = module._bk_owned_parameters() if isinstance(module, BKLayer) else module.parameters(recurse=False)
            for p in owned:
                if id(p) in names and module not in owners[id(p)]:
                    owners[id(p)].append(module)
        not_bk = []
        for p in params:
            bad = [m for m in owners[id(p)] if not isinstance(m, BKLayer)]
            if bad or not owners[id(p)]:
                not_bk.append(f"  {names[id(p)]} (in {', '.join(type(m).__name__ for m in bad) or 'no module'})")
        if not_bk:
            raise UnsupportedModuleError(
                "PrivacyEngine: these trainable parameters are not owned by bk layers, so they could not be "
                "clipped per example; call bk.convert(model) first, or freeze them:\n" + "\n".join(not_bk))
        return params, names, owners

    def _attach_to_modules(self):
        for module in self.model.modules():
            if isinstance(module, BKLayer):
                module._bk_engine = self
        self._hooks.append(self.model.register_forward_pre_hook(ModelProbe(self), with_kwargs=True))
        self._hooks.append(self.model.register_forward_hook(ModelProbe(self, after=True)))
        self._hooks.append(self.model.register_forward_hook(ModelProbe(self, after="always"), always_call=True))
        for p in self._params:
            self._hooks.append(p.register_hook(self._make_guard(self._names[id(p)])))
        self._hooks += self._towers.attach(self.model)
        for module in self.model.modules():  # frozen ones: convert refuses trainable BatchNorm
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                self._hooks.append(module.register_forward_pre_hook(self._refuse_batch_statistics))

    def _refuse_batch_statistics(self, module, args):
        """A BatchNorm (frozen: convert refuses a trainable one) that normalises with the batch's
        own statistics (train mode, or no running statistics) makes every example's output, and
        so every other layer's gradient, depend on the whole batch: no example has a gradient of
        its own and clipping bounds nothing. Refused before it runs (its running statistics
        unchanged); in eval mode it uses its running statistics, one example at a time."""
        if torch.is_grad_enabled() and (module.training or (module.running_mean is None and module.running_var is None)):
            raise UnsupportedModuleError(
                f"PrivacyEngine: {type(module).__name__} ({self._module_path(module)}) normalises with the statistics "
                "of the whole batch (train mode, or no running statistics), which mixes the examples: no example has a "
                "gradient of its own, so clipping would not bound any example's influence. Put it in eval mode after "
                "model.train() (it then uses its running statistics, per example), freeze it for good "
                "(bk.freeze_batchnorm(model)), or replace it with GroupNorm (bk.replace_batchnorm(model)); nothing "
                "was recorded and no budget was spent.")

    def _forward_starts(self, args, kwargs):
        """The model's forward pre-hook: this forward's batch size, for the layers to check. An
        empty batch (Poisson sampling makes them) runs as one all-zero padding example whose
        backward adds nothing, and its outputs come back with no example (_watch_outputs): the
        step still takes place (noise only, counted), whether or not the model can run zero
        examples."""
        if self._callback_queued:  # a backward died half-way (an error raised inside it): drop its records
            self._reset_backward_state()
        if self._watch is not None:  # the last packed forward raised before its end
            self._watch.close()
            self._watch = None
        packs = isinstance(self._example_rows, packed.PackedSequences)
        self._forward_starts_of = None  # where the packed sequences of this forward start ([R, T] bool)
        problem = _packed_sequences_problem(kwargs) if torch.is_grad_enabled() and not packs else None
        if problem is not None:  # eval records nothing
            raise UnsupportedLayoutError(problem)
        self.layout.take(args, kwargs)
        self._in_forward = torch.is_grad_enabled()  # a forward whose backward will be recorded
        self._towers.model_call(args, kwargs)
        self._unpad_outputs = self.layout.empty_batch()
        self._padding_forward = self._unpad_outputs or self._padding_chunk()
        # the rows' examples, checked against this batch before anything runs (padding holds none)
        self._forward_groups = None if self._padding_forward or not torch.is_grad_enabled() else \
            self._packed_groups(kwargs) if packs else \
            example_rows.resolve(self._example_rows, self.layout.batch, self.layout.input_device)
        if self._unpad_outputs:
            if self._towers.towers:  # no example, no image: a 0-row patch input is left out, not padded
                kwargs = patch_rows.without_empty_patches(kwargs)
            args, kwargs = self.layout.pad(args, kwargs)
            self.layout.take(args, kwargs)
        self._forward_labels = kwargs.get("labels") if kwargs else None
        self._forward_items = kwargs.get("num_items_in_batch") if kwargs else None
        return (args, kwargs) if self._unpad_outputs else None

    def _packed_groups(self, kwargs):
        """Under example_rows(bk.packed_sequences()): the examples of the tokens of a forward whose
        rows pack several sequences (token rows for the layers, watched to the forward's end:
        packed.py), or None when its rows are not packed (one example each)."""
        starts = packed.sequence_starts(kwargs)
        if starts is None:
            return None
        why = packed.attention_problem(self.model)
        if why is None and not self.batch_first:
            why = "the engine was made with batch_first=False; packed rows are read batch-first"
        if why is None and tuple(starts.shape) != tuple((self.layout.input_shape or ())[:2]):
            why = (f"its position_ids {tuple(starts.shape)} are not laid out as its input "
                   f"{self.layout.input_shape} (rows, tokens)")
        if why is not None:
            raise UnsupportedLayoutError(
                f"PrivacyEngine: the batch packs several sequences into a row (example_rows(bk.packed_sequences())), "
                f"but {why}; nothing ran, nothing was recorded and no budget was spent.")
        packed.check_flash_kwargs(kwargs, starts)
        groups = packed.PackedGroups(starts.to(self.layout.input_device))
        self.layout.tokens = tuple(starts.shape)
        self._forward_starts_of = starts
        self._watch = packed.Watch(self, starts)
        return groups

    def _padding_chunk(self):
        """Whether the forward starting is a padding chunk of bk.distributed.micro_batches."""
        return False

    def example_rows(self, rows):
        """Tells the engine which example each row of the model's batch belongs to, when one
        example is laid out as several rows (a DPO batch of chosen then rejected sequences:
        bk.stacked_rows(2); K augmentations of each image: bk.interleaved_rows(K)): the rows of
        an example are then clipped TOGETHER, as one example (its gradient the sum of its rows'),
        and count as one example (the mean loss's scale, the sampling check). Clipped row by row,
        each example's influence would be bounded by K x max_grad_norm only.

        rows: None (one row per example: the default), a 1-D integer tensor (the example of each
        row of the model's input; any labels, relabelled in order), or a callable taking the
        number of rows and returning one (bk.stacked_rows(k), bk.interleaved_rows(k)). A tensor
        must match every forward's batch (a check before the forward runs); a callable follows
        the batch size (Poisson batches, micro-batches).

        Takes effect at once, for every forward from now on (Trainers that run the forward
        themselves), and as a context manager restores the previous setting on exit:

            with engine.example_rows(torch.cat([ids, ids])):
                loss = dpo_loss(model(torch.cat([chosen, rejected])))
                loss.backward()

        Each backward uses the rows of the forward it goes through (set when that forward ran)."""
        previous, self._example_rows = self._example_rows, example_rows.check_spec(rows)
        return _Restore(self, previous)

    def _forward_ended(self):
        """After every forward of the model, also one that raised: a packed forward's watch (a
        global module hook) ends with it, and so do the layers' output holds."""
        self._in_forward = False
        self._output_holds.forward_ended()
        if self._watch is not None:
            self._watch.close()
            self._watch = None

    def _watch_outputs(self, output):
        """The model's forward hook: the first gradient to reach one of its outputs marks the start
        of a backward through the model, on the backward's own graph task. The clipping callback
        is queued there, so a layer first recorded inside a nested backward (reentrant activation
        checkpointing runs one per checkpointed segment) cannot end the book-keeping early.
        Returns the output (an empty batch's: with no example again)."""
        if self._watch is not None:  # packed sequences: the model's masks must have read them apart
            watch, self._watch = self._watch, None
            watch.finish()
        self._towers.model_ends()
        if self._unpad_outputs:
            output = self.layout.unpad(output)
            self._unpad_outputs = False
        loss = output.get("loss") if isinstance(output, dict) else None  # a Hugging Face ModelOutput's
        if isinstance(loss, torch.Tensor) and loss.requires_grad:
            problem = _token_mean_problem(self._forward_labels, self.model, self._forward_items,
                                          self._forward_starts_of)
            if problem is not None:
                def refuse(grad):  # first in the backward: nothing recorded yet
                    raise ValueError(problem)
                loss.register_hook(refuse)
        self._forward_labels = self._forward_items = None
        leaves = (output,) if isinstance(output, torch.Tensor) else torch.utils._pytree.tree_leaves(output)
        if self.layout.expanded:
            self._check_expanded_uses(leaves)
        reached = self._padding_reached_output if self._padding_forward else self._backward_reached_output
        serial, self._forward_serial = self._forward_serial, self._forward_serial + 1
        for t in leaves:
            if isinstance(t, torch.Tensor) and t.requires_grad:
                t.register_hook(functools.partial(reached, forward=serial, groups=self._forward_groups))
        return output

    def _check_expanded_uses(self, outputs):
        """Refuses a forward in which a bk layer's input broadcast over the batch was expanded to
        it and its output is then used in a way that mixes the copies (nn/expanded.py)."""
        layers, self.layout.expanded = self.layout.expanded, []
        problem = expanded_use_problem(outputs, layers, self.layout.batch)
        if problem is not None:
            names = sorted({f"{type(m).__name__} ({self._module_path(m)})" for m in layers})
            raise UnsupportedLayoutError(
                f"PrivacyEngine: {', '.join(names)} got an input of size 1 on the example dim (shared by every "
                f"example), which bk expands to the {self.layout.batch} examples so that each gets its own copy of the "
                f"output; the model then uses that output in a way that does not keep the copies apart: {problem}. "
                "Per-example gradients would mix the examples there. Feed the layer an input that holds the batch, "
                "freeze it, or let its owner take the generic path (bk.register_layer); nothing was recorded and no "
                "budget was spent.")

    def _backward_reached_output(self, grad, forward=None, groups=None):
        """`forward`: which forward of the model made the output (a serial number); `groups`: the
        examples of its rows (example_rows; None: one row each)."""
        self._queue_finish()
        if forward is not None:
            if self._backward_forwards and not example_rows.same(groups, self._backward_groups):
                raise UnsupportedLayoutError(
                    "PrivacyEngine: one backward goes through forwards of the model made under different "
                    "example_rows settings, so the rows of its uses cannot all be matched to their examples. Run "
                    "backward() once per forward; nothing of this backward was kept.")
            self._backward_forwards.add(forward)
            self._backward_groups = groups
        return grad

    def _padding_reached_output(self, grad, forward=None, groups=None):
        """The backward of a padding example (an empty batch's, or bk.distributed.micro_batches'
        padding chunk): no example of the batch, nothing of it is kept."""
        self._backward_of_padding = True
        return self._backward_reached_output(grad, forward, groups)

    def _queue_finish(self):
        if not self._callback_queued:
            torch.autograd.Variable._execution_engine.queue_callback(self._finish_backward)
            self._callback_queued = True

    @staticmethod
    def _make_guard(name):
        def guard(grad):
            if grad is None:  # a bk layer's backward returned no weight gradient: as it should
                return grad
            raise RuntimeError(
                f"PrivacyEngine: parameter {name!r} received an ordinary (non-private) gradient: it is used "
                "outside its bk layer's forward. Use it only through bk layers, or freeze it.")
        return guard

    # ---------------------------------------------------------------- optimizer

    def attach(self, optimizer, *, grad_scaler=None):
        """Makes `optimizer` private: its step() adds noise and divides by batch_size first.

        grad_scaler: the torch.amp.GradScaler of an fp16 run (scaler.scale(loss).backward()):
        the engine removes its scale before clipping (see _finish_backward).
        """
        if self._optimizer is not None:
            raise RuntimeError("PrivacyEngine: already attached to an optimizer; detach() it first")
        if grad_scaler is not None and not isinstance(grad_scaler, torch.amp.GradScaler):
            raise TypeError("PrivacyEngine: grad_scaler must be a torch.amp.GradScaler, got "
                            f"{type(grad_scaler).__name__}")
        self._check_optimizer_params(optimizer)
        if not self._hooks:  # detach() had released the modules too
            self._attach_to_modules()
        engine = self
        saved = {name: optimizer.__dict__.get(name) for name in ("step", "zero_grad")}
        original_step, original_zero_grad = optimizer.step, optimizer.zero_grad

        # Bound methods (not plain functions), so that an LR scheduler made after attach can wrap
        # them like the class's own; once detached they pass straight through.
        def step(opt, *args, **kwargs):
            if engine._optimizer is opt and not engine._is_state_init_step(opt):
                engine._privatize()
            return original_step(*args, **kwargs)

        def zero_grad(opt, *args, **kwargs):
            if engine._optimizer is opt:
                engine._zero_grad()
            return original_zero_grad(*args, **kwargs)

        if getattr(original_step, "_wrapped_by_lr_sched", False):  # an LR scheduler made before attach
            step._wrapped_by_lr_sched = True  # ... still counts our step as the optimizer's
        optimizer.step = types.MethodType(step, optimizer)
        optimizer.zero_grad = types.MethodType(zero_grad, optimizer)
        self._optimizer, self._grad_scaler = optimizer, grad_scaler
        self._installed = {"step": optimizer.step, "zero_grad": optimizer.zero_grad}
        self._saved_methods = saved
        return optimizer

    def _is_state_init_step(self, optimizer):
        """torch.distributed.checkpoint's get_state_dict makes a fresh optimizer's state with one
        step() on all-zero gradients at learning rate 0 (no backward before it). No data is in
        it and nothing moves: it passes through, neither noised nor counted."""
        if self._ready_for_step or self._overflow or not self._params:
            return False
        if any(float(group.get("lr", 1.0)) != 0.0 for group in optimizer.param_groups):
            return False
        # a sharded gradient is read locally: DTensor's any() would be a hidden collective
        return all(p.grad is not None and not _fsdp.local(p.grad).any() for p in self._params)

    def _check_optimizer_params(self, optimizer):
        known = {id(p) for p in self._params}
        for i, group in enumerate(optimizer.param_groups):
            for p in group["params"]:
                if p.requires_grad and id(p) not in known:
                    raise ValueError(
                        f"PrivacyEngine: the optimizer's param group {i} holds a trainable parameter of shape "
                        f"{tuple(p.shape)} that is not part of the model given to the engine, so it would be "
                        "trained without clipping or noise" + (
                            " (it is a sharded DTensor: make the engine after fully_shard, and the optimizer "
                            "from model.parameters() after that)" if _fsdp.is_sharded(p) else ""))

    def detach(self):
        """Restores the optimizer and the modules to non-private training."""
        if self._optimizer is not None:
            opt = self._optimizer
            for name, installed in self._installed.items():
                if opt.__dict__.get(name) is installed:  # else something wrapped ours: it passes through
                    if self._saved_methods[name] is None:
                        del opt.__dict__[name]  # back to the class's method
                    else:
                        setattr(opt, name, self._saved_methods[name])
            self._optimizer, self._grad_scaler = None, None
        for module in self.model.modules():
            if isinstance(module, BKLayer):
                module._bk_engine = None
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # ---------------------------------------------------------------- backward

    def _reset_backward_state(self):
        self._uses = defaultdict(list)        # id(param) -> [use]
        self._self_norms = defaultdict(list)  # id(param) -> [[B] squared norm of each use]
        self._recorders = {}
        self._callback_queued = False
        self._backward_of_padding = False
        self._backward_forwards = set()  # the forwards whose outputs this backward reached
        self._backward_groups = None  # ... the examples of their rows (example_rows.RowGroups)

    def _record(self, module, uses):
        """Called by a bk layer's backward with [(param, use)]."""
        self._queue_finish()  # already queued when the backward came through the model's output
        # Rows that are not the model's examples: several rows of one example (example_rows), or
        # a vision tower's patch rows; a padding example's backward keeps nothing anyway
        groups = self._backward_groups if self._backward_forwards else self._forward_groups
        patches = self._towers.rows_of(module, self._backward_forwards) if self._towers.noted else None
        if self._backward_of_padding:
            groups = patches = None
        where = lambda: f"{type(module).__name__} ({self._module_path(module)})"  # noqa: E731
        for p, use in uses:
            if not self._gradient_requested(p):  # torch.autograd.grad for other inputs: no use of p
                continue
            p = self._engine_param(module, p)
            if patches is not None:
                use = patches.groups(use.batch, groups, where).regroup(use, where)
            elif groups is not None:
                use = groups.regroup(use, where)
            for use in use if isinstance(use, list) else [use]:
                use = use.densify(self.clipping_mode)  # small direct-mode gradients are kept as they are
                self._uses[id(p)].append(use)
                self._self_norms[id(p)].append(use.sq_norm(self.clipping_mode, self.backend))
            self._recorders.setdefault(id(p), module)

    def _gradient_requested(self, p):
        """Whether the backward now running computes p's gradient: not so under
        torch.autograd.grad(loss, inputs) without p (an input gradient for an adversarial
        example, a saliency map), or loss.backward(inputs=[...]) without p. Such a backward must
        leave p.grad and the step alone, as autograd does; a use recorded there would be added to
        the next step's sum a second time. p's AccumulateGrad node is held here, so p keeps it
        (get_gradient_edge costs microseconds a call); a False is checked again with a fresh one."""
        try:
            ref, node = self._grad_nodes.get(id(p), (None, None))
            if ref is None or ref() is not p:
                node = torch.autograd.graph.get_gradient_edge(p).node
                self._grad_nodes[id(p)] = (weakref.ref(p), node)
            if torch._C._will_engine_execute_node(node):
                return True
            fresh = torch.autograd.graph.get_gradient_edge(p).node  # p's accumulator replaced since?
            self._grad_nodes[id(p)] = (weakref.ref(p), fresh)
            return fresh is not node and torch._C._will_engine_execute_node(fresh)
        except (AttributeError, RuntimeError):  # not a leaf's edge, or no backward running: keep the use
            return True

    def _is_model_input(self, x):
        """Whether x is (a view of) one of the tensors given to the model's forward now running."""
        storage = _storage(x)
        return storage is not None and storage in self.layout.input_storages

    def _is_model_state(self, x):
        """Whether x is (a view of) one of the model's buffers or Parameters, which hold no
        examples whatever their shape (timm's relative-position coordinates, a table of learned
        queries). The model's own inputs are not: they are checked first, without a walk over the
        model, which is done once per forward and only when needed."""
        layout = self.layout
        storage = _storage(x)
        if storage is None or storage in layout.input_storages:
            return False
        if layout.state_storages is None:
            layout.state_storages = {_storage(t) for t in (*self.model.buffers(), *self.model.parameters())
                                     if t.numel()}
        return storage in layout.state_storages

    def _engine_param(self, module, p):
        """The engine's Parameter for the one a layer's backward saw (the same one here; FSDP2's
        unsharded stand-in maps to its sharded Parameter in DistributedPrivacyEngine)."""
        if id(p) not in self._unit_of:
            raise RuntimeError(
                f"PrivacyEngine: {type(module).__name__} ({self._module_path(module)}) used a parameter of shape "
                f"{tuple(p.shape)} that the engine does not know: the model's parameters were replaced after the "
                "engine was made (fully_shard, to_empty, load_state_dict(assign=True)?). Make the engine last, "
                "after bk.convert and fully_shard")
        return p

    def _finish_backward(self):
        """After the whole backward: clip factors per unit, clipped sums added into p.grad."""
        uses, self_norms, recorders = self._uses, self._self_norms, self._recorders
        padding, forwards = self._backward_of_padding, self._backward_forwards
        self._reset_backward_state()
        if padding:  # a sum over no example: zero, and the step may come (noise only)
            for p in self._params:
                if p.grad is None and not _fsdp.is_sharded(p):  # a shard's is made at the step
                    p.grad = torch.zeros_like(p)
            self._ready_for_step = True
            return
        if not uses:
            return
        if forwards & self._summed_forwards:
            raise RuntimeError(
                "PrivacyEngine: a second backward through the same forward of the model before the step (two losses "
                "backpropagated one at a time, or backward(retain_graph=True) twice): each example's gradient would "
                "be clipped and added twice, so its influence would be bounded by 2 x max_grad_norm, not by "
                "max_grad_norm. Add the losses and call backward() once. This backward was not recorded; the "
                "earlier one stands.")
        sizes = {u.batch for us in uses.values() for u in us}
        B = max(sizes)
        for id_p, us in uses.items() if len(sizes) > 1 else ():
            if any(u.batch != B for u in us):  # a layer called outside the model's forward (no batch size to check)
                module = recorders[id_p]
                bs = {u.batch for u in us}
                raise UnsupportedLayoutError(
                    f"PrivacyEngine: {type(module).__name__} ({self._module_path(module)}) read {min(bs)} examples "
                    f"from its input while other layers read {B} (batch_first={self.batch_first}): its examples "
                    "are not where the engine reads them, so per-example gradients cannot be told apart. Call the "
                    "model itself (the engine takes the batch size from its input), and pass batch_first=False for "
                    "a sequence-first model; nothing was recorded and no budget was spent.")
        terms = defaultdict(list)  # unit -> [B] squared-norm terms: each use's own, 2 x each cross term
        for id_p, us in uses.items():
            unit_terms = terms[self._unit_of[id_p]]
            unit_terms += self_norms[id_p]
            for i in range(len(us) - 1):  # cross terms of a parameter used several times
                for j in range(i + 1, len(us)):
                    try:
                        unit_terms.append(2 * cross(us[i], us[j]))
                    except UnsupportedSharingError as err:
                        raise RuntimeError(f"PrivacyEngine: parameter {self._names[id_p]!r} is used several times in "
                                           f"one forward in a way not supported yet ({err})") from None
        # Per-example gradient = (batch size for a mean loss) / (GradScaler's scale) * the one seen here.
        scale = float(B) if self.loss_reduction == "mean" else 1.0
        seen_to_true = scale / self._loss_scale()
        # Per unit, one op: the true squared norms (float64), the clip factors from them, and
        # whether all are finite. The clipped sums keep the loss scale (the factors carry the
        # mean's B only), which GradScaler's unscale_ removes before the step (and its finiteness
        # check still sees them).
        unit_step = {u: torch.ops.bk.unit_clip_factors(ts, seen_to_true ** 2, self._threshold, self.clipping_fn,
                                                       self.gamma, scale) for u, ts in terms.items()}
        for _, _, finite in unit_step.values():
            if not finite:
                if self._grad_scaler is not None:
                    self._examples += B  # sampled and used: the skipped step counts
                    self._overflowed()
                    return
                raise FloatingPointError(
                    "PrivacyEngine: non-finite per-example gradient norms (the loss diverged?); no gradient was "
                    "recorded and no privacy budget was spent")
        self._examples += B
        self._summed_forwards |= forwards
        self._towers.forget(forwards)
        # The true squared norms of this backward, per unit (bk.verify reads them)
        self._last_unit_sq_norms = {u: sq.detach() for u, (sq, _, _) in unit_step.items()}
        factors = {u: c for u, (_, c, _) in unit_step.items()}
        cast = {}  # a unit's factors in a parameter's accumulation dtype and device, converted once
        for id_p, us in uses.items():
            p = self._param_of[id_p]
            key = (self._unit_of[id_p], accumulation_dtype(p.dtype), p.device)
            if key not in cast:
                cast[key] = factors[key[0]].to(device=key[2], dtype=key[1])
            self._add_clipped(p, us, cast[key])
        self._ready_for_step = True

    def _add_clipped(self, p, uses, c):
        """p.grad += sum_b c_b G_b over the uses of p in this backward (c on p's device)."""
        p.grad = clipped_sum_into(p.grad, uses, c, self.backend, p, p.dtype)

    def _loss_scale(self):
        if self._grad_scaler is None or not self._grad_scaler.is_enabled():
            return 1.0
        return float(self._grad_scaler.get_scale())

    def _overflowed(self):
        """fp16 overflow under a GradScaler: poison every gradient so that scaler.step() skips the
        step and scaler.update() lowers the scale, as in ordinary mixed-precision training."""
        for p in self._params:
            if p.grad is None:
                p.grad = torch.full_like(p, math.nan)
            else:
                p.grad.fill_(math.nan)
        self._overflow = True
        self._ready_for_step = False

    def _module_path(self, module):
        for path, m in self.model.named_modules():
            if m is module:
                return path or "<model>"
        return "?"

    # ---------------------------------------------------------------- accounting

    def epsilon(self, delta=None):
        """The epsilon spent by the steps taken so far (and any a GradScaler skipped), at `delta`
        (default target_delta)."""
        return accounting.epsilon_of_history(self._history, self.target_delta if delta is None else delta,
                                             self.accountant)

    def _spend(self):
        """One Poisson-subsampled Gaussian step into the accountant's history."""
        if self._history and self._history[-1][:2] == [self.noise_multiplier, self.sample_rate]:
            self._history[-1][2] += 1
        else:
            self._history.append([self.noise_multiplier, self.sample_rate, 1])

    # ---------------------------------------------------------------- step

    def _privatize(self):
        self._check_ready_to_step()
        self._noise_and_scale(add_noise=True)
        self.steps += 1
        self._spend()
        self._ready_for_step = False
        self._summed_forwards = set()
        self._count_examples()

    def _count_examples(self):
        """The step's examples to the sampling check (a rank of a data-parallel run sees only its share)."""
        if getattr(self, "world_size", 1) == 1:
            self._sampling.step(self._examples)
        self._examples = 0

    def _check_ready_to_step(self):
        if self._overflow:
            raise RuntimeError("PrivacyEngine: the last backward overflowed in fp16 (non-finite per-example norms "
                               "under the GradScaler): step with scaler.step(optimizer), which skips it")
        if not self._ready_for_step:
            raise RuntimeError("PrivacyEngine: optimizer.step() without a backward since the last step: no "
                               "parameter moved, no noise was added and no privacy budget was spent")
        self._check_optimizer_params(self._optimizer)  # param groups may have been added since attach

    def _noise_and_scale(self, add_noise):
        """p.grad <- (p.grad + N(0, (sigma R)^2)) / batch_size for every trainable parameter; without
        add_noise only the division (the noise offset advances either way)."""
        for p in self._params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        std = self.noise_multiplier * self.max_grad_norm
        grads = [p.grad for p in self._params]
        if std > 0 and add_noise and len({g.device for g in grads}) == 1:
            # one call for the whole step (each parameter's counters as _noise_and_scale_one's)
            self._noise_offset = ops.add_noise_list_(grads, std, 1.0 / self.batch_size, self._seed,
                                                     self._noise_offset, backend=self.backend)
            return
        for p in self._params:
            self._noise_and_scale_one(p, p.grad, add_noise)

    def _noise_and_scale_one(self, p, grad, add_noise, first=0):
        """grad <- (grad + N(0, (sigma R)^2)) / batch_size, grad holding p's elements from row-major
        index `first` on (all of p, or a rank's shard): element i takes Philox counter offset +
        first + i. Then the offset moves past p, noise or not, while sigma R > 0."""
        std = self.noise_multiplier * self.max_grad_norm
        if std > 0 and add_noise:
            ops.add_noise_(grad, std, 1.0 / self.batch_size, self._seed, self._noise_offset + first,
                           backend=self.backend)
        else:
            grad.div_(self.batch_size)
        if std > 0:
            # Philox draws 4 normals per counter: each parameter starts on a fresh counter, so no
            # two coordinates of any step share a draw.
            self._noise_offset += counters(p.numel())

    def _zero_grad(self):
        """Called by the optimizer's zero_grad: drops a pending backward; a step that the
        GradScaler skipped for overflow is counted as spent (its batch was sampled and used)."""
        if self._overflow:
            self.skipped_steps += 1
            self._spend()
            self._overflow = False
            self._count_examples()
        self._reset_backward_state()
        self._ready_for_step = False
        self._examples = 0  # a dropped backward's examples were not stepped on
        self._summed_forwards = set()

    # ---------------------------------------------------------------- checkpoints

    def state_dict(self):
        """What a resumed run needs to continue exactly: steps, the accountant's history, the noise
        generator's seed and position. Save it with the model's and the optimizer's state_dict.

        It holds the noise seed (secure mode included): whoever has it and the released model can
        recompute the noise, so keep checkpoints as private as the training data.
        """
        return {"version": 1, "steps": self.steps, "skipped_steps": self.skipped_steps,
                "history": [list(h) for h in self._history], "noise_seed": self._seed,
                "noise_offset": self._noise_offset, "parameters": self._parameter_signature()}

    def load_state_dict(self, state):
        """Continues the run saved by state_dict(). Validates everything before changing anything.
        Later steps are accounted with this engine's noise_multiplier and sampling rate."""
        if not isinstance(state, dict) or state.get("version") != 1:
            raise ValueError("PrivacyEngine.load_state_dict: not a state_dict() of this engine (version 1)")
        keys = {"steps", "skipped_steps", "history", "noise_seed", "noise_offset", "parameters"}
        if set(state) - {"version"} != keys:
            raise ValueError(f"PrivacyEngine.load_state_dict: expected keys {sorted(keys)}, got {sorted(state)}")
        if [tuple(x) for x in state["parameters"]] != self._parameter_signature():
            raise ValueError("PrivacyEngine.load_state_dict: the checkpoint's trainable parameters (names and "
                             "shapes) differ from this model's")
        history = [list(h) for h in state["history"]]
        for h in history:
            if not (len(h) == 3 and h[0] >= 0 and 0 < h[1] <= 1 and isinstance(h[2], int) and h[2] > 0):
                raise ValueError(f"PrivacyEngine.load_state_dict: bad accountant history entry {h!r}")
        if sum(h[2] for h in history) != state["steps"] + state["skipped_steps"]:
            raise ValueError("PrivacyEngine.load_state_dict: the accountant history does not add up to the steps")
        self.steps, self.skipped_steps = int(state["steps"]), int(state["skipped_steps"])
        self._history = history
        self._seed, self._noise_offset = int(state["noise_seed"]), int(state["noise_offset"])
        self._reset_backward_state()
        self._ready_for_step = False

    @property
    def batch_first(self):
        return self.layout.batch_first

    def _parameter_signature(self):
        return [(self._names[id(p)], tuple(p.shape)) for p in self._params]


def _token_mean_problem(labels, model, num_items=None, starts=None):
    """Why a Hugging Face model's own loss (outputs.loss) cannot be trained privately with these
    token labels, or None. That loss is the mean over ALL the batch's labelled tokens: when the
    examples hold different numbers of them (padding, random MLM masks), each example's
    gradient is scaled by the whole batch's token count, which the other examples change, and
    an unclipped example's contribution then moves with them: the per-example bound fails.
    With `num_items_in_batch` (Trainer's count over all of a step's micro-batches) the loss is
    the token sum divided by it: the same unless it equals B x every example's count.
    starts: where packed sequences start ([R, T] bool, packed.py): the examples are those."""
    if not isinstance(labels, torch.Tensor) or labels.dim() < 2 or labels.is_floating_point() or \
            (labels.shape[0] < 2 and num_items is None and starts is None):
        return None
    config = getattr(model, "config", None)
    causal = callable(getattr(model, "can_generate", None)) and model.can_generate() and \
        not getattr(config, "is_encoder_decoder", False)
    counted = labels[:, 1:] if causal else labels  # a causal LM's loss shifts its labels by one
    if starts is not None and starts.shape == labels.shape:
        crossing = starts[:, 1:] & (counted != -100) if causal else None
        if crossing is not None and bool(crossing.any()):
            row, at = (int(i) for i in crossing.nonzero()[0])
            return (f"PrivacyEngine: the backward runs through the model's own loss (outputs.loss) on packed sequences, "
                    f"and the label of the first token of a sequence (row {row}, position {at + 1}) is not -100: the "
                    "causal loss would predict it from the last token of the sequence before, another example. Label "
                    "every sequence's first token -100 (DataCollatorWithFlattening does), or backpropagate "
                    "bk_kernels.hf.example_losses(outputs.logits, labels, causal, position_ids=position_ids).mean(); "
                    "nothing was recorded and no budget was spent.")
        ids = packed.sequence_ids(starts)
        ids = ids[:, 1:] if causal else ids
        counts = torch.bincount(ids[counted != -100], minlength=int(starts.sum()))
        if len(counts) < 2 and num_items is None:
            return None
    else:
        counts = (counted != -100).flatten(1).sum(1)
    equal = bool((counts == counts[0]).all())
    if num_items is not None and not (equal and float(num_items) == float(counts.sum())):
        return (f"PrivacyEngine: the backward runs through the model's own loss (outputs.loss), which divides the "
                f"batch's token losses by num_items_in_batch={int(num_items)}, while this batch's {len(counts)} "
                f"example(s) hold {int(counts.sum())} labelled tokens ({int(counts.min())} to {int(counts.max())} "
                "each): each example's gradient would be scaled by a count that other examples (of this batch or of "
                "other micro-batches) set, and clipping would not bound its influence. Do not pass "
                "num_items_in_batch; backpropagate the mean over examples of each example's own loss "
                "(bk_kernels.hf.example_losses(outputs.logits, labels, causal).mean()); nothing was recorded and no "
                "budget was spent.")
    if equal:
        return None  # the token mean is then the mean of the examples' own token means: exact
    return (f"PrivacyEngine: the backward runs through the model's own loss (outputs.loss), which averages over all "
            f"the batch's labelled tokens, and its examples hold different numbers of them ({int(counts.min())} to "
            f"{int(counts.max())}{', after the causal shift' if causal else ''}): each example's gradient would then "
            "depend on the other examples' token counts, and clipping would not bound an example's influence. "
            "Backpropagate the mean over examples of each example's own loss instead: "
            f"bk_kernels.hf.example_losses(outputs.logits, labels, causal"
            f"{', position_ids=position_ids' if starts is not None else ''}).mean() gives it for token labels "
            "(bk_kernels.hf.PrivateTrainer does this); nothing was recorded and no budget was spent.")


# Keywords with which Hugging Face models (and their flash-attention kernels) read a row as
# several packed sequences (DataCollatorWithFlattening(return_flash_attn_kwargs=True), Mamba's seq_idx)
_PACKED_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "cu_seqlens", "seq_idx")


def _packed_sequences_problem(kwargs):
    """Why a forward's keyword inputs pack several sequences into one row, or None. Hugging Face
    models read a row as packed sequences (each attends only to itself: transformers'
    find_packed_sequence_indices) when its position_ids restart and no attention_mask is given,
    or from flash-attention's cumulative lengths. The engine clips each ROW as one example, so
    the packed examples would be clipped together: one example's influence is then not bounded
    by the clipping norm, and the privacy guarantee does not hold."""
    if not kwargs:
        return None
    given = [k for k in _PACKED_KWARGS if kwargs.get(k) is not None]
    where = f"the keyword(s) {', '.join(given)} say so" if given else None
    starts = packed.sequence_starts(kwargs) if where is None else None
    if starts is not None:
        positions = kwargs["position_ids"]
        row = int(starts[:, 1:].any(-1).nonzero()[0, 0])
        where = (f"position_ids restart inside row {row} ({positions[row, :12].tolist()}"
                 f"{' ...' if positions.shape[1] > 12 else ''}) and no attention_mask is given")
    if where is None:
        return None
    return (f"PrivacyEngine: the batch packs several sequences into one row ({where}): Hugging Face models then read "
            "each row as separate sequences (DataCollatorWithFlattening's format), but the engine clips each ROW as "
            "one example, so the packed examples would be clipped together and no example's influence would be "
            "bounded. If each packed sequence is one example, say so: engine.example_rows(bk.packed_sequences()) "
            "clips each sequence's tokens together (Hugging Face models with eager, sdpa or flex attention). Or give "
            "each example its own row (padding with an attention_mask, as DataCollatorWithPadding or "
            "bk_kernels.hf.PrivateTrainer's default collator does). If a row really is one example (a pre-packed "
            "chunk sampled as a unit), pass attention_mask=torch.ones_like(input_ids): the model then reads it as one "
            "sequence too. Nothing was recorded and no budget was spent.")


def clipped_sum_into(total, uses, c, backend, param, dtype):
    """total + sum over `uses` of sum_b c_b G_b, added in place into `total`; a None total
    becomes the first use's own clipped sum cast to dtype (no zero fill to add into), or zeros
    of param's shape when that use has no standalone sum (a block of a larger parameter)."""
    for use in uses:
        if total is None:
            fresh = use.clipped(c, backend)
            if fresh is not None:
                total = fresh if fresh.dtype == dtype else fresh.to(dtype)
                continue
            total = torch.zeros(param.shape, dtype=dtype, device=param.device)
        use.add_clipped(total, c, backend)
    return total


def _check_positive_int(value, name):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"PrivacyEngine: {name} must be a positive int, got {value!r}")


class _Restore:
    """PrivacyEngine.example_rows' context manager: restores the setting it replaced."""

    def __init__(self, engine, previous):
        self.engine, self.previous = engine, previous

    def __enter__(self):
        return self.engine

    def __exit__(self, *exc):
        self.engine._example_rows = self.previous
        return False

