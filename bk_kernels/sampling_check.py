"""Whether the batches a PrivacyEngine steps on can be the Poisson samples its accountant assumes.

The engine never sees the data loader, only how many examples each step's backwards held. The
accountant's epsilon is valid for Poisson sampling at rate q = batch_size / sample_size, where a
step's size is Binomial(sample_size, q): mean batch_size, variance sample_size q (1 - q). Two
mistakes are common and silent: a fixed-size shuffled DataLoader (every step the same size; the
epsilon is then not a guarantee at all), and a loader sampling more examples per step than the
engine was told (the epsilon is then an underestimate). Both are checked from the sizes alone,
with thresholds that a Poisson sampler crosses with probability below 1e-9, and warned about once.
"""
import math
import warnings


class SamplingWarning(UserWarning):
    """The steps' batch sizes cannot come from the Poisson sampling the accountant assumes."""


class SamplingCheck:
    EQUAL_STEPS = 20  # all equal sizes over this many steps: not Poisson (where sizes vary enough)
    RATE_STEPS = 10   # steps before the mean size is compared with batch_size
    SIGMAS = 6.0

    def __init__(self, batch_size, sample_size):
        q = batch_size / sample_size
        self.batch_size, self.sample_rate = batch_size, q
        self.variance = sample_size * q * (1.0 - q)  # of one step's size
        self.steps = self.total = 0
        self.first = None
        self.all_equal = True
        self.warned = set()

    def step(self, examples):
        """One step's number of examples (all its backwards together)."""
        self.steps += 1
        self.total += examples
        if self.first is None:
            self.first = examples
        self.all_equal = self.all_equal and examples == self.first
        # P(20 equal Binomial draws) <= (1 / (sigma sqrt(2 pi)))^19 < 1e-13 once sigma >= 2
        if self.steps == self.EQUAL_STEPS and self.all_equal and self.variance >= 4.0:
            self._warn("fixed", f"the last {self.steps} steps all held exactly {self.first} examples, but Poisson "
                                f"sampling at rate q = {self.sample_rate:.4g} (batch_size / sample_size) gives sizes "
                                f"that vary (standard deviation {math.sqrt(self.variance):.3g}): the batches look like "
                                "a fixed-size DataLoader, and for those the accountant's epsilon is NOT a privacy "
                                "guarantee. Sample with bk.data.poisson_loader(dataset, batch_size=...)")
        excess = self.total - self.steps * self.batch_size
        if self.steps >= self.RATE_STEPS and excess > self.SIGMAS * math.sqrt(self.steps * self.variance) + 1:
            self._warn("rate", f"{self.steps} steps held {self.total / self.steps:.4g} examples each on average, "
                               f"more than the batch_size ({self.batch_size}) the engine was given: the data are "
                               "sampled at a higher rate than batch_size / sample_size, so the accountant's epsilon "
                               "underestimates the privacy loss. Give the engine the loader's expected batch size "
                               "(and the dataset's size as sample_size)")

    def _warn(self, kind, message):
        if kind not in self.warned:
            self.warned.add(kind)
            warnings.warn(f"PrivacyEngine: {message}.", SamplingWarning, stacklevel=5)
