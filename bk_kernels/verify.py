"""bk.verify: the first thing to run on a new model. It checks the whole engine on the user's own
model and one small batch against the obviously correct slow path: one backward per example.

    report = bk.verify(model, lambda m, batch: F.cross_entropy(m(batch[0]), batch[1]), (x, y))
    print(report)          # worst relative errors, and the parameters and modules behind them
    assert report.ok

Both runs happen on float64 copies of the model (the model itself is not touched), in eval mode
(dropout off, so both see one forward), with noise 0 and R at the median per-example norm, so
that about half of the examples are clipped and the clip factors are exercised.
"""
import copy
import math
from dataclasses import dataclass, field

import torch
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from .clipping import clip_factors_ref
from .convert import convert, generic_modules
from .engine import PrivacyEngine
from .example_rows import check_spec, resolve
from .packed import PackedSequences, sequence_ids, sequence_starts


@dataclass
class VerifyReport:
    """What bk.verify measured. Errors are relative: a per-example norm against the reference's,
    a parameter's update against the largest entry of its reference update (floored at 1e-6 of
    the largest update of the model, for parameters that barely move)."""

    batch_size: int
    max_grad_norm: float
    norm_error: float                 # worst over examples and clipping units
    update_error: float               # worst over parameters
    worst: list = field(default_factory=list)  # [(error, parameter name, module path, module type)], worst first
    generic_modules: list = field(default_factory=list)  # (path, type, elements) on the generic path
    rtol: float = 1e-6

    @property
    def ok(self):
        return self.norm_error <= self.rtol and self.update_error <= self.rtol

    def __str__(self):
        lines = [f"bk.verify: {'OK' if self.ok else 'MISMATCH'} on {self.batch_size} examples (float64, R = "
                 f"{self.max_grad_norm:.4g}): per-example norms within {self.norm_error:.2e}, clipped update within "
                 f"{self.update_error:.2e} (tolerance {self.rtol:.0e}) of one backward per example"]
        for err, name, path, kind in self.worst[:5]:
            lines.append(f"  {err:.2e}  {name}  ({path}: {kind})")
        if self.generic_modules:
            lines.append(f"  generic path (a recompute per module): {', '.join(p for p, _, _ in self.generic_modules)}")
        return "\n".join(lines)


def _in_float64(model):
    """A copy of the model in float64 and eval mode. transformers' MoE experts default to
    torch._grouped_mm, which takes no float64: the copy's config asks for its eager loop (the
    same arithmetic)."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if getattr(config, "_experts_implementation", "eager") not in (None, "eager"):
            config._experts_implementation = "eager"
    return model.double().eval()


def verify(model, loss_fn, batch, *, batch_first=True, clipping_style="all-layer", max_grad_norm=None,
           clipping_fn="abadi", rtol=1e-6, example_rows=None, split=None):
    """Compares bk's per-example norms and clipped update with a loop of one backward per example.

    model: the user's model (converted or not; it is copied, never changed).
    loss_fn(model, batch): the batch's loss as the user trains it, a mean over its examples.
    batch: a tensor or a tuple/list/dict of them; every tensor whose example dim (0, or 1 with
        batch_first=False and more than one dim) has the batch size is split into examples,
        the others are passed whole to every example.
    example_rows: which example each row of the model's batch belongs to, as given to
        PrivacyEngine.example_rows (an example laid out as several rows). The reference's
        example e is then batch's rows of example e (every batched tensor's), and the loss_fn
        must take such a batch (a DPO loss: chosen rows, then rejected rows). With
        bk.packed_sequences() the batch is a dict holding position_ids [R, T]: example e is
        its e-th packed sequence, each tensor shaped as position_ids cut to that sequence's
        tokens ([1, L], positions restarting at its start), the others passed whole.
    split: batch -> [the batch of example 0, of example 1, ...], for batches whose tensors do not
        all hold the examples on one dim (a Qwen-VL batch: pixel_values hold every image's patch
        rows, image_grid_thw one row per image). Replaces the split above; the float64 casts
        are applied to every example's batch it returns.
    Raises what the engine raises for a model it refuses (a clear error naming the module).
    """
    leaves, spec = tree_flatten(batch)
    tensors = [t for t in leaves if isinstance(t, torch.Tensor) and t.dim() > 0]
    if not tensors:
        raise ValueError("bk.verify: the batch holds no tensor with a batch dim")
    example_dim = lambda t: 0 if batch_first or t.dim() < 2 else 1  # noqa: E731
    B = tensors[0].shape[example_dim(tensors[0])]
    if B < 1:
        raise ValueError("bk.verify: the batch is empty")
    batched = [isinstance(t, torch.Tensor) and t.dim() > example_dim(t) and t.shape[example_dim(t)] == B
               for t in leaves]
    leaves = [_float64(t) for t in leaves]

    if split is not None:  # the user's own split; each example's batch in float64 as the whole batch
        examples = [tree_map(_float64, part) for part in split(batch)]
        if not examples:
            raise ValueError("bk.verify: split(batch) gave no example")
    elif isinstance(check_spec(example_rows), PackedSequences):  # each packed sequence's tokens, as its own row
        examples = [tree_map(_float64, part) for part in _unpacked(batch)]
    else:  # each example's rows of every batched tensor (one row each, or example_rows' rows)
        groups = resolve(check_spec(example_rows), B)
        rows_of = [torch.arange(B)[i:i + 1] for i in range(B)] if groups is None else \
            [torch.nonzero(groups.example == e).flatten() for e in range(groups.examples)]
        examples = [tree_unflatten([t.index_select(example_dim(t), rows.to(t.device)) if b else t
                                    for t, b in zip(leaves, batched)], spec) for rows in rows_of]

    reference = _in_float64(copy.deepcopy(model))  # copies of converted models are not attached
    names = [n for n, p in reference.named_parameters() if p.requires_grad]
    per_example = []
    for one in examples:
        reference.zero_grad(set_to_none=True)
        try:
            loss = loss_fn(reference, one)
        except Exception as err:  # the split did not give examples: say so rather than guess
            how = "by split()" if split is not None else \
                f"on dim {0 if batch_first else 1} of its tensors (batch_first={batch_first})"
            raise ValueError(
                f"bk.verify: the loss of one example failed ({type(err).__name__}: {err}); the batch was split "
                f"into {len(examples)} examples {how}. If the model's examples lie elsewhere, its layout is declared "
                "wrong (a batch whose tensors do not all hold the examples on one dim: give split=)") from err
        loss.backward()
        params = dict(reference.named_parameters())
        per_example.append({n: params[n].grad.detach().clone() if params[n].grad is not None
                            else torch.zeros_like(params[n]) for n in names})
    totals = [math.sqrt(sum(g[n].square().sum().item() for n in names)) for g in per_example]
    not_finite = [i for i, total in enumerate(totals) if not math.isfinite(total)]
    if not_finite:  # the model itself, without bk: nothing to compare with
        raise ValueError(
            f"bk.verify: the reference gradient of example(s) {not_finite} is not finite: the model's own "
            "float64 forward and backward of that one example (without bk) gives inf or NaN (a mask filled with "
            "-inf over a whole row, or float32 arithmetic inside the model). Nothing was checked")
    B = len(examples)  # examples, from here on
    R = max_grad_norm if max_grad_norm is not None else (sorted(totals)[B // 2] or 1.0)

    private = convert(_in_float64(copy.deepcopy(model)))
    engine = PrivacyEngine(private, batch_size=B, sample_size=max(2 * B, 2), noise_multiplier=0.0, max_grad_norm=R,
                           clipping_style=clipping_style, clipping_fn=clipping_fn, batch_first=batch_first)
    optimizer = engine.attach(torch.optim.SGD([p for p in private.parameters() if p.requires_grad], lr=1.0))
    engine.example_rows(example_rows)
    loss_fn(private, tree_unflatten(leaves, spec)).backward()
    norms = engine._last_unit_sq_norms
    optimizer.step()
    got = {n: p.grad.detach() for n, p in private.named_parameters() if p.requires_grad}  # what SGD(lr=1) took

    # The reference's clipped mean gradient, (1/B) sum_i C_i g_i, unit by unit (the engine's units).
    by_id = {id(p): n for n, p in private.named_parameters() if p.requires_grad}
    units = [[by_id[id(p)] for p in unit] for unit in engine._units]
    threshold = R / math.sqrt(len(units))
    want = {n: torch.zeros_like(per_example[0][n]) for n in names}
    norm_error = 0.0
    for i, g in enumerate(per_example):
        for u, unit in enumerate(units):
            norm = math.sqrt(sum(g[n].square().sum().item() for n in unit))
            ours = math.sqrt(norms[u][i].item())
            norm_error = max(norm_error, abs(ours - norm) / max(norm, 1e-300))
            c = clip_factors_ref(torch.tensor([norm * norm], dtype=torch.float64), threshold, clipping_fn,
                                 engine.gamma).item()
            for n in unit:
                want[n] += c * g[n] / B
    overall = max((w.abs().max().item() for w in want.values()), default=0.0)
    modules = dict(private.named_modules())
    worst = []
    for n in names:
        scale = max(want[n].abs().max().item(), 1e-6 * overall, 1e-300)
        err = (got[n] - want[n]).abs().max().item() / scale
        path = n.rsplit(".", 1)[0] if "." in n else ""
        worst.append((err, n, path or "<model>", type(modules.get(path, private)).__name__))
    worst.sort(key=lambda w: -w[0])
    return VerifyReport(batch_size=B, max_grad_norm=R, norm_error=norm_error,
                        update_error=worst[0][0] if worst else 0.0, worst=worst,
                        generic_modules=generic_modules(private), rtol=rtol)


def _unpacked(batch):
    """The batches of a packed batch's sequences, one each (verify's example_rows=bk.packed_sequences())."""
    positions = batch.get("position_ids") if isinstance(batch, dict) else None
    starts = sequence_starts({"position_ids": positions}) if positions is not None else None
    if starts is None:
        raise ValueError("bk.verify: example_rows=bk.packed_sequences() takes a dict batch whose position_ids [R, T] "
                         "restart at each packed sequence (and no attention_mask); for another layout give split=")
    ids = sequence_ids(starts)
    parts = []
    for e in range(int(starts.sum())):
        row, at = (ids == e).nonzero(as_tuple=True)
        cut = lambda t: t[row[0]:row[0] + 1, at[0]:at[-1] + 1]  # noqa: E731
        parts.append({k: cut(v) if isinstance(v, torch.Tensor) and v.shape[:2] == positions.shape else v
                      for k, v in batch.items()})
    return parts


def _float64(t):
    return t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
