"""One evaluation pass from the curated tables: held-out prompt sets → base and adapter generations → the
eval_scores table, per-sample details, deltas and gates (plus live AgentDojo when asked)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import polars as pl

from cb_core.config import (Rule, check_bool, check_keys, check_mapping, check_str, check_str_list, config_dir, display_path,
                            env_number, load_yaml, nullable, number, one_of, section, whole)
from cb_core.evaluate.runner import EvalConfig, EvalResult, EvalSample, attack_samples, capability_samples, score, xstest_samples
from cb_core.evaluate.scores import Gate, GateConfig, deltas, gates, scores_frame
from cb_core.evaluate.stats import mean_of, rate

LIMIT_ENV = "CB_EVAL_LIMIT"  # the old EVAL_LIMIT: cap every prompt set for a quick run
CONFIG_FILE = "evaluation.yaml"
VLLM_DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")

# configs/evaluation.yaml, one rule per key (a key not listed is an error naming it). null = all, for limits only.
EVAL_RULES: dict[str, Rule] = {  # the `eval:` section -> EvalConfig
    "limit": nullable(whole(1)),
    "max_tokens": whole(1),
    "temperature": number(lo=0),
    "seed": whole(0),
    "batch_size": whole(1),
    "forced_call": check_bool,
    "seed_key": check_str,
    "backend": one_of(("transformers", "vllm")),
    "tensor_parallel_size": whole(1),
    "gpu_memory_utilization": number(lo=0, hi=1, lo_open=True),
    "dtype": one_of(VLLM_DTYPES),
    "enforce_eager": check_bool,
}
assert set(EVAL_RULES) == set(EvalConfig.__dataclass_fields__), "EVAL_RULES must cover EvalConfig"
LIVE_RULES: dict[str, Rule] = {  # the `live_agentdojo:` section -> EvaluationSettings.live_*
    "enabled": check_bool,
    "suites": check_str_list,
    "limit": nullable(whole(1)),
    "max_iters": whole(1),
}
TOP_KEYS = ("eval", "representation_limit", "gates", "live_agentdojo")


def config_file_shown(name: str | Path = CONFIG_FILE) -> str:
    """The evaluation config as messages name it: the file actually read (``$CB_CONFIG_DIR`` when set)."""
    path = Path(name)
    return display_path(path if path.is_absolute() else config_dir() / path)


def _section(raw: dict, key: str, rules: dict[str, Rule], source: str) -> dict[str, Any]:
    """``raw[key]`` (absent or null: empty) as a mapping whose every key has a rule; each value checked."""
    return {} if raw.get(key) is None else section(rules)(raw[key], f"{source}: {key}")


@dataclass
class EvaluationSettings:
    eval: EvalConfig = field(default_factory=EvalConfig)
    gates: GateConfig = field(default_factory=GateConfig)
    representation_limit: int | None = 16  # null: every eval_split sample
    live_agentdojo: bool = False
    live_suites: tuple[str, ...] = ("banking",)
    live_limit: int | None = 2
    live_max_iters: int = 4

    @classmethod
    def load(cls, name: str | Path = CONFIG_FILE, env: Mapping[str, str] | None = None) -> "EvaluationSettings":
        """``configs/evaluation.yaml`` (in ``$CB_CONFIG_DIR`` when set), checked; ``$CB_EVAL_LIMIT`` over it."""
        path = Path(name) if Path(name).is_absolute() else config_dir() / name
        return cls.from_dict(load_yaml(path), source=display_path(path), env=env)

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None, source: str | None = None,
                  env: Mapping[str, str] | None = None) -> "EvaluationSettings":
        """The parsed file, every value checked by the rules above (``source``: the file as messages name it,
        default the evaluation.yaml actually read); ``$CB_EVAL_LIMIT`` (a whole number >= 1) caps every set."""
        source = source or config_file_shown()
        raw = {} if raw is None else check_mapping(raw, source)
        check_keys(raw, TOP_KEYS, source)
        env = os.environ if env is None else env
        ev = _section(raw, "eval", EVAL_RULES, source)
        limit = env_number(LIMIT_ENV, None, int, lo=1, env=env)
        if limit is not None:
            ev["limit"] = limit
        live = _section(raw, "live_agentdojo", LIVE_RULES, source)
        rep = raw.get("representation_limit", 16)
        return cls(
            eval=EvalConfig(**ev),
            gates=GateConfig.from_dict(raw.get("gates"), source=f"{source}: gates"),
            representation_limit=nullable(whole(1))(rep, f"{source}: representation_limit"),
            live_agentdojo=live.get("enabled", False),
            live_suites=tuple(live.get("suites", ("banking",))),
            live_limit=live.get("limit", 2),
            live_max_iters=live.get("max_iters", 4),
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
    else:  # nothing to compare on (no eval_split renders): rows that say so, not missing rows
        rep = {"rep_cos_harmful": mean_of([]), "rep_cos_benign": mean_of([])}
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
            for k in ("agentdojo_utility", "agentdojo_utility_under_attack", "agentdojo_asr"):
                rates[name][k] = rate(0, 0)
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
