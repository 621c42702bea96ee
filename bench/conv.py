"""Convolution per-example norms and clipped sums against stock PyTorch (CIFAR-like 3x3 layers).

Stock per-example path (what Opacus' conv grad sampler does): unfold the input patches
(F.unfold, [B, C_in*k*k, L]) and einsum them with the output gradient into every example's
weight gradient [B, C_out, C_in*k*k], then its norm, or its c-weighted sum. The floor of a
clipped sum is torch's own non-private weight gradient (conv2d_weight on g). bk.ops.conv_norm
runs the ghost or direct norm kernel on chunks of patches; bk.ops.conv_clipped_sum is ONE
weight-gradient call on c-scaled g.
"""
import torch
import torch.nn.functional as F

from bk_kernels import ops
from bench import harness

K = 3


def stock_grads(x, g):
    patches = F.unfold(x, K, padding=1)  # [B, C_in*k*k, L]
    return torch.einsum("bql,bpl->bpq", patches, g.flatten(2))


def methods(device):
    """op -> {name: fn(x, g, c)}; the first stock method of each op is the one vs_stock uses."""
    norm, total = {}, {}
    for backend in ops.available_backends(device):
        if backend == "torch" or (backend == "triton" and device.type == "cpu"):
            continue
        norm[f"bk conv_norm ({backend})"] = lambda x, g, c, b=backend: ops.conv_norm(
            x, g, kernel_size=K, padding=1, bias=True, backend=b)
    norm["stock unfold+einsum grads"] = lambda x, g, c: (stock_grads(x, g).square().sum((1, 2))
                                                         + g.sum((2, 3)).square().sum(1))
    total["bk conv_clipped_sum"] = lambda x, g, c: ops.conv_clipped_sum(
        x, g, c, weight_shape=(g.shape[1], x.shape[1], K, K), padding=1, bias=True)
    total["stock unfold+einsum grads"] = lambda x, g, c: (torch.einsum("b,bpq->pq", c, stock_grads(x, g)),
                                                          torch.einsum("b,bp->p", c, g.sum((2, 3))))
    total["torch conv2d_weight (no clipping)"] = lambda x, g, c: (
        torch.nn.grad.conv2d_weight(x, (g.shape[1], x.shape[1], K, K), g, 1, 1), g.sum((0, 2, 3)))
    return {"conv_norm": norm, "conv_clipped_sum": total}


def shapes(quick):
    """(B, C_in, C_out, H=W) of the layers of a small CIFAR conv net, and ResNet-18's last stage
    at CIFAR's 32 x 32 (a 3x3 kernel on 1x1 maps: one output position per example)."""
    if quick:
        return [(16, 3, 32, 32), (16, 32, 64, 16)]
    return [(32, 3, 32, 32), (32, 32, 64, 16), (32, 64, 128, 8), (32, 128, 256, 4), (32, 512, 512, 1)]


def run(device, dtype, quick, command):
    found = methods(device)
    grid = shapes(quick)
    ctx = harness.context(device, command)
    rows = []
    with harness.progress(len(grid) * sum(len(m) for m in found.values()), f"conv {device.type}") as bar:
        for B, cin, cout, H in grid:
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(B, cin, H, H, generator=gen).to(device, dtype)
            g = torch.randn(B, cout, H, H, generator=gen).to(device, dtype)
            c = torch.rand(B, generator=gen).to(device, dtype)
            grads = stock_grads(x.double(), g.double())
            want = {"conv_norm": grads.square().sum((1, 2)) + g.double().sum((2, 3)).square().sum(1),
                    "conv_clipped_sum": torch.einsum("b,bpq->pq", c.double(), grads).view(cout, cin, K, K)}
            for op, by_name in found.items():
                medians, first = {}, len(rows)
                for name, fn in by_name.items():
                    got = fn(x, g, c)
                    if op == "conv_norm" or "clipping" not in name:
                        got = got if op == "conv_norm" else got[0].reshape(cout, cin, K, K)
                        rtol = 1e-3 if dtype != torch.float64 else 1e-9
                        torch.testing.assert_close(got.double(), want[op], rtol=rtol, atol=rtol * want[op].abs().max())
                    peak = harness.peak_extra_bytes(lambda: fn(x, g, c), device)
                    med, lo, hi = harness.time_call(lambda: fn(x, g, c), device, budget_s=0.3 if quick else 0.7)
                    medians[name] = med
                    rows.append(dict(ctx, op=op, method=name, B=B, C_in=cin, C_out=cout, H=H, k=K,
                                     dtype=str(dtype).split(".")[1], median_ms=round(med * 1e3, 4),
                                     min_ms=round(lo * 1e3, 4), max_ms=round(hi * 1e3, 4),
                                     peak_extra_mib=round(peak / 2**20, 3), vs_stock=""))
                    bar.update(1)
                    bar.set_postfix_str(f"{op} {name} C={cin}->{cout} H={H}")
                stock = medians["stock unfold+einsum grads"]
                for row in rows[first:]:
                    row["vs_stock"] = round(medians[row["method"]] / stock, 3)
    return rows


COLUMNS = ["op", "method", "B", "C_in", "C_out", "H", "median_ms", "min_ms", "max_ms", "peak_extra_mib", "vs_stock"]
