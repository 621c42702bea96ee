"""One transformers text-model class, shrunk to a tiny config, with one head, under bk.verify:
prints one JSON line (model, whether it built, the verify report or the error, the generic-path
modules and their share of the trained Parameters).

    python tools/sweep/hf_text.py MODEL_TYPE [B] [key=json ...]   (e.g. llama4_text 4)
    SWEEP_HEAD=seq-cls python tools/sweep/hf_text.py bert 4
    bash tools/sweep/run.sh hf|hf-seq-cls|hf-seq2seq|hf-mlm|hf-token-cls OUT.jsonl

Heads (SWEEP_HEAD): causal-lm (default; the model's own loss, no padding: every example has T
labelled tokens), seq-cls and token-cls (right padding: example b keeps T - b % 3 tokens, the
pad id where masked, the mean over examples of cross-entropy), seq2seq (padded encoder input,
T decoder labels each), mlm (every token labelled). Session 13's sweep was causal-lm; session
14 added the other heads (README, "Supported models"). A build failure is our shrinking's (a
config the class does not accept) or the model's wanting other inputs, not bk's; pass
key=value overrides to fix one.
"""
import json, sys, time, warnings
warnings.filterwarnings("ignore")
import torch, transformers
import os
import torch.nn.functional as F
from transformers import AutoConfig
from transformers import (AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSeq2SeqLM,
                          AutoModelForSequenceClassification, AutoModelForTokenClassification)
import bk_kernels as bk
from report import build_failed, verify_and_print
HEAD = os.environ.get("SWEEP_HEAD", "causal-lm")
AUTO = {"causal-lm": AutoModelForCausalLM, "seq-cls": AutoModelForSequenceClassification, "mlm": AutoModelForMaskedLM,
        "seq2seq": AutoModelForSeq2SeqLM, "token-cls": AutoModelForTokenClassification}[HEAD]
torch.set_num_threads(1)
name = sys.argv[1]
B = int(sys.argv[2]) if len(sys.argv) > 2 else 4
T = 8
SIZES = dict(hidden_size=32, d_model=32, emb_dim=32, n_layers=2, n_heads=4, n_embd=32, n_embed=32, intermediate_size=64, ffn_dim=64, n_inner=64, d_ff=64,
             moe_intermediate_size=32, shared_expert_intermediate_size=32, expert_intermediate_size=32,
             num_attention_heads=4, n_head=4, num_heads=4, encoder_attention_heads=4, decoder_attention_heads=4,
             num_key_value_heads=2, head_dim=8, vocab_size=96, max_position_embeddings=64, n_positions=64,
             num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
             encoder_layers=2, decoder_layers=2, num_layers=2, n_layer=2, num_hidden_layers=2,
             encoder_ffn_dim=64, decoder_ffn_dim=64, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8,
             qk_nope_head_dim=8, v_head_dim=8, sliding_window=4, attention_window=4,
             n_group=1, topk_group=1, first_k_dense_replace=1, pad_token_id=0, bos_token_id=1, eos_token_id=2)
def shrink(cfg, depth=0):
    for k, v in SIZES.items():
        if hasattr(cfg, k) and not isinstance(getattr(cfg, k), (list, dict)) and getattr(cfg, k) is not None:
            try: setattr(cfg, k, v)
            except Exception: pass
    lt = getattr(cfg, "layer_types", None)
    if isinstance(lt, list) and lt:
        kinds = list(dict.fromkeys(lt))
        if len(kinds) == 1: kinds = kinds * 2
        cfg.layer_types = kinds
        for a in ("num_hidden_layers", "num_layers"):
            if hasattr(cfg, a): setattr(cfg, a, len(kinds))
    for a in ("dropout", "attention_dropout", "hidden_dropout", "hidden_dropout_prob", "attention_probs_dropout_prob",
              "resid_pdrop", "embd_pdrop", "attn_pdrop", "activation_dropout", "classifier_dropout"):
        if isinstance(getattr(cfg, a, None), float): setattr(cfg, a, 0.0)
    if hasattr(cfg, "use_cache"): cfg.use_cache = False
    for sub in ("text_config", "decoder", "encoder"):
        s = getattr(cfg, sub, None)
        if s is not None and hasattr(s, "to_dict") and depth < 2: shrink(s, depth + 1)
    return cfg
out = dict(model=name, B=B, head=HEAD)
t0 = time.time()
try:
    base = AutoConfig.for_model(name)
    d = base.to_dict()
    kw = {k: v for k, v in SIZES.items() if k in d and d[k] is not None and not isinstance(d[k], (list, dict))}
    for k in ("hidden_size_per_layer_input", "global_head_dim"):
        if d.get(k): kw[k] = 8
    if d.get("vocab_size_per_layer_input"): kw["vocab_size_per_layer_input"] = 96
    if isinstance(d.get("layer_types"), list):
        kinds = list(dict.fromkeys(d["layer_types"])); kinds = kinds * 2 if len(kinds) == 1 else kinds
        kw["layer_types"] = kinds
        for a in ("num_hidden_layers", "num_layers"):
            if a in d: kw[a] = len(kinds)
    if "qk_rope_head_dim" in d and d["qk_rope_head_dim"]:
        kw.update(qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, head_dim=4)
    for extra in sys.argv[3:]:
        k, v = extra.split("="); kw[k] = json.loads(v)
    try:
        cfg = type(base)(**kw)
    except Exception as e:
        out["ctor_error"] = str(e)[:200]
        cfg = shrink(AutoConfig.for_model(name))
    if HEAD in ("seq-cls", "token-cls"):
        cfg.num_labels = 3
    if getattr(cfg, "pad_token_id", None) is None:
        cfg.pad_token_id = 0            # decoders' seq-cls heads find each example's last token by it
    if HEAD == "seq2seq" and getattr(cfg, "decoder_start_token_id", None) is None:
        cfg.decoder_start_token_id = 0
    torch.manual_seed(0)
    model = AUTO.from_config(cfg)
    model.train()
    vocab = model.get_input_embeddings().num_embeddings if model.get_input_embeddings() is not None else 96
    ids = torch.randint(3, min(vocab, 96), (B, T))
    lengths = torch.tensor([T - b % 3 for b in range(B)], dtype=torch.long)
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    pad = cfg.pad_token_id if getattr(cfg, "pad_token_id", None) is not None else 0
    labels = torch.randint(0, 3, (B,)) if HEAD == "seq-cls" else torch.randint(0, 3, (B, T))
    if HEAD in ("seq-cls", "token-cls", "seq2seq"):
        eos = getattr(cfg, "eos_token_id", None)
        if HEAD == "seq-cls" and isinstance(eos, int) and eos != pad:   # BART-style heads pool each example's <eos>
            ids[torch.arange(B), lengths - 1] = eos
        ids = ids.masked_fill(mask == 0, pad)
    takes_cache = "use_cache" in model.forward.__code__.co_varnames
    def loss_fn(m, batch):
        ids, mask, labels = batch
        kw = dict(use_cache=False) if takes_cache else {}
        if HEAD in ("causal-lm", "mlm"):
            return m(input_ids=ids, labels=ids, **kw).loss
        if HEAD == "seq2seq":
            return m(input_ids=ids, attention_mask=mask, labels=labels + 3, **kw).loss
        logits = m(input_ids=ids, attention_mask=mask, **kw).logits
        if HEAD == "seq-cls":
            return F.cross_entropy(logits, labels)
        per_token = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none")   # [B, T]
        return ((per_token * mask).sum(1) / mask.sum(1)).mean()
    batch = (ids, mask, labels)
    out["params"] = sum(p.numel() for p in model.parameters())
    loss_fn(model, batch).backward(); model.zero_grad(set_to_none=True)
    loss_fn(model, tuple(t[:1] for t in batch))
except Exception as e:
    build_failed(out, e); sys.exit(0)
verify_and_print(model, loss_fn, batch, out, t0)
