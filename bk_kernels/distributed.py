"""Data-parallel private training over torch.distributed (gloo on CPUs, nccl on GPUs).

Every rank holds the whole model and trains on its own shard of each Poisson batch:

    torch.distributed.init_process_group("nccl")          # e.g. under torchrun
    model = bk.convert(MyModel().cuda())
    engine = bk.distributed.DistributedPrivacyEngine(model, batch_size=1024, sample_size=len(ds), ...)
    optimizer = engine.attach(torch.optim.AdamW(model.parameters(), lr=1e-3))
    for x, y in bk.distributed.poisson_loader(ds, batch_size=1024):   # this rank's part of the batch
        F.cross_entropy(model(x.cuda()), y.cuda()).backward()
        optimizer.step(); optimizer.zero_grad()

Do NOT wrap the model in DistributedDataParallel: DDP averages ordinary gradients, and bk layers
produce none (PrivacyEngine refuses a wrapped model). Instead, at each step every rank clips its
own examples in its backward (the clip factors of an example need only that example), the
clipped sums are added across ranks with one all-reduce, rank 0 alone adds the Gaussian noise
(so the sum holds exactly one draw of N(0, (sigma R)^2) per coordinate), and the result is divided
by the global expected batch size. Every rank then holds the same gradient and takes the same
optimizer step: this is, up to float rounding, the step one process would take on the union of
the ranks' batches.

The batch sizes and dataset size given to the engine are GLOBAL (the same on every rank), so the
accountant sees one Poisson-subsampled Gaussian mechanism per step with q = batch_size /
sample_size. bk.distributed.poisson_loader samples that way: rank r draws each example of its
shard (indices r, r + W, r + 2W, ...) independently with probability q from a generator of its own,
so the union over ranks is a Poisson sample of the whole dataset.
"""
import hashlib

import torch
import torch.distributed as dist
from torch.utils.data import Subset, default_collate

from .data import PoissonDataLoader, _check_loader_args, epoch_steps
from .engine import PrivacyEngine

__all__ = ["DistributedPrivacyEngine", "poisson_loader"]

# Gradients are all-reduced in flat buckets of at most this many bytes (one collective per bucket).
BUCKET_BYTES = 64 << 20


def _group_rank_and_size(process_group):
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("bk.distributed: torch.distributed is not initialized; call "
                           "torch.distributed.init_process_group first (torchrun sets up its environment)")
    return dist.get_rank(process_group), dist.get_world_size(process_group)


class DistributedPrivacyEngine(PrivacyEngine):
    """PrivacyEngine for data-parallel training: the same arguments (batch_size and sample_size
    are global), plus `process_group` (default: the whole world).

    On construction, every rank's parameters and buffers are overwritten with rank 0's (as DDP
    does), and the ranks check that they agree on the engine's settings and the model's
    parameters. Rank 0's noise seed is used by all (secure mode draws it on rank 0). At each step,
    the ranks first agree that every one of them is ready (had a backward, no bad input): if one
    is not, all raise and no parameter moves anywhere.

    Not supported: torch.amp.GradScaler (a rank's fp16 overflow would have to skip the step on
    every rank; use bf16 autocast, which needs no scaler).
    """

    def __init__(self, model, *, process_group=None, **engine_kwargs):
        self.process_group = process_group
        self.rank, self.world_size = _group_rank_and_size(process_group)
        self._src = dist.get_global_rank(process_group, 0) if process_group is not None else 0
        super().__init__(model, **engine_kwargs)
        try:
            self._check_ranks_agree()
        except ValueError:
            self.detach()  # leave the model as it was
            raise
        with torch.no_grad():  # every rank starts from rank 0's model
            for t in [*model.parameters(), *model.buffers()]:
                dist.broadcast(t.data, src=self._src, group=process_group)
        seed = [self._seed]
        dist.broadcast_object_list(seed, src=self._src, group=process_group)
        self._seed = seed[0]

    def _check_ranks_agree(self):
        mine = {"batch_size": self.batch_size, "sample_size": self.sample_size,
                "noise_multiplier": self.noise_multiplier, "max_grad_norm": self.max_grad_norm,
                "clipping_fn": self.clipping_fn, "gamma": self.gamma, "clipping_style": repr(self.clipping_style),
                "loss_reduction": self.loss_reduction, "accountant": self.accountant, "batch_first": self.batch_first,
                "target_delta": self.target_delta, "parameters": self._parameter_signature()}
        everyone = [None] * self.world_size
        dist.all_gather_object(everyone, mine, group=self.process_group)
        for r, theirs in enumerate(everyone):
            differ = [k for k in mine if theirs[k] != everyone[0][k]]
            if differ:
                raise ValueError(f"DistributedPrivacyEngine: rank {r} differs from rank 0 in {', '.join(differ)}; "
                                 "every rank must build the same model and engine")

    def attach(self, optimizer, *, grad_scaler=None):
        if grad_scaler is not None:
            raise ValueError("DistributedPrivacyEngine: a GradScaler is not supported (an fp16 overflow on one rank "
                             "would have to skip the step on all); train under bf16 autocast instead")
        return super().attach(optimizer)

    def _privatize(self):
        # Agree first: a rank that cannot step must stop every rank before any collective on the
        # gradients, or the others would step (or hang) without it.
        try:
            self._check_ready_to_step()
            problem = None
        except (RuntimeError, ValueError) as err:
            problem = err
        device = self._params[0].device
        flag = torch.tensor([0.0 if problem is None else 1.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.process_group)
        if problem is not None:
            raise problem
        if flag.item() > 0:
            raise RuntimeError("DistributedPrivacyEngine: another rank could not take this step (see its error): no "
                               "parameter moved, no noise was added and no privacy budget was spent")
        # Only rank 0 draws noise; every rank divides by the global batch size; the sum over
        # ranks then holds one draw of noise per coordinate.
        self._noise_and_scale(add_noise=self.rank == 0)
        self._all_reduce_grads()
        self.steps += 1
        self._spend()
        self._ready_for_step = False

    def _all_reduce_grads(self):
        buckets, current, current_key, size = [], [], None, 0  # consecutive grads of one device and dtype
        for p in self._params:
            key, nbytes = (p.grad.device, p.grad.dtype), p.grad.numel() * p.grad.element_size()
            if current and (key != current_key or size + nbytes > BUCKET_BYTES):
                buckets.append(current)
                current, size = [], 0
            current.append(p.grad)
            current_key, size = key, size + nbytes
        if current:
            buckets.append(current)
        for grads in buckets:
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, group=self.process_group)
            offset = 0
            for g in grads:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()


def poisson_loader(dataset, sample_rate=None, batch_size=None, *, rank=None, world_size=None, seed=None,
                   collate_fn=None, num_workers=0, pin_memory=False, **loader_kwargs):
    """This rank's part of each Poisson batch of `dataset` (see bk.data.poisson_loader).

    sample_rate / batch_size are GLOBAL: q, or the expected batch size over all ranks
    (q = batch_size / len(dataset)), as given to DistributedPrivacyEngine. Rank r's shard is
    dataset[r::world_size]; each of its examples joins each step independently with probability
    q, so the union over ranks is a Poisson sample of the whole dataset. Every rank yields the
    same number of batches, round(1/q) an epoch; a rank's batch may be empty (run the step anyway).

    rank, world_size: default to torch.distributed's. seed: an int makes the sampling
    reproducible (rank r uses a generator seeded from (seed, r): ranks must never share draws, or
    examples of different shards would join batches together); None draws from the operating
    system on every rank. The loader's `sample_rate` is q and `expected_batch_size` q * (shard size).
    """
    if (rank is None) != (world_size is None):
        raise ValueError("bk.distributed.poisson_loader: give both rank and world_size, or neither")
    if rank is None:
        rank, world_size = _group_rank_and_size(None)
    for value, name in ((rank, "rank"), (world_size, "world_size")):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"bk.distributed.poisson_loader: {name} must be an int, got {value!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"bk.distributed.poisson_loader: need 0 <= rank < world_size, got rank {rank} of "
                         f"{world_size}")
    if "generator" in loader_kwargs:
        raise ValueError("bk.distributed.poisson_loader: give seed=, not generator= (each rank derives its own "
                         "generator; one shared by ranks would sample their shards together)")
    # The generator comes seeded from the operating system (seed=None: every rank its own draw);
    # a seed is mixed with the rank, so that ranks never share draws.
    n, q, generator = _check_loader_args("bk.distributed.poisson_loader", dataset, sample_rate, batch_size, None,
                                         seed, loader_kwargs)
    if n < world_size:
        raise ValueError(f"bk.distributed.poisson_loader: {n} examples cannot be shared by {world_size} ranks")
    if seed is not None:
        generator.manual_seed(int.from_bytes(_mix(seed, rank), "little") >> 1)
    shard = Subset(dataset, range(rank, n, world_size))
    return PoissonDataLoader(shard, q, epoch_steps(q), generator, collate_fn or default_collate,
                             num_workers=num_workers, pin_memory=pin_memory, **loader_kwargs)


def _mix(seed, rank):
    """8 bytes that differ for every (seed, rank) pair."""
    return hashlib.sha256(f"bk_kernels.distributed/{seed}/{rank}".encode()).digest()[:8]
