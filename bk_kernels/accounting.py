"""Privacy accounting for the Poisson-subsampled Gaussian mechanism, with Google's
dp-accounting library: RDP (Renyi DP, Mironov et al.) or PLD (privacy loss distributions).

Each private step samples every example independently with rate q = batch_size / sample_size
(bk_kernels.data.poisson_loader does that) and adds Gaussian noise of std sigma * R to the sum
of gradients clipped to R: a PoissonSampled(q, Gaussian(sigma)) event, composed once per step.
"""
import contextlib
import functools
import logging
import math

ACCOUNTANTS = ("rdp", "pld")


@contextlib.contextmanager
def _quiet_orders():
    """dp-accounting logs a warning for every RDP order whose series does not converge (it drops
    that order, and the epsilon stays valid); calibration probes small noise where that is common."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        logger.setLevel(level)


def _dp_accounting():
    """Imported when accounting is first used, not with bk_kernels: a machine without it (the
    GPU check's bare GPU machine) still runs every kernel and a noise-0 engine."""
    try:
        from dp_accounting import dp_event
        from dp_accounting.pld import pld_privacy_accountant
        from dp_accounting.rdp import rdp_privacy_accountant
    except ImportError as err:
        raise ImportError("bk_kernels: privacy accounting needs Google's dp-accounting (pip install "
                          "dp-accounting==0.6.0, a dependency of bk_kernels)") from err
    return dp_event, pld_privacy_accountant, rdp_privacy_accountant


def _accountant(name):
    _, pld_privacy_accountant, rdp_privacy_accountant = _dp_accounting()
    if name == "rdp":
        return rdp_privacy_accountant.RdpAccountant()
    if name == "pld":
        return pld_privacy_accountant.PLDAccountant()
    raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {name!r}")


def epsilon(noise_multiplier, sample_rate, steps, delta, accountant="rdp"):
    """The epsilon spent by `steps` steps at `delta`."""
    return epsilon_of_history([[noise_multiplier, sample_rate, steps]], delta, accountant)


def epsilon_of_history(history, delta, accountant="rdp"):
    """The epsilon spent by the composition of [noise_multiplier, sample_rate, steps] segments."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must lie in (0, 1), got {delta!r}")
    for _, sample_rate, _ in history:
        if not 0 < sample_rate <= 1:
            raise ValueError(f"the sampling rate must lie in (0, 1], got {sample_rate!r}")
    if not any(steps for *_, steps in history):
        return 0.0  # nothing spent: no accountant needed (nor dp_accounting installed)
    dp_event = _dp_accounting()[0]
    events = []
    for noise_multiplier, sample_rate, steps in history:
        if steps == 0:
            continue
        if noise_multiplier == 0:
            return math.inf
        event = dp_event.PoissonSampledDpEvent(sample_rate, dp_event.GaussianDpEvent(noise_multiplier))
        events.append(dp_event.SelfComposedDpEvent(event, int(steps)))
    if not events:
        return 0.0
    if accountant == "rdp" and _rdp_parts() is not None:
        return _rdp_epsilon(history, delta)
    acc = _accountant(accountant)
    with _quiet_orders():
        acc.compose(dp_event.ComposedDpEvent(events))
        return float(acc.get_epsilon(delta))


def _rdp_parts():
    """dp-accounting's own RDP functions (what RdpAccountant composes and converts with), or
    None if this version does not have them under these names."""
    rdp = _dp_accounting()[2]
    parts = (getattr(rdp, "DEFAULT_RDP_ORDERS", None), getattr(rdp, "_compute_rdp_poisson_subsampled_gaussian", None),
             getattr(rdp, "compute_epsilon", None))
    return parts if all(p is not None for p in parts) else None


@functools.lru_cache(maxsize=256)
def _rdp_of_one_step(sample_rate, noise_multiplier):
    """The RDP curve of one Poisson-subsampled Gaussian step, computed once per (q, sigma): it is
    what costs (~100 ms); RDP composes by adding curves, so epsilon after any number of steps is
    then a sum and a conversion (~0.3 ms). Same numbers as RdpAccountant (tested)."""
    orders, step_rdp, _ = _rdp_parts()
    with _quiet_orders():
        return step_rdp(sample_rate, noise_multiplier, orders)


def _rdp_epsilon(history, delta):
    orders, _, compute_epsilon = _rdp_parts()
    total = 0.0
    for noise_multiplier, sample_rate, steps in history:
        if steps:
            total = total + _rdp_of_one_step(float(sample_rate), float(noise_multiplier)) * int(steps)
    with _quiet_orders():
        return float(compute_epsilon(orders, total, delta)[0])


def calibrate_noise_multiplier(target_epsilon, sample_rate, steps, delta, accountant="rdp", rel_tol=0.01):
    """The smallest noise multiplier (to within rel_tol) whose epsilon after `steps` steps is at
    most target_epsilon: the spent epsilon lands in [(1 - rel_tol) * target, target]."""
    if not (isinstance(target_epsilon, (int, float)) and math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ValueError(f"target_epsilon must be a positive number, got {target_epsilon!r}")
    if steps <= 0:
        raise ValueError(f"calibrating the noise needs the number of steps (> 0), got {steps!r}")
    eps = functools.lru_cache(maxsize=None)(lambda sigma: epsilon(sigma, sample_rate, steps, delta, accountant))
    if accountant == "pld":
        # PLD is tighter than RDP and far slower to evaluate: start from RDP's answer.
        hi = calibrate_noise_multiplier(target_epsilon, sample_rate, steps, delta, "rdp", rel_tol)
    else:
        hi = 1.0
    while eps(hi) > target_epsilon:
        hi *= 2
        if hi > 1e4:
            raise ValueError(f"target_epsilon={target_epsilon} cannot be reached at delta={delta} with "
                             f"{steps} steps at sampling rate {sample_rate}: even noise_multiplier=1e4 spends "
                             f"more; raise the target or delta, or take fewer or smaller steps")
    lo = hi / 2
    while lo > 1e-3 and eps(lo) <= target_epsilon:
        hi, lo = lo, lo / 2
    # Now eps(lo) > target >= eps(hi) (or lo is tiny): bisect until eps(hi) is within rel_tol.
    while True:
        spent = eps(hi)
        if spent >= (1 - rel_tol) * target_epsilon or hi - lo < 1e-9 * hi:
            return hi
        mid = (lo + hi) / 2
        if eps(mid) > target_epsilon:
            lo = mid
        else:
            hi = mid
