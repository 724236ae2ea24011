"""Print what a pipeline run left under $CB_DATA_ROOT (`python -m cb_core.summary [ROOT]`): one line per tier,
then the generation yields, the adapter's headline numbers, base vs adapter per eval metric and the gates."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import polars as pl

from cb_core.io import data_root

GENERATED = ("ds_completions", "dr_completions", "adversarial_safe")
# measured against the base itself: its own value (0 difference, cos-sim 1) says nothing
AGAINST_BASE = ("output_difference_rate", "rep_cos_harmful", "rep_cos_benign")


def _rows(path: Path) -> int:
    return pl.scan_parquet(path).select(pl.len()).collect().item()


def summarize(root: Path) -> list[str]:
    lines = []
    for path in sorted(root.glob("*.parquet")):
        lines.append(f"{path.stem:<28} {_rows(path):>8} rows  {path}")
    return lines


def generation_lines(root: Path) -> list[str]:
    out = []
    for name in GENERATED:
        kept_p, rej_p = root / f"{name}.parquet", root / f"{name}.rejected.parquet"
        if not kept_p.exists():
            continue
        kept = _rows(kept_p)
        rejected = _rows(rej_p) if rej_p.exists() else 0
        total = kept + rejected
        share = f"{kept / total:.0%}" if total else "not measured"
        out.append(f"  {name:<18} kept {kept:>4} of {total:>4} generations (yield {share})")
    return (["generation yields:"] + out) if out else []


def adapter_lines(root: Path) -> list[str]:
    final = root / "adapter" / "final_metrics.json"
    if not final.exists():
        return []
    f = json.loads(final.read_text())
    keys = ("steps", "final_loss", "harmful_cos_sim_start", "harmful_cos_sim_end", "retain_cos_sim_end",
            "kl_benign_end", "tokens_per_s")
    vals = ", ".join(f"{k}={f[k]:.4g}" if isinstance(f.get(k), float) else f"{k}={f.get(k)}" for k in keys if k in f)
    curves = root / "adapter" / "curves.png"
    return ["adapter:", f"  {vals}", f"  loss curves: {curves}" if curves.exists() else "  loss curves: (none)"]


def eval_lines(root: Path) -> list[str]:
    path = root / "eval_scores.parquet"
    if not path.exists():
        return []
    sc = pl.read_parquet(path)

    def cell(model: str, metric: str) -> str:
        if model == "base" and metric in AGAINST_BASE:
            return "(the reference)"
        r = sc.filter((pl.col("model") == model) & (pl.col("metric") == metric))
        if not r.height or r["value"][0] is None:
            return "not measured"
        return f"{r['value'][0]:.3f} (n={r['n'][0]})"

    out = ["eval_scores (base -> adapter):"]
    for m in sc["metric"].unique().sort().to_list():
        out.append(f"  {m:<30} {cell('base', m):>20} -> {cell('adapter', m)}")
    return out + gate_lines(sc)


def gate_lines(sc: pl.DataFrame) -> list[str]:
    """The release gates (the `gate_*` checks of `eval_scores`) with configs/evaluation.yaml's thresholds: a
    failed gate is said here, not only on the asset's check in the UI."""
    from cb_core.evaluate.pipeline import EvaluationSettings
    from cb_core.evaluate.scores import gates

    return ["gates:"] + [f"  {g.name:<30} {g.status.upper():>12}  {g.description}"
                         for g in gates(sc, EvaluationSettings.load().gates)]


def main(argv: list[str]) -> int:
    root = Path(argv[0]) if argv else data_root()
    lines = summarize(root)
    if not lines:
        print(f"no tiers under {root}")
        return 1
    print("\n".join(lines + generation_lines(root) + adapter_lines(root) + eval_lines(root)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
