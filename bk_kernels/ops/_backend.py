"""Which implementation an op call runs on: one rule, shared by every op."""
import functools
import os

import torch

from .. import _C

BACKENDS = ("auto", "cpu", "cuda", "triton", "torch")


@functools.cache  # fixed for the life of the process; asked on every op call on a GPU
def cuda_compiled():
    return bool(_C.build_info()["cuda"])


def triton_runs_on(device):
    """Triton runs on a GPU, or on CPU tensors through its interpreter (TRITON_INTERPRET=1)."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def available_backends(device):
    """The backends that can run on tensors on `device` in this process."""
    device = torch.device(device)
    names = ["torch"]
    if device.type == "cpu":
        names.append("cpu")
    if device.type == "cuda" and cuda_compiled():
        names.append("cuda")
    if triton_runs_on(device):
        names.append("triton")
    return names


def resolve(backend, device, op):
    """The concrete backend for `backend` on `device`, or a clear error saying why not."""
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cpu":
            return "cpu"
        if device.type == "cuda":
            return "cuda" if cuda_compiled() else "triton"
        return "torch"
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"{op}: backend='cpu' needs CPU tensors, got tensors on {device}")
    if backend == "cuda":
        if device.type != "cuda":
            raise ValueError(f"{op}: backend='cuda' needs CUDA tensors, got tensors on {device}")
        if not cuda_compiled():
            raise RuntimeError(
                f"{op}: bk_kernels._C was built without its CUDA kernels; rebuild with nvcc on "
                "PATH (or CUDA_HOME set) and BK_CUDA=1, or use backend='triton'"
            )
    if backend == "triton" and not triton_runs_on(device):
        raise RuntimeError(
            f"{op}: backend='triton' runs on CUDA tensors, or on CPU tensors only in Triton's "
            f"interpreter (set TRITON_INTERPRET=1 before importing triton); got tensors on {device}"
        )
    return backend
