"""Sharded private training: an HF Llama-style model (RMSNorm, grouped-query attention, SwiGLU)
split over the ranks by FSDP2 (`fully_shard`), bf16 compute through its MixedPrecisionPolicy,
Poisson batches from bk.distributed.poisson_loader, and a torch.distributed.checkpoint save and
resume. Gloo on CPUs, NCCL when every rank has a GPU.

    torchrun --standalone --nproc_per_node 2 examples/private_fsdp.py
    torchrun --standalone --nproc_per_node 2 examples/private_fsdp.py --checkpoint ckpt --stop-after 1
    torchrun --standalone --nproc_per_node 2 examples/private_fsdp.py --checkpoint ckpt --resume

The order matters: bk.convert(model), then fully_shard on each block and on the root, then
DistributedPrivacyEngine, then the optimizer. The data is synthetic (no download): sequences of
a noisy counting rule, so that the loss has somewhere to go.
"""
import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import bk_kernels as bk
from common import finish_distributed, init_distributed


def counting_sequences(n, vocab, length, seed):
    """Each sequence counts up by a step of its own from a random start (mod vocab); one token
    in ten is replaced by a random one."""
    gen = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab, (n, 1), generator=gen)
    step = torch.randint(1, 4, (n, 1), generator=gen)
    ids = (start + step * torch.arange(length)) % vocab
    noise = torch.rand(n, length, generator=gen) < 0.1
    return torch.where(noise, torch.randint(0, vocab, (n, length), generator=gen), ids)


def lm_loss(model, ids):
    logits = model(input_ids=ids).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=128)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=256, help="expected batch size over all ranks")
    parser.add_argument("--micro-batch", type=int, default=32, help="at most this many examples per backward")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--no-bf16", action="store_true", help="compute in float32 (default: bf16 policy)")
    parser.add_argument("--reduce-scatter", choices=bk.distributed.REDUCE_SCATTER, default="step",
                        help="once per step (memory grows with the micro-batches) or after every backward")
    parser.add_argument("--checkpoint", help="a folder: save the model, optimizer and engine there after each epoch")
    parser.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    parser.add_argument("--stop-after", type=int, help="stop after this many epochs (to resume later)")
    parser.add_argument("--seed", type=int, default=0, help="noise and sampling seed (None: secure, from the OS)")
    args = parser.parse_args(argv)

    import transformers
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    device = init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()

    train = TensorDataset(counting_sequences(args.samples, args.vocab, args.seq_len, seed=0))
    test = counting_sequences(512, args.vocab, args.seq_len, seed=1)[rank::world].to(device)
    config = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=args.width, intermediate_size=args.width * 3,
                                      num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=args.seq_len)
    torch.manual_seed(0)  # FSDP2 keeps each rank's own slice: every rank builds the same model
    model = bk.convert(transformers.LlamaForCausalLM(config)).to(device)
    mesh = init_device_mesh(device.type, (world,))
    policy = MixedPrecisionPolicy(param_dtype=None if args.no_bf16 else torch.bfloat16, reduce_dtype=torch.float32)
    for block in model.model.layers:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    # batch_size and sample_size are global
    engine = bk.distributed.DistributedPrivacyEngine(model, batch_size=args.batch_size, sample_size=len(train),
                                                     epochs=args.epochs, target_epsilon=args.epsilon, seed=args.seed,
                                                     reduce_scatter=args.reduce_scatter)
    optimizer = engine.attach(torch.optim.AdamW(model.parameters(), lr=args.lr))
    loader = bk.distributed.poisson_loader(train, batch_size=args.batch_size, seed=args.seed)  # this rank's shard

    first_epoch = 0
    if args.resume:
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=args.checkpoint)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        extra = torch.load(os.path.join(args.checkpoint, f"bk_rank{rank}.pt"), weights_only=False)
        engine.load_state_dict(extra["engine"])
        loader.generator.set_state(extra["sampler"])
        first_epoch = extra["epoch"] + 1

    for epoch in range(first_epoch, args.epochs):
        model.train()
        for (ids,) in loader:
            # as many backwards on every rank (a sharded model's collectives need all ranks)
            for (part,) in bk.distributed.micro_batches((ids,), args.micro_batch):
                lm_loss(model, part.to(device)).backward()
            optimizer.step()  # reduce-scatters the clipped sums into the shards, noises each shard
            optimizer.zero_grad()
        model.eval()
        with torch.no_grad():
            loss = lm_loss(model, test).reshape(1) * len(test)
            count = torch.tensor([float(len(test))], device=device)
        dist.all_reduce(loss)
        dist.all_reduce(count)
        test_loss = (loss / count).item()
        if rank == 0:
            print(f"epoch {epoch}: test loss {test_loss:.6f}, epsilon spent {engine.epsilon():.3f}", flush=True)
        if args.checkpoint:
            model_state, optim_state = get_state_dict(model, optimizer)
            dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=args.checkpoint)
            torch.save({"engine": engine.state_dict(), "sampler": loader.generator.get_state(), "epoch": epoch},
                       os.path.join(args.checkpoint, f"bk_rank{rank}.pt"))
        if args.stop_after is not None and epoch + 1 - first_epoch >= args.stop_after:
            break
    finish_distributed()
    return test_loss, engine.epsilon()


if __name__ == "__main__":
    main()
