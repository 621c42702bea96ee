"""Fresh processes for the memory measurements (models, max_batch): each measurement runs in a
process of its own, so no earlier allocation (malloc arenas, allocator caches) hides or adds to
its peak.

The processes are forked from a server that has already imported torch (and torch._dynamo, which
torch.optim imports at the first optimizer: 2.4 s), the bench and the model libraries, so each
one starts in a fraction of a second instead of ~5 s (the forkserver start method; the server
runs no torch op, so no thread pool or CUDA context is forked). On the CPU two run at a time:
a child's peak RSS is its own, and most of a small child's time is single-threaded Python.
"""
import multiprocessing
import multiprocessing.connection
import os
import sys
import time

# Imported once by the server; a library that is not installed is skipped.
PRELOAD = ["torch", "torch._dynamo", "bench.models", "bench.maxbatch", "transformers", "opacus"]

_context = None


def _forkserver():
    global _context
    if _context is None:
        # The server and its children allocate as memory measurements do (harness reads this at
        # import): large blocks mmapped and returned when freed.
        os.environ["BK_BENCH_ALLOCATOR"] = "memory"
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def parallel(device):
    """How many measurements run at a time: two on a CPU with two cores or more (RSS is per
    process); one on a GPU, where the processes would share its memory."""
    return 2 if device.type == "cpu" and (os.cpu_count() or 1) >= 2 else 1


def _run_in_child(target, args, send):
    os.environ.setdefault("TQDM_DISABLE", "1")
    devnull = os.open(os.devnull, os.O_WRONLY)  # the libraries' warnings would interleave with the tables
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    try:
        result = target(args)
    except Exception as err:  # noqa: BLE001  (reported in the row)
        result = f"error: {type(err).__name__}: {str(err)[:200]}"
    send.send(result)


def run(target, jobs, parallel=1, timeout=1800, on_done=None):
    """[target(args) for args in jobs], each call in a fresh process, `parallel` at a time;
    an error string in place of a result that failed, crashed or timed out. `target` must be a
    module-level function of an importable module."""
    if not jobs:
        return []
    ctx = _forkserver()
    sys.stdout.flush()
    results, pending, running = [None] * len(jobs), list(enumerate(jobs)), {}
    while pending or running:
        while pending and len(running) < parallel:
            i, args = pending.pop(0)
            recv, send = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_run_in_child, args=(target, args, send), daemon=True)
            proc.start()
            send.close()
            running[i] = (proc, recv, time.monotonic())
        multiprocessing.connection.wait([recv for _, recv, _ in running.values()], timeout=1.0)
        for i, (proc, recv, started) in list(running.items()):
            if recv.poll():
                try:
                    results[i] = recv.recv()
                except EOFError:  # died before sending (killed for memory, a crash)
                    proc.join()
                    results[i] = f"error: subprocess exited {proc.exitcode}"
            elif time.monotonic() - started > timeout:
                proc.kill()
                results[i] = f"error: subprocess timed out after {timeout} s"
            else:
                continue
            proc.join()
            recv.close()
            del running[i]
            if on_done:
                on_done(i)
    return results
