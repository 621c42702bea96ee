"""The engine in a real training loop: any optimizer and param groups, LR schedulers, zero_grad
flavours, checkpoints that resume bit-identically, noise independence, mixed precision
(autocast bf16/fp16, GradScaler, bf16 parameters), empty Poisson batches and bad input."""
import copy
import io
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bk_kernels as bk
from python_tests.model_reference import assert_updates_close, expected_update, per_example_grads, private_update
from python_tests.tolerances import FLOOR_LOWP, RATIO_LOWP

DT = torch.float64


def mlp(dtype=DT):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)).to(dtype)


def batches(n, B=6, dtype=DT, seed=3):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(B, 5, dtype=dtype, generator=gen), torch.randint(0, 3, (B,), generator=gen))
            for _ in range(n)]


def private(model, optimizer_fn, **kwargs):
    model = bk.convert(model)
    args = dict(batch_size=6, sample_size=60, noise_multiplier=0.0, max_grad_norm=0.5)
    args.update(kwargs)
    engine = bk.PrivacyEngine(model, **args)
    return model, engine, engine.attach(optimizer_fn(model))


def train(model, opt, data, scheduler=None):
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()


def clipped_mean_grads(model, x, y, R, batch_size):
    """{name: (1/batch_size) sum_i C_i g_i} from one backward per example, in float64."""
    loss = lambda m, b: F.cross_entropy(m(b["x"]), b["y"], reduction="none")  # noqa: E731
    grads = per_example_grads(model, loss, {"x": x, "y": y})
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    return {n: -d for n, d in expected_update(grads, [names], R, "abadi", batch_size).items()}


def two_groups(model, opt_class, **kw):
    return opt_class([{"params": model[0].parameters(), "lr": 0.05},
                      {"params": model[2].parameters(), "lr": 0.2}], **kw)


OPTIMIZERS = {
    "sgd-momentum": lambda m: two_groups(m, torch.optim.SGD, momentum=0.9, nesterov=True),
    "adam": lambda m: two_groups(m, torch.optim.Adam),
    "adamw": lambda m: two_groups(m, torch.optim.AdamW, weight_decay=0.1),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_any_optimizer_with_param_groups_steps_on_the_clipped_mean(name):
    data = batches(3)
    model, engine, opt = private(mlp(), OPTIMIZERS[name])
    reference = mlp()
    ref_opt = OPTIMIZERS[name](reference)
    for x, y in data:
        grads = clipped_mean_grads(reference, x, y, 0.5, 6)
        for n, p in reference.named_parameters():
            p.grad = grads[n]
        ref_opt.step()
    train(model, opt, data)
    for (n, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12, msg=n)
    assert engine.steps == 3


@pytest.mark.parametrize("when", ["before", "after"])
def test_lr_scheduler_made_before_or_after_attach(when):
    model = bk.convert(mlp())
    engine = bk.PrivacyEngine(model, batch_size=6, sample_size=60, noise_multiplier=0.0)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5) if when == "before" else None
    engine.attach(opt)
    sched = sched or torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        train(model, opt, batches(2), sched)
    assert engine.steps == 2 and opt.param_groups[0]["lr"] == 0.25
    engine.detach()  # no engine: the bk layers hand out ordinary gradients again
    x, y = batches(1)[0]
    F.cross_entropy(model(x), y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()  # the optimizer's own step: no privatization
    assert engine.steps == 2 and not all(torch.equal(b, p) for b, p in zip(before, model.parameters()))


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_with_and_without_set_to_none(set_to_none):
    data = batches(2)
    model, engine, opt = private(mlp(), lambda m: torch.optim.SGD(m.parameters(), lr=1.0))
    for x, y in data:
        opt.zero_grad(set_to_none=set_to_none)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        want = clipped_mean_grads(copy.deepcopy(model), x, y, 0.5, 6)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        for n, p in model.named_parameters():
            torch.testing.assert_close(before[n] - p.detach(), want[n], rtol=1e-9, atol=1e-13)


def test_detach_restores_the_optimizer_exactly():
    model = bk.convert(mlp())
    opt = torch.optim.Adam(model.parameters())
    engine = bk.PrivacyEngine(model, batch_size=6, sample_size=60, noise_multiplier=1.0)
    engine.attach(opt)
    assert "step" in vars(opt)
    engine.detach()
    assert "step" not in vars(opt) and "zero_grad" not in vars(opt)
    engine.attach(opt)  # and it can attach again
    train(model, opt, batches(1))
    assert engine.steps == 1


# ------------------------------------------------------------------ noise


def test_noise_is_independent_across_steps_and_parameters():
    """Noise of step 1 vs step 2 and of one parameter vs another: correlation within
    5 standard errors (1/sqrt(n)) of 0; a repeated stream would give exactly 1."""
    model = bk.convert(nn.Sequential(nn.Linear(200, 300), nn.Linear(300, 200, bias=False)).to(DT))
    engine = bk.PrivacyEngine(model, batch_size=8, sample_size=800, noise_multiplier=1.0, seed=5)
    opt = engine.attach(torch.optim.SGD(model.parameters(), lr=1.0))
    moves = []
    for _ in range(2):
        before = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        (model(torch.zeros(2, 200, dtype=DT)).sum() * 0).backward()  # zero gradients: pure noise
        opt.step()
        moves.append([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])
    n = 60_000
    pairs = [(moves[0][0][:n], moves[1][0][:n]), (moves[0][0][:n], moves[0][2][:n]),
             (moves[1][0][:n], moves[1][2][:n])]
    for u, v in pairs:
        corr = torch.corrcoef(torch.stack([u, v]))[0, 1].item()
        assert abs(corr) < 5 / math.sqrt(n), corr


def test_secure_mode_draws_a_fresh_seed_from_the_os():
    def noise():
        model = bk.convert(nn.Sequential(nn.Linear(50, 50)).to(DT))
        engine = bk.PrivacyEngine(model, batch_size=2, sample_size=20, noise_multiplier=1.0)  # seed=None
        opt = engine.attach(torch.optim.SGD(model.parameters(), lr=1.0))
        before = model[0].weight.detach().clone()
        (model(torch.zeros(1, 50, dtype=DT)).sum() * 0).backward()
        opt.step()
        return model[0].weight.detach() - before

    torch.manual_seed(0)
    a = noise()
    torch.manual_seed(0)  # torch's own generator plays no part
    assert not torch.equal(a, noise())


# ------------------------------------------------------------------ checkpoints


def make_run(seed):
    model, engine, opt = private(mlp(), lambda m: torch.optim.AdamW(m.parameters(), lr=0.01), noise_multiplier=0.8,
                                 seed=seed)
    return model, engine, opt, torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)


@pytest.mark.parametrize("seed", [1234, None])
def test_resume_from_a_checkpoint_takes_bit_identical_steps(seed):
    data = batches(4)
    straight, engine, opt, sched = make_run(seed)
    train(straight, opt, data[:2], sched)
    buffer = io.BytesIO()
    torch.save({"model": straight.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                "engine": engine.state_dict()}, buffer)
    train(straight, opt, data[2:], sched)

    resumed, engine2, opt2, sched2 = make_run(None if seed is None else seed + 1)  # another seed: the checkpoint's wins
    buffer.seek(0)
    state = torch.load(buffer)
    resumed.load_state_dict(state["model"])
    opt2.load_state_dict(state["opt"])
    sched2.load_state_dict(state["sched"])
    engine2.load_state_dict(state["engine"])
    assert engine2.steps == 2 and engine2.epsilon() == bk.accounting.epsilon(0.8, 0.1, 2, engine2.target_delta)
    train(resumed, opt2, data[2:], sched2)
    for p, q in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    assert engine2.steps == engine.steps == 4 and engine2.epsilon() == engine.epsilon()


def test_loading_a_checkpoint_of_another_model_changes_nothing():
    _, engine, opt, _ = make_run(1)
    train(engine.model, opt, batches(1))
    other = bk.convert(nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)).to(DT))
    engine2 = bk.PrivacyEngine(other, batch_size=6, sample_size=60, noise_multiplier=0.8, seed=9)
    with pytest.raises(ValueError, match="parameters"):
        engine2.load_state_dict(engine.state_dict())
    assert engine2.steps == 0 and engine2.epsilon() == 0.0 and engine2._noise_offset == 0
    broken = engine.state_dict()
    broken["steps"] += 1
    with pytest.raises(ValueError, match="add up"):
        engine.load_state_dict(broken)
    assert engine.steps == 1


def test_epsilon_composes_the_history_of_a_resumed_run_with_other_noise():
    _, engine, opt, _ = make_run(1)
    train(engine.model, opt, batches(3))
    model2, engine2, opt2 = private(mlp(), lambda m: torch.optim.SGD(m.parameters(), lr=0.1), noise_multiplier=1.5)
    engine2.load_state_dict(engine.state_dict())
    train(model2, opt2, batches(2))
    from dp_accounting import dp_event  # here: the GPU check's machine has no dp_accounting
    from dp_accounting.rdp import rdp_privacy_accountant

    acc = rdp_privacy_accountant.RdpAccountant()  # computed independently of bk's accounting module
    q = 6 / 60
    acc.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(0.8)), 3)
    acc.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(1.5)), 2)
    want = acc.get_epsilon(engine2.target_delta)
    assert engine2.epsilon() == pytest.approx(want, rel=1e-9) and engine2.steps == 5


# ------------------------------------------------------------------ empty batches


def test_an_empty_poisson_batch_is_a_step_with_noise_only():
    model = bk.convert(nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4), nn.Linear(4, 3)).to(DT))
    engine = bk.PrivacyEngine(model, batch_size=4, sample_size=40, noise_multiplier=1.0, seed=2)
    opt = engine.attach(torch.optim.SGD(model.parameters(), lr=1.0))
    before = [p.detach().clone() for p in model.parameters()]
    ids, y = torch.zeros(0, 7, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    F.cross_entropy(model(ids).mean(1), y).backward()  # a nan loss over no examples: no gradient at all
    opt.step()
    assert engine.steps == 1 and engine.epsilon() > 0
    for p, b in zip(model.parameters(), before):
        moved = p.detach() - b
        assert torch.isfinite(moved).all() and (moved != 0).all()  # noise, and nothing else


# ------------------------------------------------------------------ bad input changes nothing


def untouched(model, engine, before):
    return engine.steps == 0 and engine.epsilon() == 0.0 and all(
        torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_parameters_added_to_the_optimizer_after_attach_are_refused_at_the_step():
    model, engine, opt = private(mlp(), lambda m: torch.optim.SGD(m.parameters(), lr=1.0), noise_multiplier=1.0)
    stranger = nn.Parameter(torch.zeros(3, dtype=DT))
    opt.add_param_group({"params": [stranger]})
    before = [p.detach().clone() for p in model.parameters()]
    x, y = batches(1)[0]
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(ValueError, match="param group 1 holds a trainable parameter of shape \\(3,\\)"):
        opt.step()
    assert untouched(model, engine, before) and torch.equal(stranger, torch.zeros(3, dtype=DT))


def test_attach_refuses_an_optimizer_over_other_parameters():
    model = bk.convert(mlp())
    engine = bk.PrivacyEngine(model, batch_size=6, sample_size=60, noise_multiplier=1.0)
    opt = torch.optim.SGD(list(model.parameters()) + [nn.Parameter(torch.zeros(2))], lr=1.0)
    with pytest.raises(ValueError, match="not part of the model"):
        engine.attach(opt)
    assert "step" not in vars(opt)


@pytest.mark.parametrize("bad", ["non-scalar loss", "input dtype", "input device"])
def test_bad_inputs_raise_and_change_nothing(bad):
    model, engine, opt = private(mlp(), lambda m: torch.optim.SGD(m.parameters(), lr=1.0), noise_multiplier=1.0)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = batches(1)[0]
    with pytest.raises((RuntimeError, TypeError, NotImplementedError)):
        if bad == "non-scalar loss":
            F.cross_entropy(model(x), y, reduction="none").backward()
        elif bad == "input dtype":
            F.cross_entropy(model(x.float()), y).backward()
        else:
            F.cross_entropy(model(x.to("meta")), y).backward()
    with pytest.raises(RuntimeError, match="without a backward"):
        opt.step()
    assert untouched(model, engine, before)
    F.cross_entropy(model(x), y).backward()  # and the engine goes on as if nothing happened
    opt.step()
    assert engine.steps == 1


# ------------------------------------------------------------------ mixed precision


class _OwnMatmul(nn.Module):
    """x @ W with W its own Parameter: the generic path (a matmul that autocast runs in 16 bits)."""

    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d, d) / d**0.5)

    def forward(self, x):
        return x @ self.w


def lm(dtype=DT, generic=False):
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(30, 16), nn.LayerNorm(16), *([_OwnMatmul(16)] if generic else []),
                         nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 5)).to(dtype)


def lm_inputs(B=5, T=9):
    gen = torch.Generator().manual_seed(4)
    return torch.randint(0, 30, (B, T), generator=gen), torch.randint(0, 5, (B,), generator=gen)


def lm_loss(model, ids, y, reduction="mean"):
    return F.cross_entropy(model(ids).mean(1).float(), y, reduction=reduction)


def reference_mean_grads(model, ids, y, R, batch_size, autocast=None):
    """(1/batch_size) sum_i C_i g_i from one backward per example of the STOCK model (optionally
    under autocast), clipped and summed in float64."""
    loss = lambda m, b: lm_loss(m, b["ids"], b["y"], "none")  # noqa: E731
    with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
        grads = per_example_grads(model, loss, {"ids": ids, "y": y})
    grads = [{n: g.double() for n, g in gr.items()} for gr in grads]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    return {n: -d for n, d in expected_update(grads, [names], R, "abadi", batch_size).items()}


def assert_within_eager_error(got, want, eager):
    """bk's error against float64 at most RATIO_LOWP x eager PyTorch's in the same precision."""
    for n in want:
        scale = want[n].abs().max().item()
        err = (got[n].double() - want[n]).abs().max().item()
        eager_err = (eager[n] - want[n]).abs().max().item()
        assert err <= RATIO_LOWP * eager_err + FLOOR_LOWP * scale, (n, err, eager_err, scale)


def bk_mean_grads(model, ids, y, R, batch_size, autocast=None, scaler=None):
    model = bk.convert(model)
    engine = bk.PrivacyEngine(model, batch_size=batch_size, sample_size=10 * batch_size, noise_multiplier=0.0,
                              max_grad_norm=R)
    opt = engine.attach(torch.optim.SGD(model.parameters(), lr=0.0), grad_scaler=scaler)
    with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
        loss = lm_loss(model, ids, y)
    (scaler.scale(loss) if scaler else loss).backward()
    if scaler:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    return {n: p.grad for n, p in model.named_parameters()}, engine  # the step left grad = clipped mean


@pytest.mark.parametrize("generic", [False, True], ids=["fused", "with-generic-module"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_gives_float32_gradients_within_eager_error(dtype, generic):
    """With a generic-path module too: its recompute check used to compare the forward's
    fingerprint, computed under autocast in 16 bits, with the recompute's float32 one, and refused
    every such module (HF Llama's RMSNorm under autocast)."""
    ids, y = lm_inputs()
    want = reference_mean_grads(lm(generic=generic), ids, y, 0.3, 7)
    eager = reference_mean_grads(lm(torch.float32, generic), ids, y, 0.3, 7, autocast=dtype)
    got, _ = bk_mean_grads(lm(torch.float32, generic), ids, y, 0.3, 7, autocast=dtype)
    assert all(g.dtype == torch.float32 for g in got.values())
    if not generic:
        assert_within_eager_error(got, want, eager)
    else:
        # Over all parameters together: the recompute rounds its 16-bit matmul in another order
        # (vmapped), and per parameter the largest error of a 16-element bias is one rounding's
        # luck (measured: bk 2.7e-5 vs eager 1.2e-5 there, while bk's error is below eager's on
        # 5 of the 8 parameters)
        total = lambda d: torch.cat([(d[n].double() - want[n]).flatten() for n in want]).norm()  # noqa: E731
        assert total(got) <= RATIO_LOWP * total(eager), (total(got), total(eager))


def test_grad_scaler_scale_is_removed_before_clipping():
    """Norms seen under scaler.scale(loss) are 2^12 too large: unless the engine removes the
    scale, the clip factors (and so the gradients after unscale_) come out 2^12 too small."""
    ids, y = lm_inputs()
    want = reference_mean_grads(lm(), ids, y, 0.3, 7)
    eager = reference_mean_grads(lm(torch.float32), ids, y, 0.3, 7, autocast=torch.float16)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    got, engine = bk_mean_grads(lm(torch.float32), ids, y, 0.3, 7, autocast=torch.float16, scaler=scaler)
    assert engine.steps == 1 and engine.skipped_steps == 0
    assert_within_eager_error(got, want, eager)


def test_grad_scaler_overflow_skips_the_step_and_counts_it():
    ids, y = lm_inputs()
    model = bk.convert(lm(torch.float32))
    engine = bk.PrivacyEngine(model, batch_size=7, sample_size=70, noise_multiplier=1.0, seed=3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 60)  # overflows fp16 for sure
    opt = engine.attach(torch.optim.SGD(model.parameters(), lr=0.1), grad_scaler=scaler)
    before = [p.detach().clone() for p in model.parameters()]
    with torch.autocast("cpu", dtype=torch.float16):
        loss = lm_loss(model, ids, y)
    scaler.scale(loss).backward()
    with pytest.raises(RuntimeError, match="scaler.step"):
        opt.step()  # a direct step would bypass the scaler's check
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert scaler.get_scale() < 2.0 ** 60 and engine.steps == 0 and engine.skipped_steps == 1
    assert engine.epsilon() == pytest.approx(bk.accounting.epsilon(1.0, 0.1, 1, engine.target_delta))


def test_bf16_parameters_get_their_clipped_mean_within_eager_error():
    ids, y = lm_inputs()
    want = reference_mean_grads(lm(), ids, y, 0.3, 7)
    eager = reference_mean_grads(lm(torch.bfloat16), ids, y, 0.3, 7)
    got, _ = bk_mean_grads(lm(torch.bfloat16), ids, y, 0.3, 7)
    assert all(g.dtype == torch.bfloat16 for g in got.values())
    assert_within_eager_error(got, want, eager)


def test_bf16_parameters_get_float32_noise_of_the_promised_scale():
    model = bk.convert(nn.Sequential(nn.Linear(300, 400)).to(torch.bfloat16))
    engine = bk.PrivacyEngine(model, batch_size=8, sample_size=800, noise_multiplier=1.3, max_grad_norm=0.5, seed=7)
    opt = engine.attach(torch.optim.SGD(model.parameters(), lr=1.0))
    (model(torch.zeros(3, 300, dtype=torch.bfloat16)).sum() * 0).backward()
    opt.step()
    noise = model[0].weight.grad.double().flatten()  # the step left grad = noise / batch_size
    want = 1.3 * 0.5 / 8
    n = noise.numel()
    # bf16 rounding moves each value by <= 2^-9 relative: far inside the 3% the issue allows
    assert abs(noise.std().item() / want - 1) < 5 * math.sqrt(1 / (2 * n)) + 2 ** -8


def test_copies_of_an_attached_model_are_not_attached():
    """A deepcopy (an EMA or evaluation model) or a pickled model trains ordinarily and never
    reports into the engine of the original."""
    model, engine, opt = private(mlp(), lambda m: torch.optim.SGD(m.parameters(), lr=1.0))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for twin in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
        x, y = batches(1)[0]
        F.cross_entropy(twin(x), y).backward()
        assert all(p.grad is not None for p in twin.parameters())  # ordinary gradients
        with pytest.raises(RuntimeError, match="without a backward"):
            opt.step()  # the original's engine saw no backward
    assert model[0]._bk_engine is engine


class ConvAttentionNet(nn.Module):
    """Conv2d, GroupNorm, MultiheadAttention, LayerNorm and Linear in one model."""

    def __init__(self):
        super().__init__()
        self.conv, self.gn = nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8)
        self.attn, self.ln = nn.MultiheadAttention(8, 2, batch_first=True), nn.LayerNorm(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        h = F.relu(self.gn(self.conv(x))).flatten(2).transpose(1, 2)  # [B, 36 positions, 8]
        h = self.ln(h + self.attn(h, h, h, need_weights=False)[0])
        return self.head(h.mean(1))


def test_autocast_bf16_through_conv_group_norm_and_attention():
    torch.manual_seed(1)
    x, y = torch.randn(5, 3, 6, 6), torch.randint(0, 4, (5,))

    def make(dtype):
        torch.manual_seed(0)
        return ConvAttentionNet().to(dtype)

    def loss(m, batch):
        return F.cross_entropy(m(batch["x"].to(next(m.parameters()).dtype)).float(), batch["y"], reduction="none")

    def reference(model, autocast=None):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast is not None):
            grads = per_example_grads(model, loss, {"x": x, "y": y})
        grads = [{n: g.double() for n, g in gr.items()} for gr in grads]
        names = [n for n, _ in model.named_parameters()]
        return {n: -d for n, d in expected_update(grads, [names], 0.3, "abadi", 7).items()}

    model = bk.convert(make(torch.float32))
    engine = bk.PrivacyEngine(model, batch_size=7, sample_size=70, noise_multiplier=0.0, max_grad_norm=0.3)
    opt = engine.attach(torch.optim.SGD(model.parameters(), lr=0.0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        batch_loss = loss(model, {"x": x, "y": y}).mean()
    batch_loss.backward()
    opt.step()
    got = {n: p.grad for n, p in model.named_parameters()}
    assert all(g.dtype == torch.float32 for g in got.values())
    assert_within_eager_error(got, reference(make(DT)), reference(make(torch.float32), autocast=True))


def test_a_float64_model_under_autocast_stays_float64_as_torchs_layers_do():
    """Autocast casts float32 only. The bk layers cast their saved input to the autocast dtype
    whatever it was: a float64 Linear or Conv2d under bf16 autocast raised a dtype mismatch."""
    torch.manual_seed(3)
    model = ConvAttentionNet().to(DT)
    x, y = torch.randn(4, 3, 6, 6, dtype=DT), torch.randint(0, 4, (4,))
    loss = lambda m, b, r="mean": F.cross_entropy(m(b["x"]), b["y"], reduction=r)  # noqa: E731
    grads = per_example_grads(model, lambda m, one: loss(m, one, "sum"), {"x": x, "y": y})
    want = expected_update(grads, [[n for n, _ in model.named_parameters()]], 0.3, "abadi", 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = private_update(model, loss, {"x": x, "y": y}, 4, max_grad_norm=0.3)
    assert_updates_close(got, want)


def test_a_compiled_model_takes_the_eager_private_step():
    """torch.compile(model) of a converted model under the engine: bk's layers' Functions break the
    graph where they must, and the private step (clipping active, float64) is the eager one."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.LayerNorm(16), nn.Linear(16, 5)).double()
    x, y = torch.randn(6, 12, dtype=torch.float64), torch.randint(0, 5, (6,))
    updates = []
    for compiled in (False, True):
        model = bk.convert(copy.deepcopy(base))
        engine = bk.PrivacyEngine(model, batch_size=6, sample_size=60, noise_multiplier=0.0, max_grad_norm=0.05)
        optimizer = engine.attach(torch.optim.SGD(model.parameters(), lr=1.0))
        run = torch.compile(model) if compiled else model
        F.cross_entropy(run(x), y).backward()
        optimizer.step()
        updates.append(torch.cat([(p - q).detach().flatten() for p, q in zip(model.parameters(), base.parameters())]))
        assert engine.steps == 1
    assert updates[0].abs().max() > 0
    torch.testing.assert_close(updates[1], updates[0], rtol=1e-12, atol=1e-14)
