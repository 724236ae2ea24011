"""ETL_B, first half: traces -> `renders` (render_v1: tokenized once, token spans of every part) and its
quarantine, with the blocking checks. Thin: the work is in cb_core.render.

`renders` returns a SourceResult, so the IO manager writes `renders.parquet` and the rejected rows beside it
(`renders.rejected.parquet`) in the same step; `renders_quarantine` publishes those. (A two-output
multi_asset would make `dagster asset materialize --select lossmasks` fail: a non-subsettable multi-asset
must be selected whole.)"""
import time

import dagster as dg
import polars as pl

from cb_assets.assets._etl_b import ETL_B_GROUP, GENERATED_INS, by_reason
from cb_assets.assets.generation import generated_inputs_status, with_generated
from cb_assets.resources import DatasetsResource, ModelResource
from cb_assets.tags import cpu_tags
from cb_assets.validation import check_stage_output, pandera_check
from cb_core.config import setting
from cb_core.lossmask import boundary_problems
from cb_core.schemas import RenderModel
from cb_core.sources import SourceResult


class RendersConfig(dg.Config):
    num_workers: int = 0  # processes for render+tokenize; 0: one per core from 512 traces (CB_RENDER_WORKERS overrides)
    max_length: int = 0  # 0: the model profile's max_length


@dg.asset(
    ins={"traces": dg.AssetIn("traces"), **GENERATED_INS},
    group_name=ETL_B_GROUP,
    kinds={"polars"},
    tags=cpu_tags("B"),
    description="render_v1: each trace rendered in the model's chat format, tokenized once with offsets; "
    "token spans of every part (headers, content, tool calls, tool names, end tokens). Rejected traces "
    "(render errors; traces still over max_length after the truncation steps) are kept beside it as "
    "renders.rejected.parquet and published as `renders_quarantine`.",
)
def renders(
    context: dg.AssetExecutionContext,
    config: RendersConfig,
    model: ModelResource,
    datasets: DatasetsResource,
    traces: pl.DataFrame,
    ds_completions: pl.DataFrame,
    dr_completions: pl.DataFrame,
    adversarial_safe: pl.DataFrame,
) -> SourceResult:
    from cb_core.render import render_traces

    generated = {"ds_completions": ds_completions, "dr_completions": dr_completions,
                 "adversarial_safe": adversarial_safe}
    traces = with_generated(traces, generated)  # generated traces are rendered like any other trace

    profile = model.model_profile()
    tok = model.tokenizer()
    rcfg = profile.render_config()
    if config.max_length:
        rcfg.max_length = config.max_length
    env_workers = setting("CB_RENDER_WORKERS", "operations.yaml", "renders", "num_workers", None, int, lo=0)
    workers = int(env_workers if env_workers is not None else config.num_workers)
    stats: dict = {}
    t0 = time.perf_counter()
    df, rejected = render_traces(traces, tok, rcfg, num_workers=workers, stats=stats)
    dt = time.perf_counter() - t0
    check_stage_output("renders", df, rejected, RenderModel, n_in=traces.height,
                       limit=datasets.config().max_reject_fraction,
                       empty=f"no trace rendered ({traces.height} in, {rejected.height} rejected)")
    context.log.info(f"rendered {df.height}/{traces.height} traces in {dt:.1f}s ({df.height / max(dt, 1e-9):.0f}/s, "
                     f"{stats.get('workers', 1)} process(es))")
    for warning in over_length_warnings(traces, stats.get("truncation", {}), profile.name, rcfg.max_length):
        context.log.warning(warning)
    context.add_output_metadata(
        {
            "profile": profile.name,
            "generated": dg.MetadataValue.json(generated_inputs_status(generated)),
            "tokenizer_id": df["tokenizer_id"][0],
            "tool_call_format": rcfg.tool_call_format,
            "max_length": rcfg.max_length,
            "truncated": int(df["truncated"].sum()),
            "workers": int(stats.get("workers", 1)),
            # runs of up to STEP_ROWS traces each process took from the shared queue (this one first)
            "worker_steps": dg.MetadataValue.json(stats.get("worker_steps", [])),
            "worker_rows": dg.MetadataValue.json(stats.get("worker_rows", [])),  # traces each process rendered
            # per dataset: traces over max_length, how many each truncation step saved, how many quarantined
            "truncation": dg.MetadataValue.json(stats.get("truncation", {})),
            "truncation_steps": dg.MetadataValue.json(list(rcfg.truncation.steps)),
            "rejected": rejected.height,
            "tokens": int(df["n_tokens"].cast(pl.Int64).sum()),
            "samples_per_s": round(df.height / max(dt, 1e-9), 1),
            "timing": dg.MetadataValue.json({k: (round(v, 3) if isinstance(v, float) else v) for k, v in stats.items() if k != "truncation"}),
            "rejected_by_reason": by_reason(rejected),
        }
    )
    return SourceResult(good=df, rejected=rejected)


def over_length_warnings(traces: pl.DataFrame, truncation: dict, profile: str, max_length: int,
                         share: float = 0.10) -> list[str]:
    """A dataset losing more than ``share`` of its traces to max_length says so: a real AgentDojo run on the
    `tiny` profile (4,096) quarantines ~62 % (the suites' tool definitions alone are 4.4-5.2k tokens), which a
    green run and one "rendered N/M" line hid."""
    counts = dict(traces.group_by("dataset").len().iter_rows()) if traces.height else {}
    out = []
    for ds, t in sorted(truncation.items()):
        lost, n = int(t.get("quarantined", 0)), counts.get(ds, 0)
        if n and lost / n > share:
            out.append(f"{ds}: {lost} of {n} traces ({lost / n:.0%}) are longer than max_length={max_length} of "
                       f"model profile '{profile}' and were quarantined (renders_quarantine, excluded); real "
                       f"agent contexts want a long-context profile (CB_MODEL=llama31_8b: 16,384) or "
                       f"renders.max_length")
    return out


@dg.asset(
    group_name=ETL_B_GROUP,
    kinds={"polars"},
    tags=cpu_tags("B"),
    description="Traces the renderer rejected: render errors, and traces no truncation step brought within "
    "max_length (severity excluded).",
)
def renders_quarantine(context: dg.AssetExecutionContext, renders: SourceResult) -> pl.DataFrame:
    context.add_output_metadata({"by_reason": by_reason(renders.rejected)})
    return renders.rejected


# ------------------------------------------------------------------------------------- blocking checks
@dg.asset_check(asset="renders", blocking=True, description="render_v1 schema (pandera RenderModel)")
def renders_schema(renders: pl.DataFrame) -> dg.AssetCheckResult:
    return pandera_check(RenderModel, renders)


@dg.asset_check(
    asset="renders",
    blocking=True,
    description="assistant boundary tokens found: every assistant message has a header span starting with "
    "<|start_header_id|> and an end_token span holding <|eot_id|> (128009) or <|eom_id|> (128008)",
)
def renders_assistant_boundaries(renders: pl.DataFrame) -> dg.AssetCheckResult:
    probs = boundary_problems(renders)
    return dg.AssetCheckResult(
        passed=probs.height == 0,
        metadata={
            "rows": renders.height,
            "failing_rows": probs["trace_id"].n_unique() if "trace_id" in probs.columns else probs.height,
            "failing_messages": probs.height,
            "examples": dg.MetadataValue.json(probs.head(5).to_dicts()),
        },
    )
