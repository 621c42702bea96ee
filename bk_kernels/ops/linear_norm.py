"""linear_norm: a layer's per-example squared weight-gradient norms by the cheaper method.

The ONE place that chooses between the ghost norm (cost ~T^2 (d+p) per example) and the direct
norm (~T d p). The rule is by FLOPs: ghost when T (d + p) < d p, decided per call from that
call's shapes, so a sequence length that changes between batches is handled.

On the CPU backend, where the two FLOP counts are within a factor of 4 of each other, the rule
can be off by 2x (the kernels reach different fractions of peak: measured on a 2-core EPYC,
GPT-2's 768 x 3072 layer at T = 1024 ran the ghost norm 2.2x faster than the direct norm the
rule picks). Under set_cpu_norm_impl("auto") both are timed there once per shape class and the
faster is kept; the same measurement picks each op's implementation. The default ("kernel") and
"blas" turn both measurements off: the FLOP rule and one implementation, in every process alike.
"""
import time

import torch

from .. import _C
from ._backend import resolve
from ._norm_common import check_norm_inputs
from .direct_norm import direct_norm_3d
from .ghost_norm import ghost_norm_3d

MODES = ("auto", "ghost", "direct")
CPU_NORM_IMPLS = ("auto", "kernel", "blas")
_MEASURED_BAND = 4.0  # FLOP ratios within this factor are timed on the CPU, not guessed


def use_ghost(T, d, p):
    """True when the ghost norm needs fewer FLOPs than forming the per-example gradients."""
    return T * (d + p) < d * p


def choose_mode(mode, T, d, p):
    if mode not in MODES:
        raise ValueError(f"clipping_mode must be one of {MODES}, got {mode!r}")
    if mode == "auto":
        return "ghost" if use_ghost(T, d, p) else "direct"
    return mode


def linear_norm(a, g, *, mode="auto", backend="auto"):
    """[B] = ||a_b^T g_b||_F^2 for a:[B,T,d] (or [B,d]), g:[B,T,p] (or [B,p]).

    mode: "auto" (by FLOPs, see use_ghost; timed on the CPU where close, see above), "ghost"
    or "direct".
    """
    a, g = check_norm_inputs(a, g, "linear_norm")
    return linear_norm_3d(a, g, mode, resolve(backend, a.device, "linear_norm"))


def linear_norm_3d(a, g, mode, backend):
    """linear_norm of inputs already checked (3-D) on a resolved backend (the engine's path)."""
    T, d, p = a.shape[1], a.shape[2], g.shape[2]
    method = choose_mode(mode, T, d, p)
    if mode == "auto" and backend == "cpu" and _cpu_setting[0] == "auto" and T > 1:
        ghost_flops, direct_flops = T * (d + p), d * p
        if ghost_flops < _MEASURED_BAND * direct_flops and direct_flops < _MEASURED_BAND * ghost_flops:
            method = _measured_method(a, g, T, d, p)
    if method == "ghost":
        return ghost_norm_3d(a, g, backend)
    return direct_norm_3d(a, g, backend)


# (dtype, then T, d, p and min(B, 1024) rounded up to powers of two, threads) -> the measured
# record of that class (the C++ ops' classes are the same); _cpu_picks remembers each exact
# shape's method so that a step's calls cost one dict lookup.
_cpu_methods = {}
_cpu_picks = {}
_cpu_setting = [_C.cpu_norm_impl()]  # mirrors the C++ setting, read on every call


def _measured_method(a, g, T, d, p):
    B = a.shape[0]
    threads = torch.get_num_threads()
    exact = (a.dtype, B, T, d, p, threads)
    method = _cpu_picks.get(exact)
    if method is not None:
        return method
    key = (a.dtype, *((n - 1).bit_length() for n in (T, d, p, min(B, 1024))), threads)
    made = _cpu_methods.get(key)
    if made is None:
        us = {}
        for method, op in (("ghost", ghost_norm_3d), ("direct", direct_norm_3d)):
            op(a, g, "cpu")  # first run; also lets the op measure its implementations
            best = float("inf")
            for _ in range(2):
                start = time.perf_counter()
                op(a, g, "cpu")
                best = min(best, time.perf_counter() - start)
            us[method] = best * 1e6
        made = _cpu_methods[key] = dict(
            op="linear_norm", dtype=str(a.dtype).removeprefix("torch."), B=B, T=T, d=d, p=p, threads=threads,
            impl="ghost" if us["ghost"] < us["direct"] else "direct", ghost_us=us["ghost"], direct_us=us["direct"])
    _cpu_picks[exact] = made["impl"]
    return made["impl"]


def set_cpu_norm_impl(impl):
    """How float32/float64 ghost and direct norms with T > 1 run on the CPU backend.

    "kernel" (the default): the hand-written kernels, the same path in every process, so a
    resumed or repeated run is bitwise the same. "auto": the kernel or torch's BLAS on chunks
    of examples (bounded buffers, never B*T*T or B*d*p), whichever ran faster the first time
    this process saw the shape class (T, d, p and B up to the next power of two, the dtype and
    the thread count), and linear_norm's ghost-or-direct choice timed where the FLOP counts are
    close. Which wins depends on the CPU's BLAS (the kernels on the AMD EPYC we measured; BLAS
    was faster on an Intel Xeon with AMX), but the choice is made per process by a timing, so
    two processes may round differently: faster, not bitwise reproducible across processes.
    "blas" forces BLAS (where one example's Gram matrices or gradient fit its buffer). The
    environment variable BK_CPU_NORMS sets the starting value. Setting it forgets every
    measured choice.
    """
    if impl not in CPU_NORM_IMPLS:
        raise ValueError(f"set_cpu_norm_impl: impl must be one of {CPU_NORM_IMPLS}, got {impl!r}")
    _C.set_cpu_norm_impl(impl)
    _cpu_setting[0] = impl
    _cpu_methods.clear()
    _cpu_picks.clear()


def cpu_norm_impl():
    """The CPU norm implementation setting now in force ("auto", "kernel" or "blas")."""
    return _cpu_setting[0]


def cpu_norm_choices():
    """The choices "auto" has made so far, one dict per shape class: op, dtype, the B, T, d, p
    of the call that measured it, threads, and impl with the two best times in microseconds:
    for "ghost_norm"/"direct_norm", impl "kernel"/"blas" (kernel_us, blas_us); for
    "linear_norm", the method, impl "ghost"/"direct" (ghost_us, direct_us)."""
    return _C.cpu_norm_choices() + list(_cpu_methods.values())
