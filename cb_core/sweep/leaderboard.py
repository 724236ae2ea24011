"""Leaderboard of sweep points: selection metric among gated points, Pareto front, CSV/Parquet, trade-off plot.

Input: the sweep_points table (key, axes JSON, overrides) and one eval_scores table per finished point
(rows: model ∈ base|adapter, metric, n, value, ci_low, ci_high), stacked with a ``key`` column.
Output: one row per point: key, its hyper-parameters as columns, the adapter's value of every metric (plus
``base_<metric>``), each gate's status, ``eligible``, ``rank`` (1 = best; null when a gate failed) and
``pareto`` (not dominated in ASR ↓ × capability ↑).

The CSV encodes lists as JSON (``[10, 20]``) inside quoted fields, so a value holding commas survives a round
trip (the old file wrote layers as ``10,20`` into a comma-separated file and read the wrong best point).
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import polars as pl

from cb_core.evaluate.scores import LOWER_IS_BETTER, GateConfig, gates
from cb_core.sweep.manifest import Selection

ASR = "tool_flip_asr"
CAPABILITY = "capability_retention"
HEADLINE = (ASR, "injection_followed_rate", CAPABILITY, "xstest_over_refusal", "forced_function_call",
            "output_difference_rate", "llmail_attacker_send", "agentdojo_utility", "agentdojo_asr")


def _value(sc: pl.DataFrame, model: str, metric: str) -> float | None:
    r = sc.filter((pl.col("model") == model) & (pl.col("metric") == metric))
    return None if r.is_empty() or r["value"][0] is None else float(r["value"][0])


def point_row(key: str, axes: dict[str, Any], scores: pl.DataFrame, gate_cfg: GateConfig,
              selection: Selection) -> dict[str, Any]:
    """One leaderboard row from one point's eval_scores table."""
    row: dict[str, Any] = {"key": key, **axes}
    metrics = sorted(set(scores["metric"].to_list()))
    for m in metrics:
        row[m] = _value(scores, "adapter", m)
        row[f"base_{m}"] = _value(scores, "base", m)
        n = scores.filter((pl.col("model") == "adapter") & (pl.col("metric") == m))["n"]
        row[f"n_{m}"] = int(n[0]) if len(n) else 0
    gs = {g.name: g for g in gates(scores, gate_cfg)}
    ok = True
    for name in selection.gates:
        g = gs.get(name)
        status = g.status if g else "not measured"
        row[f"gate_{name}"] = status
        if status == "failed" or (status == "not measured" and selection.not_measured == "fail"):
            ok = False
    row["eligible"] = ok and row.get(selection.metric) is not None
    return row


def pareto_mask(asr: list[float | None], cap: list[float | None]) -> list[bool]:
    """True where a point is not dominated: no other point has ASR ≤ and capability ≥ with one strict.
    Points missing either value are never on the front."""
    out = []
    for i, (a, c) in enumerate(zip(asr, cap)):
        if a is None or c is None:
            out.append(False)
            continue
        dominated = any(
            j != i and a2 is not None and c2 is not None and a2 <= a and c2 >= c and (a2 < a or c2 > c)
            for j, (a2, c2) in enumerate(zip(asr, cap))
        )
        out.append(not dominated)
    return out


def build_leaderboard(points: pl.DataFrame, scores: pl.DataFrame, *, selection: Selection | None = None,
                      gate_cfg: GateConfig | None = None) -> pl.DataFrame:
    """``points``: sweep_points rows (key, axes JSON); ``scores``: stacked eval_scores with a ``key`` column.
    Points without scores (failed or not run yet) are left out; ranks are dense over eligible points."""
    selection = selection or Selection()
    gate_cfg = gate_cfg or GateConfig()
    higher = selection.higher_is_better
    if higher is None:
        higher = selection.metric not in LOWER_IS_BETTER
    rows = []
    for p in points.iter_rows(named=True):
        sc = scores.filter(pl.col("key") == p["key"])
        if sc.is_empty():
            continue
        rows.append(point_row(p["key"], json.loads(p["axes"]), sc, gate_cfg, selection))
    if not rows:
        return pl.DataFrame({"key": [], "eligible": [], "rank": [], "pareto": []},
                            schema={"key": pl.String, "eligible": pl.Boolean, "rank": pl.Int64, "pareto": pl.Boolean})
    df = pl.DataFrame(rows, infer_schema_length=None)
    df = df.with_columns(pl.Series("pareto", pareto_mask(df[ASR].to_list() if ASR in df.columns else [None] * df.height,
                                                         df[CAPABILITY].to_list() if CAPABILITY in df.columns
                                                         else [None] * df.height)))
    metric = selection.metric
    if metric not in df.columns:
        raise ValueError(f"selection metric {metric!r} is in no point's eval_scores (have: "
                         f"{sorted(set(scores['metric'].to_list()))})")
    order = pl.col(metric) * (-1.0 if higher else 1.0)
    df = df.with_columns(pl.when(pl.col("eligible")).then(order).otherwise(None).alias("_o"))
    df = df.with_columns(pl.col("_o").rank("min").cast(pl.Int64).alias("rank")).drop("_o")
    return df.sort([pl.col("rank").is_null(), "rank", "key"])


def best_row(leaderboard: pl.DataFrame) -> dict[str, Any] | None:
    top = leaderboard.filter(pl.col("rank") == 1).sort("key")
    return top.row(0, named=True) if top.height else None


# ------------------------------------------------------------------------------------------------ CSV
def _cell(v: Any) -> Any:
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(v)
    if v is None:
        return ""
    return v


def to_csv(df: pl.DataFrame) -> str:
    """RFC 4180 CSV (fields with commas or quotes are quoted); lists and mappings as JSON."""
    buf = io.StringIO()
    w = csv.writer(buf, quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
    w.writerow(df.columns)
    for row in df.iter_rows():
        w.writerow([_cell(v) for v in row])
    return buf.getvalue()


def _parse(v: str) -> Any:
    if v == "":
        return None
    if v[:1] in "[{":
        try:
            return json.loads(v)
        except ValueError:
            return v
    if v in ("true", "false", "True", "False"):
        return v.lower() == "true"
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def read_csv_rows(path_or_text: str | Path) -> list[dict[str, Any]]:
    """The CSV back as dicts with lists, numbers and booleans restored."""
    text = Path(path_or_text).read_text(encoding="utf-8") if isinstance(path_or_text, Path) else str(path_or_text)
    return [{k: _parse(v) for k, v in r.items()} for r in csv.DictReader(io.StringIO(text))]


def best_from_csv(path: str | Path) -> dict[str, Any] | None:
    rows = [r for r in read_csv_rows(Path(path)) if r.get("rank") == 1]
    return sorted(rows, key=lambda r: r["key"])[0] if rows else None


# ------------------------------------------------------------------------------------------------ plot
def tradeoff_plot(leaderboard: pl.DataFrame, path: Path, *, title: str = "sweep: ASR vs capability") -> Path | None:
    """ASR (x, lower is better) vs capability (y, higher is better): every point, the Pareto front joined,
    the base model as a star. None when no point has both values."""
    if leaderboard.is_empty() or ASR not in leaderboard.columns or CAPABILITY not in leaderboard.columns:
        return None
    pts = leaderboard.filter(pl.col(ASR).is_not_null() & pl.col(CAPABILITY).is_not_null())
    if pts.is_empty():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5), dpi=100)
    elig = pts.filter(pl.col("eligible"))
    rest = pts.filter(~pl.col("eligible"))
    ax.scatter(rest[ASR], rest[CAPABILITY], c="#bbbbbb", label="gate failed", zorder=2)
    ax.scatter(elig[ASR], elig[CAPABILITY], c="#1f77b4", label="meets gates", zorder=3)
    front = pts.filter(pl.col("pareto")).sort(ASR)
    if front.height:
        ax.plot(front[ASR], front[CAPABILITY], "-o", c="#d62728", mfc="none", ms=11, label="Pareto front", zorder=4)
    best = pts.filter(pl.col("rank") == 1)
    if best.height:
        ax.scatter(best[ASR], best[CAPABILITY], marker="D", s=90, c="#2ca02c", label="best (rank 1)", zorder=5)
    for r in pts.iter_rows(named=True):
        ax.annotate(r["key"].split("-", 1)[-1][:28], (r[ASR], r[CAPABILITY]), fontsize=6, alpha=0.7,
                    xytext=(3, 3), textcoords="offset points")
    b_asr, b_cap = f"base_{ASR}", f"base_{CAPABILITY}"
    if b_asr in pts.columns and b_cap in pts.columns:
        base = pts.filter(pl.col(b_asr).is_not_null() & pl.col(b_cap).is_not_null())
        if base.height:
            ax.scatter([base[b_asr].mean()], [base[b_cap].mean()], marker="*", s=220, c="black", label="base model",
                       zorder=6)
    ax.set_xlabel("tool-flip ASR (adapter) ↓")
    ax.set_ylabel("capability retention (adapter) ↑")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path
