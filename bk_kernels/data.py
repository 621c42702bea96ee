"""Poisson sampling, the batches the privacy accountant assumes, and micro-batching.

bk_kernels.accounting (and so PrivacyEngine.epsilon()) accounts every step as a
Poisson-subsampled Gaussian mechanism: each example of the dataset joins the step's batch
independently with probability q = batch_size / sample_size, so batch sizes vary from step to
step. A plain `DataLoader(dataset, batch_size=B, shuffle=True)` does NOT sample that way (fixed
size, each example exactly once per epoch): the epsilon the engine reports would then not be a
valid guarantee. Use `poisson_loader` and give its expected batch size to the engine:

    loader = bk.data.poisson_loader(train_set, batch_size=256)
    engine = bk.PrivacyEngine(model, batch_size=256, sample_size=len(train_set), ...)

`micro_batches` splits one logical (Poisson) batch into chunks that fit in memory: one
forward+backward per chunk, one optimizer.step() per logical batch.
"""
import os
from collections.abc import Mapping

import torch
from torch.utils.data import DataLoader, IterableDataset, Sampler, default_collate

__all__ = ["PoissonBatchSampler", "PoissonDataLoader", "micro_batches", "poisson_loader"]

# DataLoader arguments that would replace or contradict the Poisson batch sampler.
_RESERVED = ("sampler", "batch_sampler", "shuffle", "drop_last")


class PoissonBatchSampler(Sampler):
    """Yields `steps` lists of indices into range(num_samples); each list holds every index
    independently with probability sample_rate (drawn in float64 from `generator`)."""

    def __init__(self, num_samples, sample_rate, steps, generator):
        self.num_samples, self.sample_rate, self.steps, self.generator = num_samples, sample_rate, steps, generator

    def __len__(self):
        return self.steps

    def __iter__(self):
        for _ in range(self.steps):
            yield poisson_sample(self.num_samples, self.sample_rate, self.generator).tolist()


def poisson_sample(num_samples, sample_rate, generator):
    """The indices of one Poisson sample of range(num_samples): each independently with
    probability sample_rate. float64 uniforms in [0, 1): P(u < q) = q to within 2^-53 (float32
    would be off by up to 2^-24)."""
    u = torch.rand(num_samples, dtype=torch.float64, generator=generator)
    return torch.nonzero(u < sample_rate).flatten()


class PoissonDataLoader(DataLoader):
    """The DataLoader poisson_loader returns: one epoch is len(loader) = round(1/q) Poisson
    batches. `sample_rate` is q, `expected_batch_size` is q * len(dataset)."""

    def __init__(self, dataset, sample_rate, steps, generator, collate_fn, **kwargs):
        self.sample_rate = sample_rate
        self.expected_batch_size = sample_rate * len(dataset)
        super().__init__(dataset, batch_sampler=PoissonBatchSampler(len(dataset), sample_rate, steps, generator),
                         collate_fn=_EmptySafeCollate(dataset, collate_fn), generator=generator, **kwargs)


def poisson_loader(dataset, sample_rate=None, batch_size=None, *, generator=None, seed=None, collate_fn=None,
                   num_workers=0, pin_memory=False, **loader_kwargs):
    """A DataLoader over `dataset` whose every batch is a Poisson sample: each example is in it
    independently with probability q, so batch sizes vary (mean q*N, variance q*(1-q)*N, N =
    len(dataset)). This is the sampling the privacy accountant of PrivacyEngine assumes.

    Give exactly one of
      sample_rate: q, in (0, 1];
      batch_size:  the expected batch size, an int in [1, N]; then q = batch_size / N.
    Give PrivacyEngine the expected batch size as its `batch_size` and N as its `sample_size`
    (the engine takes q = batch_size / sample_size for the accounting and divides every step's
    clipped sum by batch_size). With sample_rate=, q * N must be an integer for the engine to match;
    prefer batch_size=.

    A plain shuffled, fixed-size `DataLoader(dataset, batch_size=B, shuffle=True)` is NOT what the
    accountant assumes: with it, the epsilon that PrivacyEngine reports is not a valid guarantee.

    One epoch (one pass of `for batch in loader`, and len(loader)) is round(1/q) steps; each step
    draws a fresh, independent sample, so an example may appear in several batches of an epoch or
    in none. The number of steps is fixed, not random, as the accountant counts it.
    PrivacyEngine(epochs=E, ...) plans E * round(N / batch_size) steps: E epochs of this loader
    (engine.epsilon() counts the steps actually taken either way).

    Empty batches happen (probability (1-q)^N) and are yielded, not skipped, with the structure,
    dtypes and trailing shapes of a real batch and a first dimension of 0 (built by collating
    dataset[0] and slicing every tensor to [:0], through tuples, lists and dicts; a list of
    per-example strings or numbers becomes empty): run forward, backward and
    optimizer.step() on it as on any batch. The step must count: skipping it would change the
    sampling the accountant assumes.

    Randomness: `generator` (a CPU torch.Generator, used and advanced in place) or `seed` (an int)
    makes the sampling reproducible; with neither, it comes from the operating system
    (a torch.Generator seeded from os.urandom), never from torch's global RNG. A seed known to
    others weakens the privacy guarantee (the guarantee assumes the sample is secret): use one to
    debug or reproduce, not to release. The same generator also seeds the DataLoader's workers.

    collate_fn (default torch's default_collate), num_workers, pin_memory and other DataLoader
    arguments (**loader_kwargs, e.g. persistent_workers, worker_init_fn) are passed on; sampler,
    batch_sampler, shuffle and drop_last are not allowed (the Poisson sampler replaces them).
    Returns a PoissonDataLoader (a torch DataLoader) with attributes sample_rate and
    expected_batch_size.
    """
    n, sample_rate, generator = _check_loader_args("poisson_loader", dataset, sample_rate, batch_size, generator,
                                                   seed, loader_kwargs)
    return PoissonDataLoader(dataset, sample_rate, epoch_steps(sample_rate), generator, collate_fn or default_collate,
                             num_workers=num_workers, pin_memory=pin_memory, **loader_kwargs)


def epoch_steps(sample_rate):
    """Steps in one epoch of Poisson batches at rate q: round(1/q), at least 1."""
    return max(1, round(1 / sample_rate))


def _check_loader_args(caller, dataset, sample_rate, batch_size, generator, seed, loader_kwargs):
    """Validates poisson_loader's arguments; returns (len(dataset), q, a CPU generator)."""
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        raise TypeError(f"{caller}: Poisson sampling needs a map-style dataset (with __len__ and "
                        f"__getitem__), got {type(dataset).__name__}")
    n = len(dataset)
    if n == 0:
        raise ValueError(f"{caller}: the dataset is empty")
    if (sample_rate is None) == (batch_size is None):
        raise ValueError(f"{caller}: give exactly one of sample_rate and batch_size")
    if batch_size is not None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"{caller}: batch_size (the expected batch size) must be a positive int, "
                             f"got {batch_size!r}")
        if batch_size > n:
            raise ValueError(f"{caller}: batch_size ({batch_size}) exceeds the dataset size ({n})")
        sample_rate = batch_size / n  # the same float PrivacyEngine computes as batch_size / sample_size
    elif (isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, float))
          or not 0 < sample_rate <= 1):  # also refuses nan
        raise ValueError(f"{caller}: sample_rate must lie in (0, 1], got {sample_rate!r}")
    sample_rate = float(sample_rate)
    bad = [k for k in _RESERVED if k in loader_kwargs]
    if bad:
        raise ValueError(f"{caller}: {', '.join(bad)} cannot be given: the Poisson batch sampler decides "
                         "the batches")
    if generator is not None and seed is not None:
        raise ValueError(f"{caller}: give at most one of generator and seed")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"{caller}: generator must be a torch.Generator, got {type(generator).__name__} "
                            "(pass an int as seed=)")
        if generator.device.type != "cpu":
            raise ValueError(f"{caller}: generator must be a CPU generator, got one on {generator.device}")
    else:
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"{caller}: seed must be an int, got {seed!r}")
        generator = torch.Generator()
        generator.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
    return n, sample_rate, generator


class _EmptySafeCollate:
    """collate_fn, except that an empty list of samples gives an empty batch shaped like a real
    one. A class, not a closure, so that DataLoader workers can pickle it."""

    def __init__(self, dataset, collate_fn):
        self.dataset, self.collate_fn = dataset, collate_fn

    def __call__(self, samples):
        if len(samples) > 0:
            return self.collate_fn(samples)
        return _empty_like(self.collate_fn([self.dataset[0]]), "batch")


_PER_EXAMPLE_SCALARS = (str, bytes, int, float, complex, bool, type(None))


def _empty_like(batch, path):
    """`batch` (a collated batch of one example) with its batch dimension cut to 0."""
    if isinstance(batch, torch.Tensor):
        if batch.dim() == 0:
            raise TypeError(f"poisson_loader: collate_fn returned a 0-d tensor at {path}, which has no batch "
                            "dimension to make an empty batch from")
        return batch[:0]
    if isinstance(batch, Mapping):
        items = {k: _empty_like(v, f"{path}[{k!r}]") for k, v in batch.items()}
        try:
            return type(batch)(items)
        except TypeError:
            return items
    if isinstance(batch, (list, tuple)):
        if all(isinstance(v, _PER_EXAMPLE_SCALARS) for v in batch):  # one value per example: strings, ids
            return [] if isinstance(batch, list) else ()
        items = [_empty_like(v, f"{path}[{i}]") for i, v in enumerate(batch)]
        if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
            return type(batch)(*items)
        return type(batch)(items)
    raise TypeError(f"poisson_loader: cannot make an empty batch: collate_fn's output holds a "
                    f"{type(batch).__name__} at {path}; only tensors, lists/tuples/dicts of them and lists of "
                    "per-example strings or numbers are supported")


def micro_batches(batch, max_size):
    """Splits one logical batch into consecutive chunks of at most `max_size` examples.

    `batch` is a tensor, or a (nested) tuple/list/dict of tensors, whose first dimension is the
    batch (the same size for every tensor). Each chunk has the same structure, holds the next
    examples in order, and its tensors are views of the batch's (no copies). An empty batch gives
    exactly one empty chunk, so the training loop still runs a backward and the step counts.

    The pattern (like Opacus' BatchMemoryManager): one forward+backward per chunk, ONE
    optimizer.step() per logical batch:

        for batch in bk.data.poisson_loader(ds, batch_size=256):
            for x, y in bk.data.micro_batches(batch, max_size=64):
                F.cross_entropy(model(x), y).backward()   # mean over the chunk: the engine rescales per chunk
            optimizer.step(); optimizer.zero_grad()

    This is exact: PrivacyEngine clips each example's gradient within its chunk's backward (with
    loss_reduction="mean" it recovers per-example gradients with the chunk's actual size), the
    backwards add their clipped sums, and the step adds noise once, divides by the engine's
    batch_size (the expected batch size) and counts one step for the accountant.
    """
    return _chunks(batch, _batch_size_of(batch, max_size), max_size)


def _batch_size_of(batch, max_size, who="micro_batches"):
    """The batch's size (its tensors' common first dim), after checking the arguments."""
    if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size <= 0:
        raise ValueError(f"{who}: max_size must be a positive int, got {max_size!r}")
    leaves = []
    _tensor_leaves(batch, "batch", leaves)
    if not leaves:
        raise ValueError(f"{who}: the batch holds no tensor")
    sizes = {path: t.shape[0] for path, t in leaves}
    n = leaves[0][1].shape[0]
    if any(s != n for s in sizes.values()):
        raise ValueError(f"{who}: the tensors of the batch disagree on the batch size (first dimension): "
                         f"{', '.join(f'{p}: {s}' for p, s in sizes.items())}")
    return n


def _chunks(batch, n, max_size):
    if n == 0:
        yield _slice(batch, 0, 0)
    for start in range(0, n, max_size):
        yield _slice(batch, start, min(start + max_size, n))


def _tensor_leaves(batch, path, out):
    if isinstance(batch, torch.Tensor):
        if batch.dim() == 0:
            raise ValueError(f"micro_batches: {path} is a 0-d tensor: it has no batch dimension")
        out.append((path, batch))
    elif isinstance(batch, Mapping):
        for k, v in batch.items():
            _tensor_leaves(v, f"{path}[{k!r}]", out)
    elif isinstance(batch, (list, tuple)):
        for i, v in enumerate(batch):
            _tensor_leaves(v, f"{path}[{i}]", out)
    else:
        raise TypeError(f"micro_batches: {path} is a {type(batch).__name__}; a batch must be a tensor or "
                        "tuples/lists/dicts of tensors")


def _slice(batch, start, stop):
    return _map_batch(batch, lambda t: t[start:stop])


def _map_batch(batch, fn):
    """The batch's structure with fn(tensor) for every tensor."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        items = {k: _map_batch(v, fn) for k, v in batch.items()}
        try:
            return type(batch)(items)
        except TypeError:
            return items
    items = [_map_batch(v, fn) for v in batch]
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*items)
    return type(batch)(items)
