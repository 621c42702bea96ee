"""bk.nn.RNN, GRU and LSTM: multi-layer, bidirectional, batch_first either way, packed sequences.

A recurrent layer's weights are shared across time, so each is a linear map over T positions:
- the input weight W_ih maps every x_t at once: gi = x W_ih^T + b_ih, one linear use over
  [B, T, in] (the linear family's ghost/direct norm and clipped sum);
- the hidden weight W_hh maps h_{t-1} for every t. The recurrence runs step by step with W_hh
  detached, and a zeros tensor Z [B, T, G] (unbound into steps) is added to each step's
  gh_t = h_{t-1} W_hh^T + b_hh. The gradient that reaches Z is every step's dL/d gh_t at once,
  so W_hh is ONE linear use with a = [h_0 .. h_{T-1}] and g = dL/dZ: no per-step uses and no
  T x T cross terms.
The recurrence is written out in PyTorch (as Opacus' DPLSTM is), so it is slower than torch's
fused kernels; the per-example work is the linear family's. Gate order and bias placement are
torch's (GRU: n = tanh(gi_n + r * (h W_hn^T + b_hn))).
"""
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from ._core import BKLayer, in_plain_forward
from ._uses import DenseUse, LinearUse
from .families import register_layer
from .linear import linear_with


class _StepGradients(torch.autograd.Function):
    """Returns zeros [B, T, G]; its backward receives dL/d(gh_t) for every step and book-keeps
    W_hh (and b_hh) as one linear use over the T positions. `state.h_prev` ([B, T, H], the
    hidden state each step read) is filled in after the recurrence has run."""

    @staticmethod
    def forward(ctx, weight, bias, layer, state, shape):
        ctx.layer, ctx.weight, ctx.bias, ctx.state = layer, weight, bias, state
        return weight.new_zeros(shape)

    @staticmethod
    def backward(ctx, g):
        h_prev, layer, weight, bias = ctx.state.h_prev, ctx.layer, ctx.weight, ctx.bias
        uses = [(weight, LinearUse(h_prev, g))]
        if bias is not None:
            uses.append((bias, DenseUse(g.sum(1))))
        if layer._bk_hand_off(uses):
            return None, None, None, None, None
        grad_w = g.reshape(-1, g.shape[-1]).T @ h_prev.reshape(-1, h_prev.shape[-1])
        return grad_w, (g.sum((0, 1)) if bias is not None else None), None, None, None


class _State:
    h_prev = None


def _cell(mode, gi, gh, h, c):
    """One step: (h, c) from the input and hidden projections (gi, gh: [B, G])."""
    if mode == "LSTM":
        i, f, g, o = (gi + gh).chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c
    if mode == "GRU":
        ir, iz, inn = gi.chunk(3, 1)
        hr, hz, hn = gh.chunk(3, 1)
        r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
        n = torch.tanh(inn + r * hn)
        return (1 - z) * n + z * h, c
    act = torch.tanh if mode == "RNN_TANH" else torch.relu
    return act(gi + gh), c


class _RecurrentMixin(BKLayer):
    def forward(self, input, hx=None):
        if in_plain_forward():
            return super().forward(input, hx)
        packed = isinstance(input, PackedSequence)
        if packed:
            x, lengths = pad_packed_sequence(input, batch_first=True)  # [B, T, in], original order
            lengths = lengths.to(x.device)
        else:
            unbatched = input.dim() == 2
            x = input.unsqueeze(0 if self.batch_first else 1) if unbatched else input
            x = x if self.batch_first else x.transpose(0, 1)  # [B, T, in]
            lengths = None
        x = self._bk_examples(x, 0)
        B, T = x.shape[0], x.shape[1]
        lstm = self.mode == "LSTM"
        dirs = 2 if self.bidirectional else 1
        h0, c0 = (hx if lstm else (hx, None)) if hx is not None else (None, None)
        if hx is not None and not packed and unbatched:
            h0 = h0.unsqueeze(1)
            c0 = c0.unsqueeze(1) if c0 is not None else None
        valid = (torch.arange(T, device=x.device)[None, :] < lengths[:, None]) if packed else None
        h_n, c_n = [], []
        layer_input = x
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(dirs):
                k = layer * dirs + direction
                h = h0[k] if h0 is not None else x.new_zeros(B, self.hidden_size)
                c = (c0[k] if c0 is not None else x.new_zeros(B, self.hidden_size)) if lstm else None
                out, h, c = self._bk_direction(layer_input, layer, direction, h, c, valid)
                outputs.append(out)
                h_n.append(h)
                c_n.append(c)
            layer_input = torch.cat(outputs, 2) if dirs == 2 else outputs[0]
            if self.dropout and self.training and layer < self.num_layers - 1:
                layer_input = F.dropout(layer_input, self.dropout, True)
        output, h_n = layer_input, torch.stack(h_n)
        c_n = torch.stack(c_n) if lstm else None
        if packed:
            output = _repack(output, input)
        else:
            if not self.batch_first:
                output = output.transpose(0, 1)
            if unbatched:
                output = output.squeeze(0 if self.batch_first else 1)
                h_n = h_n.squeeze(1)
                c_n = c_n.squeeze(1) if lstm else None
        return output, ((h_n, c_n) if lstm else h_n)

    def _bk_direction(self, x, layer, direction, h, c, valid):
        """One layer in one direction over x [B, T, in] -> ([B, T, H], h_n, c_n)."""
        suffix = f"_l{layer}" + ("_reverse" if direction else "")
        w_ih, w_hh = getattr(self, "weight_ih" + suffix), getattr(self, "weight_hh" + suffix)
        b_ih = getattr(self, "bias_ih" + suffix) if self.bias else None
        b_hh = getattr(self, "bias_hh" + suffix) if self.bias else None
        B, T = x.shape[0], x.shape[1]
        gi = linear_with(self, x, w_ih, b_ih)  # [B, T, G]: W_ih over every position at once
        state = _State()
        taps = _StepGradients.apply(w_hh, b_hh, self, state, (B, T, w_hh.shape[0])).unbind(1)
        w_fixed = w_hh.detach()
        b_fixed = b_hh.detach() if b_hh is not None else None
        steps = range(T - 1, -1, -1) if direction else range(T)
        h_prev, outs = [None] * T, [None] * T
        for t in steps:
            h_prev[t] = h
            gh = F.linear(h, w_fixed, b_fixed) + taps[t]
            h_new, c_new = _cell(self.mode, gi[:, t], gh, h, c)
            if valid is not None:  # a packed sequence: past its end an example's state stands still
                keep = valid[:, t, None]
                h_new = torch.where(keep, h_new, h)
                c_new = torch.where(keep, c_new, c) if c is not None else None
                outs[t] = h_new * keep
            else:
                outs[t] = h_new
            h, c = h_new, c_new
        state.h_prev = torch.stack(h_prev, 1).detach()
        return torch.stack(outs, 1), h, c


def _repack(output, like):
    """output [B, T, H] in the original order as a PackedSequence laid out like `like`."""
    order = like.sorted_indices if like.sorted_indices is not None else torch.arange(output.shape[0])
    time_major = output.index_select(0, order.to(output.device)).transpose(0, 1)  # [T, B, H], sorted
    data = torch.cat([time_major[t, :n] for t, n in enumerate(like.batch_sizes.tolist())])
    return PackedSequence(data, like.batch_sizes, like.sorted_indices, like.unsorted_indices)


class RNN(_RecurrentMixin, torch.nn.RNN):
    pass


class GRU(_RecurrentMixin, torch.nn.GRU):
    pass


class LSTM(_RecurrentMixin, torch.nn.LSTM):
    pass


def recurrent_unsupported_reason(module):
    if getattr(module, "proj_size", 0):
        return "proj_size > 0 (a projected LSTM) is not supported yet"
    return None


for _torch_class, _bk_class in ((torch.nn.RNN, RNN), (torch.nn.GRU, GRU), (torch.nn.LSTM, LSTM)):
    register_layer(_torch_class, _bk_class, unsupported_reason=recurrent_unsupported_reason)
