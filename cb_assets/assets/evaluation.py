"""`eval_scores`: the adapter against its base model (adapter switched off) on held-out prompts."""

import json
from pathlib import Path

import dagster as dg
import polars as pl

from cb_assets.tags import gpu_tags
from cb_core.evaluate.pipeline import EvaluationSettings, evaluate, held_out_samples, representation_rows, write_outputs

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


def _settings(config: EvalScoresConfig) -> EvaluationSettings:
    from cb_core.config import load_yaml

    s = EvaluationSettings.from_dict(load_yaml("evaluation.yaml"))
    for k in ("limit", "max_tokens", "temperature", "seed", "batch_size"):
        v = getattr(config, k)
        if v is not None:
            setattr(s.eval, k, v)
    if config.live_agentdojo is not None:
        s.live_agentdojo = config.live_agentdojo
    if config.live_limit is not None:
        s.live_limit = config.live_limit
    return s


def _adapter_record(root: Path) -> dict:
    """The published adapter (`$CB_DATA_ROOT/adapter`): its directory, base model profile and target layers,
    read from the resolved training config the `adapter` asset publishes beside the weights."""
    import yaml

    from cb_core.train import adapter_dir

    path = adapter_dir(root)
    cfg_path = path / "config.yaml"
    if not (path / "adapter_config.json").exists() or not cfg_path.exists():
        raise dg.Failure(f"eval_scores: no published adapter at {path}: materialize `adapter` first")
    cfg = yaml.safe_load(cfg_path.read_text()) or {}
    base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
    try:
        return {"adapter_dir": path, "model_profile": cfg["model"]["profile"],
                "target_layers": list(cfg["loss"]["target_layers"]),
                # the exact weights the adapter was trained on, when they are a local directory
                "base_dir": Path(base) if base and Path(base).is_dir() else None}
    except (KeyError, TypeError) as e:
        raise dg.Failure(f"eval_scores: {cfg_path} lacks model.profile or loss.target_layers ({e})") from e


@dg.asset(
    group_name=EVAL_GROUP,
    kinds={"pytorch", "polars"},
    tags=GPU_TAGS,
    deps=["adapter"],
    description="Base vs adapter on held-out prompts (none from train_split): tool_flip_asr and "
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
    from cb_core.evaluate.agentdojo_live import text_generate
    from cb_core.evaluate.models import load_adapter_model, transformers_generate
    from cb_core.parse import parse_completion
    from cb_core.io import data_root
    from cb_core.model import load_model, load_profile, load_profile_tokenizer

    settings = _settings(config)
    rec = _adapter_record(data_root())
    profile = load_profile(rec["model_profile"])
    tokenizer = load_profile_tokenizer(profile)
    if rec["base_dir"] is not None:
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(str(rec["base_dir"]), local_files_only=True)
    else:
        base = load_model(profile, tokenizer)
    model = load_adapter_model(base, rec["adapter_dir"])
    context.log.info(f"eval_scores: base {rec['base_dir'] or profile.name}, adapter {rec['adapter_dir']}")
    render_cfg = profile.render_config()
    layers = rec["target_layers"]

    samples, counts = held_out_samples(eval_attacks, eval_split, train_split, traces)
    context.log.info(f"eval_scores: {len(samples)} held-out prompts ({counts}); limit={settings.eval.limit}")
    gen = transformers_generate(model, tokenizer, render_cfg, settings.eval)
    outcome = evaluate(
        samples, gen, parse_completion, settings, rep_rows=representation_rows(eval_split, renders), model=model,
        layers=layers, live_generate=lambda name: text_generate(model, tokenizer, render_cfg, adapter=name == "adapter",
                                                                max_tokens=settings.eval.max_tokens),
        log=context.log.info,
    )
    root = data_root()
    files = write_outputs(outcome, root)
    sc = outcome.scores
    headline = {}
    for r in sc.iter_rows(named=True):
        if r["value"] is not None:
            headline[f"{r['model']}/{r['metric']}"] = dg.MetadataValue.float(float(r["value"]))
    for k, v in outcome.deltas.items():
        if v is not None:
            headline[k] = dg.MetadataValue.float(float(v))
    table_md = "| metric | n | base | adapter |\n|---|---|---|---|\n" + "\n".join(
        f"| {m} | {_n(sc, m)} | {_fmt(sc, 'base', m)} | {_fmt(sc, 'adapter', m)} |"
        for m in sc["metric"].unique().sort().to_list()
    )
    meta = {
        **headline,
        "scores": dg.MetadataValue.md(table_md),
        "gates": dg.MetadataValue.json([{"gate": g.name, "status": g.status, "detail": g.description}
                                        for g in outcome.gates]),
        "details": dg.MetadataValue.path(str(files["details"])),
        "prompts": dg.MetadataValue.json(counts | outcome.counts),
        "eval_seconds": round(outcome.seconds, 1),
        "adapter_dir": dg.MetadataValue.path(str(rec["adapter_dir"])),
    }
    if "chart" in files:
        import base64

        b64 = base64.b64encode(Path(files["chart"]).read_bytes()).decode()
        meta["chart"] = dg.MetadataValue.md(f"![base vs adapter](data:image/png;base64,{b64})")
        meta["chart_path"] = dg.MetadataValue.path(str(files["chart"]))
    context.add_output_metadata(meta)
    return sc


def _fmt(sc: pl.DataFrame, model: str, metric: str) -> str:
    row = sc.filter((pl.col("model") == model) & (pl.col("metric") == metric))
    if not row.height or row["value"][0] is None:
        return "not measured"
    return f"{row['value'][0]:.3f} [{row['ci_low'][0]:.2f}, {row['ci_high'][0]:.2f}]"


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
