"""Kernels, one file per op. Every op takes `backend=`: "auto", "cpu", "cuda", "triton" or
"torch" (chunked pure PyTorch), and has a pure-PyTorch float64 `<op>_ref` beside it."""
from ._backend import BACKENDS, available_backends
from .direct_norm import direct_norm, direct_norm_ref
from .ghost_norm import ghost_norm, ghost_norm_ref

__all__ = [
    "BACKENDS",
    "available_backends",
    "direct_norm",
    "direct_norm_ref",
    "ghost_norm",
    "ghost_norm_ref",
]
