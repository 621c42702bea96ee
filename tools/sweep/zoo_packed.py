"""bk.verify with engine.example_rows(bk.packed_sequences()) over every causal language model of
the test zoo (python_tests/zoo.py) and 20 more transformers architectures (ARCHS, tiny): 4 sequences of 5, 7, 4 and 6 tokens packed into one row
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


# More transformers causal LMs, tiny (not in the zoo): class prefix -> config extras
ARCHS = {"Qwen3": dict(head_dim=8), "Phi3": dict(pad_token_id=0), "Phi": {}, "Gemma2": dict(head_dim=8),
         "Gemma3": dict(head_dim=8, sliding_window=4), "Olmo": {}, "Olmo2": {}, "SmolLM3": dict(pad_token_id=0),
         "Granite": {}, "Cohere": {}, "StableLm": {}, "Starcoder2": {}, "GPTNeoX": {},
         "Exaone4": dict(head_dim=8), "Glm": dict(head_dim=8, pad_token_id=0), "Glm4": dict(head_dim=8, pad_token_id=0),
         "Helium": dict(head_dim=8), "Arcee": {}, "SeedOss": dict(head_dim=8), "Apertus": {}}
# transformers refuses sdpa for these: eager attention (a float32 softmax inside a float64 model)
EAGER = {"Gemma2"}


def archs():
    import transformers
    for name, extra in ARCHS.items():
        config_class = getattr(transformers, "Gemma3TextConfig" if name == "Gemma3" else f"{name}Config")
        config = config_class(vocab_size=zoo.VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, **extra)
        config._attn_implementation = "eager" if name in EAGER else "sdpa"
        yield name, (lambda c=config, n=name: getattr(transformers, f"{n}ForCausalLM")(c).double())


def main():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, zoo.VOCAB, (1, sum(LENGTHS)), generator=g)
    positions = torch.cat([torch.arange(n) for n in LENGTHS])[None]
    counts = {"OK": 0, "MISMATCH": 0, "refused": 0}
    for name, build in [(n, b) for n, (b, _, _) in zoo.ZOO.items()] + list(archs()):
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
