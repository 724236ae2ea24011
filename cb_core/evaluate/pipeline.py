"""One evaluation pass from the curated tables: held-out prompt sets → base and adapter generations → the
eval_scores table, per-sample details, deltas and gates (plus live AgentDojo when asked)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from cb_core.evaluate.runner import EvalConfig, EvalResult, EvalSample, attack_samples, capability_samples, score, xstest_samples
from cb_core.evaluate.scores import Gate, GateConfig, deltas, gates, scores_frame
from cb_core.evaluate.stats import rate

LIMIT_ENV = "CB_EVAL_LIMIT"  # the old EVAL_LIMIT: cap every prompt set for a quick run


@dataclass
class EvaluationSettings:
    eval: EvalConfig = field(default_factory=EvalConfig)
    gates: GateConfig = field(default_factory=GateConfig)
    representation_limit: int = 16
    live_agentdojo: bool = False
    live_suites: tuple[str, ...] = ("banking",)
    live_limit: int = 2
    live_max_iters: int = 4

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None, source: str = "configs/evaluation.yaml",
                  env: dict[str, str] | None = None) -> "EvaluationSettings":
        raw = dict(raw or {})
        env = os.environ if env is None else env
        ev = dict(raw.get("eval") or {})
        unknown = set(ev) - set(EvalConfig.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{source}: unknown key(s) eval.{sorted(unknown)}")
        if env.get(LIMIT_ENV):
            try:
                ev["limit"] = int(env[LIMIT_ENV])
            except ValueError:
                raise ValueError(f"{LIMIT_ENV} must be an integer, got {env[LIMIT_ENV]!r}") from None
        live = dict(raw.get("live_agentdojo") or {})
        return cls(
            eval=EvalConfig(**ev),
            gates=GateConfig.from_dict(raw.get("gates"), source=f"{source}: gates"),
            representation_limit=int(raw.get("representation_limit", 16)),
            live_agentdojo=bool(live.get("enabled", False)),
            live_suites=tuple(live.get("suites", ("banking",))),
            live_limit=int(live.get("limit", 2)),
            live_max_iters=int(live.get("max_iters", 4)),
        )


@dataclass
class EvaluationOutcome:
    scores: pl.DataFrame
    details: pl.DataFrame
    gates: list[Gate]
    deltas: dict[str, float | None]
    counts: dict[str, int]
    live: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def held_out_samples(eval_attacks: pl.DataFrame, eval_split: pl.DataFrame, train_split: pl.DataFrame,
                     traces: pl.DataFrame | None) -> tuple[list[EvalSample], dict[str, int]]:
    """Every prompt set, minus anything whose id or task group was trained on."""
    train_ids = set(train_split["id"].to_list()) if train_split.height else set()
    train_groups = set(train_split["pair_group"].to_list()) if train_split.height else set()
    samples = (attack_samples(eval_attacks)
               + capability_samples(eval_split, traces, exclude_groups=train_groups)
               + xstest_samples(traces, exclude_groups=train_groups))
    kept = [s for s in samples if s.id not in train_ids and s.pair_group not in train_groups]
    counts = {"excluded_trained": len(samples) - len(kept)}
    for s in kept:
        counts[f"prompts_{s.set}"] = counts.get(f"prompts_{s.set}", 0) + 1
    return kept, counts


def evaluate(samples: list[EvalSample], generate, parse, settings: EvaluationSettings, *,
             rep_rows: pl.DataFrame | None = None, model=None, layers=(), live_generate=None, log=None) -> EvaluationOutcome:
    res: EvalResult = score(samples, generate, settings.eval, parse, log=log)
    rates = res.scores
    if model is not None and rep_rows is not None and layers:
        from cb_core.evaluate.models import representation_similarity

        rep = representation_similarity(model, rep_rows, layers, limit=settings.representation_limit)
        for k, v in rep.items():
            rates["adapter"][k] = v
            rates["base"][k] = type(v)(v.n, 1.0 if v.n else None, 1.0 if v.n else None, 1.0 if v.n else None)
    live_rows: list[dict] = []
    if settings.live_agentdojo and live_generate is not None:
        from cb_core.evaluate.agentdojo_live import run_live

        for name in ("base", "adapter"):
            lr = run_live(live_generate(name), settings.live_suites, limit=settings.live_limit,
                          max_iters=settings.live_max_iters, log=log)
            rates[name]["agentdojo_utility"] = lr.utility
            rates[name]["agentdojo_utility_under_attack"] = lr.utility_under_attack
            rates[name]["agentdojo_asr"] = lr.asr
            live_rows += [{**p, "model": name} for p in lr.pairs]
    else:
        for name in ("base", "adapter"):
            rates[name]["agentdojo_utility"] = rate(0, 0)
            rates[name]["agentdojo_asr"] = rate(0, 0)
    table = scores_frame(rates)
    return EvaluationOutcome(scores=table, details=res.details, gates=gates(table, settings.gates),
                             deltas=deltas(table), counts=res.extra, live=live_rows, seconds=res.seconds)


def representation_rows(eval_split: pl.DataFrame, renders: pl.DataFrame | None) -> pl.DataFrame | None:
    """eval_split rows joined to their rendered ids: `input_ids`, `mask_spans`, `category`."""
    if renders is None or not eval_split.height or "mask_spans" not in eval_split.columns:
        return None
    r = renders.select(pl.col("trace_id").alias("id"), "input_ids")
    return eval_split.select("id", "mask_spans", "category").join(r, on="id", how="inner")


def write_outputs(outcome: EvaluationOutcome, root: Path) -> dict[str, Path]:
    from cb_core.evaluate.plots import scores_bar_chart
    from cb_core.io import write_parquet

    out = {"details": write_parquet(outcome.details, root / "eval_details.parquet")}
    png = scores_bar_chart(outcome.scores, root / "eval_scores.png")
    if png:
        out["chart"] = png
    if outcome.live:
        out["live"] = write_parquet(pl.DataFrame(outcome.live), root / "eval_agentdojo_live.parquet")
    return out
