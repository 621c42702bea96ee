"""Convolution per-example norms, clipped sums and per-example gradients against stock PyTorch.

Layers: a small CIFAR conv net's 3x3 layers, ResNet-18's last stage at CIFAR's 32 x 32 (a 3x3
kernel on 1x1 maps: one output position per example), timm ConvNeXt-atto's pointwise (1x1) and
7x7 depthwise layers at 64 x 64 inputs, and timm RegNetY-004's grouped 3x3 layers (8 channels a
group) at 64 x 64 inputs.

Stock per-example path (what Opacus' conv grad sampler does): unfold the input patches
(F.unfold, [B, C_in*k*k, L]) and einsum them with the output gradient, group by group, into
every example's weight gradient [B, C_out, C_in/groups*k*k], then its norm, or its c-weighted
sum. The floor of a clipped sum is torch's own non-private weight gradient (conv2d_weight on
g). bk.ops.conv_norm runs the ghost or direct norm kernel on chunks of patches;
bk.ops.conv_clipped_sum is ONE weight-gradient call on c-scaled g; conv_per_example_grads
(the engine's path for direct-mode layers whose per-example gradients are small, the only
layers it is timed on) is one call with the batch folded into the groups: torch's
conv2d_weight that way is its row "batch in groups".
On the CPU both take a batched matmul (pointwise) or a forward convolution (depthwise) there.
"""
import torch
import torch.nn.functional as F

from bk_kernels import ops
from bk_kernels.nn._uses import keeps_conv_grads
from bench import harness


def stock_grads(x, g, k, groups):
    """[B, C_out, C_in/groups*k*k] every example's weight gradient, unfold + einsum per group."""
    B, G = x.shape[0], groups
    patches = F.unfold(x, k, padding=k // 2)  # [B, C_in*k*k, L]
    patches = patches.view(B, G, patches.shape[1] // G, patches.shape[2])
    grads = torch.einsum("bgql,bgpl->bgpq", patches, g.flatten(2).view(B, G, g.shape[1] // G, -1))
    return grads.reshape(B, g.shape[1], -1)


def methods(device):
    """op -> {name: fn(x, g, c, k, groups)}; the first stock method of each op is the one vs_stock uses."""
    norm, total, per_example = {}, {}, {}

    def weight_shape(x, g, k, groups):
        return (g.shape[1], x.shape[1] // groups, k, k)

    for backend in ops.available_backends(device):
        if backend == "torch" or (backend == "triton" and device.type == "cpu"):
            continue
        norm[f"bk conv_norm ({backend})"] = lambda x, g, c, k, G, b=backend: ops.conv_norm(
            x, g, kernel_size=k, padding=k // 2, groups=G, bias=True, backend=b)
    norm["stock unfold+einsum grads"] = lambda x, g, c, k, G: (stock_grads(x, g, k, G).square().sum((1, 2))
                                                               + g.sum((2, 3)).square().sum(1))
    total["bk conv_clipped_sum"] = lambda x, g, c, k, G: ops.conv_clipped_sum(
        x, g, c, weight_shape=weight_shape(x, g, k, G), padding=k // 2, groups=G, bias=True)
    total["stock unfold+einsum grads"] = lambda x, g, c, k, G: (
        torch.einsum("b,bpq->pq", c, stock_grads(x, g, k, G)), torch.einsum("b,bp->p", c, g.sum((2, 3))))
    total["torch conv2d_weight (no clipping)"] = lambda x, g, c, k, G: (
        torch.nn.grad.conv2d_weight(x, weight_shape(x, g, k, G), g, 1, k // 2, 1, G), g.sum((0, 2, 3)))
    per_example["bk conv_per_example_grads"] = lambda x, g, c, k, G: ops.conv_per_example_grads(
        x, g, weight_shape=weight_shape(x, g, k, G), padding=k // 2, groups=G)
    per_example["stock unfold+einsum grads"] = lambda x, g, c, k, G: stock_grads(x, g, k, G)
    per_example["torch conv2d_weight, batch in groups"] = lambda x, g, c, k, G: torch.nn.grad.conv2d_weight(
        x.reshape(1, -1, *x.shape[2:]), (x.shape[0] * g.shape[1], x.shape[1] // G, k, k),
        g.reshape(1, -1, *g.shape[2:]), 1, k // 2, 1, G * x.shape[0])
    return {"conv_norm": norm, "conv_clipped_sum": total, "conv_per_example_grads": per_example}


def shapes(quick):
    """(B, C_in, C_out, H=W, k, groups); padding k // 2."""
    if quick:
        return [(16, 3, 32, 32, 3, 1), (16, 32, 64, 16, 3, 1), (16, 160, 640, 4, 1, 1), (16, 40, 40, 16, 7, 40)]
    return [(32, 3, 32, 32, 3, 1), (32, 32, 64, 16, 3, 1), (32, 64, 128, 8, 3, 1), (32, 128, 256, 4, 3, 1),
            (32, 512, 512, 1, 3, 1), (16, 40, 160, 16, 1, 1), (16, 160, 640, 4, 1, 1), (16, 40, 40, 16, 7, 40),
            (16, 320, 320, 2, 7, 320), (16, 208, 208, 4, 3, 26), (16, 440, 440, 2, 3, 55)]


def run(device, dtype, quick, command):
    found = methods(device)
    grid = shapes(quick)
    ctx = harness.context(device, command)
    rows = []
    with harness.progress(len(grid) * sum(len(m) for m in found.values()), f"conv {device.type}") as bar:
        for B, cin, cout, H, k, G in grid:
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(B, cin, H, H, generator=gen).to(device, dtype)
            g = torch.randn(B, cout, H, H, generator=gen).to(device, dtype)
            c = torch.rand(B, generator=gen).to(device, dtype)
            grads = stock_grads(x.double(), g.double(), k, G)
            wshape = (cout, cin // G, k, k)
            want = {"conv_norm": grads.square().sum((1, 2)) + g.double().sum((2, 3)).square().sum(1),
                    "conv_clipped_sum": torch.einsum("b,bpq->pq", c.double(), grads).view(wshape),
                    "conv_per_example_grads": grads.view(B, *wshape)}
            for op, by_name in found.items():
                if op == "conv_per_example_grads" and not keeps_conv_grads("auto", B, H * H, wshape, G):
                    continue  # the engine forms them only for these (ConvUse.densify): 3 s a call at 512 x 512
                medians, first = {}, len(rows)
                for name, fn in by_name.items():
                    got = fn(x, g, c, k, G)
                    if op != "conv_clipped_sum" or "clipping" not in name:
                        got = got[0] if op == "conv_clipped_sum" else got
                        rtol = 1e-3 if dtype != torch.float64 else 1e-9
                        want_op = want[op]
                        torch.testing.assert_close(got.double().reshape(want_op.shape), want_op, rtol=rtol,
                                                   atol=rtol * want_op.abs().max())
                    peak = harness.peak_extra_bytes(lambda: fn(x, g, c, k, G), device)
                    med, lo, hi = harness.time_call(lambda: fn(x, g, c, k, G), device, budget_s=0.3 if quick else 0.7)
                    medians[name] = med
                    rows.append(dict(ctx, op=op, method=name, B=B, C_in=cin, C_out=cout, H=H, k=k, groups=G,
                                     dtype=str(dtype).split(".")[1], median_ms=round(med * 1e3, 4),
                                     min_ms=round(lo * 1e3, 4), max_ms=round(hi * 1e3, 4),
                                     peak_extra_mib=round(peak / 2**20, 3), vs_stock=""))
                    bar.update(1)
                    bar.set_postfix_str(f"{op} {name} C={cin}->{cout} H={H} k={k}")
                stock = medians["stock unfold+einsum grads"]
                for row in rows[first:]:
                    row["vs_stock"] = round(medians[row["method"]] / stock, 3)
    return rows


COLUMNS = ["op", "method", "B", "C_in", "C_out", "H", "k", "groups", "median_ms", "min_ms", "max_ms", "peak_extra_mib", "vs_stock"]
