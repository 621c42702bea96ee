"""bk_kernels.hf.PrivateTrainer: Hugging Face's Trainer, private. The same seeds give the same
parameters as our own loop (Poisson batches split into the accumulation steps' micro-batches,
per-example mean losses, one engine step per batch); epsilon is logged; a resumed run takes the
steps of the uninterrupted one."""
import copy
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

import bk_kernels as bk  # noqa: E402
from bk_kernels.hf import PoissonMicroBatchSampler, PrivateTrainer, example_losses  # noqa: E402

N, T, VOCAB = 40, 6, 23


class Texts(torch.utils.data.Dataset):
    def __init__(self):
        gen = torch.Generator().manual_seed(3)
        self.ids = torch.randint(0, VOCAB, (N, T), generator=gen)

    def __len__(self):
        return N

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config).double()


def _args(tmp_path, **extra):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=4,
                learning_rate=0.5, lr_scheduler_type="constant", report_to=[], use_cpu=True, logging_steps=1,
                save_strategy="no", disable_tqdm=True, seed=0)
    base.update(extra)
    return transformers.TrainingArguments(**base)


def _trainer(model, tmp_path, **extra):
    sgd = torch.optim.SGD(model.parameters(), lr=0.5)
    return PrivateTrainer(model=model, args=_args(tmp_path, **extra), train_dataset=Texts(),
                          data_collator=transformers.default_data_collator, optimizers=(sgd, None),
                          noise_multiplier=0.7, max_grad_norm=0.3, seed=11)


def own_loop(model, steps, per_device=4, micro=2, pairs=False):
    """The same training written with the engine directly (pairs: DPO on Pairs, each pair's
    chosen and rejected rows stacked in one forward)."""
    bk.convert(model)
    batch_size = per_device * micro
    engine = bk.PrivacyEngine(model, batch_size=batch_size, sample_size=N, noise_multiplier=0.7, max_grad_norm=0.3,
                              seed=11)
    opt = engine.attach(torch.optim.SGD(model.parameters(), lr=0.5))
    if pairs:
        engine.example_rows(bk.stacked_rows(2))
    epoch_steps = round(N / batch_size)
    sampler = PoissonMicroBatchSampler(N, batch_size / N, epoch_steps, micro, 11)
    data = Pairs() if pairs else Texts()
    for step in range(steps):
        epoch, i = divmod(step, epoch_steps)
        for part in torch.tensor_split(sampler.sample(epoch, i), micro):
            if pairs:
                losses = dpo_losses(model, data.ids[part], data.rejected[part])
            else:
                ids = data.ids[part]
                losses = example_losses(model(input_ids=ids).logits, ids, causal=True)
            (losses.sum() / max(len(losses), 1)).backward()
        opt.step()
        opt.zero_grad()
    return engine


class Pairs(Texts):
    """Preference pairs: each text as the chosen sequence, a shuffle of it as the rejected one."""

    def __init__(self):
        super().__init__()
        self.rejected = self.ids[:, torch.randperm(T, generator=torch.Generator().manual_seed(4))]

    def __getitem__(self, i):
        return {"chosen": self.ids[i], "rejected": self.rejected[i]}


def dpo_losses(model, chosen, rejected):
    """Each pair's DPO loss (no reference model), from ONE forward of [chosen; rejected]."""
    rows = torch.cat([chosen, rejected])
    logp = torch.log_softmax(model(input_ids=rows).logits[:, :-1], -1).gather(2, rows[:, 1:, None]).sum((1, 2))
    return -torch.nn.functional.logsigmoid(0.5 * (logp[:len(chosen)] - logp[len(chosen):]))


class DPOTrainer(PrivateTrainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        losses = dpo_losses(model, inputs["chosen"], inputs["rejected"])
        return losses.sum() / max(len(losses), 1)


def test_trainer_takes_the_steps_of_our_own_loop(tmp_path):
    model = tiny_gpt2()
    reference = copy.deepcopy(model)
    trainer = _trainer(model, tmp_path)
    trainer.train()
    engine = own_loop(reference, 4)
    assert trainer.engine.steps == engine.steps == 4
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(a, b), name
    logged = [h for h in trainer.state.log_history if "epsilon" in h]
    assert logged and logged[-1]["epsilon"] == pytest.approx(engine.epsilon())
    assert trainer.args.max_grad_norm == 0  # Trainer's own clipping of the noisy sum is off


def test_a_dpo_trainer_with_example_rows_takes_the_steps_of_our_own_loop(tmp_path):
    """A PrivateTrainer subclass whose compute_loss runs each micro-batch's pairs as stacked rows,
    with trainer.engine.example_rows(bk.stacked_rows(2)): our own loop's steps, bit for bit, and
    each step counts pairs (not rows) as its examples."""
    model = tiny_gpt2()
    reference = copy.deepcopy(model)
    sgd = torch.optim.SGD(model.parameters(), lr=0.5)
    trainer = DPOTrainer(model=model, args=_args(tmp_path, remove_unused_columns=False), train_dataset=Pairs(),
                         data_collator=transformers.default_data_collator, optimizers=(sgd, None),
                         noise_multiplier=0.7, max_grad_norm=0.3, seed=11)
    trainer.engine.example_rows(bk.stacked_rows(2))
    counted = []
    count = trainer.engine._count_examples
    trainer.engine._count_examples = lambda: (counted.append(trainer.engine._examples), count())
    trainer.train()
    engine = own_loop(reference, 4, pairs=True)
    assert trainer.engine.steps == engine.steps == 4
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(a, b), name
    sampler = PoissonMicroBatchSampler(N, 8 / N, round(N / 8), 2, 11)
    assert counted == [len(sampler.sample(*divmod(step, round(N / 8)))) for step in range(4)]


def test_empty_micro_batches_take_their_step(tmp_path):
    """A Poisson batch smaller than gradient_accumulation_steps leaves micro-batches empty, and
    Hugging Face's attention cannot run zero examples (a view of 0 elements with a -1): the
    engine runs such a forward on one all-zero padding example whose backward it drops."""
    sampler = PoissonMicroBatchSampler(N, 4 / N, 10, 4, 11)
    assert any(len(part) == 0 for part in sampler)  # the case under test does occur in these steps
    model = tiny_gpt2()
    reference = copy.deepcopy(model)
    trainer = _trainer(model, tmp_path, per_device_train_batch_size=1, gradient_accumulation_steps=4, max_steps=10)
    trainer.train()
    engine = own_loop(reference, 10, per_device=1, micro=4)
    assert trainer.engine.steps == engine.steps == 10
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(a, b), name


def test_resume_from_a_checkpoint_takes_the_uninterrupted_steps(tmp_path):
    full = tiny_gpt2()
    resumed = copy.deepcopy(full)
    _trainer(full, tmp_path / "full", max_steps=6).train()
    first = _trainer(resumed, tmp_path / "resumed", max_steps=6, save_strategy="steps", save_steps=3)
    first.train()  # saves at steps 3 and 6
    again = _trainer(tiny_gpt2(), tmp_path / "resumed", max_steps=6)
    again.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-3"))
    assert again.engine.steps == 6
    for (name, a), b in zip(again.model.named_parameters(), full.parameters()):
        assert torch.equal(a, b), name


def test_sampler_splits_every_poisson_batch_into_the_accumulation_steps():
    sampler = PoissonMicroBatchSampler(1000, 0.05, 20, 3, seed=5)
    parts = list(sampler)
    assert len(parts) == len(sampler) == 60
    sizes = [sum(len(p) for p in parts[i:i + 3]) for i in range(0, 60, 3)]
    assert abs(sum(sizes) / 20 - 50) < 10  # expected batch size q N = 50
    sampler.set_epoch(1)
    assert list(sampler) != parts  # a fresh sample every epoch
    sampler.set_epoch(0)
    assert list(sampler) == parts  # ... and the same one for the same (seed, epoch, step)


class RaggedTexts(Texts):
    """Texts of 2 to T tokens (no padding in the dataset: a padding-free collator packs them)."""

    def __init__(self):
        super().__init__()
        self.lengths = torch.randint(2, T + 1, (N,), generator=torch.Generator().manual_seed(5)).tolist()

    def __getitem__(self, i):
        ids = self.ids[i, :self.lengths[i]].tolist()
        return {"input_ids": ids, "labels": ids}


def padded_loop(model, steps, per_device=4, micro=2):
    """own_loop on RaggedTexts, each example its own row: right-padded, attention_mask, labels -100."""
    bk.convert(model)
    batch_size = per_device * micro
    engine = bk.PrivacyEngine(model, batch_size=batch_size, sample_size=N, noise_multiplier=0.7, max_grad_norm=0.3,
                              seed=11)
    opt = engine.attach(torch.optim.SGD(model.parameters(), lr=0.5))
    epoch_steps = round(N / batch_size)
    sampler = PoissonMicroBatchSampler(N, batch_size / N, epoch_steps, micro, 11)
    data = RaggedTexts()
    for step in range(steps):
        epoch, i = divmod(step, epoch_steps)
        for part in torch.tensor_split(sampler.sample(epoch, i), micro):
            ids = torch.zeros(len(part), T, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, k in enumerate(part.tolist()):
                ids[row, :data.lengths[k]], mask[row, :data.lengths[k]] = data.ids[k, :data.lengths[k]], 1
            logits = model(input_ids=ids, attention_mask=mask).logits
            losses = example_losses(logits, ids.masked_fill(mask == 0, -100), causal=True)
            (losses.sum() / max(len(losses), 1)).backward()
        opt.step()
        opt.zero_grad()
    return engine


def test_a_padding_free_collator_trains_each_packed_sequence_as_an_example(tmp_path):
    """DataCollatorWithFlattening packs each micro-batch into one row: each sequence is clipped as
    one example (bk.packed_sequences()), so the steps are those of each example in its own padded
    row (to float64 rounding: the sums run in another order), empty micro-batches included."""
    model = tiny_gpt2()
    reference = copy.deepcopy(model)
    sgd = torch.optim.SGD(model.parameters(), lr=0.5)
    trainer = PrivateTrainer(model=model, args=_args(tmp_path, per_device_train_batch_size=2,
                                                     gradient_accumulation_steps=3, max_steps=5),
                             train_dataset=RaggedTexts(), data_collator=transformers.DataCollatorWithFlattening(),
                             optimizers=(sgd, None), noise_multiplier=0.7, max_grad_norm=0.3, seed=11)
    counted = []
    count = trainer.engine._count_examples
    trainer.engine._count_examples = lambda: (counted.append(trainer.engine._examples), count())
    trainer.train()
    engine = padded_loop(reference, 5, per_device=2, micro=3)
    assert trainer.engine.steps == engine.steps == 5
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=name)
    sampler = PoissonMicroBatchSampler(N, 6 / N, round(N / 6), 3, 11)
    assert any(len(part) == 0 for part in sampler)  # empty micro-batches occur in these steps
    assert counted == [len(sampler.sample(*divmod(step, round(N / 6)))) for step in range(5)]


def test_refuses_what_it_cannot_do_privately(tmp_path):
    with pytest.raises(ValueError, match="exactly one of target_epsilon and noise_multiplier"):
        PrivateTrainer(model=tiny_gpt2(), args=_args(tmp_path), train_dataset=Texts())
    with pytest.raises(ValueError, match="exceeds"):
        PrivateTrainer(model=tiny_gpt2(), args=_args(tmp_path, per_device_train_batch_size=32), train_dataset=Texts(),
                       noise_multiplier=1.0)


def test_target_epsilon_is_met_over_the_planned_steps(tmp_path):
    trainer = PrivateTrainer(model=tiny_gpt2(), args=_args(tmp_path, max_steps=5), train_dataset=Texts(),
                             data_collator=transformers.default_data_collator, target_epsilon=8.0, seed=2)
    trainer.train()
    assert trainer.engine.steps == 5
    assert 0.99 * 8.0 * 0.98 <= trainer.engine.epsilon() <= 8.0 + 1e-9
    assert not math.isnan(trainer.state.log_history[-1]["train_loss"])


def test_example_losses_match_hugging_face_where_they_must():
    """Without ignored labels every example has T-1 tokens: the mean of the per-example losses is
    the model's own loss. With ignored labels each example is averaged over its own tokens."""
    model = tiny_gpt2()
    ids = Texts().ids[:5]
    out = model(input_ids=ids, labels=ids)
    torch.testing.assert_close(example_losses(out.logits, ids, causal=True).mean(), out.loss.float(), rtol=1e-6,
                               atol=0)
    labels = ids.clone()
    labels[0, 3:] = -100
    mine = example_losses(out.logits, labels, causal=True)
    first = torch.nn.functional.cross_entropy(out.logits[0, :2].float(), ids[0, 1:3])  # its 2 labelled tokens
    torch.testing.assert_close(mine[0], first)
    classes = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    torch.testing.assert_close(example_losses(classes, torch.tensor([0, 1]), causal=False),
                               torch.nn.functional.cross_entropy(classes, torch.tensor([0, 1]), reduction="none"))
