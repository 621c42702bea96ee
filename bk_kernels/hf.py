"""Private training with Hugging Face's `transformers.Trainer`: `PrivateTrainer`.

    from bk_kernels.hf import PrivateTrainer
    trainer = PrivateTrainer(model=model, args=TrainingArguments(..., per_device_train_batch_size=16,
                             gradient_accumulation_steps=4), train_dataset=train, data_collator=collate,
                             target_epsilon=3.0, max_grad_norm=1.0)   # or noise_multiplier=...
    trainer.train()                    # logs carry "epsilon"; trainer.engine is the PrivacyEngine

What it changes in Trainer, and why:
- the model is converted (bk.convert) and a PrivacyEngine made for it; the engine is attached to
  whichever optimizer Trainer creates or is given;
- batches are Poisson samples (what the accountant assumes) of expected size
  per_device_train_batch_size x gradient_accumulation_steps: each one split into exactly
  gradient_accumulation_steps micro-batches, so Trainer's accumulation loop takes one Poisson
  batch per optimizer step. Sample i of epoch e is drawn from a generator seeded by (seed, e, i),
  so Trainer's skipping of trained batches on resume gives the batches the uninterrupted run had;
- the loss is the mean over examples of each example's own loss (for token-level labels, the
  mean over that example's labelled tokens; with DataCollatorWithFlattening, which packs a
  micro-batch into one row, each packed sequence is an example: bk.packed_sequences()), never normalised by counts over the whole batch
  (that would make one example's gradient depend on the others'), and the backward is
  loss.backward(): each micro-batch's per-example gradients are recovered exactly by the engine;
- Trainer's own gradient clipping (args.max_grad_norm) is turned off: it would clip the noisy
  sum; `max_grad_norm` of PrivateTrainer is the per-example clipping norm R;
- logs carry "epsilon" (shown beside the progress bar at every log line); checkpoints hold the engine's state (noise generator, accountant
  history) and the sampling seed in bk_engine.pt, and resume from them.
Not supported yet (refused with a message): several processes (use bk.distributed), fp16 with a
GradScaler (use bf16), DeepSpeed/FSDP.
"""
import math
import os
import warnings

import torch
import torch.nn.functional as F
import transformers
from torch.utils.data import DataLoader, Sampler

from . import packed
from .convert import convert
from .data import _EmptySafeCollate, epoch_steps, poisson_sample
from .engine import PrivacyEngine

ENGINE_FILE = "bk_engine.pt"


class PoissonMicroBatchSampler(Sampler):
    """`steps` Poisson samples of range(num_samples) per epoch (each index independently with
    probability sample_rate), each yielded as `micro_batches` near-equal lists of indices (some
    empty when the sample is small). Sample i of epoch e comes from a generator seeded by
    (seed, e, i): the same whatever was drawn before it."""

    def __init__(self, num_samples, sample_rate, steps, micro_batches, seed):
        self.num_samples, self.sample_rate, self.steps = num_samples, sample_rate, steps
        self.micro_batches, self.seed, self.epoch = micro_batches, seed, 0

    def set_epoch(self, epoch):  # Trainer calls it at the start of every epoch
        self.epoch = int(epoch)

    def __len__(self):
        return self.steps * self.micro_batches

    def sample(self, epoch, i):
        """The indices of sample i of `epoch`."""
        gen = torch.Generator().manual_seed(hash((self.seed, epoch, i)) & (2**63 - 1))
        return poisson_sample(self.num_samples, self.sample_rate, gen)

    def __iter__(self):
        for i in range(self.steps):
            for part in torch.tensor_split(self.sample(self.epoch, i), self.micro_batches):
                yield part.tolist()


def example_losses(logits, labels, causal, position_ids=None):
    """[B] per-example losses: cross-entropy for class labels [B]; for token labels [B, T] the
    mean over each example's labelled tokens (label -100 is ignored), shifted by one for a
    causal LM (token t predicts label t+1, as Hugging Face's causal LM loss).

    position_ids [R, T] of packed sequences (a padding-free batch, position ids restarting at
    each sequence: bk.packed_sequences()): one loss per SEQUENCE, in order, [E]; a causal LM's
    last token of a sequence does not predict the next sequence's first (that label is ignored)."""
    if labels.dim() == 1:
        if logits.dim() == 2 and logits.shape[1] > 1:
            return F.cross_entropy(logits.float(), labels, reduction="none")
        return (logits.float().view(-1) - labels.float()).square()  # regression: squared error
    starts = packed.sequence_starts({"position_ids": position_ids}) if position_ids is not None else None
    if starts is not None and starts.shape != labels.shape:
        raise ValueError(f"example_losses: position_ids {tuple(position_ids.shape)} and labels {tuple(labels.shape)} "
                         "should have the same shape")
    ids = packed.sequence_ids(starts) if starts is not None else None
    if causal:
        logits, labels = logits[:, :-1], labels[:, 1:]
        if starts is not None:  # a prediction across two sequences: no example's own
            labels, ids = labels.masked_fill(starts[:, 1:], -100), ids[:, 1:]
    token = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100,
                            reduction="none").view(labels.shape)
    if ids is None:
        return token.sum(1) / (labels != -100).sum(1).clamp(min=1)
    sequences = int(starts.sum())
    sums = token.new_zeros(sequences).index_add_(0, ids.flatten(), token.flatten())
    counts = torch.bincount(ids.flatten(), weights=(labels != -100).flatten().to(token.dtype), minlength=sequences)
    return sums / counts.clamp(min=1)


class _EpsilonOnTheBar(transformers.TrainerCallback):
    """Shows beside Trainer's progress bar the epsilon of the latest log line (PrivateTrainer.log
    computes it; the accountant takes ~0.1 s a call, too slow for every step)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "epsilon" not in logs:
            return
        for callback in self.trainer.callback_handler.callbacks:
            bar = getattr(callback, "training_bar", None)
            if bar is not None:
                bar.set_postfix(epsilon=f"{logs['epsilon']:.3f}", refresh=False)


class PrivateTrainer(transformers.Trainer):
    """transformers.Trainer that trains privately with bk (see the module's docstring).

    Privacy arguments (keywords): target_epsilon or noise_multiplier (exactly one),
    target_delta (default 1 / N^1.1), max_grad_norm (R, default 1.0), clipping_fn,
    clipping_style, accountant, seed (noise and sampling; default secure, from the OS).
    Everything else goes to transformers.Trainer unchanged.
    """

    def __init__(self, *args, target_epsilon=None, noise_multiplier=None, target_delta=None, max_grad_norm=1.0,
                 clipping_fn="abadi", clipping_style="all-layer", accountant="rdp", seed=None, **kwargs):
        model = kwargs.get("model", args[0] if args else None)
        if model is None:
            raise ValueError("PrivateTrainer: give the model (model_init is not supported)")
        # A padding-free collator packs the micro-batch's examples into one row, each its own
        # sequence: the engine clips sequence by sequence (bk.packed_sequences())
        self._packed = isinstance(kwargs.get("data_collator"), transformers.DataCollatorWithFlattening)
        convert(model)  # in place: Trainer sees the same module, Parameters and state_dict keys
        super().__init__(*args, **kwargs)
        targs = self.args
        if targs.world_size > 1:
            raise NotImplementedError("PrivateTrainer: one process only for now; for data-parallel or FSDP2-sharded "
                                      "private training use bk.distributed.DistributedPrivacyEngine in your own loop "
                                      "(examples/private_ddp.py, examples/private_fsdp.py)")
        if targs.fp16:
            raise NotImplementedError("PrivateTrainer: fp16 (GradScaler) is not supported yet; use bf16=True")
        if targs.max_grad_norm:
            if targs.max_grad_norm != 1.0:  # 1.0 is TrainingArguments' default
                warnings.warn(f"PrivateTrainer: args.max_grad_norm={targs.max_grad_norm} is ignored: examples are "
                              f"clipped to max_grad_norm={max_grad_norm} (R) before the noise instead", stacklevel=2)
            targs.max_grad_norm = 0.0  # Trainer must not clip the noisy sum
        if self.train_dataset is None:
            raise ValueError("PrivateTrainer: give a train_dataset (its size is the accountant's sample size)")
        self._sample_size = len(self.train_dataset)
        self._micro_batches = targs.gradient_accumulation_steps
        batch_size = targs.per_device_train_batch_size * self._micro_batches
        if batch_size > self._sample_size:
            raise ValueError(f"PrivateTrainer: the expected batch size per_device_train_batch_size x "
                             f"gradient_accumulation_steps = {batch_size} exceeds the {self._sample_size} examples")
        self._steps_per_epoch = epoch_steps(batch_size / self._sample_size)
        planned = targs.max_steps if targs.max_steps > 0 else math.ceil(targs.num_train_epochs * self._steps_per_epoch)
        self.engine = PrivacyEngine(self.model, batch_size=batch_size, sample_size=self._sample_size,
                                    steps=planned if target_epsilon is not None else None,
                                    target_epsilon=target_epsilon, noise_multiplier=noise_multiplier,
                                    target_delta=target_delta, max_grad_norm=max_grad_norm, clipping_fn=clipping_fn,
                                    clipping_style=clipping_style, accountant=accountant, seed=seed)
        if self._packed:
            self.engine.example_rows(packed.packed_sequences())
        # The sampling seed: given, or secret (saved in checkpoints, as the noise seed is).
        self._sampling_seed = seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        self._sampler = None
        self.add_callback(_EpsilonOnTheBar(self))
        self._causal = bool(getattr(self.model, "can_generate", lambda: False)()) and not getattr(
            self.model.config, "is_encoder_decoder", False)

    # ------------------------------------------------------------ data

    def get_train_dataloader(self):
        dataset = self.train_dataset
        try:
            import datasets
            if isinstance(dataset, datasets.Dataset):
                dataset = self._remove_unused_columns(dataset, description="training")
        except ImportError:
            pass
        self._sampler = PoissonMicroBatchSampler(len(dataset), self.engine.sample_rate, self._steps_per_epoch,
                                                 self._micro_batches, self._sampling_seed)
        loader = DataLoader(dataset, batch_sampler=self._sampler, collate_fn=_EmptySafeCollate(dataset,
                                                                                               self.data_collator),
                            num_workers=self.args.dataloader_num_workers, pin_memory=self.args.dataloader_pin_memory)
        return self.accelerator.prepare(loader)

    # ------------------------------------------------------------ step

    def create_optimizer(self, model=None):
        """Trainer's optimizer (made here, or given through optimizers=), attached to the engine
        before accelerate wraps it: its step() adds the noise and divides by the batch size."""
        optimizer = super().create_optimizer(model)
        if self.engine._optimizer is None:
            self.engine.attach(self.optimizer)
        return optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The mean over the micro-batch's examples of each example's own loss."""
        labels = inputs.get("labels")
        if labels is None:  # the model's own loss: it must be a mean over examples
            return super().compute_loss(model, inputs, return_outputs=return_outputs)
        forward = {k: v for k, v in inputs.items() if k != "labels"}
        if self._packed and "use_cache" not in forward and getattr(self.model.config, "use_cache", None):
            forward["use_cache"] = False  # a cache would turn off transformers' packed-sequence masks
        outputs = model(**forward)
        losses = example_losses(outputs.logits, labels, self._causal,
                                position_ids=inputs.get("position_ids") if self._packed else None)
        loss = losses.sum() / max(len(losses), 1)  # an empty micro-batch: 0, not nan
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        """Forward and backward of one micro-batch. loss.backward() itself, not the accelerator's
        (which divides by the accumulation steps): the engine recovers every example's gradient
        from the micro-batch's mean loss, and divides the noisy sum by the expected batch size."""
        if self.engine._optimizer is None:  # never train on clipped sums without the noise
            raise RuntimeError("PrivateTrainer: the optimizer is not attached to the privacy engine (was "
                               "create_optimizer overridden without calling PrivateTrainer's?)")
        model.train()
        inputs = self._prepare_inputs(inputs)
        with self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        loss.backward()
        return loss.detach() / self._micro_batches  # Trainer sums the micro-batches' values for its log

    # ------------------------------------------------------------ logs and checkpoints

    def log(self, logs, *args, **kwargs):
        logs = dict(logs, epsilon=self.engine.epsilon()) if self.engine.steps else dict(logs)
        return super().log(logs, *args, **kwargs)

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        folder = os.path.join(self._get_output_dir(trial=trial),
                              f"{transformers.trainer_utils.PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        torch.save({"engine": self.engine.state_dict(), "sampling_seed": self._sampling_seed},
                   os.path.join(folder, ENGINE_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, ENGINE_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(f"PrivateTrainer: {path} is missing: this checkpoint was not written by a "
                                    "PrivateTrainer, so its privacy state (noise, accountant) cannot be resumed")
        state = torch.load(path, weights_only=False)
        self.engine.load_state_dict(state["engine"])
        self._sampling_seed = state["sampling_seed"]
        if self._sampler is not None:
            self._sampler.seed = self._sampling_seed


__all__ = ["PoissonMicroBatchSampler", "PrivateTrainer", "example_losses"]
