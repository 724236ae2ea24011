"""Base vs adapter bar chart for the eval_scores asset page."""
from __future__ import annotations

from pathlib import Path

import polars as pl


def scores_bar_chart(scores: pl.DataFrame, path: Path, title: str = "base vs adapter") -> Path | None:
    """One pair of bars per measured metric, with the 95 % intervals as error bars. None if nothing measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = scores.filter(pl.col("value").is_not_null())
    metrics = sorted(set(measured["metric"].to_list()))
    if not metrics:
        return None
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(metrics) + 2), 4))
    width = 0.4
    for j, model in enumerate(("base", "adapter")):
        vals, lo, hi = [], [], []
        for m in metrics:
            row = measured.filter((pl.col("model") == model) & (pl.col("metric") == m))
            v = row["value"][0] if row.height else 0.0
            vals.append(v)
            lo.append(max(0.0, v - (row["ci_low"][0] if row.height and row["ci_low"][0] is not None else v)))
            hi.append(max(0.0, (row["ci_high"][0] if row.height and row["ci_high"][0] is not None else v) - v))
        xs = [i + (j - 0.5) * width for i in range(len(metrics))]
        ax.bar(xs, vals, width, yerr=[lo, hi], capsize=3, label=model, color=("#9aa5b1" if j == 0 else "#2f6fde"))
    ax.set_xticks(range(len(metrics)))
    ax.set_xticklabels(metrics, rotation=35, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path
