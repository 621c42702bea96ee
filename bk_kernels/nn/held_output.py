"""A layer's forward output kept for the layer's own backward, but only while something else
keeps it anyway (the next layer's saved input), so that holding it costs no memory.

A weight-standardized convolution's norms need sum_pos g * conv(x, normalized weight) per
example and channel: the forward's output, less its bias, over the weight's scale. Recomputing
that convolution was 40% of these norms' time on timm's BiT ResNet-V2 (session 25), and holding
every output until the backward cost 21% more step memory (session 24: a convolution before a
residual add has an output nobody else keeps). So the engine checks its holds while the forward
runs (at every new hold and at the forward's end) and drops each output whose storage only the
hold references: those layers recompute, as before. The check reads the storage's use count, so
a wrong answer costs time or memory, never exactness: a held output is read only if unchanged
since the forward (its version counter)."""
import torch


class HeldOutput:
    """An alias of a forward's output (detached: no reference cycle through its autograd node)
    and its version then; `output()` is None once dropped or changed in place."""

    __slots__ = ("tensor", "version")

    def __init__(self, y):
        self.tensor, self.version = y.detach(), y._version

    def output(self):
        t = self.tensor
        return t if t is not None and t._version == self.version else None


def _kept_elsewhere(t):
    """Whether anything besides the alias `t` references t's storage (the output itself, alive
    in a saved tensor, a view or a variable). The count includes t and the storage object this
    call makes."""
    try:
        return torch._C._storage_Use_Count(t.untyped_storage()._cdata) > 2
    except (AttributeError, RuntimeError, TypeError):  # no such private API: recompute
        return False


class OutputHolds:
    """The engine's holds of one forward: checked at each new hold and at the forward's end."""

    def __init__(self):
        self.live = []

    def hold(self, y):
        """A HeldOutput of y, or None when y cannot be held (traced by torch.compile)."""
        if torch.compiler.is_compiling():
            return None
        self.check()
        held = HeldOutput(y)
        self.live.append(held)
        return held

    def check(self):
        """Drops every output that only its hold keeps."""
        for held in self.live:
            if not _kept_elsewhere(held.tensor):
                held.tensor = None
        self.live = [held for held in self.live if held.tensor is not None]

    def forward_ended(self):
        """The last check of a forward; the holds left stay with their layers' autograd nodes."""
        self.check()
        self.live = []
