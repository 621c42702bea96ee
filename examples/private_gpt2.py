"""Private fine-tuning of a Hugging Face GPT-2 (tied input/output embeddings) under bf16
autocast, on random token sequences (replace `tokens` with a real tokenized corpus).

    python examples/private_gpt2.py --layers 2 --width 128 --steps 5
"""
import argparse

import torch
import torch.nn.functional as F
import transformers

import bk_kernels as bk


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)

    config = transformers.GPT2Config(vocab_size=1000, bos_token_id=0, eos_token_id=0, n_positions=args.seq_len,
                                     n_embd=args.width,
                                     n_layer=args.layers, n_head=max(1, args.width // 64))
    torch.manual_seed(0)
    model = bk.convert(transformers.GPT2LMHeadModel(config))  # wte and lm_head stay one Parameter
    tokens = torch.randint(0, config.vocab_size, (args.samples, args.seq_len))
    dataset = torch.utils.data.TensorDataset(tokens)
    engine = bk.PrivacyEngine(model, batch_size=args.batch_size, sample_size=len(dataset), steps=args.steps,
                              target_epsilon=args.epsilon, max_grad_norm=1.0, seed=args.seed)
    optimizer = engine.attach(torch.optim.AdamW(model.parameters(), lr=3e-4))
    loader = bk.data.poisson_loader(dataset, batch_size=args.batch_size, seed=args.seed)
    step = 0
    while step < args.steps:
        for (ids,) in loader:
            # position_ids of shape [B, T]: with HF's default [1, T] the position embedding would see
            # one row for the whole batch, and the engine refuses that (no per-example gradients).
            positions = torch.arange(ids.shape[1]).expand(ids.shape[0], -1)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(input_ids=ids, position_ids=positions).logits
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            print(f"step {step}: batch {ids.shape[0]}, loss {loss.item():.3f}, epsilon {engine.epsilon():.3f}")
            if step == args.steps:
                break
    return engine.epsilon()


if __name__ == "__main__":
    main()
