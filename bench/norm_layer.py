"""Norm layers' per-example affine gradients and norms (bk.ops.norm_layer_grads) against stock
PyTorch: the eager (xhat * g).sum over positions and g.sum, then their squared norms (what
Opacus' LayerNorm / GroupNorm grad samplers compute). LayerNorm shapes are [B, T, C]
contiguous; GroupNorm's are [B, C, H*W] read channel-last through a transpose (no copy).
"""
import torch

from bk_kernels import ops
from bench import harness


def stock(xhat, g):
    gw, gb = (xhat * g).sum(1), g.sum(1)
    return gw, gb, gw.square().sum(1) + gb.square().sum(1)


def methods(device):
    found = {}
    for backend in ops.available_backends(device):
        if backend == "torch" or (backend == "triton" and device.type == "cpu"):
            continue
        found[f"bk norm_layer_grads ({backend})"] = lambda xh, g, b=backend: ops.norm_layer_grads(xh, g, backend=b)
    found["stock (xhat*g).sum"] = stock
    return found


def shapes(quick):
    """(layer, B, T, C): T positions sharing each channel's weight."""
    if quick:
        return [("LayerNorm", 8, 128, 256), ("GroupNorm", 16, 256, 64)]
    return [("LayerNorm", 8, 128, 256), ("LayerNorm", 8, 512, 768), ("LayerNorm", 32, 64, 192),
            ("GroupNorm", 32, 1024, 32), ("GroupNorm", 32, 256, 64)]


def run(device, dtype, quick, command):
    found = methods(device)
    grid = shapes(quick)
    ctx = harness.context(device, command)
    rows = []
    with harness.progress(len(grid) * len(found), f"norm_layer {device.type}") as bar:
        for layer, B, T, C in grid:
            gen = torch.Generator().manual_seed(0)
            if layer == "LayerNorm":
                xhat, g = (torch.randn(B, T, C, generator=gen).to(device, dtype) for _ in range(2))
            else:  # channel-major storage, as GroupNorm's [B, C, H, W] activations
                xhat, g = (torch.randn(B, C, T, generator=gen).to(device, dtype).transpose(1, 2) for _ in range(2))
            want = ops.norm_layer_grads_ref(xhat, g)[2]
            medians = {}
            for name, fn in found.items():
                rtol = 1e-3 if dtype != torch.float64 else 1e-9
                torch.testing.assert_close(fn(xhat, g)[2].double(), want, rtol=rtol, atol=0)
                peak = harness.peak_extra_bytes(lambda: fn(xhat, g), device)
                med, lo, hi = harness.time_call(lambda: fn(xhat, g), device, budget_s=0.3 if quick else 0.7)
                medians[name] = med
                rows.append(dict(ctx, op="norm_layer_grads", layer=layer, method=name, B=B, T=T, C=C,
                                 dtype=str(dtype).split(".")[1], median_ms=round(med * 1e3, 4),
                                 min_ms=round(lo * 1e3, 4), max_ms=round(hi * 1e3, 4),
                                 peak_extra_mib=round(peak / 2**20, 3), vs_stock=""))
                bar.update(1)
                bar.set_postfix_str(f"{layer} {name} T={T} C={C}")
            for row in rows[-len(found):]:
                row["vs_stock"] = round(medians[row["method"]] / medians["stock (xhat*g).sum"], 3)
    return rows


COLUMNS = ["layer", "method", "B", "T", "C", "median_ms", "min_ms", "max_ms", "peak_extra_mib", "vs_stock"]
