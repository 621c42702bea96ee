"""Private DPO (direct preference optimization) of a Hugging Face GPT-2, the way TRL batches it:
each pair's chosen and rejected sequences concatenated along the batch and run in ONE forward.
One example (a preference pair) is then two rows of the batch; `engine.example_rows` tells the
engine so, and it clips each pair's gradient (the sum of its two rows') to max_grad_norm. Without
it each row would be clipped alone and a pair could move the model by 2 x max_grad_norm.

The task is synthetic so that it runs anywhere in seconds: a prompt of random tokens, the chosen
answer copies the prompt, the rejected one is random. The held-out reward accuracy (how often the
policy's implicit reward ranks the chosen answer first, ties counted half) starts at chance (0.5:
the policy is the reference) and rises.

    python examples/private_dpo.py --steps 40
"""
import argparse
import copy

import torch
import torch.nn.functional as F
import transformers

import bk_kernels as bk


def preference_pairs(n, prompt_len, vocab, generator):
    """[n, 2 * prompt_len] chosen (the prompt copied) and rejected (random) sequences."""
    prompt = torch.randint(1, vocab, (n, prompt_len), generator=generator)
    rejected = torch.randint(1, vocab, (n, prompt_len), generator=generator)
    return torch.cat([prompt, prompt], 1), torch.cat([prompt, rejected], 1)


def answer_logp(model, ids, prompt_len):
    """[rows] each row's log-probability of its answer (the tokens after the prompt)."""
    logits = model(input_ids=ids).logits[:, prompt_len - 1:-1]
    return F.log_softmax(logits.float(), -1).gather(2, ids[:, prompt_len:, None]).squeeze(2).sum(1)


def dpo_rewards(policy, reference, chosen, rejected, prompt_len, beta):
    """(chosen, rejected) implicit rewards beta * log(pi / pi_ref), from one forward of the
    policy on the pairs concatenated along the batch (rows b and B + b are pair b)."""
    rows = torch.cat([chosen, rejected])
    with torch.no_grad():
        ref = answer_logp(reference, rows, prompt_len)
    rewards = beta * (answer_logp(policy, rows, prompt_len) - ref)
    return rewards[:len(chosen)], rewards[len(chosen):]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--pairs", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)

    vocab, prompt_len = 32, 6
    config = transformers.GPT2Config(vocab_size=vocab, bos_token_id=0, eos_token_id=0, n_positions=2 * prompt_len,
                                     n_embd=64, n_layer=2, n_head=2)
    torch.manual_seed(0)
    policy = transformers.GPT2LMHeadModel(config)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)  # the frozen starting point, not private
    bk.convert(policy)

    generator = torch.Generator().manual_seed(1)
    train = torch.utils.data.TensorDataset(*preference_pairs(args.pairs, prompt_len, vocab, generator))
    held_out = preference_pairs(512, prompt_len, vocab, generator)
    engine = bk.PrivacyEngine(policy, batch_size=args.batch_size, sample_size=len(train), steps=args.steps,
                              target_epsilon=args.epsilon, max_grad_norm=1.0, seed=args.seed)
    optimizer = engine.attach(torch.optim.AdamW(policy.parameters(), lr=args.lr))
    engine.example_rows(bk.stacked_rows(2))  # every forward of the policy: [chosen; rejected] rows
    loader = bk.data.poisson_loader(train, batch_size=args.batch_size, seed=args.seed)

    def accuracy():
        policy.eval()
        with torch.no_grad():
            chosen, rejected = dpo_rewards(policy, reference, *held_out, prompt_len, args.beta)
        policy.train()
        return ((chosen > rejected).double() + 0.5 * (chosen == rejected).double()).mean().item()  # ties: half

    first = accuracy()
    print(f"held-out reward accuracy before: {first:.3f}")
    step = 0
    while step < args.steps:
        for chosen, rejected in loader:
            chosen_reward, rejected_reward = dpo_rewards(policy, reference, chosen, rejected, prompt_len, args.beta)
            loss = -F.logsigmoid(chosen_reward - rejected_reward).mean()  # the mean over pairs
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            if step % 10 == 0 or step == args.steps:
                print(f"step {step}: {len(chosen)} pairs, loss {loss.item():.3f}, epsilon {engine.epsilon():.3f}")
            if step == args.steps:
                break
    last = accuracy()
    print(f"held-out reward accuracy after {step} steps at epsilon {engine.epsilon():.2f}: {last:.3f}")
    return first, last, engine.epsilon()


if __name__ == "__main__":
    main()
