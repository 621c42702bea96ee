"""bk.verify with engine.example_rows(bk.packed_sequences()) over every causal language model of
the test zoo (python_tests/zoo.py): 4 sequences of 5, 7, 4 and 6 tokens packed into one row
(position_ids restarting, no attention_mask, use_cache=False), each sequence's mean token loss.
One line per model: OK, MISMATCH, or the engine's refusal (a layer family that reads examples per
row, a module that mixes positions, attention whose masks transformers makes without its
packed-sequence detection).

    python tools/sweep/zoo_packed.py            # ~1 min on 2 cores
"""
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
warnings.filterwarnings("ignore")

import bk_kernels as bk  # noqa: E402
from bk_kernels.hf import example_losses  # noqa: E402
from python_tests import zoo  # noqa: E402

LENGTHS = (5, 7, 4, 6)


def loss_fn(model, batch):
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    return example_losses(logits, batch["input_ids"], True, position_ids=batch["position_ids"]).mean()


def causal_lm(model):
    config = getattr(model, "config", None)
    return config is not None and callable(getattr(model, "can_generate", None)) and model.can_generate() and \
        not getattr(config, "is_encoder_decoder", False)


def main():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, zoo.VOCAB, (1, sum(LENGTHS)), generator=g)
    positions = torch.cat([torch.arange(n) for n in LENGTHS])[None]
    counts = {"OK": 0, "MISMATCH": 0, "refused": 0}
    for name, (build, _, _) in zoo.ZOO.items():
        torch.manual_seed(0)
        model = build()
        if not causal_lm(model):
            continue
        started = time.time()
        try:
            report = bk.verify(model, loss_fn, {"input_ids": ids, "position_ids": positions},
                               example_rows=bk.packed_sequences())
            kind = "OK" if report.ok else "MISMATCH"
            status = f"{kind} norm {report.norm_error:.1e} update {report.update_error:.1e}"
        except Exception as err:  # noqa: BLE001  (a line per model, whatever it raises)
            kind, status = "refused", f"{type(err).__name__}: {str(err)[:220]}"
        counts[kind] += 1
        print(f"{name:28s} {time.time() - started:5.1f}s {status}", flush=True)
    print(", ".join(f"{v} {k}" for k, v in counts.items()))


if __name__ == "__main__":
    main()
