"""bk_kernels.data: Poisson sampling (statistics, independence, length, randomness, empty
batches, bad arguments) and micro-batching (structure, views, errors, and exactness with the
PrivacyEngine: one step over micro-batches equals one step over the whole batch).

The statistical checks run on fixed seeds, so they are deterministic; each bound is set at 6 or
more standard errors, where a correct sampler would fail for at most ~1e-7 of all seeds, while
each deliberately wrong sampler below fails by a wide margin.
"""
import copy
import math
from collections import namedtuple

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

import bk_kernels as bk
from bk_kernels import accounting, data

DT = torch.float64
N, Q = 1000, 0.05   # dataset size and rate of the statistical checks: expected batch size 50
K = 2000            # batches drawn (100 epochs of 20 steps): each example is expected in K*Q = 100


def poisson_violations(batches, n, q):
    """The names of the checks that `batches` (lists of indices into range(n)) fail as
    independent Poisson samples of rate q; [] if they pass all."""
    k = len(batches)
    fails = []
    if any(len(set(b)) != len(b) for b in batches):
        fails.append("duplicate index in a batch")
    x = torch.zeros(k, n, dtype=DT)  # x[t, j] = 1 if example j is in batch t
    for t, b in enumerate(batches):
        x[t, torch.as_tensor(b, dtype=torch.long)] = 1
    sizes = x.sum(1)
    var = n * q * (1 - q)  # a batch size is Binomial(n, q)
    # Mean batch size: the mean of k iid Binomial(n, q) has standard error sqrt(var / k).
    if abs(sizes.mean().item() - n * q) > 6 * math.sqrt(var / k):
        fails.append("mean batch size")
    # Batch-size variance: the sample variance S2 of k iid draws with variance var and excess
    # kurtosis (1 - 6q(1-q)) / var has sd var * sqrt(2 / (k-1) + kurtosis / k).
    sd_s2 = var * math.sqrt(2 / (k - 1) + (1 - 6 * q * (1 - q)) / (var * k))
    if abs(sizes.var().item() - var) > 6 * sd_s2:
        fails.append("batch size variance")
    # Each example's count c_j is Binomial(k, q), independent across examples.
    # z_j = (c_j - kq) / sqrt(kq(1-q)); P(|z_j| > 7) < 6e-11 for k=2000, q=0.05 (exact binomial
    # tail), so below 1e-7 over 1000 examples. An example never sampled has z = -10.3.
    vc = k * q * (1 - q)
    z = (x.sum(0) - k * q) / math.sqrt(vc)
    if z.abs().max().item() > 7:
        fails.append("an example's inclusion count")
    # sum_j z_j^2 has mean n and variance n * (2 + (1 - 6q(1-q)) / vc): rates that vary across
    # examples inflate it, deterministic schedules (each example once per epoch) deflate it.
    if abs((z ** 2).sum().item() - n) > 6 * math.sqrt(n * (2 + (1 - 6 * q * (1 - q)) / vc)):
        fails.append("spread of the inclusion counts")
    # Independence between consecutive batches: the lag-1 correlation of each example's
    # inclusion, pooled over examples, is a sum of n(k-1) uncorrelated terms: sd 1/sqrt(n(k-1)).
    p = x.mean()
    y = x - p
    r = ((y[1:] * y[:-1]).sum() / (n * (k - 1) * p * (1 - p))).item()
    if abs(r) > 6 / math.sqrt(n * (k - 1)):
        fails.append("correlation between consecutive batches")
    return fails


def indices_of(loader, epochs):
    """Batches of a loader over TensorDataset(arange(n)), as lists of example indices."""
    return [batch[0].tolist() for _ in range(epochs) for batch in loader]


def index_dataset(n=N):
    return TensorDataset(torch.arange(n))


# ---------------------------------------------------------------- sampling statistics

def test_poisson_loader_passes_the_statistical_checks():
    loader = data.poisson_loader(index_dataset(), batch_size=int(N * Q), seed=0)
    assert len(loader) == 20
    assert poisson_violations(indices_of(loader, K // 20), N, Q) == []


def _fixed_size_shuffled():
    # The plain DataLoader the docstring warns about: fixed size, each example once per epoch.
    loader = DataLoader(index_dataset(), batch_size=int(N * Q), shuffle=True)
    return indices_of(loader, K // 20)


def _fixed_size_independent(g):
    # Sampling WITHOUT replacement of a fixed size, a fresh sample every step.
    return [torch.randperm(N, generator=g)[:int(N * Q)].tolist() for _ in range(K)]


def _poisson(g, rates):
    return [torch.nonzero(torch.rand(N, generator=g, dtype=DT) < rates).flatten().tolist() for _ in range(K)]


def _repeated(g):
    # Correct marginals, but every batch is drawn twice in a row.
    batches = _poisson(g, torch.full((N,), Q, dtype=DT))[:K // 2]
    return [b for b in batches for _ in range(2)]


@pytest.mark.parametrize("name,make,must_fail", [
    ("plain shuffled DataLoader", lambda g: _fixed_size_shuffled(), "batch size variance"),
    ("fixed size, without replacement", _fixed_size_independent, "batch size variance"),
    ("rate 10% too high", lambda g: _poisson(g, torch.full((N,), 1.1 * Q, dtype=DT)), "mean batch size"),
    ("rate 10% too low", lambda g: _poisson(g, torch.full((N,), 0.9 * Q, dtype=DT)), "mean batch size"),
    ("last example never sampled", lambda g: _poisson(g, torch.cat([torch.full((N - 1,), Q, dtype=DT),
                                                                   torch.zeros(1, dtype=DT)])),
     "an example's inclusion count"),
    ("rates 0.8q / 1.2q, right on average",
     lambda g: _poisson(g, Q * torch.tensor([0.8, 1.2], dtype=DT).repeat(N // 2)),
     "spread of the inclusion counts"),
    ("each batch twice in a row", _repeated, "correlation between consecutive batches"),
])
def test_the_statistical_checks_catch_wrong_samplers(name, make, must_fail):
    torch.manual_seed(0)  # the plain DataLoader shuffles with the global RNG
    fails = poisson_violations(make(torch.Generator().manual_seed(0)), N, Q)
    assert must_fail in fails, f"{name}: {fails}"


def test_plain_shuffled_loader_also_fails_the_count_spread():
    # Each example exactly once per epoch: every count is K*Q, far less spread than Poisson's.
    torch.manual_seed(0)
    assert "spread of the inclusion counts" in poisson_violations(_fixed_size_shuffled(), N, Q)


# ---------------------------------------------------------------- length, epochs

@pytest.mark.parametrize("n,batch_size,steps", [(1000, 50, 20), (100, 3, 33), (7, 2, 4), (9, 6, 2), (10, 10, 1),
                                                (5, 1, 5)])
def test_len_is_round_of_one_over_q_and_an_epoch_has_that_many_batches(n, batch_size, steps):
    loader = data.poisson_loader(index_dataset(n), batch_size=batch_size, seed=0)
    assert len(loader) == steps == round(n / batch_size)
    assert sum(1 for _ in loader) == steps
    assert sum(1 for _ in loader) == steps  # and again for the next epoch


def test_sample_rate_and_batch_size_are_the_engine_s():
    ds = index_dataset(1000)
    loader = data.poisson_loader(ds, batch_size=37, seed=0)
    engine = bk.PrivacyEngine(bk.convert(nn.Linear(2, 2)), batch_size=37, sample_size=len(ds), noise_multiplier=1.0)
    assert loader.sample_rate == engine.sample_rate  # the same float: the accountant's q
    assert loader.expected_batch_size == pytest.approx(37, rel=1e-15)
    loader = data.poisson_loader(ds, sample_rate=0.25, seed=0)
    assert loader.sample_rate == 0.25 and loader.expected_batch_size == 250 and len(loader) == 4


def test_rate_one_takes_every_example_in_order():
    loader = data.poisson_loader(index_dataset(13), sample_rate=1.0, seed=0)
    assert indices_of(loader, 3) == [list(range(13))] * 3


# ---------------------------------------------------------------- randomness

def test_seed_reproduces_the_batches_and_epochs_differ():
    a = indices_of(data.poisson_loader(index_dataset(), batch_size=50, seed=3), 2)
    b = indices_of(data.poisson_loader(index_dataset(), batch_size=50, seed=3), 2)
    c = indices_of(data.poisson_loader(index_dataset(), batch_size=50, generator=torch.Generator().manual_seed(3)), 2)
    assert a == b == c
    assert a[:20] != a[20:]  # the second epoch draws new samples
    assert a != indices_of(data.poisson_loader(index_dataset(), batch_size=50, seed=4), 2)


def test_workers_get_the_same_batches():
    ds = index_dataset(200)
    a = indices_of(data.poisson_loader(ds, batch_size=20, seed=5), 1)
    b = indices_of(data.poisson_loader(ds, batch_size=20, seed=5, num_workers=2), 1)
    assert a == b


def test_without_a_seed_the_randomness_comes_from_the_os_not_torch(monkeypatch):
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        runs.append(indices_of(data.poisson_loader(index_dataset(), sample_rate=0.5), 1))
    assert runs[0] != runs[1]  # equal with probability 2^-20000
    torch.manual_seed(0)
    state = torch.get_rng_state()
    indices_of(data.poisson_loader(index_dataset(), sample_rate=0.5), 1)
    assert torch.equal(torch.get_rng_state(), state)  # torch's global RNG is left alone
    # ... and the seed is drawn from os.urandom: fixing it fixes the batches.
    monkeypatch.setattr(data.os, "urandom", lambda k: bytes(range(k)))
    x = indices_of(data.poisson_loader(index_dataset(), sample_rate=0.5), 1)
    y = indices_of(data.poisson_loader(index_dataset(), sample_rate=0.5), 1)
    assert x == y


# ---------------------------------------------------------------- empty batches

class Mixed(Dataset):
    Pair = namedtuple("Pair", "a b")

    def __len__(self):
        return 6

    def __getitem__(self, i):
        return {"x": torch.full((3, 5), float(i)), "ids": torch.arange(4) + i,
                "pair": self.Pair(torch.tensor(i, dtype=torch.float64), torch.zeros(2, dtype=torch.bool)),
                "tags": (torch.tensor([i], dtype=torch.int32), torch.ones(1, 2, dtype=torch.float16)),
                "text": f"example {i}", "label": i}


def _assert_same_structure(empty, full, path="batch"):
    assert type(empty) is type(full), path
    if isinstance(full, torch.Tensor):
        assert empty.shape == (0,) + full.shape[1:] and empty.dtype == full.dtype, path
    elif isinstance(full, dict):
        assert list(empty) == list(full), path
        for k in full:
            _assert_same_structure(empty[k], full[k], f"{path}[{k!r}]")
    elif all(isinstance(v, str) for v in full):  # per-example strings
        assert len(empty) == 0, path
    else:
        assert len(empty) == len(full), path
        for i, (e, f) in enumerate(zip(empty, full)):
            _assert_same_structure(e, f, f"{path}[{i}]")


def test_empty_batches_are_yielded_with_the_structure_of_real_ones():
    loader = data.poisson_loader(Mixed(), sample_rate=0.1, seed=0)  # P(empty) = 0.9^6 = 0.53
    batches = [b for _ in range(5) for b in loader]
    empty = [b for b in batches if b["x"].shape[0] == 0]
    full = [b for b in batches if b["x"].shape[0] > 0]
    assert empty and full
    assert isinstance(full[0]["pair"], Mixed.Pair) and full[0]["text"] and full[0]["label"].dtype == torch.int64
    for e in empty:
        _assert_same_structure(e, full[0])


def test_empty_batch_trains_end_to_end_and_the_step_counts():
    torch.manual_seed(0)
    ds = TensorDataset(torch.randn(20, 4, dtype=DT), torch.randint(0, 3, (20,)))
    loader = data.poisson_loader(ds, sample_rate=0.01, seed=0)  # P(empty) = 0.99^20 = 0.82
    x, y = next(b for b in loader if b[0].shape[0] == 0)
    assert x.shape == (0, 4) and x.dtype == DT and y.shape == (0,) and y.dtype == torch.int64
    model = bk.convert(nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).to(DT))
    engine = bk.PrivacyEngine(model, batch_size=1, sample_size=100, noise_multiplier=1.0, seed=0)
    opt = engine.attach(torch.optim.SGD(model.parameters(), lr=1.0))
    before = [p.detach().clone() for p in model.parameters()]
    F.cross_entropy(model(x), y).backward()  # the loss is nan (a mean over nothing); its gradient is empty
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())  # no example: zero sum
    opt.step()
    assert engine.steps == 1
    for p, b in zip(model.parameters(), before):  # the move is pure noise: nonzero, finite
        assert torch.isfinite(p).all() and not torch.equal(p.detach(), b)
    assert engine.epsilon() == accounting.epsilon(1.0, engine.sample_rate, 1, engine.target_delta) > 0


def test_empty_batch_through_micro_batches_still_steps():
    model = bk.convert(nn.Sequential(nn.Linear(4, 3)).to(DT))
    engine = bk.PrivacyEngine(model, batch_size=2, sample_size=10, noise_multiplier=1.0, seed=0)
    opt = engine.attach(torch.optim.SGD(model.parameters(), lr=1.0))
    chunks = list(data.micro_batches((torch.zeros(0, 4, dtype=DT), torch.zeros(0, dtype=torch.long)), 3))
    assert len(chunks) == 1
    for x, y in chunks:
        F.cross_entropy(model(x), y).backward()
    opt.step()
    assert engine.steps == 1


def _tiny_causal_lm(kind):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if kind == "gpt2":
        config = transformers.GPT2Config(vocab_size=17, n_positions=8, n_embd=8, n_layer=1, n_head=2)
        return transformers.GPT2LMHeadModel(config).to(DT)
    config = transformers.LlamaConfig(vocab_size=17, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1)
    return transformers.LlamaForCausalLM(config).to(DT)


def _private(model, noise):
    engine = bk.PrivacyEngine(bk.convert(model), batch_size=2, sample_size=10, noise_multiplier=noise, seed=5)
    return engine, engine.attach(torch.optim.SGD(model.parameters(), lr=1.0))


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("noise", [0.0, 1.0])
def test_empty_batch_steps_models_that_cannot_run_zero_examples(kind, noise):
    """Hugging Face's attention cannot run zero examples (`view(0, T, -1, head_dim)`). The engine
    runs an empty batch as one all-zero padding example, hands back outputs with no example,
    and keeps nothing of the padding's backward: the step moves the model exactly as a real
    batch whose examples all have zero gradients (the noise alone; nothing at all without it)."""
    model = _tiny_causal_lm(kind)
    reference, initial = copy.deepcopy(model), copy.deepcopy(model.state_dict())
    engine, opt = _private(model, noise)
    ids = torch.zeros(0, 5, dtype=torch.long)
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
    assert out.logits.shape == (0, 5, 17) and out.loss.item() == 0
    out.loss.backward()
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())
    opt.step()
    assert engine.steps == 1 and engine.epsilon() > 0

    ref_engine, ref_opt = _private(reference, noise)
    real = torch.randint(0, 17, (3, 5), generator=torch.Generator().manual_seed(0))
    (reference(input_ids=real).logits.sum() * 0).backward()  # every example's gradient is zero
    ref_opt.step()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p, q), name
        if noise == 0:
            assert torch.equal(p, initial[name]), name
        else:
            assert not torch.equal(p, initial[name]), name
    out = model(input_ids=real, labels=real)  # the next batch runs as usual
    out.loss.backward()
    opt.step()
    assert engine.steps == 2


def test_empty_sequence_first_batch_is_padded_on_its_example_dim():
    """batch_first=False: the examples lie on dim 1 of the model's input, and so of the padding."""
    torch.manual_seed(0)
    model = bk.convert(nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0), 1,
                                             enable_nested_tensor=False).to(DT))
    engine = bk.PrivacyEngine(model, batch_size=2, sample_size=10, noise_multiplier=0.0, seed=5, batch_first=False)
    opt = engine.attach(torch.optim.SGD(model.parameters(), lr=1.0))
    before = copy.deepcopy(model.state_dict())
    out = model(torch.zeros(4, 0, 8, dtype=DT))
    assert out.shape == (4, 0, 8)
    out.sum().backward()
    opt.step()
    assert engine.steps == 1
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name


def test_padding_never_replaces_a_batch_read_from_a_flat_input():
    """An EmbeddingBag's flat ids can be empty while its bags are not: the batch size read from a
    1-D input is a guess, and such a batch is never padded (it holds real examples)."""
    torch.manual_seed(0)

    class Bags(nn.Module):
        def __init__(self):
            super().__init__()
            self.bag = nn.EmbeddingBag(7, 3, mode="sum")

        def forward(self, ids, offsets):
            return self.bag(ids, offsets)

    model = bk.convert(Bags().to(DT))
    engine = bk.PrivacyEngine(model, batch_size=2, sample_size=10, noise_multiplier=0.0, seed=5)
    opt = engine.attach(torch.optim.SGD(model.parameters(), lr=1.0))
    out = model(torch.zeros(0, dtype=torch.long), torch.zeros(2, dtype=torch.long))  # two empty bags
    assert out.shape == (2, 3) and not out.any()
    out.sum().backward()
    opt.step()
    assert engine.steps == 1


# ---------------------------------------------------------------- the engine's check of the batch sizes

def _train_counting_warnings(loader, batch_size, sample_size, micro=None, steps=None):
    """Trains a tiny model on `loader`'s batches; the SamplingWarnings raised, and at which step."""
    import warnings

    torch.manual_seed(0)
    model = bk.convert(nn.Linear(4, 3).to(DT))
    engine = bk.PrivacyEngine(model, batch_size=batch_size, sample_size=sample_size, noise_multiplier=1.0, seed=0)
    opt = engine.attach(torch.optim.SGD(model.parameters(), lr=0.1))
    raised = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i, batch in enumerate(loader):
            for x, y in (data.micro_batches(batch, micro) if micro else [batch]):
                F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            raised += [(engine.steps, str(w.message)) for w in caught if issubclass(w.category, bk.SamplingWarning)]
            caught.clear()
            if steps is not None and engine.steps == steps:
                break
    return raised


def _sampling_dataset(n=2000):
    gen = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(n, 4, dtype=DT, generator=gen), torch.randint(0, 3, (n,), generator=gen))


@pytest.mark.parametrize("micro", [None, 20])
def test_a_fixed_size_dataloader_is_warned_about(micro):
    """A shuffled fixed-size DataLoader is not Poisson sampling: its epsilon is no guarantee. Every
    step holding exactly the same number of examples (micro-batches summed) for 20 steps has
    probability below 1e-13 under Poisson sampling at this rate: warned once, at step 20."""
    loader = DataLoader(_sampling_dataset(), batch_size=50, shuffle=True, generator=torch.Generator().manual_seed(0))
    raised = _train_counting_warnings(loader, 50, 2000, micro=micro)
    assert len(raised) == 1 and raised[0][0] == 20 and "fixed-size DataLoader" in raised[0][1]
    assert "exactly 50 examples" in raised[0][1]


def test_poisson_batches_at_the_declared_rate_are_not_warned_about():
    assert _train_counting_warnings(data.poisson_loader(_sampling_dataset(), batch_size=50, seed=3), 50, 2000) == []
    # every example every step (q = 1): Poisson sizes do not vary, nothing to tell apart
    full = data.poisson_loader(_sampling_dataset(60), batch_size=60, seed=3)  # one step an epoch
    assert _train_counting_warnings((b for _ in range(25) for b in full), 60, 60, steps=25) == []


def test_a_loader_sampling_more_than_the_engine_was_told_is_warned_about():
    """A loader at batch size 80 under an engine told 50: the accountant's epsilon would be an
    underestimate. The mean size is 6 standard errors above 50 well within the epoch."""
    raised = _train_counting_warnings(data.poisson_loader(_sampling_dataset(), batch_size=80, seed=3), 50, 2000)
    assert len(raised) == 1 and "higher rate than batch_size / sample_size" in raised[0][1]


# ---------------------------------------------------------------- bad arguments

class Stream(IterableDataset):
    def __iter__(self):
        return iter(range(3))


@pytest.mark.parametrize("args,kwargs,error,match", [
    ((), {}, ValueError, "exactly one of sample_rate and batch_size"),
    ((0.1,), dict(batch_size=2), ValueError, "exactly one of sample_rate and batch_size"),
    ((0.0,), {}, ValueError, r"sample_rate must lie in \(0, 1\]"),
    ((1.5,), {}, ValueError, "sample_rate must lie in"),
    ((-0.1,), {}, ValueError, "sample_rate must lie in"),
    ((float("nan"),), {}, ValueError, "sample_rate must lie in"),
    ((True,), {}, ValueError, "sample_rate must lie in"),
    ((), dict(batch_size=0), ValueError, "batch_size .* must be a positive int"),
    ((), dict(batch_size=2.5), ValueError, "batch_size .* must be a positive int"),
    ((), dict(batch_size=11), ValueError, r"batch_size \(11\) exceeds the dataset size \(10\)"),
    ((0.1,), dict(shuffle=True), ValueError, "shuffle cannot be given"),
    ((0.1,), dict(drop_last=True), ValueError, "drop_last cannot be given"),
    ((0.1,), dict(seed=1, generator=torch.Generator()), ValueError, "at most one of generator and seed"),
    ((0.1,), dict(generator=3), TypeError, "generator must be a torch.Generator"),
    ((0.1,), dict(seed=1.5), TypeError, "seed must be an int"),
])
def test_bad_loader_arguments(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        data.poisson_loader(index_dataset(10), *args, **kwargs)


def test_empty_or_iterable_datasets_are_refused():
    with pytest.raises(ValueError, match="dataset is empty"):
        data.poisson_loader(index_dataset(0), sample_rate=0.5)
    with pytest.raises(TypeError, match="map-style dataset"):
        data.poisson_loader(Stream(), sample_rate=0.5)


# ---------------------------------------------------------------- micro_batches

def test_micro_batches_cover_the_batch_in_order_with_views():
    batch = torch.arange(30, dtype=DT).reshape(10, 3)
    for max_size, sizes in [(3, [3, 3, 3, 1]), (5, [5, 5]), (1, [1] * 10), (10, [10]), (64, [10])]:
        chunks = list(data.micro_batches(batch, max_size))
        assert [c.shape[0] for c in chunks] == sizes
        assert torch.equal(torch.cat(chunks), batch)
        assert all(c.untyped_storage().data_ptr() == batch.untyped_storage().data_ptr() for c in chunks)


def test_micro_batches_keep_the_structure():
    Pair = namedtuple("Pair", "x y")
    batch = {"a": torch.arange(7), "b": (torch.zeros(7, 2), [torch.ones(7, 1, 1)]),
             "p": Pair(torch.arange(7), torch.arange(7))}
    chunks = list(data.micro_batches(batch, 3))
    assert len(chunks) == 3
    for c, (lo, hi) in zip(chunks, [(0, 3), (3, 6), (6, 7)]):
        assert list(c) == ["a", "b", "p"] and type(c["b"]) is tuple and type(c["b"][1]) is list
        assert isinstance(c["p"], Pair)
        assert torch.equal(c["a"], torch.arange(lo, hi)) and c["b"][0].shape == (hi - lo, 2)
        assert c["b"][1][0].shape == (hi - lo, 1, 1) and torch.equal(c["p"].y, torch.arange(lo, hi))
    (x, y), = data.micro_batches([torch.zeros(0, 5), torch.zeros(0, dtype=torch.long)], 4)  # exactly one
    assert x.shape == (0, 5) and y.shape == (0,) and y.dtype == torch.long


@pytest.mark.parametrize("batch,max_size,error,match", [
    (torch.zeros(4), 0, ValueError, "max_size must be a positive int"),
    (torch.zeros(4), -2, ValueError, "max_size must be a positive int"),
    (torch.zeros(4), 2.0, ValueError, "max_size must be a positive int"),
    (torch.zeros(4), True, ValueError, "max_size must be a positive int"),
    ((torch.zeros(4, 2), {"y": torch.zeros(5)}), 2, ValueError, r"disagree.*batch\[0\]: 4, batch\[1\]\['y'\]: 5"),
    ((torch.zeros(4), torch.tensor(1.0)), 2, ValueError, r"batch\[1\] is a 0-d tensor"),
    ((torch.zeros(4), ["a", "b", "c", "d"]), 2, TypeError, r"batch\[1\]\[0\] is a str"),
    ((), 2, ValueError, "holds no tensor"),
])
def test_micro_batches_errors_come_at_the_call(batch, max_size, error, match):
    with pytest.raises(error, match=match):
        data.micro_batches(batch, max_size)  # not iterated: checked eagerly


def _engine(model, reduction, noise, batch_size):
    engine = bk.PrivacyEngine(model, batch_size=batch_size, sample_size=100, noise_multiplier=noise,
                              max_grad_norm=2.0, loss_reduction=reduction, seed=5)
    return engine, engine.attach(torch.optim.SGD(model.parameters(), lr=1.0))


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_micro_batched_step_equals_the_whole_batch_step(reduction):
    # A real Poisson batch whose size differs from the expected 8: the divisor must stay 8.
    torch.manual_seed(0)
    ds = TensorDataset(torch.randn(100, 4, dtype=DT), torch.randint(0, 3, (100,)))
    x, y = next(b for b in data.poisson_loader(ds, batch_size=8, seed=1) if b[0].shape[0] >= 10)
    B = x.shape[0]
    base = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).to(DT)

    # Independent reference: one backward per example on the plain model, clipped, / 8.
    grads = []
    for i in range(B):
        base.zero_grad()
        F.cross_entropy(base(x[i:i + 1]), y[i:i + 1]).backward()
        grads.append([p.grad.clone() for p in base.parameters()])
    norms = torch.stack([torch.sqrt(sum((g ** 2).sum() for g in gs)) for gs in grads])
    clip = torch.clamp(2.0 / (norms + 1e-6), max=1.0)  # abadi, R = 2
    assert (clip < 1).any() and (clip == 1).any()  # clipping matters for some examples, not all
    want = [-sum(clip[i] * grads[i][k] for i in range(B)) / 8 for k in range(len(grads[0]))]

    loss = (lambda out, t: F.cross_entropy(out, t, reduction=reduction))
    for noise in (0.0, 1.0):
        whole, micro = bk.convert(copy.deepcopy(base)), bk.convert(copy.deepcopy(base))
        e_whole, o_whole = _engine(whole, reduction, noise, 8)
        e_micro, o_micro = _engine(micro, reduction, noise, 8)
        loss(whole(x), y).backward()
        o_whole.step()
        n_chunks = 0
        for xc, yc in data.micro_batches((x, y), max_size=4):
            loss(micro(xc), yc).backward()  # per-chunk mean (or sum): the engine rescales per chunk
            n_chunks += 1
        o_micro.step()
        assert n_chunks == math.ceil(B / 4) >= 3
        assert e_whole.steps == e_micro.steps == 1
        for pb, pw, pm, w in zip(base.parameters(), whole.parameters(), micro.parameters(), want):
            # Same seed and one step each: even the noise is the same draw.
            assert _rel(pm.detach() - pb.detach(), pw.detach() - pb.detach()) < 1e-9
            if noise == 0:
                assert _rel(pm.detach() - pb.detach(), w) < 1e-9
        if noise > 0:
            assert e_micro.epsilon() == e_whole.epsilon() == accounting.epsilon(1.0, 0.08, 1, e_whole.target_delta)


def test_engine_epochs_plan_as_many_steps_as_epochs_of_the_loader():
    """N / batch_size = 2.6: an epoch of the loader is round(2.6) = 3 steps, and epochs=3 must
    calibrate the noise for 9 steps (ceil(3 * 2.6) = 8 would overshoot the target)."""
    loader = data.poisson_loader(TensorDataset(torch.zeros(26, 1)), batch_size=10, seed=0)
    model = bk.convert(nn.Linear(1, 1))
    engine = bk.PrivacyEngine(model, batch_size=10, sample_size=26, epochs=3, target_epsilon=5.0)
    assert 3 * len(loader) == 9
    spent = accounting.epsilon(engine.noise_multiplier, 10 / 26, 9, engine.target_delta)
    assert 0.99 * 5.0 <= spent <= 5.0
