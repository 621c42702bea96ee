"""Packed sequences: several examples laid out along one row, each attending only to itself.

Padding-free training (transformers' DataCollatorWithFlattening, TRL's padding_free) packs a
batch's sequences one after the other into a row ([1, N] ids) with position_ids restarting at
each sequence; Hugging Face models then mask attention between the sequences. An example's
gradient is then the sum over ITS TOKENS of each token's contribution, and the engine clips
that sum when told (PrivacyEngine.example_rows(bk.packed_sequences())):

  - every layer that acts on each token alone (Linear, GPT-2's Conv1D, Embedding, LayerNorm,
    RMSNorm and transformers' RMSNorm classes, MoE experts and top-k routers) takes its input
    [R, T, ...] as N = R*T rows of one token each ([N, 1, ...]; rows the model folded itself,
    [N, d], and heads before tokens, [R, H, T, D], too), so its uses are over the tokens; the
    engine sums the tokens of each sequence (PackedGroups: a linear map's use kept on its token
    rows, each sequence's norm from its own rows, short sequences bucketed; per-token gradients
    summed);
  - the sequences are read from position_ids as transformers reads them
    (masking_utils.find_packed_sequence_indices: a sequence starts where the position does not
    go up by one), only when no attention_mask and no cache are given (otherwise the model reads
    each row as one sequence, and so does the engine);
  - the mixing between tokens must be only the model's attention, masked per sequence. Checked
    for every forward: transformers' own packed-sequence detection must have run in the model's
    mask creation and found these sequences (eager, sdpa and flex attention; flash attention's
    varlen path reads them its own way and is refused for now), and every module that runs in
    the forward must be a token-wise bk layer or a module without its own Parameters that is no
    convolution, recurrent layer or torch MultiheadAttention (a frozen short convolution of a
    hybrid model would mix the sequences as much as a trained one). Anything else is refused
    before the backward, nothing recorded.
"""
import sys
import threading

import torch

from .example_rows import RowGroups
from .layout import UnsupportedLayoutError
from .nn._uses import LinearUse
from .ops._backend import resolve
from .ops._norm_common import accumulation_dtype
from .ops.linear_norm import linear_norm_3d

# Modules whose forward mixes positions even when frozen, seen in the layer lists of hybrid and
# speech models: none of them reads the packed sequences apart.
_TOKEN_MIXERS = (torch.nn.modules.conv._ConvNd, torch.nn.RNNBase, torch.nn.MultiheadAttention)
# attention implementations whose masks transformers makes with its packed-sequence detection
_CHECKED_ATTENTION = ("eager", "sdpa", "flex_attention")


class PackedSequences:
    """PrivacyEngine.example_rows' setting for packed sequences (bk.packed_sequences())."""

    def __repr__(self):
        return "bk.packed_sequences()"

    def __eq__(self, other):
        return isinstance(other, PackedSequences)

    def __hash__(self):
        return hash(PackedSequences)


def packed_sequences():
    """Each sequence packed into a row of the batch is one example (padding-free batches:
    transformers' DataCollatorWithFlattening, TRL's padding_free=True): its tokens are clipped
    together, and it counts as one example. Pass it to PrivacyEngine.example_rows. A batch
    whose rows are not packed (an attention_mask given, or position ids that never restart)
    is read as one example per row, as before."""
    return PackedSequences()


def sequence_starts(kwargs):
    """[R, T] bool: where a packed sequence starts in each row of the forward's position_ids,
    as transformers reads them (only with no attention_mask and no cache), or None when no row
    holds two sequences. Every row's first token starts one."""
    if not kwargs:
        return None
    positions = kwargs.get("position_ids")
    if not (isinstance(positions, torch.Tensor) and positions.dim() == 2 and positions.shape[1] > 1
            and not positions.is_floating_point() and kwargs.get("attention_mask") is None
            and kwargs.get("past_key_values") is None and kwargs.get("cache") is None):
        return None
    steps = torch.diff(positions, dim=-1) != 1
    if not bool(steps.any()):
        return None
    return torch.cat([torch.ones_like(steps[:, :1]), steps], dim=1)


def sequence_ids(starts):
    """[R, T] long: the example of each token (sequences numbered row by row, from 0)."""
    return starts.flatten().long().cumsum(0).view(starts.shape) - 1


def check_flash_kwargs(kwargs, starts):
    """flash attention's cumulative lengths, where given, must cut the tokens where position_ids do."""
    cu = kwargs.get("cu_seq_lens_q") if kwargs else None
    if cu is None:
        return
    ours = torch.cat([starts.flatten().nonzero().flatten(), torch.tensor([starts.numel()], device=starts.device)])
    if cu.dim() != 1 or cu.shape[0] != ours.shape[0] or not torch.equal(cu.to(ours.device, torch.long), ours):
        raise UnsupportedLayoutError(
            f"PrivacyEngine: packed sequences: cu_seq_lens_q {cu.tolist()[:12]} does not cut the tokens where the "
            f"position_ids restart ({ours.tolist()[:12]}); nothing ran, nothing was recorded and no budget was spent.")


def attention_problem(model):
    """Why the model's attention cannot be checked to keep packed sequences apart, or None."""
    impls = {getattr(c, "_attn_implementation", None) for c in _configs(model)}
    impls.discard(None)
    if not impls:
        return ("it is not a transformers model (no config._attn_implementation): bk checks that attention keeps "
                "packed sequences apart through transformers' own packed-sequence detection")
    other = sorted(i for i in impls if i not in _CHECKED_ATTENTION)
    if other:
        return (f"its attention implementation {', '.join(map(str, other))} reads packed sequences its own way, which "
                f"bk does not check yet; load it with attn_implementation='sdpa' (or 'eager', 'flex_attention')")
    return None


def _configs(model):
    config = getattr(model, "config", None)
    if config is None:
        return []
    found = [config]
    for name in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, name, None)
        if sub is not None and hasattr(sub, "_attn_implementation"):
            found.append(sub)
    return found


class PackedGroups(RowGroups):
    """RowGroups over the R*T token rows of a packed forward, each sequence's tokens consecutive.

    A linear map's use of ragged sequences is not zero-padded to the longest sequence here
    (RowGroups.side_by_side would: the padding costs fills, copies and norm work on zeros) but
    kept on its token rows (TokenLinearUse): each sequence's norm from its own rows (views), the
    clipped sum as one weighted sum over the tokens with each token weighted by its sequence's
    factor. Equal lengths keep RowGroups' views ([E, L, d], one fused call)."""

    def __init__(self, starts):
        super().__init__(sequence_ids(starts).flatten(), examples=int(starts.sum()))
        first = starts.flatten().nonzero().flatten().tolist()
        self.bounds = list(zip(first, first[1:] + [starts.numel()]))  # [(first token, past the last)] per sequence
        # A norm call costs tens of us: long sequences get one each (views, no copy), short ones
        # are gathered by similar length into buckets, zero-padded (at most a third of padding)
        self.long_ones = [(e, lo, hi) for e, (lo, hi) in enumerate(self.bounds) if hi - lo >= LONG_SEQUENCE]
        self._buckets, self._bucket_tensors = [], {}
        short = sorted(((hi - lo, e) for e, (lo, hi) in enumerate(self.bounds) if hi - lo < LONG_SEQUENCE),
                       reverse=True)
        for length, e in short:
            if self._buckets and length * 3 >= self._buckets[-1][0] * 2:
                self._buckets[-1][1].append(e)
            else:
                self._buckets.append((length, [e]))

    def buckets(self, device):
        """[(examples [k], token rows [k, L] (the last row where past a sequence's end), real [k, L])]."""
        if device not in self._bucket_tensors:
            made = []
            for longest, examples in self._buckets:
                lo = torch.tensor([self.bounds[e][0] for e in examples])
                n = torch.tensor([self.bounds[e][1] - self.bounds[e][0] for e in examples])
                step = torch.arange(longest)
                real = step[None, :] < n[:, None]
                index = torch.where(real, lo[:, None] + step[None, :], lo[:, None])
                made.append((torch.tensor(examples, device=device), index.to(device), real.to(device)))
            self._bucket_tensors[device] = made
        return self._bucket_tensors[device]

    def regroup(self, use, where):
        if isinstance(use, LinearUse) and not self.in_place and use.batch == self.rows:
            return TokenLinearUse(use, self)
        return super().regroup(use, where)


class TokenLinearUse:
    """A linear map's use on the token rows of packed sequences (a [N, 1, d], g [N, 1, p]), over
    the sequences: G_e = sum over e's tokens t of g_t^T a_t (see PackedGroups)."""

    def __init__(self, use, groups):
        self.use, self.groups = use, groups
        self._padded = None

    @property
    def batch(self):
        return self.groups.examples

    def sq_norm(self, mode, backend):
        a, g = self.use.a, self.use.g  # [N, k, d], [N, k, p]: k rows per token (1, or a head dim)
        backend = resolve(backend, a.device, "linear_norm")
        out = torch.empty(self.batch, dtype=accumulation_dtype(a.dtype), device=a.device)
        for e, lo, hi in self.groups.long_ones:  # one call each, on views of its rows
            out[e:e + 1] = linear_norm_3d(_rows_of(a, lo, hi), _rows_of(g, lo, hi), mode, backend)
        for examples, index, real in self.groups.buckets(a.device):  # short ones: one call per bucket
            k, L = index.shape
            rows_a = a.index_select(0, index.flatten()).view(k, L * a.shape[1], a.shape[2])
            rows_g = (g.index_select(0, index.flatten()) * real.flatten()[:, None, None].to(g.dtype)).view(
                k, L * g.shape[1], g.shape[2])  # zero rows of g past a sequence's end: no term
            out[examples] = linear_norm_3d(rows_a, rows_g, mode, backend).to(out.dtype)
        return out

    def factors(self):  # cross terms (a tied embedding): the sequences zero-padded side by side
        if self._padded is None:
            self._padded = RowGroups.regroup(self.groups, self.use, lambda: "")
        return self._padded.factors()

    def dense(self):
        return None

    def densify(self, mode):
        return self

    def _token_factors(self, c):
        return c.index_select(0, self.groups.example.to(c.device))

    def clipped(self, c, backend):
        return self.use.clipped(self._token_factors(c), backend)

    def add_clipped(self, grad, c, backend):
        self.use.add_clipped(grad, self._token_factors(c), backend)


def _rows_of(t, lo, hi):
    """Tokens lo..hi of token rows [N, d] as one example [1, hi - lo, d] ([N, h, d]: [1, (hi - lo) h, d])."""
    part = t[lo:hi]
    return part.reshape(1, -1, part.shape[-1])


# tokens from which a packed sequence's norm is computed on its own rows (views) rather than in a
# zero-padded bucket of shorter ones
LONG_SEQUENCE = 32

_watching = threading.local()


class Watch:
    """One packed forward, watched: the modules that run in it (a global forward pre-hook,
    registered for that forward only) and what transformers' packed-sequence detection found."""

    def __init__(self, engine, starts):
        self.engine, self.starts, self.found, self.problem = engine, starts, [], None
        _wrap_detection()
        self._hook = torch.nn.modules.module.register_module_forward_pre_hook(self._module_runs)
        _watching.current = self

    def _module_runs(self, module, args):
        from .nn._core import BKLayer, in_plain_forward
        if getattr(_watching, "current", None) is not self or in_plain_forward() or not torch.is_grad_enabled():
            return  # another thread's modules, or outside this forward
        if isinstance(module, BKLayer):
            if module._bk_token_features is None:
                self.problem = (module, "its bk family takes its examples per row, not per token (it may mix the "
                                        "positions of a row: a convolution, recurrence, attention table or a module "
                                        "on the generic path)")
        elif isinstance(module, _TOKEN_MIXERS):
            self.problem = (module, "it mixes the positions of a row and does not read the packed sequences apart")
        elif any(True for _ in module.parameters(recurse=False)) and not _token_wise_library_layer(module):
            self.problem = (module, "it owns Parameters but is no bk layer (frozen, so left unconverted), and bk "
                                    "cannot tell whether it mixes the positions of a row")
        if self.problem is not None:  # raised here, before the module runs
            self.close()
            raise self.refusal()

    def refusal(self):
        module, why = self.problem
        return UnsupportedLayoutError(
            f"PrivacyEngine: packed sequences (example_rows(bk.packed_sequences())): {type(module).__name__} "
            f"({self.engine._module_path(module)}) runs in the forward, and {why}. Only layers that act on each token "
            "alone, and the model's attention masked per sequence, may run on packed sequences; give each example "
            "its own row (a padding collator) for this model. Nothing was recorded and no budget was spent.")

    def close(self):
        self._hook.remove()
        if getattr(_watching, "current", None) is self:
            _watching.current = None

    def finish(self):
        """At the forward's end: the model's masks must have read these sequences apart."""
        self.close()
        ours = self.starts.long().cumsum(1) - 1  # numbered from 0 in each row, as transformers numbers them
        seen = [m for m in self.found if m is not None]
        if seen and len(seen) == len(self.found) and all(
                m.shape == ours.shape and torch.equal(m.to(ours.device, torch.long), ours) for m in seen):
            return
        why = ("transformers' packed-sequence detection did not run in the model's forward: it is skipped when the "
               "forward makes a cache (pass use_cache=False; use_cache defaults to the config's, True for most "
               "decoders), and absent from an encoder's bidirectional mask or a model's own mask code") \
            if not self.found else "the model's attention masks did not cut the rows where the engine's position_ids do"
        raise UnsupportedLayoutError(
            f"PrivacyEngine: packed sequences (example_rows(bk.packed_sequences())): {why}, so the packed examples "
            "may attend to each other and none of their influences would be bounded. Give each example its own row "
            "for this model; nothing was recorded and no budget was spent.")


def _token_wise_library_layer(module):
    """A library layer left unconverted (frozen: a LoRA base layer, a frozen embedding, an MoE
    router or experts) that acts on each token alone."""
    from .nn.linear import is_gpt2_conv1d
    from .nn.moe import is_hf_experts
    cls = type(module)
    transformers_layer = cls.__module__.startswith("transformers.models.")
    return isinstance(module, _TOKEN_WISE_LAYERS) or is_gpt2_conv1d(cls) or is_hf_experts(cls) or (
        transformers_layer and cls.__name__.endswith(("RMSNorm", "TopKRouter", "TopkRouter")))


_TOKEN_WISE_LAYERS = (torch.nn.Linear, torch.nn.Embedding, torch.nn.LayerNorm, torch.nn.RMSNorm)


def _wrap_detection():
    """Wraps transformers.masking_utils.find_packed_sequence_indices once: each call made while
    a packed forward is watched reports what it found (it stays transparent otherwise)."""
    masking = sys.modules.get("transformers.masking_utils")
    if masking is None or getattr(masking.find_packed_sequence_indices, "_bk_watched", False):
        return
    original = masking.find_packed_sequence_indices

    def find_packed_sequence_indices(position_ids):
        found = original(position_ids)
        watch = getattr(_watching, "current", None)
        if watch is not None:
            watch.found.append(found)
        return found
    find_packed_sequence_indices._bk_watched = True
    find_packed_sequence_indices.__wrapped__ = original
    masking.find_packed_sequence_indices = find_packed_sequence_indices
