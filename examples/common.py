"""What the examples share: the device, the process group of the distributed ones, a progress bar
that shows epsilon, checkpoints, and the final JSON summary."""
import gc
import json
import os
import time

import torch


def device(name):
    """"auto": a GPU when there is one."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def init_distributed():
    """The process group torchrun describes: NCCL when every local rank has a GPU (that GPU made
    current), gloo otherwise. Returns this rank's device."""
    import torch.distributed as dist

    use_cuda = torch.cuda.is_available() and torch.cuda.device_count() >= int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return torch.device("cuda") if use_cuda else torch.device("cpu")


def finish_distributed():
    import torch.distributed as dist

    dist.barrier()  # no rank tears gloo down while another still talks to it
    dist.destroy_process_group()
    # Free the process group now, not in the interpreter's final collection: there, gloo's
    # threads may still need the GIL and abort the process ("terminate called ...").
    gc.collect()


def progress(total, desc, quiet=False):
    """A tqdm bar (a plain counter when tqdm is missing or quiet is set)."""
    try:
        if quiet:
            raise ImportError
        from tqdm import tqdm
        return tqdm(total=total, desc=desc, dynamic_ncols=True, leave=False)
    except ImportError:
        class Bar:
            def update(self, n=1):
                pass

            def set_postfix(self, **kwargs):
                pass

            def close(self):
                pass
        return Bar()


class Meter:
    """Wall time, examples seen and peak memory of a run."""

    def __init__(self, dev):
        self.dev, self.start, self.examples = dev, time.perf_counter(), 0
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)

    def summary(self):
        seconds = time.perf_counter() - self.start
        peak = torch.cuda.max_memory_allocated(self.dev) if self.dev.type == "cuda" else _peak_rss()
        return {"seconds": round(seconds, 2), "examples_per_second": round(self.examples / max(seconds, 1e-9), 1),
                "peak_memory_mib": round(peak / 2**20, 1)}


def _peak_rss():
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return 0


def save_checkpoint(path, **state):
    """Written to a temporary file first: an interrupted save never leaves a broken checkpoint."""
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path):
    return torch.load(path, weights_only=False) if path and os.path.exists(path) else None


def write_summary(out_dir, name, summary):
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    with open(path, "w") as f:
        json.dump(summary, f, indent=1)
    return path
