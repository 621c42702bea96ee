"""transformers' Mamba mixers (Mamba, Falcon-Mamba; Mamba-2 and its copies in Bamba,
Granite-MoE-hybrid, Nemotron-H, Zamba2 and Falcon-H1): the selective scan book-kept.

The mixer owns A_log [I, N] and D [I] and uses them inline, and hands conv1d.weight and
dt_proj.weight to its scan functions itself. Left alone it took the generic path with those
children absorbed: the whole mixer (23-51% of a Mamba's Parameters) recomputed per example.
Here its training forward (no cache) is transformers' slow path (5.24) with:
- conv1d called as the bk Conv1d it is (its padding, kernel - 1, then the first T positions:
  what transformers' causal_conv1d_fn computes from its weight) and dt_proj's weight through
  bk.nn.linear;
- A_log, D and dt_proj's bias made per example by a shift of zeros ([B, I, N], [B, I]): each
  example's scan reads its own copy, so the backward gives every example's gradient; each copy
  is cast to float32 where transformers casts the Parameter (in a float64 model its gradients
  round as transformers' do).
The scan is transformers' recurrence (or mambapy's pscan where the config asks for it and it is
installed) on that per-example A. A prefill into an empty cache (eval mode with use_cache on)
fills the cache as transformers does; a call continuing from cached states, or outside private
training, runs transformers' own forward.
Falcon-Mamba's mixer is the same with weightless RMS norms on dt, B and C.
Mamba-2's mixer (_HFMamba2Mixer) owns A_log, D and dt_bias per head: the same per-example copies
go to transformers' own chunked scan.
"""
import inspect

import torch
import torch.nn.functional as F

from ._core import BKLayer, in_plain_forward
from ._made import library_module, mixin_class, source_of, takes
from .families import GENERIC, register_layer
from .layer_scale import per_example
from .linear import linear


def _masked(hidden_states, attention_mask):
    """transformers' apply_mask_to_padding_states: padded positions zeroed."""
    if attention_mask is None:
        return hidden_states
    return (hidden_states * attention_mask[:, :, None]).to(hidden_states.dtype)


def _pscan():
    try:
        from mambapy.pscan import pscan
    except ImportError:
        return None
    return pscan


# Packed sequences: transformers' torch scans cannot keep them apart (its hub wrapper raises
# without the kernel packages); bk calls the unwrapped torch function, so it leaves such calls to
# transformers' forward (which raises, or runs the kernels and is refused at the backward)
_PACKED = ("cu_seqlens", "seq_idx", "cu_seq_lens_q")


def _bypassed(layer, cache, kwargs=None):
    """transformers' own forward runs outside private training, for a call continuing from
    cached states (generation) and for packed sequences; a prefill into an empty cache (a model
    in eval mode with use_cache on: bk.verify's copies, users training in eval mode) is book-kept."""
    if in_plain_forward() or layer._bk_layout() is None:
        return True
    if kwargs and any(kwargs.get(name) is not None for name in _PACKED):
        return True
    return cache is not None and (cache.get_conv_state(layer.layer_idx) is not None
                                  or cache.get_recurrent_state(layer.layer_idx) is not None)


def _fill_conv_cache(layer, cache, x):
    """A prefill's conv state into the cache, as transformers' forward stores it; the prefill's
    output is the uncached one's (its left padding, if any, is zeros, as the convolution's own)."""
    if cache is not None:
        cache.update_conv_state(x, layer.layer_idx, conv_kernel_size=layer.conv_kernel_size)


def _causal_conv1d(layer, x):
    """transformers' causal_conv1d_fn on x [B, channels, T] through layer.conv1d, the bk Conv1d it
    is (its padding, kernel - 1 on both sides, then the first T positions), then layer.activation."""
    from transformers.activations import ACT2FN

    out = layer.conv1d(x.to(layer.conv1d.weight.dtype))[:, :, :x.shape[-1]]
    if layer.activation is not None:
        out = ACT2FN[layer.activation](out)
    return out.to(x.dtype)


def _copies_forward(module, reads, own, children):
    """Whether module's forward is the one a bk copy was written from: the signature
    (hidden_states, cache, attention_mask, **kwargs), these statements in its source, exactly
    these own Parameters and these child modules."""
    cls = type(module)
    source = source_of(cls.forward)
    return (takes(cls, "forward", ["hidden_states", "cache", "attention_mask", "kwargs"])
            and all(statement in source for statement in reads)
            and {name for name, _ in module.named_parameters(recurse=False)} == set(own)
            and all(isinstance(getattr(module, name, None), torch.nn.Module) for name in children))


def selective_scan(u, dt, A, B, C, use_mambapy=False):
    """transformers' mamba_selective_scan (no D, no gate) with a per-example A [batch, I, N].

    u, dt: [batch, I, T] (dt after its bias and softplus); B, C: [batch, T, N]. Returns the
    output [batch, I, T] and the last state [batch, I, N]."""
    input_dtype = u.dtype
    discrete_A = torch.exp(A[:, :, None, :] * dt[:, :, :, None])
    deltaB_u = dt[:, :, :, None] * B[:, None, :, :].float() * u[:, :, :, None].float()
    pscan = _pscan() if use_mambapy else None
    if pscan is not None:
        states = pscan(discrete_A.transpose(1, 2), deltaB_u.transpose(1, 2))
        return (states @ C.unsqueeze(-1)).squeeze(3).transpose(1, 2), states[:, -1]
    state = u.new_zeros(u.shape[0], u.shape[1], A.shape[-1])
    outputs = []
    for t in range(u.shape[2]):
        state = discrete_A[:, :, t] * state + deltaB_u[:, :, t]
        outputs.append(torch.matmul(state.to(input_dtype), C[:, t, :].unsqueeze(-1))[:, :, 0])
    return torch.stack(outputs, dim=-1), state


class _HFMambaMixer(BKLayer):
    """MambaMixer.forward / FalconMambaMixer.forward without a cache, book-kept (module docstring)."""

    _bk_swap_without_parameters = True  # A_log and D frozen: conv1d and dt_proj still need this forward

    def forward(self, hidden_states, cache=None, attention_mask=None, **kwargs):
        # conv1d's and dt_proj's weights are read here, so this runs whether or not A_log, D train
        if _bypassed(self, cache, kwargs):
            return super().forward(hidden_states, cache=cache, attention_mask=attention_mask, **kwargs)
        dtype = hidden_states.dtype
        projected = self.in_proj(_masked(hidden_states, attention_mask)).transpose(1, 2)
        x, gate = projected.chunk(2, dim=1)
        _fill_conv_cache(self, cache, x)
        x = _masked(_causal_conv1d(self, x).transpose(1, 2), attention_mask)  # [B, T, I]
        time_step, B, C = torch.split(self.x_proj(x), [self.time_step_rank, self.ssm_state_size,
                                                       self.ssm_state_size], dim=-1)
        if hasattr(self, "b_layernorm"):  # Falcon-Mamba: weightless RMS norms on dt, B and C
            time_step, B, C = self.dt_layernorm(time_step), self.b_layernorm(B), self.c_layernorm(C)
        # transformers' dt_proj.weight @ time_step, its bias added in the scan; A_log, D and that
        # bias cast as it casts them (float32), from per-example copies
        if isinstance(self.dt_proj, BKLayer):
            dt = linear(self.dt_proj, time_step, self.dt_proj.weight)
        else:  # frozen, so left unconverted
            dt = F.linear(time_step, self.dt_proj.weight)
        dt = dt.transpose(1, 2)  # [B, I, T]
        batch = x.shape[0]
        dt = F.softplus(dt + per_example(self.dt_proj, self.dt_proj.bias, batch).float().to(dt.dtype)[:, :, None])
        A = -torch.exp(per_example(self, self.A_log, batch).float())
        u = x.transpose(1, 2)
        y, last_state = selective_scan(u, dt, A, B, C, self.use_mambapy)
        if cache is not None:
            cache.update_recurrent_state(last_state, self.layer_idx)
        y = y + u * per_example(self, self.D, batch).float()[:, :, None]
        y = y * F.silu(gate)
        return self.out_proj(y.transpose(1, 2).to(dtype))


# Statements of transformers' forward that the copy above relies on (5.24's slow path)
_READS = ("A = -torch.exp(self.A_log.float())", "projected_states.chunk(2, dim=1)", "causal_conv1d_fn(",
          "self.x_proj(hidden_states_B_C)", "D=self.D.float()", "z=gate", "delta_softplus=True",
          "self.out_proj(scan_output.transpose(1, 2).to(dtype))")


def _mamba_mixer_class(module):
    """_HFMambaMixer for a mixer whose forward reads what the copy reads, with A_log and D its
    only own Parameters and the children it calls; else the generic path (exact, slower)."""
    falcon = "self.b_layernorm(B)" in source_of(type(module).forward)
    fits = (_copies_forward(module, _READS, {"A_log", "D"}, ("in_proj", "conv1d", "x_proj", "dt_proj", "out_proj"))
            and module.dt_proj.bias is not None
            and not hasattr(getattr(module, "config", None), "_is_quantized")
            and (not falcon or all(not any(True for _ in getattr(module, name).parameters())
                                   for name in ("dt_layernorm", "b_layernorm", "c_layernorm"))))
    if fits:
        return mixin_class(type(module), _HFMambaMixer)
    return GENERIC if any(True for _ in module.parameters(recurse=False)) else None


register_layer(None, _mamba_mixer_class,
               matches=lambda cls: cls.__name__ in ("MambaMixer", "FalconMambaMixer")
               and cls.__module__.startswith("transformers.models."))


class _HFMamba2Mixer(BKLayer):
    """Mamba2Mixer.forward (and its copies: Bamba, Granite-MoE-hybrid, Nemotron-H, Zamba2; Falcon-H1's
    with its muP multipliers and optional norm) without a cache, book-kept: its chunked scan (the
    library's own torch function) reads per-example copies of A_log, D and dt_bias ([B, 1, H], broadcast where it reads [H]); conv1d is called as
    the bk Conv1d it is. The gated RMSNorm after the scan is a module of its own (hf_rmsnorm.py)."""

    _bk_swap_without_parameters = True  # A_log, D, dt_bias frozen: conv1d still needs this forward

    def forward(self, hidden_states, cache=None, attention_mask=None, **kwargs):
        if _bypassed(self, cache, kwargs):
            return super().forward(hidden_states, cache=cache, attention_mask=attention_mask, **kwargs)
        batch, seq_len, _ = hidden_states.shape
        dtype = hidden_states.dtype
        hidden_states = _masked(hidden_states, attention_mask)
        falcon_h1 = hasattr(self, "mup_vector")  # Falcon-H1: muP multipliers around in_proj
        projected = self.in_proj(hidden_states * self.ssm_in_multiplier if falcon_h1 else hidden_states)
        if falcon_h1:
            projected = projected * self.mup_vector
        gate, x, dt = projected.split([self.intermediate_size, self.conv_dim, self.num_heads], dim=-1)
        _fill_conv_cache(self, cache, x.transpose(1, 2))
        x = _masked(_causal_conv1d(self, x.transpose(1, 2)).transpose(1, 2), attention_mask)
        groups = self.n_groups * self.ssm_state_size
        x, B, C = torch.split(x, [self.intermediate_size, groups, groups], dim=-1)
        chunk_scan = inspect.unwrap(library_module(type(self)).mamba2_chunk_scan)  # its torch path
        y = chunk_scan(x.view(batch, seq_len, self.num_heads, self.head_dim), dt,
                       -torch.exp(per_example(self, self.A_log, batch).float())[:, None],
                       B.view(batch, seq_len, self.n_groups, self.ssm_state_size),
                       C.view(batch, seq_len, self.n_groups, self.ssm_state_size),
                       chunk_size=self.chunk_size, D=per_example(self, self.D, batch)[:, None], z=None,
                       return_final_states=cache is not None,
                       dt_bias=per_example(self, self.dt_bias, batch)[:, None], dt_softplus=True,
                       initial_states=None, dt_limit=self.time_step_limit, **kwargs)
        if cache is not None:
            y, final_state = y
            cache.update_recurrent_state(final_state, layer_idx=self.layer_idx)
        y = y.flatten(2)  # [B, T, H * P] (B may be 0)
        # Falcon-H1 without its gated RMSNorm (mamba_rms_norm off) gates by SiLU alone
        y = self.norm(y, gate) if getattr(self, "mamba_rms_norm", True) else y * F.silu(gate)
        return self.out_proj(y.to(dtype))


# What the copy above relies on: the forward's statements and how the chunk scan reads A, D and
# dt_bias (each broadcast against [B, T, H] tensors, so a [B, 1, H] copy per example fits)
_MAMBA2_READS = ("A = -torch.exp(self.A_log.float())", "causal_conv1d_fn(", "mamba2_chunk_scan(",
                 "D=self.D,", "dt_bias=self.dt_bias,", "scan_output = self.norm(scan_output, gate)",
                 "self.out_proj(scan_output.to(dtype))")
_FALCON_H1_READS = ("hidden_states = hidden_states * self.ssm_in_multiplier",
                    "projected_states = projected_states * self.mup_vector", "if self.mamba_rms_norm:",
                    "scan_output = scan_output * torch.nn.functional.silu(gate)")
_CHUNK_SCAN_READS = ("dt = dt + dt_bias.to(dt.dtype)", "D_residual = D[..., None] * pad_tensor_by_size(hidden_states",
                     "A = A.to(hidden_states.dtype) * dt.float()")


def _mamba2_mixer_class(module):
    """_HFMamba2Mixer for a mixer whose forward and chunk scan read what the copy reads; else the
    generic path (exact, slower)."""
    scan = getattr(library_module(type(module)), "mamba2_chunk_scan", None)
    scan_source = source_of(inspect.unwrap(scan)) if callable(scan) else ""
    falcon_h1 = "self.mup_vector" in source_of(type(module).forward)
    children = ("in_proj", "conv1d", "out_proj") + (("norm",) if getattr(module, "mamba_rms_norm", True) else ())
    fits = (_copies_forward(module, _MAMBA2_READS + (_FALCON_H1_READS if falcon_h1 else ()), {"A_log", "D", "dt_bias"},
                            children)
            and all(statement in scan_source for statement in _CHUNK_SCAN_READS)
            and (not falcon_h1 or isinstance(getattr(module, "mup_vector", None), torch.Tensor)))
    if fits:
        return mixin_class(type(module), _HFMamba2Mixer)
    return GENERIC if any(True for _ in module.parameters(recurse=False)) else None


register_layer(None, _mamba2_mixer_class,
               matches=lambda cls: cls.__name__ in ("Mamba2Mixer", "BambaMixer", "GraniteMoeHybridMambaLayer",
                                                    "NemotronHMamba2Mixer", "Zamba2MambaMixer", "FalconH1Mixer")
               and cls.__module__.startswith("transformers.models."))
