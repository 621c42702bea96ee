"""What the privacy engine needs to know of a model sharded by FSDP2 (torch's `fully_shard`).

FSDP2 keeps each trainable parameter as a DTensor sharded on dim 0 over a 1-D device mesh (rank r
holds rows [r*ceil(n/W), ...) of n, torch.chunk's split) and, around each unit's forward and
backward, swaps in a plain unsharded Parameter gathered from the shards. The bk layers see (and
hand the engine) that unsharded Parameter; the engine book-keeps, clips and steps the sharded
one. This module maps one to the other and says where a rank's shard lies. The map reads FSDP2's
FSDPParam objects (`sharded_param`, `_unsharded_param`), its only private API used here.
"""
import math

import torch
import torch.distributed as dist

try:  # torch.distributed may be built without FSDP (no distributed support at all)
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover
    FSDPModule = DTensor = Shard = None


def is_fsdp2(model):
    return FSDPModule is not None and any(isinstance(m, FSDPModule) for m in model.modules())


def is_fsdp1(model):
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover
        return False
    return any(isinstance(m, FullyShardedDataParallel) for m in model.modules())


def is_sharded(p):
    return DTensor is not None and isinstance(p, DTensor)


def local(t):
    """This rank's part of a DTensor, or the tensor itself."""
    return t.to_local() if is_sharded(t) else t


def fsdp_params(model):
    """[(sharded Parameter, FSDPParam)] of every fully_shard unit in `model`."""
    out = []
    for module in model.modules():
        if isinstance(module, FSDPModule):
            state = module._get_fsdp_state()
            group = getattr(state, "_fsdp_param_group", None)
            for fsdp_param in (group.fsdp_params if group is not None else []):
                out.append((fsdp_param.sharded_param, fsdp_param))
    return out


def unsharded_of(fsdp_param):
    """The unsharded Parameter FSDP2 swaps in for the forward (None before the first all-gather)."""
    return getattr(fsdp_param, "_unsharded_param", None)


# torch 2.14 renamed reduce_scatter_tensor (deprecated there); the GPU image's 2.11 has only the old name
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class Shard0:
    """Where a rank's part of a dim-0 sharded parameter lies: rows [start, start + rows) of
    `n` on a mesh of `world` ranks, each holding `chunk` = ceil(n / world) rows when padded."""

    def __init__(self, p, name):
        mesh = p.device_mesh
        if mesh.ndim != 1 or len(p.placements) != 1 or p.placements[0] != Shard(0):
            raise ValueError(
                f"bk.distributed: parameter {name!r} is sharded as {tuple(p.placements)} over a {mesh.ndim}-D mesh; "
                "only FSDP2's default (Shard(0) over a 1-D mesh: fully_shard without shard_placement_fn, "
                "no HSDP or tensor parallelism) is supported")
        self.group = mesh.get_group()
        self.world, self.rank = mesh.size(), mesh.get_local_rank()
        self.n = p.shape[0] if p.dim() else 1
        self.chunk = math.ceil(self.n / self.world)
        self.start = min(self.rank * self.chunk, self.n)
        self.rows = min(self.chunk, self.n - self.start)
        if p.to_local().shape[:1] != (self.rows,) and p.dim():
            raise ValueError(f"bk.distributed: parameter {name!r} holds {p.to_local().shape[0]} rows on rank "
                             f"{self.rank}, not the {self.rows} of torch.chunk's split that FSDP2 makes")
        self.row_numel = math.prod(p.shape[1:])

    def reduce_scatter(self, full):
        """The sum over ranks of `full` (this rank's whole-parameter tensor), this rank's rows only:
        one reduce-scatter, the input padded to world * chunk rows."""
        flat = full.reshape(self.n, self.row_numel)
        padded_rows = self.world * self.chunk
        if padded_rows != self.n:
            flat = torch.cat([flat, flat.new_zeros(padded_rows - self.n, self.row_numel)])
        out = flat.new_empty(self.chunk, self.row_numel)
        _reduce_scatter(out, flat.contiguous(), group=self.group)
        return out[: self.rows]

    def first_element(self):
        """The row-major index of this shard's first element in the whole parameter."""
        return self.start * self.row_numel
