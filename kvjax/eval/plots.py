"""The evaluation's figures: accuracy against KV reduction, one panel per prompt length (and per task), and
accuracy by needle depth and length, one heatmap per (policy, task)."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np

from kvjax.eval.results import safe_name

REDUCTION_TICKS = (1, 1.25, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 48, 64, 96, 128)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def wilson_interval(accuracy: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a success rate measured on n samples."""
    if n < 1:
        return 0.0, 1.0
    centre = (accuracy + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(accuracy * (1 - accuracy) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _styles(plt, names: list[str]) -> dict[str, dict]:
    """A distinct colour and marker per policy name (tab10 up to 10 names, then tab20 and a marker cycle)."""
    colours = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    markers = "osD^v<>ph*"
    return {
        name: {"color": colours(i % colours.N), "marker": markers[i % len(markers)]} for i, name in enumerate(names)
    }


def _accuracy_panel(ax, rows: list[dict], styles: dict[str, dict]) -> None:
    """One panel: per policy name, accuracy (pooled over `rows`' tasks) against KV reduction over its
    budgets, with a 95% Wilson band; Full as a dashed line. x is log-scaled with readable ticks."""
    import matplotlib.ticker

    for name, style in styles.items():
        points = {}
        for r in rows:
            if r["policy_name"] == name:
                points.setdefault(r["policy"], []).append(r)
        if not points:
            continue
        xs, ys, lows, highs = [], [], [], []
        for cells in points.values():
            n = sum(c["samples"] for c in cells)
            acc = sum(c["accuracy"] * c["samples"] for c in cells) / n
            low, high = wilson_interval(acc, n)
            xs.append(float(np.mean([c["kv_reduction_x"] for c in cells])))
            ys.append(acc)
            lows.append(low)
            highs.append(high)
        order = np.argsort(xs)
        xs, ys, lows, highs = (np.asarray(v)[order] for v in (xs, ys, lows, highs))
        if name == "full":
            ax.axhline(ys[0], color="black", linestyle="--", linewidth=1, label="full")
            continue
        ax.plot(xs, ys, label=name, markersize=4, **style)
        ax.fill_between(xs, lows, highs, color=style["color"], alpha=0.12, linewidth=0)
    reductions = [r["kv_reduction_x"] for r in rows if r["policy_name"] != "full"] or [1.0]
    low, high = min(reductions) / 1.15, max(reductions) * 1.15
    ax.set_xscale("log")
    ax.set_xlim(low, high)
    ax.set_xticks([t for t in REDUCTION_TICKS if low <= t <= high])
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}x"))
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)


def _finish(plt, fig, axes, path: Path, title: str) -> Path:
    """One legend for all panels at the right, the title, saved at `path`."""
    handles, labels = [], []
    for ax in axes.flat:
        for h, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels:
                handles.append(h)
                labels.append(label)
    fig.legend(handles, labels, loc="center right", fontsize=8)
    fig.suptitle(textwrap.fill(title, width=int(11 * fig.get_figwidth())), fontsize=10)
    fig.tight_layout(rect=(0, 0, 1 - 1.6 / fig.get_figwidth(), 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_accuracy_vs_compression(rows: list[dict], path: Path, metadata: dict) -> Path:
    """Accuracy (mean over the tasks) against KV reduction vs Full, one panel per prompt length, one curve
    per policy over its budgets, a 95% Wilson band, and Full's accuracy as a dashed reference line."""
    plt = _pyplot()
    lengths = sorted({r["length"] for r in rows})
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(1, len(lengths), figsize=(4.2 * len(lengths) + 1.6, 3.8), sharey=True, squeeze=False)
    styles = _styles(plt, list(dict.fromkeys(r["policy_name"] for r in rows)))
    for ax, length in zip(axes[0], lengths):
        here = [r for r in rows if r["length"] == length]
        _accuracy_panel(ax, here, styles)
        ax.set_title(f"{length} tokens (n = {here[0]['samples'] * len(tasks)} per point)", fontsize=9)
        ax.set_xlabel("KV reduction vs Full (kv_bytes)")
    axes[0][0].set_ylabel("accuracy (string match, 95% Wilson band)")
    title = f"{metadata['model']} ({metadata['dtype']}), {', '.join(tasks)}; {metadata['device']}"
    return _finish(plt, fig, axes, path, title)


def plot_accuracy_by_task(rows: list[dict], path: Path, metadata: dict) -> Path:
    """The same curves per task: one panel per (task, prompt length), tasks down, lengths across."""
    plt = _pyplot()
    lengths = sorted({r["length"] for r in rows})
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(
        len(tasks), len(lengths), figsize=(3.6 * len(lengths) + 1.6, 2.7 * len(tasks)), sharey=True, squeeze=False
    )
    styles = _styles(plt, list(dict.fromkeys(r["policy_name"] for r in rows)))
    for i, task in enumerate(tasks):
        for j, length in enumerate(lengths):
            ax = axes[i][j]
            here = [r for r in rows if r["task"] == task and r["length"] == length]
            if not here:
                ax.set_axis_off()
                continue
            _accuracy_panel(ax, here, styles)
            ax.set_title(f"{task}, {length} tokens (n = {here[0]['samples']})", fontsize=9)
            if i == len(tasks) - 1:
                ax.set_xlabel("KV reduction vs Full (kv_bytes)")
        axes[i][0].set_ylabel("accuracy")
    return _finish(plt, fig, axes, path, f"{metadata['model']} ({metadata['dtype']}) by task; {metadata['device']}")


def plot_heatmaps(sample_rows: list[dict], out_dir: Path, bins: int = 10) -> list[Path]:
    """Per (policy, task), mean score by needle depth (rows, binned) and length (columns):
    heatmap_<policy>__<task>.png."""
    plt = _pyplot()
    paths = []
    cells = dict.fromkeys((r["policy"], r["task"]) for r in sample_rows)
    for label, task in cells:
        mine = [r for r in sample_rows if r["policy"] == label and r["task"] == task]
        lengths = sorted({r["length"] for r in mine})
        per_cell = max(sum(r["length"] == n for r in mine) for n in lengths)
        n_bins = max(1, min(bins, per_cell))  # samples spread their depths evenly: one bin each, at most `bins`
        total, count = np.zeros((n_bins, len(lengths))), np.zeros((n_bins, len(lengths)))
        for r in mine:
            b = min(int(r["depth"] * n_bins), n_bins - 1)
            total[b, lengths.index(r["length"])] += r["score"]
            count[b, lengths.index(r["length"])] += 1
        grid = np.where(count > 0, total / np.maximum(count, 1), np.nan)
        fig, ax = plt.subplots(figsize=(3.2 + 0.9 * len(lengths), 1.8 + 0.35 * n_bins))
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_yticks(range(n_bins), [f"{100 * (i + 0.5) / n_bins:.0f}%" for i in range(n_bins)])
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel("needle depth")
        ax.set_title(f"{label}, {task}\naccuracy by needle depth and length", fontsize=10)
        for (i, j), v in np.ndenumerate(grid):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
        fig.colorbar(image, ax=ax, fraction=0.046)
        fig.tight_layout()
        path = out_dir / f"heatmap_{safe_name(label)}__{task}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths
