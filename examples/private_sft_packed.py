"""Private supervised fine-tuning with padding-free batches: Hugging Face's Trainer
(bk_kernels.hf.PrivateTrainer) with DataCollatorWithFlattening, which packs each micro-batch's
examples one after the other into ONE row (position_ids restarting at each, no padding). Each
packed sequence is an example: the engine clips each one's gradient to max_grad_norm
(bk.packed_sequences(), set by PrivateTrainer for this collator), and transformers' attention
masks keep the sequences apart (checked in every forward).

The task is synthetic so that it runs anywhere in seconds: a prompt of 2 to 8 random tokens and a
separator, then the answer, the prompt copied; only the answer is labelled. The held-out accuracy
is the fraction of answer tokens the model predicts (teacher-forced, chance 1/30).

    python examples/private_sft_packed.py --steps 40
"""
import argparse
import os
import tempfile

import torch
import transformers

from bk_kernels.hf import PrivateTrainer

VOCAB, SEP = 32, 1  # token 0 is unused, 1 separates the prompt from its answer


class CopyTask(torch.utils.data.Dataset):
    """Examples of different lengths: prompt, SEP, the prompt again (labels: the answer only)."""

    def __init__(self, n, generator):
        lengths = torch.randint(2, 9, (n,), generator=generator).tolist()
        self.prompts = [torch.randint(2, VOCAB, (k,), generator=generator).tolist() for k in lengths]

    def __len__(self):
        return len(self.prompts)

    def __getitem__(self, i):
        prompt = self.prompts[i]
        ids = prompt + [SEP] + prompt
        return {"input_ids": ids, "labels": [-100] * (len(prompt) + 1) + prompt}


@torch.no_grad()
def answer_accuracy(model, data):
    """Teacher-forced accuracy on the answer tokens, one example at a time (no packing, no padding)."""
    model.eval()
    right = total = 0
    for i in range(len(data)):
        item = data[i]
        ids, labels = torch.tensor([item["input_ids"]]), torch.tensor(item["labels"][1:])
        predicted = model(input_ids=ids).logits[0, :-1].argmax(-1)
        answer = labels != -100
        right += int((predicted[answer] == labels[answer]).sum())
        total += int(answer.sum())
    model.train()
    return right / total


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--examples", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=128, help="expected examples per step (Poisson)")
    parser.add_argument("--micro-batches", type=int, default=2, help="gradient_accumulation_steps")
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    gen = torch.Generator().manual_seed(args.seed)
    train, held_out = CopyTask(args.examples, gen), CopyTask(200, gen)
    torch.manual_seed(args.seed)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                      pad_token_id=0, bos_token_id=0, eos_token_id=0)
    model = transformers.LlamaForCausalLM(config)
    before = answer_accuracy(model, held_out)
    with tempfile.TemporaryDirectory() as out:
        targs = transformers.TrainingArguments(
            output_dir=out, per_device_train_batch_size=args.batch_size // args.micro_batches,
            gradient_accumulation_steps=args.micro_batches, max_steps=args.steps, learning_rate=args.lr,
            lr_scheduler_type="constant", optim="adamw_torch", weight_decay=0.0, report_to=[], use_cpu=True,
            logging_steps=max(args.steps // 4, 1), save_strategy="no", disable_tqdm=True, seed=args.seed,
            remove_unused_columns=False)
        trainer = PrivateTrainer(model=model, args=targs, train_dataset=train,
                                 data_collator=transformers.DataCollatorWithFlattening(),
                                 target_epsilon=args.epsilon, max_grad_norm=1.0, seed=args.seed)
        trainer.train()
    after = answer_accuracy(model, held_out)
    epsilon = trainer.engine.epsilon()
    print(f"held-out answer accuracy {before:.3f} -> {after:.3f} after {args.steps} steps; epsilon {epsilon:.3f} "
          f"(delta {trainer.engine.target_delta:.2g}); each packed sequence clipped as one example")
    return before, after, epsilon


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
