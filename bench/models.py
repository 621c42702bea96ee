"""Whole training steps: non-private autograd against BK (and, where installed, Opacus).

Each method gets its own copy of the model and optimizer; after warm-up, every round runs one
step of each method in turn (interleaved, so the machine's drift hits all alike), and the
per-round ratio to the non-private step is reported (median, min, max over rounds).
"""
import copy
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import bk_kernels as bk
from bench import harness


def gpt2(layers=4, width=256, T=128, B=8, vocab=50257):
    import transformers

    config = transformers.GPT2Config(vocab_size=vocab, n_positions=max(T, 128), n_embd=width, n_layer=layers,
                                     n_head=width // 64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    ids = torch.randint(0, vocab, (B, T))
    positions = torch.arange(T).expand(B, -1)

    def loss_fn(m):
        logits = m(input_ids=ids, position_ids=positions).logits
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())

    return model, loss_fn, dict(model="gpt2", layers=layers, width=width, T=T, B=B)


def mlp(B=256, width=512, depth=3, classes=10):
    torch.manual_seed(0)
    layers = [nn.Linear(784, width), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(width, classes))
    x, y = torch.randn(B, 784), torch.randint(0, classes, (B,))
    return model, (lambda m: F.cross_entropy(m(x), y)), dict(model="mlp", layers=depth, width=width, T=1, B=B)


def make_steps(model, loss_fn, B, backends, sigma=1.0):
    """name -> a function taking one training step."""
    steps = {}
    plain = copy.deepcopy(model)
    opt = torch.optim.SGD(plain.parameters(), lr=1e-3)

    def non_private():
        opt.zero_grad()
        loss_fn(plain).backward()
        opt.step()

    steps["non-private"] = non_private
    for backend in backends:
        private = bk.convert(copy.deepcopy(model))
        engine = bk.PrivacyEngine(private, batch_size=B, sample_size=100 * B, noise_multiplier=sigma,
                                  max_grad_norm=1.0, backend=backend, seed=0)
        popt = engine.attach(torch.optim.SGD(private.parameters(), lr=1e-3))

        def bk_step(m=private, o=popt):
            o.zero_grad()
            loss_fn(m).backward()
            o.step()

        steps[f"bk ({backend})"] = bk_step
    return steps


SCENARIOS = {"gpt2": gpt2, "mlp": mlp}


def run(device, dtype, quick, command, names=("mlp", "gpt2")):
    if device.type != "cpu":
        raise NotImplementedError("models scenario: GPU runs are not written yet")
    backends = ["cpu"]
    ctx = harness.context(device, command)
    rows = []
    warmup, rounds = (1, 5) if quick else (2, 15)
    for name in names:
        model, loss_fn, shape = SCENARIOS[name]()
        steps = make_steps(model, loss_fn, shape["B"], backends)
        progress = harness.Progress((warmup + rounds) * len(steps), f"steps {name}")
        times = {k: [] for k in steps}
        for r in range(warmup + rounds):
            for k, fn in steps.items():
                t0 = time.perf_counter()
                fn()
                if r >= warmup:
                    times[k].append(time.perf_counter() - t0)
                progress.step(f"{name} round {r} {k}")
        for k in steps:
            ratios = [t / base for t, base in zip(times[k], times["non-private"])]
            rows.append(dict(ctx, scenario="step", **shape, method=k, dtype="float32",
                             median_ms=round(statistics.median(times[k]) * 1e3, 2),
                             min_ms=round(min(times[k]) * 1e3, 2), max_ms=round(max(times[k]) * 1e3, 2),
                             ratio=round(statistics.median(ratios), 3), ratio_min=round(min(ratios), 3),
                             ratio_max=round(max(ratios), 3)))
    return rows


COLUMNS = ["model", "layers", "width", "T", "B", "method", "median_ms", "min_ms", "max_ms", "ratio", "ratio_min",
           "ratio_max"]
