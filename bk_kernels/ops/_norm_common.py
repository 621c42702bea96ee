"""Argument handling shared by the per-example norm ops (ghost_norm, direct_norm)."""
import torch

NORM_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def accumulation_dtype(dtype):
    """The dtype rule, written once for Python: sums and norms are float64 for float64 inputs,
    float32 for float32/bf16/fp16 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


norm_dtype = accumulation_dtype  # norms follow the same rule


def check_norm_inputs(a, g, op):
    """Validates a:[B,T,d] (or [B,d]) and g:[B,T,p] (or [B,p]); returns them as 3-D."""
    if not isinstance(a, torch.Tensor) or not isinstance(g, torch.Tensor):
        raise TypeError(f"{op}: a and g must be tensors, got {type(a).__name__} and {type(g).__name__}")
    if a.dim() == 2 and g.dim() == 2:  # a linear layer on [B, d] inputs: T = 1
        a, g = a.unsqueeze(1), g.unsqueeze(1)
    if a.dim() != 3 or g.dim() != 3:
        raise ValueError(
            f"{op}: expected a:[B,T,d] and g:[B,T,p] (or both 2-D), got shapes "
            f"{tuple(a.shape)} and {tuple(g.shape)}"
        )
    if a.shape[:2] != g.shape[:2]:
        raise ValueError(
            f"{op}: a and g must agree in batch and position dims, got {tuple(a.shape)} and {tuple(g.shape)}"
        )
    if a.dtype != g.dtype:
        raise ValueError(f"{op}: a and g must have one dtype, got {a.dtype} and {g.dtype}")
    if a.dtype not in NORM_DTYPES:
        raise ValueError(f"{op}: unsupported dtype {a.dtype}; supported: {NORM_DTYPES}")
    if a.device != g.device:
        raise ValueError(f"{op}: a and g must be on one device, got {a.device} and {g.device}")
    return a, g


def example_chunks(B, elems_per_example, budget_elems=1 << 24):
    """Ranges of examples whose temporaries stay within `budget_elems` elements."""
    step = max(1, budget_elems // max(1, elems_per_example))
    return [(lo, min(B, lo + step)) for lo in range(0, B, step)]
