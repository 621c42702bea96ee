"""linear_norm: a layer's per-example squared weight-gradient norms by the cheaper method.

The ONE place that chooses between the ghost norm (cost ~T^2 (d+p) per example) and the direct
norm (~T d p): ghost when T (d + p) < d p. The choice is made per call from the shapes of that
call, never cached, so a sequence length that changes between batches is handled.
"""
from .direct_norm import direct_norm
from .ghost_norm import ghost_norm

MODES = ("auto", "ghost", "direct")


def use_ghost(T, d, p):
    """True when the ghost norm needs fewer FLOPs than forming the per-example gradients."""
    return T * (d + p) < d * p


def choose_mode(mode, T, d, p):
    if mode not in MODES:
        raise ValueError(f"clipping_mode must be one of {MODES}, got {mode!r}")
    if mode == "auto":
        return "ghost" if use_ghost(T, d, p) else "direct"
    return mode


def linear_norm(a, g, *, mode="auto", backend="auto"):
    """[B] = ||a_b^T g_b||_F^2 for a:[B,T,d] (or [B,d]), g:[B,T,p] (or [B,p]).

    mode: "auto" (by FLOPs, see use_ghost), "ghost" or "direct".
    """
    T = a.shape[1] if a.dim() == 3 else 1
    if choose_mode(mode, T, a.shape[-1], g.shape[-1]) == "ghost":
        return ghost_norm(a, g, backend=backend)
    return direct_norm(a, g, backend=backend)
