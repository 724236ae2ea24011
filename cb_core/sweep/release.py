"""Release report: the best configuration trained once per seed; mean ± std of every headline metric across
the seeds, for the adapter and for the base model (whose spread shows what the evaluation itself varies)."""
from __future__ import annotations

import math
from typing import Any

import polars as pl

from cb_core.summary import AGAINST_BASE


def seed_stats(scores: pl.DataFrame) -> pl.DataFrame:
    """``scores``: stacked eval_scores of the seed runs with a ``seed`` column.

    One row per (model, metric): seeds (how many measured it), mean, std (sample std, ddof 1; null with one
    seed), min, max, n (samples per seed, summed). A metric no seed measured keeps its row with seeds = 0."""
    need = {"seed", "model", "metric", "value", "n"}
    missing = need - set(scores.columns)
    if missing:
        raise ValueError(f"seed scores: missing columns {sorted(missing)}")
    return (
        scores.group_by("model", "metric")
        .agg(
            pl.col("value").drop_nulls().len().alias("seeds"),
            pl.col("value").mean().alias("mean"),
            pl.col("value").std(ddof=1).alias("std"),
            pl.col("value").min().alias("min"),
            pl.col("value").max().alias("max"),
            pl.col("n").sum().alias("n"),
            pl.col("seed").sort().alias("seed_list"),
        )
        .sort("metric", "model")
    )


def _pm(mean: Any, std: Any, seeds: int) -> str:
    if not seeds or mean is None:
        return "not measured"
    if std is None or (isinstance(std, float) and math.isnan(std)):
        return f"{mean:.3f} (1 seed)"
    return f"{mean:.3f} ± {std:.3f}"


def report_markdown(stats: pl.DataFrame, *, best: dict[str, Any], seeds: list[int], title: str = "Release report") -> str:
    """Markdown: the configuration, then one table row per metric: adapter mean ± std, base mean ± std."""
    lines = [f"# {title}", "", f"Best configuration: `{best.get('key')}` (preset `{best.get('preset')}`), "
             f"seeds {', '.join(str(s) for s in seeds)}.", ""]
    ov = best.get("overrides") or []
    if ov:
        lines += ["Overrides: " + ", ".join(f"`{o}`" for o in ov), ""]
    lines += ["| metric | adapter (mean ± std) | base (mean ± std) | seeds | n |", "|---|---|---|---|---|"]
    for metric in stats["metric"].unique().sort().to_list():
        cells = {}
        for model in ("adapter", "base"):
            r = stats.filter((pl.col("metric") == metric) & (pl.col("model") == model))
            cells[model] = r.row(0, named=True) if r.height else None
        a, b = cells["adapter"], cells["base"]
        # a metric measured against the base itself: its base cell (difference 0, cos-sim 1) is no result
        base = "(the reference)" if metric in AGAINST_BASE else _pm(b and b["mean"], b and b["std"], b["seeds"] if b else 0)
        lines.append(
            f"| {metric} | {_pm(a and a['mean'], a and a['std'], a['seeds'] if a else 0)} | "
            f"{base} | {a['seeds'] if a else 0} | {a['n'] if a else 0} |"
        )
    lines.append("")
    return "\n".join(lines)
