"""One example laid out as several rows of the batch (PrivacyEngine.example_rows): DPO's
concatenation of chosen and rejected sequences, augmentation multiplicity, and any ids.

The reference is independent of the engine: example e's rows are picked by a Python loop over
the ids, its loss computed on those rows alone and backpropagated alone in float64; one private
SGD(lr=1) step without noise must move every parameter by -(1/E) sum_e C_e g_e."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bk_kernels as bk
from python_tests import zoo
from python_tests.model_reference import assert_updates_close, expected_update

DT = torch.float64


def reference_grads(model, loss_of_rows, batch, ids):
    """[{name: grad}] per example: example e = the rows whose id is the e-th smallest value."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    out = []
    for label in sorted(set(ids)):
        rows = torch.tensor([r for r, v in enumerate(ids) if v == label])
        model.zero_grad(set_to_none=True)
        loss_of_rows(model, {k: v[rows] for k, v in batch.items()}).backward()
        out.append({n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in params.items()})
    return out


def private_step(model, loss_of_rows, batch, rows_spec, examples, **engine_kwargs):
    """(update, engine) of one private step on a converted copy, rows grouped by rows_spec;
    loss_of_rows gives the batch's MEAN loss over its examples."""
    model = bk.convert(copy.deepcopy(model))
    engine = bk.PrivacyEngine(model, batch_size=examples, sample_size=10 * examples, noise_multiplier=0.0,
                              **engine_kwargs)
    optimizer = engine.attach(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0))
    with engine.example_rows(rows_spec):
        loss_of_rows(model, batch).backward()
    optimizer.step()
    return {n: -p.grad.detach() for n, p in model.named_parameters() if p.requires_grad}, engine


def check(model, loss_of_rows, batch, ids, rows_spec=None, R=None, rtol=1e-9, **engine_kwargs):
    """The private step equals the per-example reference; R defaults to the median norm."""
    grads = reference_grads(copy.deepcopy(model), loss_of_rows, batch, ids)
    norms = sorted(sum(g.square().sum().item() for g in ex.values()) ** 0.5 for ex in grads)
    R = R if R is not None else norms[len(norms) // 2]
    names = list(grads[0])
    want = expected_update(grads, [names], R, "abadi", len(grads))
    got, engine = private_step(model, loss_of_rows, batch, rows_spec if rows_spec is not None else torch.tensor(ids),
                               len(grads), max_grad_norm=R, **engine_kwargs)
    assert_updates_close(got, want, rtol)
    return engine


# ---------------------------------------------------------------- DPO: chosen then rejected


class TinyLM(nn.Module):
    """Embedding tied to the output layer (a cross term per example), LayerNorm, MLP."""

    def __init__(self, vocab=23, d=12):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        h = self.embed(ids)
        return self.head(self.norm(h + self.mlp(h)))


def sequence_logp(model, ids):
    logits = model(ids) if not hasattr(model, "config") else model(input_ids=ids).logits
    lp = F.log_softmax(logits[:, :-1], -1)
    return lp.gather(2, ids[:, 1:, None]).squeeze(2).sum(1)


def dpo_loss(model, batch):
    """TRL's concatenated forward: rows [chosen; rejected], the loss a mean over the pairs."""
    lp = sequence_logp(model, batch["ids"])
    n = lp.shape[0] // 2
    return -F.logsigmoid(0.3 * (lp[:n] - lp[n:])).mean()


@pytest.mark.parametrize("B", [1, 4])
def test_dpo_pairs_are_clipped_as_one_example(B):
    torch.manual_seed(B)
    model = TinyLM().to(DT)
    ids = torch.randint(0, 23, (2 * B, 7))
    check(model, dpo_loss, {"ids": ids}, list(range(B)) * 2, rows_spec=bk.stacked_rows(2))
    # the same pairs as explicit ids whose order is not the rows': gathered, not sliced
    labels = list(range(B))[::-1] * 2  # example 0 is rows B - 1 and 2B - 1
    assert B == 1 or bk.example_rows.resolve(torch.tensor(labels), 2 * B).copies is None
    check(model, dpo_loss, {"ids": ids}, labels)


# 4 pairs: the mean's 1/4 is exact in the float32 RMSNorms inside HF's float64 Llama and Mixtral
# (with 3, their rounding of a 1/3-scaled gradient differs from one example's alone: 1e-7)
@pytest.mark.parametrize("build", [zoo.gpt2, zoo.llama])
def test_dpo_on_gpt2_and_llama(build):
    torch.manual_seed(0)
    ids = torch.randint(0, zoo.VOCAB, (8, 5))
    check(build(), dpo_loss, {"ids": ids}, [0, 1, 2, 3] * 2, rows_spec=bk.stacked_rows(2))


def test_dpo_on_mixtral_experts():
    """Routed experts (ExpertsUse): each routed row is relabelled with its pair's example."""
    torch.manual_seed(0)
    ids = torch.randint(0, zoo.VOCAB, (8, 5))
    check(zoo.mixtral(), dpo_loss, {"ids": ids}, [0, 1, 2, 3] * 2, rows_spec=bk.stacked_rows(2))


def test_chosen_and_rejected_as_two_forwards_need_no_setting():
    """Row b of each of two forwards is example b: one backward of their joint loss is exact as
    it is (a parameter used twice per example: the cross terms); and under the same setting
    (each forward stacked pairs) the two forwards' rows match and are accepted."""
    torch.manual_seed(9)
    model = TinyLM().to(DT)
    chosen, rejected = torch.randint(0, 23, (3, 7)), torch.randint(0, 23, (3, 7))

    def two_forwards(m, batch):
        return -F.logsigmoid(0.3 * (sequence_logp(m, batch["chosen"]) - sequence_logp(m, batch["rejected"]))).mean()
    check(model, two_forwards, {"chosen": chosen, "rejected": rejected}, [0, 1, 2], rows_spec=bk.interleaved_rows(1))

    def four_forwards(m, batch):  # each a stacked pair batch of the same examples
        return dpo_loss(m, {"ids": batch["ids"]}) + dpo_loss(m, {"ids": batch["ids"].flip(1)})
    check(model, four_forwards, {"ids": torch.cat([chosen, rejected])}, [0, 1, 2] * 2, rows_spec=bk.stacked_rows(2))


def test_row_by_row_clipping_is_not_the_reference():
    """Without example_rows each row is clipped alone: the test above would fail (it can)."""
    torch.manual_seed(1)
    model = TinyLM().to(DT)
    batch = {"ids": torch.randint(0, 23, (6, 7))}
    with pytest.raises(AssertionError):
        check(model, dpo_loss, batch, [0, 1, 2] * 2, rows_spec=bk.interleaved_rows(1))


# ---------------------------------------------------------------- augmentation multiplicity


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.norm = nn.GroupNorm(2, 6)
        self.conv2 = nn.Conv2d(6, 8, 3, stride=2)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        h = F.relu(self.norm(self.conv1(x)))
        return self.fc(F.relu(self.conv2(h)).mean((2, 3)))


def multiplicity_loss(model, batch):
    """Each example's loss is the mean over its augmentations; the batch's the mean over examples."""
    per_row = F.cross_entropy(model(batch["x"]), batch["y"], reduction="none")
    ids = batch["ids"]
    _, example = torch.unique(ids, return_inverse=True)
    counts = torch.bincount(example).to(per_row.dtype)
    return (per_row / counts[example]).sum() / len(counts)


# interleaved: each example's rows consecutive (a view); permuted: as many rows each, in no
# order (a gather); ragged: 3, 2, 2, 3 rows (zero rows pad the smaller examples)
@pytest.mark.parametrize("spec", ["interleaved", "permuted", "ragged"])
def test_augmentation_multiplicity_on_a_cnn(spec):
    torch.manual_seed(2)
    model = SmallCNN().to(DT)
    ids = {"interleaved": [0, 0, 0, 1, 1, 1, 2, 2, 2], "permuted": [2, 0, 1, 1, 0, 2, 1, 0, 2],
           "ragged": [5, 2, 5, 9, 2, 5, 7, 7, 9, 5]}[spec]
    n = len(ids)
    batch = {"x": torch.randn(n, 3, 8, 8, dtype=DT), "y": torch.randint(0, 4, (n,)), "ids": torch.tensor(ids)}
    check(model, multiplicity_loss, batch, ids, rows_spec=bk.interleaved_rows(3) if spec == "interleaved" else None)


def test_weight_standardized_convolutions_and_the_generic_path():
    """timm's StdConv2d (a map of the weight: TransformedUse) and a module on the generic path
    (its own Parameter used inline: per-example gradients summed per example)."""
    timm = pytest.importorskip("timm")

    class Inline(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = nn.Parameter(torch.randn(4))

        def forward(self, h):
            return h * torch.sigmoid(self.gate)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = timm.layers.StdConv2d(3, 4, 3)
            self.inline = Inline()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(self.inline(self.conv(x).mean((2, 3))))

    torch.manual_seed(3)
    ids = [1, 0, 1, 2, 0, 2, 2]
    batch = {"x": torch.randn(7, 3, 6, 6, dtype=DT), "y": torch.randint(0, 3, (7,)), "ids": torch.tensor(ids)}
    model = Net().to(DT)
    assert [p for p, _, _ in bk.generic_modules(bk.convert(copy.deepcopy(model)))] == ["inline"]
    check(model, multiplicity_loss, batch, ids)


# ---------------------------------------------------------------- how it is told, and refused


def attached_tiny_lm(seed, batch_size, noise_multiplier=1.0):
    """(a converted TinyLM, its engine, SGD attached to it)."""
    torch.manual_seed(seed)
    model = bk.convert(TinyLM().to(DT))
    engine = bk.PrivacyEngine(model, batch_size=batch_size, sample_size=10 * batch_size,
                              noise_multiplier=noise_multiplier)
    return model, engine, engine.attach(torch.optim.SGD(model.parameters(), lr=0.1))


def test_forward_under_the_setting_backward_outside_still_groups():
    """A backward uses the rows of the forward it goes through: leaving the `with` between
    forward and backward must not fall back to row-by-row clipping."""
    torch.manual_seed(4)
    model = bk.convert(TinyLM().to(DT))
    engine = bk.PrivacyEngine(model, batch_size=3, sample_size=30, noise_multiplier=0.0, max_grad_norm=1e-3)
    engine.attach(torch.optim.SGD(model.parameters(), lr=1.0))
    ids = torch.randint(0, 23, (6, 7))
    with engine.example_rows(bk.stacked_rows(2)):
        loss = dpo_loss(model, {"ids": ids})
    assert engine._example_rows is None  # restored on exit
    loss.backward()
    assert engine._examples == 3
    total = sum(p.grad.square().sum() for p in model.parameters()).sqrt().item()
    # 3 examples clipped to 1e-3 each, then the mean's scale x 3: at most 3e-3 (rows alone: 6e-3)
    assert total <= 3e-3 * (1 + 1e-9)


def test_the_setting_persists_without_with_and_counts_examples():
    model, engine, optimizer = attached_tiny_lm(5, 2)
    engine.example_rows(bk.interleaved_rows(2))  # a Trainer runs the forwards: set once
    for B in (2, 3):
        dpo = torch.randint(0, 23, (2 * B, 7))
        dpo_loss(model, {"ids": dpo}).backward()
        assert engine._examples == B
        optimizer.step()
        optimizer.zero_grad()
    engine.example_rows(None)
    dpo_loss(model, {"ids": torch.randint(0, 23, (4, 7))}).backward()
    assert engine._examples == 4


def test_wrong_ids_are_refused_before_anything_runs():
    model, engine, optimizer = attached_tiny_lm(6, 2)
    before = [p.detach().clone() for p in model.parameters()]
    ids = torch.randint(0, 23, (5, 7))
    with engine.example_rows(torch.tensor([0, 0, 1, 1])):
        with pytest.raises(bk.UnsupportedLayoutError, match="4 example ids for a batch of 5 rows"):
            model(ids)
    with engine.example_rows(bk.stacked_rows(2)):
        with pytest.raises(bk.UnsupportedLayoutError, match="5 rows, not a multiple of 2"):
            model(ids)
    with pytest.raises(TypeError, match="1-D integer tensor"):
        engine.example_rows(torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="positive int"):
        bk.stacked_rows(0)
    with pytest.raises(RuntimeError, match="without a backward"):
        optimizer.step()
    assert engine.steps == 0 and engine.epsilon() == 0.0
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_one_backward_through_forwards_of_different_settings_is_refused():
    model, engine, optimizer = attached_tiny_lm(10, 2)
    ids = torch.randint(0, 23, (4, 7))
    with engine.example_rows(bk.stacked_rows(2)):
        first = dpo_loss(model, {"ids": ids})
    second = dpo_loss(model, {"ids": ids})  # one row per example
    with pytest.raises(bk.UnsupportedLayoutError, match="different example_rows settings"):
        (first + second).backward()
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(RuntimeError, match="without a backward"):
        optimizer.step()


def test_an_empty_batch_under_the_setting_steps_on_noise_only():
    model, engine, optimizer = attached_tiny_lm(7, 2, noise_multiplier=0.0)
    before = [p.detach().clone() for p in model.parameters()]
    with engine.example_rows(bk.stacked_rows(2)):
        out = model(torch.zeros(0, 7, dtype=torch.long))
        assert out.shape[0] == 0
        out.sum().backward()
    optimizer.step()
    assert engine.steps == 1
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_verify_takes_example_rows():
    torch.manual_seed(8)
    model = TinyLM().to(DT)
    batch = {"ids": torch.randint(0, 23, (6, 7))}
    report = bk.verify(model, dpo_loss, batch, example_rows=bk.stacked_rows(2))
    assert report.ok and report.batch_size == 3, str(report)
    assert not bk.verify(model, lambda m, b: dpo_loss(m, b) if len(b["ids"]) > 1 else sequence_logp(m, b["ids"]).sum(),
                         batch).ok
