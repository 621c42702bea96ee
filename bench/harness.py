"""The one benchmark harness: timing, peak memory, progress bar, result rows.

Timing: warm-up calls, then repeated timed calls (CUDA events on a GPU, perf_counter on the
CPU); median, min and max are reported so the machine's noise is visible.
Memory: extra peak memory of one call beyond what was resident before it. On the CPU that is
the process's peak RSS (VmHWM, reset through /proc/self/clear_refs before the call), with large
blocks mmapped (memory_allocator); on a GPU torch.cuda.max_memory_allocated. Timing runs with
the heap reuse of a long-running process (timing_allocator).
"""
import contextlib
import csv
import ctypes
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings

import torch

# The bench steps fixed-size synthetic batches on purpose (timings, not a training run): the
# engine's check that the batches can be Poisson samples (bk.SamplingWarning) would warn in every config.
warnings.filterwarnings("ignore", message="PrivacyEngine: the last .* steps all held exactly")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
try:
    _LIBC = ctypes.CDLL("libc.so.6")
except OSError:  # not glibc: the allocator is left as it is
    _LIBC = None


def _mallopt(mmap_threshold, trim_threshold):
    if _LIBC is not None:
        _LIBC.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)
        _LIBC.mallopt(_M_TRIM_THRESHOLD, trim_threshold)


def timing_allocator():
    """Timing runs with glibc's dynamic thresholds where a training process settles: a freed
    block under 32 MiB stays in the heap for the next step, so no step pays page faults for
    memory it reuses (as in a user's training loop). Session 23 found the bench timing every
    method with large blocks mmapped afresh on each call: the MLP at B=64 took 5.7 ms a
    non-private step instead of 3.5 ms, which made every ratio over it look smaller."""
    _mallopt(32 << 20, 64 << 20)


def _memory_settings():
    """Large blocks (64 KiB and up) from mmap, trimmed at glibc's default 128 KiB, and the free
    memory that timing left in the heap given back (malloc_trim): a block reused from it is
    resident again only when touched, so it counts in the peak RSS too."""
    _mallopt(1 << 16, 128 << 10)
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


@contextlib.contextmanager
def memory_allocator():
    """The allocator of a peak-memory measurement (_memory_settings): a call's temporaries show
    up in the peak RSS instead of reusing memory freed by an earlier call. Timing's settings
    come back after it."""
    _memory_settings()
    try:
        yield
    finally:
        timing_allocator()


if os.environ.get("BK_BENCH_ALLOCATOR") == "memory":  # a process that only measures memory (fresh.py)
    _memory_settings()
else:
    timing_allocator()


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_extra_bytes(fn, device):
    """Peak memory one call of fn() needs beyond what is resident before it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with memory_allocator():
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        before = _status_kib("VmRSS")
        fn()
        return max(0, _status_kib("VmHWM") - before) * 1024


def timed(fn, device):
    """Seconds one call of fn takes (CUDA events on a GPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_call(fn, device, warmup=3, min_runs=15, max_runs=200, budget_s=1.0):
    """Seconds per call: (median, min, max) over at least min_runs timed calls."""
    for _ in range(warmup):
        fn()
    times = []
    deadline = time.perf_counter() + budget_s
    while len(times) < min_runs or (len(times) < max_runs and time.perf_counter() < deadline):
        times.append(timed(fn, device))
    return statistics.median(times), min(times), max(times)


# The vector and matrix extensions that decide how fast torch's BLAS (and our kernels) run.
_ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def isa():
    """The CPU's relevant instruction-set extensions, e.g. "avx2 avx512f avx512_bf16"."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line.split(":", 1)[1].split() for line in f if line.startswith("flags"))
    except (OSError, StopIteration):
        return platform.machine()
    return " ".join(flag for flag in _ISA_FLAGS if flag in flags) or platform.machine()


def machine(device):
    """The device: the GPU's name, or the CPU's model, threads and ISA (every row carries it:
    BLAS speed differs between CPU vendors and generations)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model} ({torch.get_num_threads()} threads; {isa()})"


def commit():
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


class Progress:
    """A progress bar on stderr: tqdm's when installed, else a one-line bar of its own."""

    def __init__(self, total, label):
        self.total, self.done, self.label, self.start = total, 0, label, time.time()
        try:
            from tqdm import tqdm

            self._tqdm = tqdm(total=total, desc=label, file=sys.stderr, dynamic_ncols=True)
        except ImportError:
            self._tqdm = None

    def step(self, what):
        if self._tqdm is not None:
            self._tqdm.set_postfix_str(what[:50], refresh=False)
            self._tqdm.update(1)
            self.done += 1
            if self.done == self.total:
                self._tqdm.close()
            return
        self.done += 1
        width = 30
        filled = width * self.done // max(1, self.total)
        elapsed = time.time() - self.start
        sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] "
                         f"{self.done}/{self.total} {elapsed:5.0f}s {what[:50]:<50}")
        sys.stderr.flush()
        if self.done == self.total:
            sys.stderr.write("\n")


class _Bar:
    """tqdm's interface over Progress, where tqdm is not installed."""

    def __init__(self, total, label):
        self._p, self._what = Progress(total, label), ""
        self._p._tqdm = None

    def update(self, n=1):
        for _ in range(n):
            self._p.step(self._what)

    def set_postfix_str(self, what):
        self._what = what

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def progress(total, label):
    """A progress bar (tqdm when installed) to use as `with progress(n, label) as bar: bar.update()`."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _Bar(total, label)
    return tqdm(total=total, desc=label, file=sys.stderr, dynamic_ncols=True, leave=True)


def context(device, command):
    return {
        "device": machine(device),
        "commit": commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "torch": torch.__version__,
        "command": command,
    }


def append_rows(name, rows):
    """Appends rows (dicts with one set of keys) to bench/results/<name>.csv and .jsonl."""
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{name}.csv")
    fields = list(rows[0])
    old_rows, old_fields = [], None
    if os.path.exists(path):
        with open(path, newline="") as f:
            old_fields = next(csv.reader(f), None)
    if old_fields is not None and old_fields != fields:  # the columns changed: rewrite with both
        with open(path, newline="") as f:
            old_rows = list(csv.DictReader(f))
        fields = list(dict.fromkeys(old_fields + fields))
    with open(path, "w" if old_rows or old_fields is None else "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        if old_rows or old_fields is None:
            writer.writeheader()
            writer.writerows(old_rows)
        writer.writerows(rows)
    with open(os.path.join(RESULTS, f"{name}.jsonl"), "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def table(rows, columns):
    """A plain-text table of rows over the given columns."""
    cells = [[str(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)
