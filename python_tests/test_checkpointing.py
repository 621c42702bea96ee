"""Activation checkpointing (torch.utils.checkpoint, reentrant and not): the recomputed forward
is not recorded twice, and a layer first reached inside a checkpointed segment's nested
backward (reentrant) does not end the book-keeping before the rest of the model is recorded."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as cp

from python_tests.test_models import check_model

DT = torch.float64


class Segmented(nn.Module):
    def __init__(self, reentrant, last_inside):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(5, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.norm = nn.LayerNorm(8)
        self.reentrant, self.last_inside = reentrant, last_inside

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if self.last_inside:  # the last bk layer inside the segment: its records come first
            return cp.checkpoint(lambda t: self.c(torch.tanh(self.norm(self.b(t)))), h, use_reentrant=self.reentrant)
        h = cp.checkpoint(lambda t: torch.tanh(self.norm(self.b(t))), h, use_reentrant=self.reentrant)
        return self.c(h)


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("last_inside", [False, True])
def test_checkpointed_segments_are_exact(reentrant, last_inside):
    torch.manual_seed(0)
    inputs = {"x": torch.randn(6, 5, dtype=DT), "y": torch.randint(0, 3, (6,))}
    loss = lambda m, b: F.cross_entropy(m(b["x"]), b["y"], reduction="none")  # noqa: E731
    check_model(Segmented(reentrant, last_inside).to(DT), loss, inputs, style="all-layer", backend="cpu", R=0.3)
