"""Data-parallel private training: the MLP of private_mlp.py on several processes, each training on
its shard of every Poisson batch (bk.distributed). Gloo on CPUs, NCCL when every rank has a GPU.

    torchrun --standalone --nproc_per_node 2 examples/private_ddp.py
"""
import argparse

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import bk_kernels as bk
from common import finish_distributed, init_distributed
from private_mlp import synthetic


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=20_000)
    parser.add_argument("--batch-size", type=int, default=512, help="expected batch size over all ranks")
    parser.add_argument("--micro-batch", type=int, default=128, help="at most this many examples per backward")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--epsilon", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=None, help="noise and sampling seed (default: secure, from the OS)")
    args = parser.parse_args(argv)

    device = init_distributed()
    rank = dist.get_rank()

    train, test = synthetic(args.samples), synthetic(2000, seed=1)
    torch.manual_seed(0)  # rank 0's initial model is everyone's
    model = bk.convert(nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                                     nn.Linear(256, 10))).to(device)
    # batch_size and sample_size are global; the engine starts every rank from rank 0's parameters
    engine = bk.distributed.DistributedPrivacyEngine(model, batch_size=args.batch_size, sample_size=len(train),
                                                     epochs=args.epochs, target_epsilon=args.epsilon, seed=args.seed)
    optimizer = engine.attach(torch.optim.AdamW(model.parameters(), lr=2e-3))
    loader = bk.distributed.poisson_loader(train, batch_size=args.batch_size, seed=args.seed)  # this rank's shard

    for epoch in range(args.epochs):
        for batch in loader:
            for x, y in bk.data.micro_batches(batch, args.micro_batch):
                F.cross_entropy(model(x.to(device)), y.to(device)).backward()
            optimizer.step()  # all-reduces the clipped sums; rank 0 adds the noise
            optimizer.zero_grad()
        with torch.no_grad():
            x, y = test.tensors
            accuracy = (model(x.to(device)).argmax(1).cpu() == y).float().mean().item()
        if rank == 0:
            print(f"epoch {epoch}: test accuracy {accuracy:.3f}, epsilon spent {engine.epsilon():.3f}", flush=True)
    # every rank holds the same model: check it, as a user should once
    checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1)
    everyone = [torch.zeros_like(checksum) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, checksum)
    if rank == 0:
        print(f"ranks agree: {all(torch.equal(c, checksum) for c in everyone)}", flush=True)
    finish_distributed()
    return accuracy, engine.epsilon()


if __name__ == "__main__":
    main()
