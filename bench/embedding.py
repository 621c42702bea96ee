"""Embedding per-example norms and clipped sums against stock PyTorch, GPT-2's table
(V=50257, d=768), B=8, T in {128, 512}.

Stock per-example paths form every example's dense [V, d] gradient: all at once with a one-hot
bmm ([B, T, V] one-hot and [B, V, d] gradients), or one example at a time with index_add_
(one [V, d] buffer). For the clipped sum, once the clip factors are known, stock PyTorch can
also scatter the scaled rows in one index_add_ ("stock index_add c*g": what the embedding's own
backward does); the fused ops group positions by id and never form a [V, d] gradient per
example. Methods named "out=" add into an existing gradient instead of allocating one.
vs_stock: time over the fastest stock method for that op and shape (of the same kind: "out="
or not).
"""
import time

import torch

from bk_kernels import ops
from bk_kernels.ops import embedding as emb
from bench import harness

V, D = 50257, 768


def stock_one_hot_grads(ids, g):
    one_hot = torch.nn.functional.one_hot(ids, V).to(g.dtype)
    return one_hot.mT @ g  # [B, V, d]


def stock_norm_one_hot(ids, g, c):
    return stock_one_hot_grads(ids, g).square().sum((1, 2))


def stock_norm_index_add(ids, g, c):
    out = torch.empty(ids.shape[0], dtype=g.dtype, device=g.device)
    for b in range(ids.shape[0]):
        out[b] = torch.zeros(V, g.shape[2], dtype=g.dtype, device=g.device).index_add_(0, ids[b], g[b]).square().sum()
    return out


def stock_sum_one_hot(ids, g, c):
    return (c[:, None, None] * stock_one_hot_grads(ids, g)).sum(0)


def stock_sum_index_add_per_example(ids, g, c):
    total = torch.zeros(V, g.shape[2], dtype=g.dtype, device=g.device)
    for b in range(ids.shape[0]):
        grad = torch.zeros(V, g.shape[2], dtype=g.dtype, device=g.device).index_add_(0, ids[b], g[b])
        total.add_(grad, alpha=float(c[b]))
    return total


def stock_sum_index_add(ids, g, c, out=None):
    rows = (c[:, None, None] * g).reshape(-1, g.shape[2])
    if out is None:
        out = torch.zeros(V, g.shape[2], dtype=g.dtype, device=g.device)
    return out.index_add_(0, ids.reshape(-1), rows)


def methods(device):
    """op -> {name: function(ids, g, c, out)}; stock methods are named "stock ...", and
    methods named "... out=" add into an existing [V, d] gradient `out` instead of a new one
    (as in training, where the gradient buffer is allocated once)."""
    norm, total = {}, {}
    for backend in ops.available_backends(device):
        if backend == "triton" and device.type == "cpu":
            continue  # Triton's interpreter is for tests, not timing
        norm[f"bk ({backend})"] = lambda ids, g, c, out, b=backend: emb.embedding_norm(ids, g, backend=b)
        total[f"bk ({backend})"] = lambda ids, g, c, out, b=backend: emb.embedding_clipped_sum(ids, g, c, V, backend=b)
        total[f"bk ({backend}) out="] = lambda ids, g, c, out, b=backend: emb.embedding_clipped_sum(
            ids, g, c, out=out, backend=b)
    norm["stock one-hot bmm"] = lambda ids, g, c, out: stock_norm_one_hot(ids, g, c)
    norm["stock index_add per example"] = lambda ids, g, c, out: stock_norm_index_add(ids, g, c)
    total["stock one-hot bmm"] = lambda ids, g, c, out: stock_sum_one_hot(ids, g, c)
    total["stock index_add per example"] = lambda ids, g, c, out: stock_sum_index_add_per_example(ids, g, c)
    total["stock index_add c*g"] = lambda ids, g, c, out: stock_sum_index_add(ids, g, c)
    total["stock index_add c*g out="] = stock_sum_index_add
    return {"embedding_norm": norm, "embedding_clipped_sum": total}


def shapes(quick):
    return [(4, T) for T in (32, 128)] if quick else [(8, T) for T in (128, 512)]


def run(device, dtype, quick, command):
    found = methods(device)
    grid = shapes(quick)
    progress = harness.Progress(len(grid) * sum(len(m) for m in found.values()), f"embedding {device.type}")
    ctx = harness.context(device, command)
    rows = []
    for B, T in grid:
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, V, (B, T), generator=gen).to(device)
        ids[:, : T // 4] = ids[:, :1]  # repeated ids, as in real text
        g = torch.randn(B, T, D, generator=gen).to(device, dtype)
        c = torch.rand(B, generator=gen).to(device, dtype)
        want = {"embedding_norm": emb.embedding_norm(ids, g, backend="torch"),
                "embedding_clipped_sum": emb.embedding_clipped_sum(ids, g, c, V, backend="torch")}
        for op, by_name in found.items():
            medians, first = {}, len(rows)
            for name, fn in by_name.items():
                out = torch.zeros(V, D, dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                                  device=device) if op == "embedding_clipped_sum" else None
                got = []
                t0 = time.perf_counter()
                peak = harness.peak_extra_bytes(lambda: got.append(fn(ids, g, c, out)), device)
                slow = time.perf_counter() - t0 > 0.5
                rtol = 1e-3 if dtype != torch.float64 else 1e-9
                torch.testing.assert_close(got[0].to(want[op].dtype), want[op], rtol=rtol, atol=rtol * 1e-2)
                got.clear()
                if not slow:  # a second call's peak, past any first-call allocation (the slow ones: seconds a call)
                    peak = harness.peak_extra_bytes(lambda: fn(ids, g, c, out), device)
                timing = dict(warmup=0, min_runs=2, budget_s=0) if slow else dict(budget_s=0.5 if quick else 1.0)
                med, lo, hi = harness.time_call(lambda: fn(ids, g, c, out), device, **timing)
                medians[name] = med
                rows.append(dict(ctx, op=op, method=name, B=B, T=T, V=V, d=D, dtype=str(dtype).split(".")[1],
                                 median_ms=round(med * 1e3, 4), min_ms=round(lo * 1e3, 4), max_ms=round(hi * 1e3, 4),
                                 peak_extra_mib=round(peak / 2**20, 3), vs_stock=""))
                progress.step(f"{op} {name} T={T}")
            for row in rows[first:]:
                name = row["method"]
                if not name.startswith("stock"):  # against the fastest stock method of its kind
                    into = name.endswith("out=")
                    best = min(m for n, m in medians.items() if n.startswith("stock") and n.endswith("out=") == into)
                    row["vs_stock"] = float(f"{medians[name] / best:.3g}")
    return rows


COLUMNS = ["op", "method", "B", "T", "median_ms", "min_ms", "max_ms", "peak_extra_mib", "vs_stock"]
