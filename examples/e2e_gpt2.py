"""Private fine-tuning of GPT-2 on E2E-style table-to-text (the BK paper's GPT-2 task), through
Hugging Face's Trainer (bk_kernels.hf.PrivateTrainer), scored by BLEU and ROUGE-L.

Input: a meaning representation, then the reference sentence:
    name[The Eagle], eatType[coffee shop], food[French], area[riverside] = The Eagle is a French ...
The model learns the sentence (the loss covers the tokens after "="); at test time it decodes
greedily from the meaning representation, and BLEU (sacrebleu, all references of an MR) and
ROUGE-L (F-measure of the longest common subsequence, best reference) score the outputs.

Data: the official E2E CSV files (columns mr, ref) from --data DIR (trainset.csv, and
testset_w_refs.csv or devset.csv), else Hugging Face `datasets` ("e2e_nlg") when it can reach its
hub, else (this machine: no network) an E2E-format corpus generated from the E2E slot schema (name,
eatType, food, priceRange, customer rating, area, familyFriendly, near) with varied templated
references: said in the output. Weights: GPT-2 `from_pretrained` (--pretrained gpt2) when it is
available, else a small randomly initialised GPT-2 on a word-level vocabulary: said in the output.

    python examples/e2e_gpt2.py                       # non-private, epsilon 8 and epsilon 3, same steps
    python examples/e2e_gpt2.py --epsilons 3 --lora   # LoRA (peft) instead of full fine-tuning
    python examples/e2e_gpt2.py --quick               # a few steps (CI)
    python examples/e2e_gpt2.py --resume              # continue each run from its last checkpoint

Writes OUT/e2e_gpt2.json: per run, epsilon, delta, steps, BLEU, ROUGE-L, throughput, peak memory.
"""
import argparse
import csv
import os
import random
import re

import torch
import transformers

import common

# ---------------------------------------------------------------------------- data

SLOTS = {
    "eatType": ["restaurant", "coffee shop", "pub"],
    "food": ["French", "Italian", "English", "Chinese", "Indian", "Japanese", "Fast food"],
    "priceRange": ["cheap", "moderate", "high", "less than £20", "£20-25", "more than £30"],
    "customer rating": ["low", "average", "high", "1 out of 5", "3 out of 5", "5 out of 5"],
    "area": ["city centre", "riverside"],
    "familyFriendly": ["yes", "no"],
}
NAMES = ["The Eagle", "The Mill", "Loch Fyne", "The Punter", "Zizzi", "Aromi", "The Wrestlers", "Giraffe",
         "Cotto", "Alimentum", "Strada", "Wildwood", "Fitzbillies", "The Phoenix", "Bibimbap House", "Clowns",
         "The Cricketers", "Browns Cambridge", "Midsummer House", "Green Man", "The Vaults", "Travellers Rest Beefeater"]
NEAR = ["Café Rouge", "Burger King", "The Bakers", "Raja Indian Cuisine", "Crowne Plaza Hotel", "The Portland Arms",
        "Ranch", "Avalon", "Yippee Noodle Bar", "All Bar One"]

CLAUSES = {
    "food": ["serves {} food", "offers {} food", "is a {} place"],
    "priceRange": ["has a price range of {}", "is in the {} price range", "has {} prices"],
    "customer rating": ["has a {} customer rating", "is rated {} by customers", "has a customer rating of {}"],
    "area": ["is in the {}", "is located in the {}", "can be found in the {}"],
    "near": ["is near {}", "is close to {}", "is located near {}"],
}


def _sentence(mr, rng):
    """One templated reference for the slots of mr."""
    name, kind = mr["name"], mr.get("eatType", "place")
    clauses = []
    for slot in ("food", "priceRange", "customer rating", "area", "near"):
        if slot in mr:
            clauses.append(rng.choice(CLAUSES[slot]).format(mr[slot]))
    rng.shuffle(clauses)
    family = mr.get("familyFriendly")
    head = rng.choice([f"{name} is a {kind}", f"There is a {kind} called {name}", f"{name} is a {kind} that"])
    body = head
    if clauses:
        joiner = " " if head.endswith("that") else (" that " if rng.random() < 0.5 else ". It ")
        body += joiner + (", ".join(clauses[:-1]) + " and " + clauses[-1] if len(clauses) > 1 else clauses[0])
    elif head.endswith("that"):
        body = f"{name} is a {kind}"
    if family is not None:
        body += rng.choice([". It is family friendly", ". It is kid friendly", " and is family friendly"]) \
            if family == "yes" else rng.choice([". It is not family friendly", ". It is not kid friendly"])
    return body + "."


def synthetic_e2e(n_train, n_test, refs=3, seed=0):
    """E2E-format (mr, [refs]) pairs from the E2E slot schema; test MRs never seen in training."""
    rng = random.Random(seed)
    seen, train, test = set(), [], []
    while len(train) + len(test) < n_train + n_test:
        mr = {"name": rng.choice(NAMES), "eatType": rng.choice(SLOTS["eatType"])}
        for slot, values in SLOTS.items():
            if slot != "eatType" and rng.random() < 0.55:
                mr[slot] = rng.choice(values)
        if rng.random() < 0.4:
            mr["near"] = rng.choice(NEAR)
        text = ", ".join(f"{k}[{v}]" for k, v in mr.items())
        if text in seen:
            continue
        seen.add(text)
        if len(test) < n_test and rng.random() < n_test / (n_train + n_test):
            test.append((text, [_sentence(mr, rng) for _ in range(refs)]))
        elif len(train) < n_train:
            train.append((text, [_sentence(mr, rng)]))
    return train, test


def official_e2e(folder):
    """The official CSV files: (mr, [refs]) with the references of one MR grouped."""
    def read(name):
        grouped = {}
        with open(os.path.join(folder, name), newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                grouped.setdefault(row["mr"], []).append(row["ref"])
        return list(grouped.items())
    test = "testset_w_refs.csv" if os.path.exists(os.path.join(folder, "testset_w_refs.csv")) else "devset.csv"
    return read("trainset.csv"), read(test)


def hub_e2e():
    import datasets
    ds = datasets.load_dataset("e2e_nlg")

    def group(split):
        grouped = {}
        for row in split:
            grouped.setdefault(row["meaning_representation"], []).append(row["human_reference"])
        return list(grouped.items())
    return group(ds["train"]), group(ds["test"])


# ---------------------------------------------------------------------------- tokens

class WordTokenizer:
    """Words and punctuation of the corpus (offline: no GPT-2 BPE files here)."""
    SPECIAL = ["<pad>", "<eos>", "=", "<unk>"]

    def __init__(self, texts):
        words = sorted({w for t in texts for w in self.split(t)})
        self.itos = self.SPECIAL + [w for w in words if w not in self.SPECIAL]
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self.pad_token_id, self.eos_token_id, self.sep = 0, 1, 2

    @staticmethod
    def split(text):
        return re.findall(r"£?[\w'-]+|[^\w\s]", text)

    def encode(self, text):
        return [self.stoi.get(w, 3) for w in self.split(text)]

    def decode(self, ids):
        text = " ".join(self.itos[i] for i in ids if i > 3)
        return re.sub(r" ([.,\]])", r"\1", text).replace("[ ", "[")

    def __len__(self):
        return len(self.itos)


class GPT2Tokenizer:
    """The real GPT-2 BPE (with --pretrained); " =" separates the MR from the sentence."""

    def __init__(self, name):
        self.tok = transformers.AutoTokenizer.from_pretrained(name)
        self.eos_token_id = self.pad_token_id = self.tok.eos_token_id
        self.sep = self.tok.encode(" =")[-1]

    def encode(self, text):
        return self.tok.encode(" " + text)

    def decode(self, ids):
        return self.tok.decode([i for i in ids if i != self.eos_token_id]).strip()

    def __len__(self):
        return len(self.tok)


class Examples(torch.utils.data.Dataset):
    """mr = sentence <eos>, padded to a fixed length; labels only on the sentence and <eos>."""

    def __init__(self, pairs, tok, length):
        self.rows = []
        for mr, refs in pairs:
            for ref in refs:
                prompt = tok.encode(mr) + [tok.sep]
                target = tok.encode(ref) + [tok.eos_token_id]
                ids = (prompt + target)[:length]
                labels = ([-100] * len(prompt) + target)[:length]
                pad = length - len(ids)
                self.rows.append({"input_ids": torch.tensor(ids + [tok.pad_token_id] * pad),
                                  "attention_mask": torch.tensor([1] * len(ids) + [0] * pad),
                                  "labels": torch.tensor(labels + [-100] * pad)})

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


# ---------------------------------------------------------------------------- scores

def rouge_l(candidate, references):
    """ROUGE-L F-measure (beta 1.2, as the E2E scripts) against the best reference, on words."""
    def lcs(a, b):
        prev = [0] * (len(b) + 1)
        for x in a:
            cur = [0]
            for j, y in enumerate(b):
                cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
            prev = cur
        return prev[-1]
    c = candidate.lower().split()
    best = 0.0
    for ref in references:
        r = ref.lower().split()
        common_len = lcs(c, r)
        if common_len == 0 or not c or not r:
            continue
        p, rec = common_len / len(c), common_len / len(r)
        beta = 1.2
        best = max(best, (1 + beta ** 2) * p * rec / (rec + beta ** 2 * p))
    return best


def score(hypotheses, references):
    import sacrebleu
    width = max(len(r) for r in references)
    streams = [[refs[i] if i < len(refs) else refs[0] for refs in references] for i in range(width)]
    bleu = sacrebleu.corpus_bleu(hypotheses, streams).score
    rouge = 100 * sum(rouge_l(h, r) for h, r in zip(hypotheses, references)) / len(hypotheses)
    return round(bleu, 2), round(rouge, 2)


@torch.no_grad()
def generate(model, tok, pairs, length, dev, batch=64):
    """Greedy decoding from each MR (left-padded prompts, so every row continues at the end)."""
    model.eval()
    outputs = []
    for lo in range(0, len(pairs), batch):
        prompts = [tok.encode(mr) + [tok.sep] for mr, _ in pairs[lo:lo + batch]]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts], device=dev)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=dev)
        done = torch.zeros(len(prompts), dtype=torch.bool, device=dev)
        new = []
        for _ in range(length - width):
            positions = (mask.cumsum(1) - 1).clamp(min=0)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
            nxt = torch.where(done, torch.full_like(done, tok.pad_token_id, dtype=torch.long), logits.argmax(-1))
            done |= nxt == tok.eos_token_id
            new.append(nxt)
            ids = torch.cat([ids, nxt[:, None]], 1)
            mask = torch.cat([mask, (~done | (nxt == tok.eos_token_id)).long()[:, None]], 1)
            if done.all():
                break
        gen = torch.stack(new, 1).tolist() if new else [[] for _ in prompts]
        for row in gen:
            cut = row.index(tok.eos_token_id) if tok.eos_token_id in row else len(row)
            outputs.append(tok.decode(row[:cut]))
    return outputs


# ---------------------------------------------------------------------------- runs

def build_model(args, tok, length):
    if args.pretrained:
        model = transformers.GPT2LMHeadModel.from_pretrained(args.pretrained)
    else:
        torch.manual_seed(args.seed)
        config = transformers.GPT2Config(vocab_size=len(tok), n_positions=length, n_embd=args.width,
                                         n_layer=args.layers, n_head=max(1, args.width // 32), bos_token_id=1,
                                         eos_token_id=1, pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                                         attn_pdrop=0.0)
        model = transformers.GPT2LMHeadModel(config)
    if args.lora:
        import peft
        model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj"],
                                                           lora_dropout=0.0, fan_in_fan_out=True))
    return model


def train_run(args, epsilon, train, tok, length, dev, out_dir):
    """One run through Trainer; epsilon None: non-private (plain Trainer, the same steps)."""
    from bk_kernels.hf import PrivateTrainer

    model = build_model(args, tok, length)
    targs = transformers.TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=max(1, args.batch_size // args.micro_batch), max_steps=args.steps,
        learning_rate=args.lr, lr_scheduler_type="constant", weight_decay=0.0, report_to=[], logging_steps=10,
        save_strategy="steps", save_steps=args.save_every, save_total_limit=1, seed=args.seed,
        use_cpu=dev.type == "cpu", disable_tqdm=args.quiet, bf16=dev.type == "cuda")
    meter = common.Meter(dev)
    if epsilon is None:
        trainer = transformers.Trainer(model=model, args=targs, train_dataset=train,
                                       data_collator=transformers.default_data_collator)
    else:
        trainer = PrivateTrainer(model=model, args=targs, train_dataset=train,
                                 data_collator=transformers.default_data_collator, target_epsilon=epsilon,
                                 max_grad_norm=args.max_grad_norm, seed=args.seed)
    last = transformers.trainer_utils.get_last_checkpoint(out_dir) if args.resume and os.path.isdir(out_dir) else None
    trainer.train(resume_from_checkpoint=last)
    meter.examples = args.steps * args.batch_size
    return trainer.model, trainer, meter


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="folder with the official E2E CSV files (mr, ref)")
    parser.add_argument("--pretrained", default=None, help="a GPT-2 checkpoint for from_pretrained (e.g. gpt2)")
    parser.add_argument("--lora", action="store_true", help="LoRA (peft, r=8 on c_attn and c_proj) instead of "
                        "full fine-tuning")
    parser.add_argument("--epsilons", type=float, nargs="+", default=[8.0, 3.0])
    parser.add_argument("--no-baseline", action="store_true", help="skip the non-private run")
    parser.add_argument("--train-size", type=int, default=4000, help="generated corpus: training pairs")
    parser.add_argument("--test-size", type=int, default=200, help="generated corpus: test MRs (3 references each)")
    parser.add_argument("--layers", type=int, default=2, help="the randomly initialised GPT-2")
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=128, help="expected (Poisson) batch size")
    parser.add_argument("--micro-batch", type=int, default=64, help="examples per backward (Trainer's "
                        "per_device_train_batch_size; the accumulation steps are batch-size / micro-batch)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--save-every", type=int, default=100, help="steps between checkpoints")
    parser.add_argument("--resume", action="store_true", help="continue each run from its last checkpoint in OUT")
    parser.add_argument("--out", default="results/e2e")
    parser.add_argument("--quick", action="store_true", help="a tiny corpus and a few steps (CI)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.train_size, args.test_size, args.steps, args.epsilons = 300, 20, 4, [8.0]
        args.batch_size, args.micro_batch, args.save_every = 32, 16, 2
    dev = common.device(args.device)

    source = "generated from the E2E slot schema (offline)"
    if args.data:
        train_pairs, test_pairs = official_e2e(args.data)
        source = f"official E2E CSV files in {args.data}"
    else:
        try:
            train_pairs, test_pairs = hub_e2e()
            source = "Hugging Face datasets e2e_nlg"
        except Exception:
            train_pairs, test_pairs = synthetic_e2e(args.train_size, args.test_size, seed=args.seed)
    print(f"data: {source}: {len(train_pairs)} training MRs, {len(test_pairs)} test MRs")
    if args.pretrained:
        tok = GPT2Tokenizer(args.pretrained)
        weights = f"pretrained {args.pretrained}"
    else:
        tok = WordTokenizer([t for mr, refs in train_pairs + test_pairs for t in [mr] + refs])
        weights = f"randomly initialised GPT-2 ({args.layers} layers, width {args.width}, word vocabulary {len(tok)})"
    print(f"model: {weights}" + (" with LoRA" if args.lora else ""))
    length = min(128, max(len(tok.encode(mr)) + 1 + len(tok.encode(r)) + 1 for mr, refs in train_pairs + test_pairs
                          for r in refs))
    train = Examples(train_pairs, tok, length)
    references = [refs for _, refs in test_pairs]

    untrained = build_model(args, tok, length).to(dev)
    bleu0, rouge0 = score(generate(untrained, tok, test_pairs, length, dev), references)
    print(f"untrained: BLEU {bleu0}, ROUGE-L {rouge0}")
    results = [{"run": "untrained", "bleu": bleu0, "rouge_l": rouge0}]
    for epsilon in [None] * (not args.no_baseline) + list(args.epsilons):
        name = "non-private" if epsilon is None else f"epsilon {epsilon:g}"
        out_dir = os.path.join(args.out, name.replace(" ", "_"))
        model, trainer, meter = train_run(args, epsilon, train, tok, length, dev, out_dir)
        hypotheses = generate(model, tok, test_pairs, length, dev)
        bleu, rouge = score(hypotheses, references)
        run = {"run": name, "bleu": bleu, "rouge_l": rouge, "steps": args.steps, "batch_size": args.batch_size,
               "sample": hypotheses[0], "references": references[0]}
        if epsilon is not None:
            run.update(epsilon=trainer.engine.epsilon(), delta=trainer.engine.target_delta,
                       noise_multiplier=trainer.engine.noise_multiplier)
        run.update(meter.summary())
        results.append(run)
        print(f"{name}: BLEU {bleu}, ROUGE-L {rouge} ({run['seconds']} s)\n  e.g. {hypotheses[0]!r}")
    summary = {"data": source, "model": weights, "lora": args.lora, "device": str(dev), "train_examples": len(train),
               "test_mrs": len(test_pairs), "runs": results}
    print("summary:", common.write_summary(args.out, "e2e_gpt2.json", summary))
    return summary


if __name__ == "__main__":
    main()
