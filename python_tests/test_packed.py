"""Packed sequences (padding-free batches: several examples along one row, position_ids
restarting at each), clipped per sequence (PrivacyEngine.example_rows(bk.packed_sequences())).

The reference is independent of the engine: each sequence run ALONE as its own row (positions
0..L-1, no packing), its loss backpropagated alone in float64; one private SGD(lr=1) step
without noise on the packed batch must move every parameter by -(1/E) sum_e C_e g_e. Four
sequences: the mean's 1/4 is exact in the float32 RMSNorms of transformers' float64 models."""
import copy

import pytest
import torch

import bk_kernels as bk
from bk_kernels.hf import example_losses
from python_tests import zoo
from python_tests.model_reference import assert_updates_close, expected_update

LENGTHS = [5, 7, 4, 6]


def pack(sequences, rows=1):
    """input_ids and position_ids [rows, T]: the sequences one after the other, split into
    `rows` rows of equal length (the sequences must fill them exactly)."""
    ids = torch.cat(sequences).view(rows, -1)
    positions = torch.cat([torch.arange(len(s)) for s in sequences]).view(rows, -1)
    return ids, positions


def sequences_of(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, zoo.VOCAB, (n,), generator=g) for n in lengths]


def reference_grads(model, sequences, trainable):
    out = []
    for s in sequences:
        m = copy.deepcopy(model)
        logits = m(input_ids=s[None], use_cache=False).logits
        example_losses(logits, s[None], True).mean().backward()
        out.append({n: (p.grad if p.grad is not None else torch.zeros_like(p)).clone()
                    for n, p in m.named_parameters() if n in trainable})
    return out


def packed_step(model, sequences, R, rows=1, loss="example_losses", **forward_kwargs):
    """(update, engine) of one private step of a converted copy on the packed batch."""
    model = bk.convert(copy.deepcopy(model))
    engine = bk.PrivacyEngine(model, batch_size=len(sequences), sample_size=10 * len(sequences),
                              noise_multiplier=0.0, max_grad_norm=R)
    optimizer = engine.attach(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0))
    engine.example_rows(bk.packed_sequences())
    ids, positions = pack(sequences, rows)
    forward_kwargs.setdefault("use_cache", False)
    if loss == "model":  # the model's own token mean: labels -100 at every sequence's first token
        labels = ids.masked_fill(positions == 0, -100)
        model(input_ids=ids, position_ids=positions, labels=labels, **forward_kwargs).loss.backward()
    else:
        logits = model(input_ids=ids, position_ids=positions, **forward_kwargs).logits
        example_losses(logits, ids, True, position_ids=positions).mean().backward()
    optimizer.step()
    return {n: -p.grad.detach() for n, p in model.named_parameters() if p.requires_grad}, engine


def check(model, sequences, rows=1, rtol=1e-9, **kwargs):
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    grads = reference_grads(model, sequences, trainable)
    norms = sorted(sum(g.square().sum().item() for g in ex.values()) ** 0.5 for ex in grads)
    R = norms[len(norms) // 2]  # some clipped, some not
    want = expected_update(grads, [sorted(trainable)], R, "abadi", len(grads))
    got, engine = packed_step(model, sequences, R, rows, **kwargs)
    assert_updates_close(got, want, rtol)
    return engine


# Gemma multiplies by (1 + weight) in float32 even in a float64 model (HF's own arithmetic): its
# norm weights' per-token gradients are float32, summed per sequence in another order than the
# reference's float32 backward sums them (4e-8 of the update): checked at float32's 1e-6.
@pytest.mark.parametrize("build, rtol", [(zoo.llama, 1e-9), (zoo.gpt2, 1e-9), (zoo.qwen2, 1e-9), (zoo.gemma, 1e-6),
                                         (zoo.mistral, 1e-9)])
def test_packed_sequences_are_clipped_one_by_one(build, rtol):
    torch.manual_seed(0)
    engine = check(build(), sequences_of(LENGTHS), rtol=rtol)
    assert {tuple(s.shape) for s in engine._last_unit_sq_norms.values()} == {(4,)}  # 4 examples, not 1 row


def test_two_rows_of_packed_sequences():
    """Sequences numbered across rows: 2 in the first row, 2 in the second."""
    torch.manual_seed(0)
    check(zoo.llama(), sequences_of([5, 7, 8, 4]), rows=2)


def test_the_models_own_loss_with_equal_label_counts():
    """outputs.loss (the token mean) is the mean of the sequences' own means when they hold as
    many labels each; labels -100 at each sequence's first token (DataCollatorWithFlattening's)."""
    torch.manual_seed(0)
    check(zoo.llama(), sequences_of([6, 6, 6, 6]), loss="model")


def test_the_models_own_loss_with_ragged_counts_is_refused():
    model = bk.convert(zoo.llama())
    engine = bk.PrivacyEngine(model, batch_size=4, sample_size=40, noise_multiplier=0.0)
    engine.attach(torch.optim.SGD(model.parameters(), lr=1.0))
    engine.example_rows(bk.packed_sequences())
    ids, positions = pack(sequences_of(LENGTHS))
    out = model(input_ids=ids, position_ids=positions, labels=ids.masked_fill(positions == 0, -100), use_cache=False)
    with pytest.raises(ValueError, match="position_ids=position_ids"):
        out.loss.backward()
    assert all(p.grad is None for p in model.parameters())
    # a first token's label not ignored: predicted from the sequence before
    out = model(input_ids=ids, position_ids=positions, labels=ids, use_cache=False)
    with pytest.raises(ValueError, match="first token of a sequence"):
        out.loss.backward()


def test_checkpointed_gpt2():
    """Activation checkpointing recomputes the blocks in the backward: same token rows."""
    torch.manual_seed(0)
    check(zoo.gpt2_checkpointed(), sequences_of(LENGTHS))


def test_lora_on_packed_sequences():
    """PEFT LoRA: frozen base layers (plain nn.Linear, token-wise) and bk LoRA factors."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = peft.get_peft_model(zoo.llama(), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj", "up_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    check(model, sequences_of(LENGTHS))


def test_rows_not_packed_are_one_example_each():
    """With the setting, a padded batch (an attention_mask: the model reads each row as one
    sequence) is clipped row by row, as without it."""
    torch.manual_seed(0)
    model = zoo.llama()
    ids = torch.randint(0, zoo.VOCAB, (4, 6))
    grads = reference_grads(model, list(ids), {n for n, _ in model.named_parameters()})
    R = sorted(sum(g.square().sum().item() for g in ex.values()) ** 0.5 for ex in grads)[2]
    want = expected_update(grads, [sorted(grads[0])], R, "abadi", 4)
    m = bk.convert(copy.deepcopy(model))
    engine = bk.PrivacyEngine(m, batch_size=4, sample_size=40, noise_multiplier=0.0, max_grad_norm=R)
    optimizer = engine.attach(torch.optim.SGD(m.parameters(), lr=1.0))
    with engine.example_rows(bk.packed_sequences()):
        logits = m(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
        example_losses(logits, ids, True).mean().backward()
    optimizer.step()
    assert_updates_close({n: -p.grad for n, p in m.named_parameters()}, want)


def test_example_losses_of_packed_sequences():
    torch.manual_seed(0)
    sequences = sequences_of([3, 5, 2])
    ids, positions = pack(sequences)
    logits = torch.randn(1, ids.shape[1], zoo.VOCAB, dtype=torch.float64)
    got = example_losses(logits, ids, True, position_ids=positions)
    offsets = [0, 3, 8, 10]
    want = torch.stack([example_losses(logits[:, a:b], ids[:, a:b], True)[0] for a, b in zip(offsets, offsets[1:])])
    torch.testing.assert_close(got, want.float())
    assert torch.equal(example_losses(logits, ids, True), example_losses(logits, ids, True, position_ids=None))


def _refused(model, match, **forward_kwargs):
    model = bk.convert(model)
    engine = bk.PrivacyEngine(model, batch_size=4, sample_size=40, noise_multiplier=0.0)
    engine.attach(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0))
    engine.example_rows(bk.packed_sequences())
    ids, positions = pack(sequences_of(LENGTHS))
    with pytest.raises(bk.layout.UnsupportedLayoutError, match=match):
        model(input_ids=ids, position_ids=positions, **forward_kwargs)
    assert engine._uses == {} and all(p.grad is None for p in model.parameters())
    return engine


def test_a_forward_that_makes_a_cache_is_refused():
    """transformers skips its packed-sequence detection when the forward makes a cache
    (use_cache defaults to True): the sequences would attend to each other."""
    _refused(zoo.llama(), "use_cache=False")


def test_without_the_setting_packed_rows_are_refused():
    model = bk.convert(zoo.llama())
    bk.PrivacyEngine(model, batch_size=4, sample_size=40, noise_multiplier=0.0)
    ids, positions = pack(sequences_of(LENGTHS))
    with pytest.raises(bk.layout.UnsupportedLayoutError, match="packed_sequences"):
        model(input_ids=ids, position_ids=positions, use_cache=False)


def test_an_encoder_is_refused():
    """BERT's bidirectional mask has no packed-sequence detection: the sequences attend to each other."""
    import transformers
    config = transformers.BertConfig(vocab_size=zoo.VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=24, max_position_embeddings=32)
    _refused(transformers.BertModel(config, add_pooling_layer=False).double(), "detection did not run")


def test_flash_attention_is_refused():
    model = zoo.llama()
    model.config._attn_implementation = "flash_attention_2"
    _refused(model, "attn_implementation='sdpa'", use_cache=False)


def test_a_layer_that_mixes_positions_is_refused():
    """Qwen3.5's gated delta net (a short convolution over positions, bk's per-row family)."""
    _refused(zoo.qwen3_5(), "per row, not per token", use_cache=False)


class _ShortConvActivation(torch.nn.Module):
    """An activation that also mixes neighbouring positions through a FROZEN convolution."""

    def __init__(self, d):
        super().__init__()
        self.conv = torch.nn.Conv1d(d, d, 2, padding=1, groups=d).double().requires_grad_(False)

    def forward(self, x):
        return torch.nn.functional.silu(x + self.conv(x.transpose(1, 2))[..., :x.shape[1]].transpose(1, 2))


def test_a_frozen_module_that_mixes_positions_is_refused():
    """Frozen, it is left unconverted and records nothing, but it would still carry one sequence's
    influence into the next one's tokens."""
    model = zoo.llama()
    model.model.layers[1].mlp.act_fn = _ShortConvActivation(24)
    _refused(model, "Conv1d .*mixes the positions of a row", use_cache=False)


def test_position_ids_laid_out_otherwise_are_refused():
    model = bk.convert(zoo.llama())
    engine = bk.PrivacyEngine(model, batch_size=4, sample_size=40, noise_multiplier=0.0)
    engine.example_rows(bk.packed_sequences())
    ids, positions = pack(sequences_of(LENGTHS))
    with pytest.raises(bk.layout.UnsupportedLayoutError, match="cu_seq_lens_q"):
        model(input_ids=ids, position_ids=positions, use_cache=False,
              cu_seq_lens_q=torch.tensor([0, 5, 12, 22], dtype=torch.int32))


def test_verify_packed_sequences():
    ids, positions = pack(sequences_of(LENGTHS))

    def loss_fn(model, batch):
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        return example_losses(logits, batch["input_ids"], True, position_ids=batch["position_ids"]).mean()
    report = bk.verify(zoo.qwen2(), loss_fn, {"input_ids": ids, "position_ids": positions},
                       example_rows=bk.packed_sequences())
    assert report.ok and report.batch_size == 4, report


def test_a_refused_packed_forward_leaves_no_hook_behind():
    """The watch of a packed forward (a global module hook) ends with the forward, also when the
    forward raises: another model's forward afterwards runs unhindered."""
    model = bk.convert(zoo.llama())
    engine = bk.PrivacyEngine(model, batch_size=4, sample_size=40, noise_multiplier=0.0)
    engine.example_rows(bk.packed_sequences())
    ids, positions = pack(sequences_of(LENGTHS))
    with pytest.raises(IndexError):  # an id past the vocabulary: the model's own error, mid-forward
        model(input_ids=ids + zoo.VOCAB, position_ids=positions, use_cache=False)
    assert engine._watch is None
    _refused(zoo.qwen3_5(), "per row, not per token", use_cache=False)  # our refusal, raised from the watch
    other = zoo.qwen3_5()  # not attached: its gated delta net runs as it would without bk
    other(input_ids=ids, position_ids=positions, use_cache=False)


def test_opt_folds_its_rows_and_makes_its_masks_without_packed_sequences():
    """OPT's layers take [R*T, d] rows (read as token rows), but its attention masks are made
    without transformers' packed-sequence detection: refused at the forward's end."""
    _refused(zoo.opt(), "detection did not run", use_cache=False)


def _exaone4(heads=2, **extra):
    """Exaone 4: RMSNorms of the queries and keys AFTER their transpose ([R, heads, T, head_dim])."""
    import transformers
    config = transformers.Exaone4Config(vocab_size=zoo.VOCAB, hidden_size=8 * heads, intermediate_size=24,
                                        num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=1,
                                        head_dim=8, max_position_embeddings=64, **extra)
    torch.manual_seed(0)
    return transformers.Exaone4ForCausalLM(config).double()


def test_norms_of_the_heads_after_their_transpose():
    """[R, H, T, D] inputs (Exaone 4's, Gemma 3's q/k norms): the tokens on dim 2."""
    check(_exaone4(), sequences_of(LENGTHS))


def test_tokens_and_heads_of_one_size_are_refused():
    """22 heads and 22 tokens: [1, 22, 22, 8] could hold the tokens on either dim."""
    _refused(_exaone4(heads=22), "cannot tell which one holds the tokens", use_cache=False)


def test_long_sequences_on_their_own_rows_and_short_ones_in_buckets():
    """Sequences of 32 tokens or more: a norm call each on views of their rows; shorter ones
    gathered by length into zero-padded buckets (9 and 5: two, 5 being under 2/3 of 9)."""
    torch.manual_seed(0)
    sequences = sequences_of([40, 5, 33, 9])
    starts = torch.zeros(1, 87, dtype=torch.bool)
    starts[0, [0, 40, 45, 78]] = True
    groups = bk.packed.PackedGroups(starts)
    assert groups.long_ones == [(0, 0, 40), (2, 45, 78)]
    assert [examples for _, examples in groups._buckets] == [[3], [1]]  # 5 < 2/3 of 9: two buckets
    check(zoo.llama(), sequences)


def _frozen_routers(model):
    for name, module in model.named_modules():
        if type(module).__name__.endswith("TopKRouter"):
            module.requires_grad_(False)
    return model


@pytest.mark.parametrize("build", [zoo.mixtral, zoo.qwen2_moe])
@pytest.mark.parametrize("routers", ["trained", "frozen"])
def test_moe_on_packed_sequences(build, routers):
    """Routed experts on token rows (each token routed on its own); the top-k router a bk linear
    map on the token rows when trained (nn/hf_router.py), transformers' own when frozen."""
    torch.manual_seed(0)
    model = build()
    check(_frozen_routers(model) if routers == "frozen" else model, sequences_of(LENGTHS))


def test_lora_on_a_frozen_moe():
    """LoRA on the attention of Mixtral: router and experts frozen, unconverted, token-wise."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = peft.get_peft_model(zoo.mixtral(), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    check(model, sequences_of(LENGTHS))
