"""bk.verify: the self-check on a user's own model. It must pass on models bk trains exactly,
and it must FAIL (not pass silently) where a layout was declared wrong."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bk_kernels as bk
from python_tests import zoo
from python_tests.test_layouts import SeqFirstMLP


def test_passes_on_an_mlp_and_leaves_the_model_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    before = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    report = bk.verify(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), (x, y))
    assert report.ok, str(report)
    assert report.norm_error < 1e-10 and report.update_error < 1e-9
    assert all(torch.equal(p, b) and p.dtype == torch.float32 for p, b in zip(model.parameters(), before))
    assert "OK" in str(report)


@pytest.mark.parametrize("name", ["gpt2", "llama", "timm_vit"])
def test_passes_on_real_models(name):
    build, loss, batch = zoo.ZOO[name]
    torch.manual_seed(0)
    report = bk.verify(build(), lambda m, b: loss(m, b).mean(), batch(3), clipping_style="layer-wise")
    assert report.update_error < 1e-6 and report.norm_error < 1e-6, str(report)  # B=3: fp32 inside HF's RMSNorm
    # timm's ViT root owns its cls token and positions (generic); Llama's RMSNorms: bk.nn.scale
    assert bool(report.generic_modules) == (name == "timm_vit"), report.generic_modules


def test_sequence_first_model_passes_with_batch_first_false():
    torch.manual_seed(1)
    x, y = torch.randn(3, 3, 17), torch.randint(0, 3, (3,))
    loss = lambda m, b: F.cross_entropy(m(b["x"]), b["y"])  # noqa: E731
    assert bk.verify(SeqFirstMLP(), loss, {"x": x, "y": y}, batch_first=False).ok


def test_catches_a_sequence_first_model_declared_batch_first():
    """T == B: the shapes cannot tell the layouts apart and the engine trusts batch_first=True.
    verify splits the batch as declared, so the mistake surfaces: as a failed per-example loss
    here, or as a mismatch where the loss still runs on the wrong split (below)."""
    torch.manual_seed(1)
    x, y = torch.randn(3, 3, 17), torch.randint(0, 3, (3,))
    with pytest.raises(ValueError, match="batch_first=True.*declared wrong"):
        bk.verify(SeqFirstMLP(), lambda m, b: F.cross_entropy(m(b["x"]), b["y"]), {"x": x, "y": y})

    class Regression(nn.Module):  # the head's output pools dim 0: per "example" it still runs
        def __init__(self):
            super().__init__()
            self.mix, self.head = nn.Linear(17, 4), nn.Linear(4, 1)

        def forward(self, x):
            return self.head(torch.tanh(self.mix(x)).mean(0)).mean()

    report = bk.verify(Regression(), lambda m, b: m(b), x)
    assert not report.ok and report.update_error > 1e-4, str(report)
    assert "MISMATCH" in str(report)


def test_refuses_a_broadcast_output_indexed_on_the_batch_dim():
    """A layer whose input has batch 1 gets its output expanded to the batch (exact when the
    output is then broadcast against per-example tensors). Code that instead indexes that
    output on dim 0 (`emb(ids[None])[0]`) sends every example's gradient to row 0. verify
    reported the mismatch until session 12; now the engine refuses it in the forward, and verify
    raises what the engine raises."""
    class Indexing(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok, self.pos, self.head = nn.Embedding(9, 4), nn.Embedding(6, 4), nn.Linear(4, 3)

        def forward(self, ids):
            pos = self.pos(torch.arange(ids.shape[1])[None])[0]  # [T, 4] from row 0 only
            return self.head((self.tok(ids) + pos).mean(1))

    torch.manual_seed(2)
    ids, y = torch.randint(0, 9, (4, 6)), torch.randint(0, 3, (4,))
    with pytest.raises(bk.UnsupportedLayoutError, match=r"Embedding \(pos\) got an input of size 1.*SelectBackward0"):
        bk.verify(Indexing(), lambda m, b: F.cross_entropy(m(b[0]), b[1]), (ids, y))


def test_passes_on_a_transformers_moe_with_its_default_grouped_mm_experts():
    """transformers' experts default to torch._grouped_mm, which takes no float64: verify's float64
    copies use the eager loop (same arithmetic); the user's model keeps its own setting."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.MixtralConfig(vocab_size=37, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, num_local_experts=4,
                                        num_experts_per_tok=2, router_jitter_noise=0.0)
    model = transformers.MixtralForCausalLM(config)
    assert model.config._experts_implementation == "grouped_mm"
    report = bk.verify(model, lambda m, ids: zoo.causal_lm(m, {"ids": ids}).mean(), torch.randint(0, 37, (3, 6)))
    assert report.ok, str(report)
    assert model.config._experts_implementation == "grouped_mm"


def test_names_a_model_whose_own_gradient_is_not_finite():
    """A model whose own per-example gradient is NaN (ProphetNet with a padded encoder input, in
    float64, without bk) is named as such, not reported as an invalid max_grad_norm."""
    class Log(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(3, 1)

        def forward(self, x):
            return self.linear(x).sqrt()  # NaN, and a NaN gradient, where the output is negative

    torch.manual_seed(0)
    model = Log()
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="reference gradient of example.*not finite"):
        bk.verify(model, lambda m, b: m(b[0]).sum(), (x,))
