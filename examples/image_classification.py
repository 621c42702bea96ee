"""Private image classification: accuracy against epsilon, with the non-private run beside it.

Data: scikit-learn's bundled handwritten digits (1797 8x8 images, 10 classes; real data that is
on every machine with scikit-learn), or CIFAR-10 through torchvision from --data DIR when it is
on disk there. Models: a CNN with GroupNorm, or a small ViT (timm). For each epsilon in
--epsilons, and non-private, the same model, steps and learning rate: Poisson batches, per-example
clipping to --max-grad-norm, noise calibrated so that the run spends exactly that epsilon at
delta = 1/N^1.1.

    python examples/image_classification.py                     # digits, CNN, epsilon 1 3 8 + non-private
    python examples/image_classification.py --model vit --epochs 30
    python examples/image_classification.py --dataset cifar10 --data ~/data --device cuda
    python examples/image_classification.py --quick             # a few steps (CI)
    python examples/image_classification.py --checkpoint ck.pt  # save each run's progress
    python examples/image_classification.py --checkpoint ck.pt --resume   # ... and continue from it

Writes OUT/image_classification.json (per run: epsilon, delta, steps, test accuracy, throughput,
peak memory) and OUT/accuracy_vs_epsilon.png.
"""
import argparse
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import bk_kernels as bk
import common


def digits(seed=0):
    """scikit-learn's digits: 8x8 grey images in [0, 16], scaled to [0, 1]; 400 held out for test."""
    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    y = torch.tensor(y)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x = (x - 0.5) / 0.5
    test, train = order[:400], order[400:]
    return (torch.utils.data.TensorDataset(x[train], y[train]), torch.utils.data.TensorDataset(x[test], y[test]),
            (1, 8, 10))


def cifar10(root):
    import torchvision
    import torchvision.transforms as tv
    norm = tv.Compose([tv.ToTensor(), tv.Normalize((0.49, 0.48, 0.45), (0.25, 0.24, 0.26))])
    train = torchvision.datasets.CIFAR10(root, train=True, download=False, transform=norm)
    test = torchvision.datasets.CIFAR10(root, train=False, download=False, transform=norm)
    return train, test, (3, 32, 10)


def cnn(channels, size, classes, width=32):
    """Two conv blocks with GroupNorm (BatchNorm mixes the examples of a batch: not private)."""
    return nn.Sequential(
        nn.Conv2d(channels, width, 3, padding=1), nn.GroupNorm(4, width), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1, stride=2), nn.GroupNorm(4, 2 * width), nn.ReLU(),
        nn.Conv2d(2 * width, 2 * width, 3, padding=1, stride=2 if size > 8 else 1), nn.GroupNorm(4, 2 * width),
        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, classes))


def vit(channels, size, classes):
    import timm
    patch = 2 if size <= 8 else 4
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=size, patch_size=patch, in_chans=channels,
                             embed_dim=64, depth=4, num_heads=4, num_classes=classes, global_pool="avg",
                             class_token=False)


def accuracy(model, data, dev, batch=512):
    model.eval()
    right = 0
    with torch.no_grad():
        for x, y in torch.utils.data.DataLoader(data, batch_size=batch):
            right += (model(x.to(dev)).argmax(1).cpu() == y).sum().item()
    return right / len(data)


def train_one(args, epsilon, train, test, shape, dev, checkpoint):
    """One run (epsilon None: non-private, same batches and steps); resumes from `checkpoint`."""
    torch.manual_seed(args.seed)
    model = (cnn(*shape, width=args.width) if args.model == "cnn" else vit(*shape)).to(dev)
    private = epsilon is not None
    batch_size = min(args.batch_size, len(train))
    steps = args.steps or args.epochs * bk.data.epoch_steps(batch_size / len(train))
    if private:
        bk.convert(model)
        engine = bk.PrivacyEngine(model, batch_size=batch_size, sample_size=len(train), steps=steps,
                                  target_epsilon=epsilon, max_grad_norm=args.max_grad_norm, seed=args.seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    if private:
        engine.attach(optimizer)
    loader = bk.data.poisson_loader(train, batch_size=batch_size, seed=args.seed)
    done, skip, interrupted = 0, 0, False
    state = common.load_checkpoint(checkpoint) if args.resume else None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if private:
            engine.load_state_dict(state["engine"])
        loader.generator.set_state(state["sampling"])  # as it was when the interrupted epoch began
        done, skip = state["step"], state["in_epoch"]
    meter = common.Meter(dev)
    bar = common.progress(steps, f"epsilon {epsilon}" if private else "non-private", quiet=args.quiet)
    bar.update(done)
    model.train()
    while done < steps:
        # The sampling generator as this epoch begins (iter() draws from it too) and the batches of
        # the epoch done: what a checkpoint keeps, so a resumed run draws the very same batches.
        epoch_start, in_epoch = loader.generator.get_state(), 0
        for x, y in loader:
            in_epoch += 1
            if skip:  # drawn again, identically, by the resumed run; trained before the interruption
                skip -= 1
                continue
            for xm, ym in bk.data.micro_batches((x, y), args.micro_batch):
                logits = model(xm.to(dev))
                if private:  # the mean over the micro-batch: the engine recovers each example's gradient
                    F.cross_entropy(logits, ym.to(dev)).backward()
                else:  # the same update without clipping or noise: the sum over the expected batch size
                    (F.cross_entropy(logits, ym.to(dev), reduction="sum") / batch_size).backward()
            optimizer.step()
            optimizer.zero_grad()
            meter.examples += len(y)
            done += 1
            bar.update(1)
            if private and (done % max(1, steps // 20) == 0 or done == steps):  # the accountant takes ~0.1 s
                bar.set_postfix(epsilon=f"{engine.epsilon():.2f}")
            interrupted = args.stop_after is not None and done == args.stop_after
            if checkpoint and (done % args.save_every == 0 or done == steps or interrupted):
                common.save_checkpoint(checkpoint, model=model.state_dict(), optimizer=optimizer.state_dict(),
                                       engine=engine.state_dict() if private else None,
                                       sampling=epoch_start, in_epoch=in_epoch, step=done)
            if done == steps or interrupted:
                break
        if interrupted:
            break
    bar.close()
    result = {"epsilon": engine.epsilon() if private else None, "target_epsilon": epsilon,
              "delta": engine.target_delta if private else None,
              "noise_multiplier": engine.noise_multiplier if private else 0.0, "steps": steps,
              "batch_size": batch_size, "test_accuracy": round(accuracy(model, test, dev), 4)}
    result.update(meter.summary())
    return result


def plot(results, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    private = [r for r in results if r["target_epsilon"] is not None]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([r["target_epsilon"] for r in private], [r["test_accuracy"] for r in private], "o-", label="private (bk)")
    for r in results:
        if r["target_epsilon"] is None:
            ax.axhline(r["test_accuracy"], color="grey", linestyle="--", label="non-private")
    ax.set_xscale("log")
    ax.set_xlabel("epsilon")
    ax.set_ylabel("test accuracy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=["digits", "cifar10"], default="digits")
    parser.add_argument("--data", default=None, help="folder holding CIFAR-10 (torchvision's layout; no download)")
    parser.add_argument("--model", choices=["cnn", "vit"], default="cnn")
    parser.add_argument("--width", type=int, default=32, help="the CNN's first conv channels")
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    parser.add_argument("--no-baseline", action="store_true", help="skip the non-private run")
    parser.add_argument("--epochs", type=int, default=40, help="epochs of Poisson batches (round(N / batch) steps each)")
    parser.add_argument("--steps", type=int, default=None, help="instead of --epochs")
    parser.add_argument("--batch-size", type=int, default=256, help="expected (Poisson) batch size")
    parser.add_argument("--micro-batch", type=int, default=256, help="at most this many examples per backward")
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="per-example clipping norm R")
    parser.add_argument("--seed", type=int, default=0, help="model, sampling and noise (a public seed is for research)")
    parser.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu or cuda")
    parser.add_argument("--checkpoint", default=None, help="checkpoint file prefix: each run saves there")
    parser.add_argument("--resume", action="store_true", help="continue each run from its checkpoint (--checkpoint)")
    parser.add_argument("--save-every", type=int, default=20, help="steps between checkpoints")
    parser.add_argument("--stop-after", type=int, default=None, help="stop every run after this many steps "
                        "(with --checkpoint: to try resuming)")
    parser.add_argument("--out", default="results", help="folder for the JSON summary and the plot")
    parser.add_argument("--quick", action="store_true", help="a few steps of two runs: checks the whole path")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.resume and not args.checkpoint:
        parser.error("--resume needs --checkpoint PREFIX (where the runs were saved)")
    if args.quick:
        args.steps, args.epsilons = 3, [8.0]
    dev = common.device(args.device)
    if args.dataset == "digits":
        train, test, shape = digits(args.seed)
    else:
        if args.data is None:
            parser.error("--dataset cifar10 needs --data DIR (torchvision's CIFAR-10 folder; nothing is downloaded)")
        train, test, shape = cifar10(args.data)
    runs = [None] * (not args.no_baseline) + list(args.epsilons)
    results = []
    for epsilon in runs:
        checkpoint = f"{args.checkpoint}.{'nonprivate' if epsilon is None else f'eps{epsilon:g}'}" \
            if args.checkpoint else None
        result = train_one(args, epsilon, train, test, shape, dev, checkpoint)
        results.append(result)
        label = "non-private" if epsilon is None else f"epsilon {result['epsilon']:.2f}"
        print(f"{args.dataset} {args.model} {label}: test accuracy {result['test_accuracy']:.3f} "
              f"({result['steps']} steps, {result['seconds']} s)")
    summary = {"dataset": args.dataset, "model": args.model, "train_examples": len(train), "device": str(dev),
               "runs": results}
    os.makedirs(args.out, exist_ok=True)
    summary["plot"] = plot(results, os.path.join(args.out, "accuracy_vs_epsilon.png"))
    print("summary:", common.write_summary(args.out, "image_classification.json", summary))
    return summary


if __name__ == "__main__":
    main()
