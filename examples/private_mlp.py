"""Private training end to end: an MLP on a synthetic 10-class problem, Poisson batches split
into micro-batches, a target epsilon, and a checkpoint that resumes exactly.

    python examples/private_mlp.py                       # 3 epochs at epsilon 3
    python examples/private_mlp.py --checkpoint ck.pt    # saves after every epoch, resumes from it
    python examples/private_mlp.py --checkpoint ck.pt --stop-after 0   # ... interrupted after epoch 0
"""
import argparse
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import bk_kernels as bk


def synthetic(n, features=32, classes=10, seed=0):
    """Gaussian blobs around 10 fixed random centres (the same for every seed): learnable, not trivial."""
    centres = torch.randn(classes, features, generator=torch.Generator().manual_seed(1234)) * 0.5
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=gen)
    x = centres[y] + torch.randn(n, features, generator=gen)
    return torch.utils.data.TensorDataset(x, y)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=20_000)
    parser.add_argument("--batch-size", type=int, default=512, help="expected (logical) batch size")
    parser.add_argument("--micro-batch", type=int, default=128, help="at most this many examples per backward")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--epsilon", type=float, default=3.0)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None, help="noise and sampling seed (default: secure, from the OS)")
    parser.add_argument("--checkpoint", default=None, help="save here after every epoch; resume from it if present")
    parser.add_argument("--stop-after", type=int, default=None, help="stop after this epoch (to try resuming)")
    args = parser.parse_args(argv)

    train, test = synthetic(args.samples), synthetic(2000, seed=1)
    torch.manual_seed(0)
    model = bk.convert(nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                                     nn.Linear(256, 10)))
    engine = bk.PrivacyEngine(model, batch_size=args.batch_size, sample_size=len(train), epochs=args.epochs,
                              target_epsilon=args.epsilon, max_grad_norm=args.max_grad_norm, seed=args.seed)
    optimizer = engine.attach(torch.optim.AdamW(model.parameters(), lr=2e-3))
    loader = bk.data.poisson_loader(train, batch_size=args.batch_size, seed=args.seed)
    first_epoch = 0
    if args.checkpoint and os.path.exists(args.checkpoint):
        state = torch.load(args.checkpoint)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        engine.load_state_dict(state["engine"])
        loader.generator.set_state(state["sampling"])
        first_epoch = state["epoch"] + 1
        print(f"resumed after epoch {state['epoch']} ({engine.steps} steps)")
    print(f"noise multiplier {engine.noise_multiplier:.3f} for epsilon {args.epsilon} at delta "
          f"{engine.target_delta:.2e}, {args.epochs * len(loader)} steps")

    for epoch in range(first_epoch, args.epochs):
        model.train()
        for batch in loader:
            for x, y in bk.data.micro_batches(batch, args.micro_batch):
                F.cross_entropy(model(x), y).backward()  # mean over the micro-batch: the engine rescales
            optimizer.step()
            optimizer.zero_grad()
        model.eval()
        with torch.no_grad():
            x, y = test.tensors
            accuracy = (model(x).argmax(1) == y).float().mean().item()
        print(f"epoch {epoch}: test accuracy {accuracy:.3f}, epsilon spent {engine.epsilon():.3f}")
        if args.checkpoint:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "engine": engine.state_dict(), "sampling": loader.generator.get_state(), "epoch": epoch},
                       args.checkpoint)
        if epoch == args.stop_after:
            break
    return accuracy, engine.epsilon()


if __name__ == "__main__":
    main()
