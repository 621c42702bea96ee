"""One example as several rows (PrivacyEngine.example_rows): what clipping an example's rows
together costs over clipping each row alone, side by side with the non-private step.

- gpt2-dpo: a DPO step as TRL batches it (chosen then rejected sequences in one forward, the
  loss a mean over pairs of -logsigmoid of the reward margin) on Hugging Face GPT-2;
  bk.stacked_rows(2): linear maps and embeddings become two uses over the pairs (cross terms);
- cnn-multiplicity: augmentation multiplicity on the bench's GroupNorm CNN (K copies of each
  image as consecutive rows, each example's loss the mean over its copies);
  bk.interleaved_rows(K): the rows side by side, views of the layers' own tensors.
"rows alone" is bk without the setting (each row clipped as an example: NOT private for these
batches, timed only as the cost to compare with). Rounds interleave one step of each method;
`ratio` is the median per-round time over non-private. Noise multiplier 1, SGD.
"""
import copy
import statistics

import torch
import torch.nn.functional as F

from bench import harness, workloads

CONFIGS = {"gpt2-dpo": dict(pairs=16, T=64, layers=4, width=256, vocab=8192),
           "cnn-multiplicity": dict(examples=16, copies=4, size=32)}
METHODS = ("non-private", "bk (rows alone)", "bk (examples whole)")


def _dpo(sizes, device, dtype):
    import transformers

    P, T = sizes["pairs"], sizes["T"]
    config = transformers.GPT2Config(vocab_size=sizes["vocab"], n_positions=T, n_embd=sizes["width"],
                                     n_layer=sizes["layers"], n_head=max(1, sizes["width"] // 64), resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).to(device, dtype)
    rows = torch.randint(0, sizes["vocab"], (2 * P, T), device=device)  # [chosen; rejected]
    reference = torch.zeros(2 * P, device=device, dtype=dtype)  # a frozen reference's log-probs (constant here)

    def loss(m):
        logits = m(input_ids=rows).logits[:, T // 2 - 1:-1]
        logp = F.log_softmax(logits.float(), -1).gather(2, rows[:, T // 2:, None]).squeeze(2).sum(1) - reference
        return -F.logsigmoid(0.1 * (logp[:P] - logp[P:])).mean()
    return model, loss, P, bk_rows(2, "stacked"), dict(B=P, rows=2 * P, T=T)


def _multiplicity(sizes, device, dtype):
    E, K = sizes["examples"], sizes["copies"]
    w = workloads.build("cnn", device, dtype, B=E * K, size=sizes["size"])
    x = w.inputs[0]
    y = w.targets[::K].repeat_interleave(K)  # the copies of an example share its label

    def loss(m):
        return F.cross_entropy(m(x), y)  # the mean over all rows = the mean over examples of their copies' mean
    return w.model, loss, E, bk_rows(K, "interleaved"), dict(B=E, rows=E * K, T=sizes["size"] ** 2)


def bk_rows(copies, order):
    import bk_kernels as bk

    return bk.stacked_rows(copies) if order == "stacked" else bk.interleaved_rows(copies)


def _step(model, loss, examples, rows, method):
    import bk_kernels as bk

    model = copy.deepcopy(model)
    if method == "non-private":
        opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    else:
        bk.convert(model)
        engine = bk.PrivacyEngine(model, batch_size=examples, sample_size=100 * examples, noise_multiplier=1.0,
                                  max_grad_norm=1.0, seed=0)
        opt = engine.attach(torch.optim.SGD(model.parameters(), lr=1e-4))
        if method == "bk (examples whole)":
            engine.example_rows(rows)

    def step():
        loss(model).backward()
        opt.step()
        opt.zero_grad()
    return step


def run(device, dtype, quick, command, configs=None):
    import warnings

    from bk_kernels import SamplingWarning
    warnings.filterwarnings("ignore", category=SamplingWarning)  # fixed synthetic batches, on purpose
    ctx = harness.context(device, command)
    rounds = 3 if quick else 11
    rows = []
    for config in [c for c in (configs or CONFIGS) if c in CONFIGS]:
        build = _dpo if config == "gpt2-dpo" else _multiplicity
        model, loss, examples, spec, shape = build(CONFIGS[config], device, dtype)
        steps = {m: _step(model, loss, examples, spec, m) for m in METHODS}
        for fn in steps.values():
            fn()  # warm-up
        times = {m: [] for m in METHODS}
        with harness.progress(rounds * len(METHODS), f"example rows {config}") as bar:
            for _ in range(rounds):
                for m, fn in steps.items():
                    times[m].append(harness.timed(fn, device))
                    bar.update(1)
        for m in METHODS:
            ratios = [t / b for t, b in zip(times[m], times["non-private"])]
            rows.append(dict(ctx, config=config, **shape, method=m, rounds=rounds,
                             median_ms=round(statistics.median(times[m]) * 1e3, 2),
                             ratio=round(statistics.median(ratios), 3), ratio_min=round(min(ratios), 3),
                             ratio_max=round(max(ratios), 3)))
    return rows


COLUMNS = ["config", "B", "rows", "T", "method", "rounds", "median_ms", "ratio", "ratio_min", "ratio_max"]
