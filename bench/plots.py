"""PNG plots of a run's rows (matplotlib, the `bench` extra), written to bench/results/:

- steps_<device>.png: whole-step time and step memory relative to non-private, per model and method;
- memory_vs_batch_<device>.png: step memory against batch size (the max_batch probes) and the budget;
- kernel_vs_t_<device>.png: per-example norm kernels against the stock paths as T grows.
"""
import os

from bench import harness

METHOD_ORDER = ["non-private", "vmap", "opacus hooks", "opacus ghost"]


def _device_of(key):
    return key.rsplit("_", 1)[1]


def _methods(rows):
    found = list(dict.fromkeys(r["method"] for r in rows))
    return sorted(found, key=lambda m: (METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER), m))


def _num(v):
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def steps_plot(rows, path):
    import matplotlib.pyplot as plt

    configs = list(dict.fromkeys(r["config"] for r in rows))
    methods = _methods(rows)
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / len(methods)
    for panel, (key, label) in zip(axes, [("ratio", "step time / non-private (median of rounds)"),
                                          ("mem_ratio", "step memory / non-private")]):
        for i, m in enumerate(methods):
            xs, ys = [], []
            for j, c in enumerate(configs):
                row = next((r for r in rows if r["config"] == c and r["method"] == m), None)
                if row is not None and _num(row.get(key)) is not None:
                    xs.append(j + (i - (len(methods) - 1) / 2) * width)
                    ys.append(row[key])
            panel.bar(xs, ys, width, label=m)
        panel.axhline(1.0, color="black", lw=0.8)
        panel.set_xticks(range(len(configs)), configs)
        panel.set_yscale("log")
        panel.set_ylabel(label)
        panel.grid(axis="y", which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    ctx = rows[0]
    fig.suptitle(f"Training steps, {ctx['device']}, commit {ctx['commit']} (missing bar: unsupported/skipped)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def memory_plot(rows, path):
    import matplotlib.pyplot as plt

    from bench.maxbatch import probes_of

    configs = list(dict.fromkeys(r["config"] for r in rows))
    fig, axes = plt.subplots(1, len(configs), figsize=(6 * len(configs), 4.5), squeeze=False)
    for panel, c in zip(axes[0], configs):
        for m in _methods([r for r in rows if r["config"] == c]):
            row = next(r for r in rows if r["config"] == c and r["method"] == m)
            points = sorted(probes_of(row))
            if points:
                panel.plot([b for b, _ in points], [v for _, v in points], marker="o", ms=3,
                           label=f"{m} (max B {row['max_batch']})")
        budget = rows[0]["budget_gib"] * 1024
        panel.axhline(budget, color="black", ls="--", lw=0.8, label=f"budget {rows[0]['budget_gib']:g} GiB")
        panel.set_xscale("log", base=2)
        panel.set_yscale("log")
        panel.set_xlabel("batch size B")
        panel.set_ylabel("step memory over model+data (MiB)")
        panel.set_title(c)
        panel.legend(fontsize=7)
        panel.grid(which="both", alpha=0.3)
    ctx = rows[0]
    fig.suptitle(f"Memory vs batch size, {ctx['device']}, commit {ctx['commit']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def kernel_plot(rows, path):
    import matplotlib.pyplot as plt

    widths = list(dict.fromkeys((r["d"], r["p"]) for r in rows))
    fig, axes = plt.subplots(1, len(widths), figsize=(5 * len(widths), 4), squeeze=False)
    for panel, (d, p) in zip(axes[0], widths):
        sub = [r for r in rows if (r["d"], r["p"]) == (d, p)]
        for m in dict.fromkeys(r["method"] for r in sub):
            pts = sorted((r["T"], r["median_ms"]) for r in sub if r["method"] == m)
            panel.plot([t for t, _ in pts], [v for _, v in pts], marker="o", ms=3, label=m)
        panel.set_xscale("log", base=2)
        panel.set_yscale("log")
        panel.set_xlabel("T")
        panel.set_ylabel("ms per call")
        panel.set_title(f"per-example norms, B={sub[0]['B']}, d={d}, p={p}")
        panel.legend(fontsize=7)
        panel.grid(which="both", alpha=0.3)
    ctx = rows[0]
    fig.suptitle(f"Kernel time vs T, {ctx['device']}, commit {ctx['commit']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


PLOTS = {"models": ("steps", steps_plot), "max_batch": ("memory_vs_batch", memory_plot),
         "norms": ("kernel_vs_t", kernel_plot)}


def draw(results, out=harness.RESULTS):
    """results: {"<scenario>_<device>": rows}; returns the paths written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
    except ImportError:
        print("plots: matplotlib is not installed (pip install the `bench` extra); no plots drawn")
        return []
    os.makedirs(out, exist_ok=True)
    written = []
    for key, rows in results.items():
        scenario, device = key.rsplit("_", 1)
        if scenario in PLOTS and rows:
            stem, fn = PLOTS[scenario]
            path = os.path.join(out, f"{stem}_{device}.png")
            fn(rows, path)
            written.append(path)
    return written
