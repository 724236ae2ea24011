"""`eval_scores`: the adapter against its base model (adapter switched off) on held-out prompts."""

from pathlib import Path

import dagster as dg
import polars as pl

from cb_assets.tags import gpu_tags
from cb_core.evaluate.pipeline import EvaluationSettings

EVAL_GROUP = "evaluation"
GPU_TAGS = gpu_tags("08.00.00")  # as `adapter`


class EvalScoresConfig(dg.Config):
    """Overrides of configs/evaluation.yaml (same key names); unset fields keep the file's values."""

    limit: int | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    seed: int | None = None
    batch_size: int | None = None
    live_agentdojo: bool | None = None
    live_limit: int | None = None
    backend: str | None = None  # transformers | vllm


def _settings(config: EvalScoresConfig) -> EvaluationSettings:
    from cb_core.evaluate.pipeline import EVAL_RULES, LIVE_RULES

    s = EvaluationSettings.load()
    for k in ("limit", "max_tokens", "temperature", "seed", "batch_size", "backend"):  # checked as the file's are
        v = getattr(config, k)
        if v is not None:
            setattr(s.eval, k, EVAL_RULES[k](v, f"eval_scores config {k}"))
    if config.live_agentdojo is not None:
        s.live_agentdojo = config.live_agentdojo
    if config.live_limit is not None:
        s.live_limit = LIVE_RULES["limit"](config.live_limit, "eval_scores config live_limit")
    return s


@dg.asset(
    group_name=EVAL_GROUP,
    kinds={"pytorch", "polars"},
    tags=GPU_TAGS,
    deps=["adapter"],
    description="Base vs adapter on held-out prompts (none from train_split): tool_flip_asr, "
    "injection_followed_rate (the attacker's call or a preparatory step it asked for) and "
    "forced_function_call on eval_attacks, capability_retention on held-out benign traces, LLMail, XSTest "
    "over-refusal, coherence, output difference, representation similarity; optional live AgentDojo. One row "
    "per (model, metric) with n and a 95% Wilson interval; n = 0 is 'not measured'.",
)
def eval_scores(
    context: dg.AssetExecutionContext,
    config: EvalScoresConfig,
    eval_attacks: pl.DataFrame,
    eval_split: pl.DataFrame,
    train_split: pl.DataFrame,
    traces: pl.DataFrame,
    renders: pl.DataFrame,
) -> pl.DataFrame:
    from cb_core.io import data_root
    from cb_core.train import adapter_dir

    frames = {"eval_attacks": eval_attacks, "eval_split": eval_split, "train_split": train_split, "traces": traces,
              "renders": renders}
    root = data_root()
    result = run_scoring(adapter_dir(root), frames, _settings(config), root, log=context.log.info)
    context.add_output_metadata(eval_metadata(result))
    return result.outcome.scores


def run_scoring(adapter_path: Path, frames: dict, settings: EvaluationSettings, out_dir: Path, *, log):
    """`cb_core.evaluate.adapter_eval.score_adapter` with its input errors as Dagster failures."""
    from cb_core.evaluate.adapter_eval import AdapterNotFound, adapter_record, score_adapter

    try:
        rec = adapter_record(adapter_path)
    except AdapterNotFound as e:
        raise dg.Failure(f"{e}: materialize the adapter first") from e
    except ValueError as e:
        raise dg.Failure(str(e)) from e
    return score_adapter(rec, frames, settings, out_dir, log=log)


def eval_metadata(result) -> dict:
    """Headline numbers (numeric, so the UI plots them across materializations), the scores table, gates, chart."""
    import base64

    outcome, files = result.outcome, result.files
    sc = outcome.scores
    meta: dict = {}
    for r in sc.iter_rows(named=True):
        if r["value"] is not None:
            meta[f"{r['model']}/{r['metric']}"] = dg.MetadataValue.float(float(r["value"]))
    for k, v in outcome.deltas.items():
        if v is not None:
            meta[k] = dg.MetadataValue.float(float(v))
    meta["scores"] = dg.MetadataValue.md("| metric | n | base | adapter |\n|---|---|---|---|\n" + "\n".join(
        f"| {m} | {_n(sc, m)} | {_fmt(sc, 'base', m)} | {_fmt(sc, 'adapter', m)} |"
        for m in sc["metric"].unique().sort().to_list()))
    meta["gates"] = dg.MetadataValue.json([{"gate": g.name, "status": g.status, "detail": g.description}
                                           for g in outcome.gates])
    meta["details"] = dg.MetadataValue.path(str(files["details"]))
    meta["prompts"] = dg.MetadataValue.json(result.counts | outcome.counts)
    meta["eval_seconds"] = round(outcome.seconds, 1)
    meta["backend"] = result.backend
    meta["base_model"] = result.record.base_name
    meta["adapter_dir"] = dg.MetadataValue.path(str(result.record.adapter_dir))
    if "chart" in files:
        b64 = base64.b64encode(Path(files["chart"]).read_bytes()).decode()
        meta["chart"] = dg.MetadataValue.md(f"![base vs adapter](data:image/png;base64,{b64})")
        meta["chart_path"] = dg.MetadataValue.path(str(files["chart"]))
    return meta


def _fmt(sc: pl.DataFrame, model: str, metric: str) -> str:
    row = sc.filter((pl.col("model") == model) & (pl.col("metric") == metric))
    if not row.height or row["value"][0] is None:
        return "not measured"
    lo, hi = row["ci_low"][0], row["ci_high"][0]
    return f"{row['value'][0]:.3f}" + (f" [{lo:.2f}, {hi:.2f}]" if lo is not None and hi is not None else "")


def _n(sc: pl.DataFrame, metric: str) -> int:
    row = sc.filter((pl.col("model") == "adapter") & (pl.col("metric") == metric))
    return int(row["n"][0]) if row.height else 0


def _gate_check(name: str) -> dg.AssetChecksDefinition:
    @dg.asset_check(asset=eval_scores, name=f"gate_{name}", blocking=False,
                    description=f"eval gate `{name}` (configs/evaluation.yaml gates); 'not measured' passes with a warning")
    def _check(eval_scores: pl.DataFrame) -> dg.AssetCheckResult:
        from cb_core.config import load_yaml
        from cb_core.evaluate.scores import GateConfig, gates

        cfg = GateConfig.from_dict((load_yaml("evaluation.yaml") or {}).get("gates"))
        g = next(x for x in gates(eval_scores, cfg) if x.name == name)
        return dg.AssetCheckResult(
            passed=g.passed is not False,
            severity=dg.AssetCheckSeverity.WARN if g.passed is None else dg.AssetCheckSeverity.ERROR,
            description=g.description,
            metadata={"status": g.status, **{k: float(v) for k, v in g.values.items()}},
        )

    return _check


eval_gate_checks = [_gate_check(n) for n in ("asr_reduction", "capability", "output_difference", "over_refusal")]
