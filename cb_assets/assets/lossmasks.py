"""ETL_B, second half: renders + traces -> `lossmasks` (lossmask_v1, every policy) and its quarantine, the
HTML mask preview and the blocking checks. Thin: the work is in cb_core.lossmask / mixture / preview.

`lossmasks` returns a SourceResult (the IO manager writes `lossmasks.parquet` and `lossmasks.rejected.parquet`
in one step); `lossmasks_quarantine` publishes the rejected rows."""
import time

import dagster as dg
import polars as pl

from cb_assets.assets._etl_b import ETL_B_GROUP, GENERATED_INS, by_reason
from cb_assets.assets.generation import generated_inputs_status, with_generated
from cb_assets.resources import DatasetsResource, ModelResource
from cb_assets.tags import cpu_tags
from cb_assets.validation import check_stage_output, pandera_check, rows_check
from cb_core.io import atomic_write_bytes, data_root
from cb_core.lossmask import LossmaskConfig, bad_span_rows, build_lossmasks, lossmask_stats
from cb_core.mixture import MixtureSchedule
from cb_core.preview import inline_preview_markdown, mask_preview_html, preview_markdown
from cb_core.schemas import LossmaskModel
from cb_core.sources import SourceResult

PREVIEW_FILE = "mask_preview.html"


class LossmasksConfig(dg.Config):
    config_file: str = "configs/lossmask.yaml"  # policies (default: all) and training defaults
    mwcs: str = "configs/mwcs/default.yaml"  # MWCS schedule: sample_weight = base class weight


@dg.asset(
    ins={"renders": dg.AssetIn("renders"), "traces": dg.AssetIn("traces"), **GENERATED_INS},
    group_name=ETL_B_GROUP,
    kinds={"polars"},
    tags=cpu_tags("B"),
    description="lossmask_v1: one row per training-bound trace and loss-mask policy (token ranges with "
    "weights, MWCS sample_weight). HTML preview: $CB_DATA_ROOT/mask_preview.html. Training-bound traces "
    "whose mask under a policy is empty are kept beside it (lossmasks.rejected.parquet) and published as "
    "`lossmasks_quarantine`; never written as all-zero masks.",
)
def lossmasks(
    context: dg.AssetExecutionContext,
    config: LossmasksConfig,
    model: ModelResource,
    datasets: DatasetsResource,
    renders: pl.DataFrame,
    traces: pl.DataFrame,
    ds_completions: pl.DataFrame,
    dr_completions: pl.DataFrame,
    adversarial_safe: pl.DataFrame,
) -> SourceResult:
    lcfg = LossmaskConfig.load(config.config_file)
    mwcs = MixtureSchedule.load(config.mwcs)
    stats: dict = {}
    t0 = time.perf_counter()
    generated = {"ds_completions": ds_completions, "dr_completions": dr_completions,
                 "adversarial_safe": adversarial_safe}
    traces = with_generated(traces, generated)
    df, rejected = build_lossmasks(renders, traces, lcfg.policies, mwcs.base_weights(), stats=stats)
    dt = time.perf_counter() - t0
    check_stage_output("lossmasks", df, rejected, LossmaskModel,
                       n_in=max(1, stats.get("training_bound", 0) * len(lcfg.policies)),
                       limit=datasets.config().max_reject_fraction,
                       empty=f"no mask written ({stats.get('training_bound', 0)} training-bound of {renders.height} "
                       f"renders; {rejected.height} rejected)")
    per_policy = lossmask_stats(df, rejected)

    tok = model.tokenizer()
    preview = mask_preview_html(tok, df, renders, samples_per_policy=lcfg.preview_samples, policies=lcfg.policies)
    path = data_root() / PREVIEW_FILE
    atomic_write_bytes(path, preview.encode("utf-8"))
    context.log.info(f"built {df.height} masks ({len(lcfg.policies)} policies) in {dt:.2f}s; preview at {path}")
    context.add_output_metadata(
        {
            "policies": dg.MetadataValue.json(lcfg.policies),
            "generated": dg.MetadataValue.json(generated_inputs_status(generated)),
            "training_default": dg.MetadataValue.json(lcfg.training_default),
            "mwcs": mwcs.name,
            "per_policy": dg.MetadataValue.json(per_policy),
            "masked_fraction": dg.MetadataValue.json({p: s["masked_fraction"] for p, s in per_policy.items()}),
            "training_bound": stats["training_bound"],
            "skipped_skeleton": stats["skipped_skeleton"],
            "missing_trace": stats["missing_trace"],
            # training-bound traces without an injection span: cb_from_injection = cb_full_sequence for them
            "cb_from_injection_fallback": dg.MetadataValue.json(stats.get("cb_from_injection_fallback", {})),
            "rejected": rejected.height,
            "build_s": round(dt, 3),
            "preview_path": dg.MetadataValue.path(str(path)),
            # one click from the asset page: the file as a link, and the samples inlined as Markdown
            "preview_url": dg.MetadataValue.url(path.resolve().as_uri()),
            "mask_preview": dg.MetadataValue.md(inline_preview_markdown(df, renders, tok, lcfg.preview_samples)),
            "preview": dg.MetadataValue.md(preview_markdown(per_policy, str(path), df, renders, tok)),
        }
    )
    return SourceResult(good=df, rejected=rejected)


@dg.asset(
    group_name=ETL_B_GROUP,
    kinds={"polars"},
    tags=cpu_tags("B"),
    description="Training-bound traces whose loss mask under a policy is empty (reason names the policy; "
    "severity excluded = the policy needs a tool call the trace lacks, malformed = anything else).",
)
def lossmasks_quarantine(context: dg.AssetExecutionContext, lossmasks: SourceResult) -> pl.DataFrame:
    q = lossmasks.rejected
    context.add_output_metadata(
        {
            "by_reason": by_reason(q),
            "by_severity": dg.MetadataValue.json(dict(q.group_by("severity").len().iter_rows())),
        }
    )
    return q


# ------------------------------------------------------------------------------------- blocking checks
@dg.asset_check(asset="lossmasks", blocking=True, description="lossmask_v1 schema (pandera LossmaskModel)")
def lossmasks_schema(lossmasks: pl.DataFrame) -> dg.AssetCheckResult:
    return pandera_check(LossmaskModel, lossmasks)


@dg.asset_check(
    asset="lossmasks", blocking=True, description="every training-bound mask is non-empty (n_masked > 0)"
)
def lossmasks_nonempty(lossmasks: pl.DataFrame) -> dg.AssetCheckResult:
    bad = (pl.col("n_masked") <= 0) | (pl.col("mask_spans").list.len() == 0)
    return rows_check(lossmasks, bad, "empty loss masks", id_col="trace_id",
                      verified="every training-bound mask is non-empty")


@dg.asset_check(
    asset="lossmasks",
    blocking=True,
    description="mask spans inside the sequence: 0 <= start < end <= n_tokens, sorted, non-overlapping, "
    "n_masked = their total length",
)
def lossmasks_spans_in_sequence(lossmasks: pl.DataFrame) -> dg.AssetCheckResult:
    if lossmasks.height == 0:
        return dg.AssetCheckResult(passed=True, metadata={"rows": 0})
    return rows_check(lossmasks, bad_span_rows(lossmasks), "mask spans outside the sequence", id_col="trace_id",
                      verified="no mask span outside its sequence")
