"""ETL_B: traces -> renders (tokenized, with token spans) -> lossmasks (every policy), plus their quarantines,
the HTML mask preview and the blocking checks. Thin: the work is in cb_core.render / lossmask / mixture /
preview.

`renders` and `lossmasks` return a SourceResult, so the IO manager writes `<key>.parquet` and the rejected
rows beside it (`<key>.rejected.parquet`) in the same step; `renders_quarantine` / `lossmasks_quarantine`
publish those. (A two-output multi_asset would make `dagster asset materialize --select lossmasks` fail:
a non-subsettable multi-asset must be selected whole.)"""

import os
import time

import dagster as dg
import polars as pl

from cb_assets.assets.generation import generated_inputs_status, with_generated
from cb_assets.resources import DatasetsResource, ModelResource
from cb_assets.tags import cpu_tags
from cb_assets.validation import keep_rejects, pandera_check, rows_check, stop_the_line, validate_or_fail
from cb_core.io import atomic_write_bytes, data_root
from cb_core.lossmask import LossmaskConfig, bad_span_rows, boundary_problems, build_lossmasks, lossmask_stats
from cb_core.mixture import MixtureSchedule
from cb_core.schemas import LossmaskModel, QuarantineModel, RenderModel
from cb_core.sources import SourceResult

ETL_B_GROUP = "etl_b"
# Generated trace tables enter renders and lossmasks as asset inputs (an unmaterialized one reads as empty).
GENERATED_INS = {name: dg.AssetIn(name) for name in ("ds_completions", "dr_completions", "adversarial_safe")}
PREVIEW_FILE = "mask_preview.html"


class RendersConfig(dg.Config):
    num_workers: int = 1  # processes for render+tokenize (CB_RENDER_WORKERS overrides)
    max_length: int = 0  # 0: the model profile's max_length


class LossmasksConfig(dg.Config):
    config_file: str = "configs/lossmask.yaml"  # policies (default: all) and training defaults
    mwcs: str = "configs/mwcs/default.yaml"  # MWCS schedule: sample_weight = base class weight


# ------------------------------------------------------------------------------------------------ renders
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
    workers = int(os.environ.get("CB_RENDER_WORKERS") or config.num_workers)
    stats: dict = {}
    t0 = time.perf_counter()
    df, rejected = render_traces(traces, tok, rcfg, num_workers=workers, stats=stats)
    dt = time.perf_counter() - t0
    if df.height == 0:
        kept = keep_rejects("renders", rejected)
        raise dg.Failure(
            f"renders: no trace rendered ({traces.height} in, {rejected.height} rejected); nothing written; "
            f"rejected rows kept in {kept}"
        )
    stop_the_line("renders", traces.height, rejected, datasets.config().max_reject_fraction)
    validate_or_fail(RenderModel, df, "renders")
    validate_or_fail(QuarantineModel, rejected, "renders_quarantine")
    context.log.info(f"rendered {df.height}/{traces.height} traces in {dt:.1f}s ({df.height / max(dt, 1e-9):.0f}/s)")
    context.add_output_metadata(
        {
            "profile": profile.name,
            "generated": dg.MetadataValue.json(generated_inputs_status(generated)),
            "tokenizer_id": df["tokenizer_id"][0],
            "tool_call_format": rcfg.tool_call_format,
            "max_length": rcfg.max_length,
            "truncated": int(df["truncated"].sum()),
            # per dataset: traces over max_length, how many each truncation step saved, how many quarantined
            "truncation": dg.MetadataValue.json(stats.get("truncation", {})),
            "truncation_steps": dg.MetadataValue.json(list(rcfg.truncation.steps)),
            "rejected": rejected.height,
            "tokens": int(df["n_tokens"].cast(pl.Int64).sum()),
            "samples_per_s": round(df.height / max(dt, 1e-9), 1),
            "timing": dg.MetadataValue.json({k: (round(v, 3) if isinstance(v, float) else v) for k, v in stats.items() if k != "truncation"}),
            "rejected_by_reason": _by_reason(rejected),
        }
    )
    return SourceResult(good=df, rejected=rejected)


def _by_reason(q: pl.DataFrame) -> dg.MetadataValue:
    return dg.MetadataValue.json(q.group_by("reason").len().sort("len", descending=True).head(20).to_dicts())


@dg.asset(
    group_name=ETL_B_GROUP,
    kinds={"polars"},
    tags=cpu_tags("B"),
    description="Traces the renderer rejected: render errors, and traces no truncation step brought within "
    "max_length (severity excluded).",
)
def renders_quarantine(context: dg.AssetExecutionContext, renders: SourceResult) -> pl.DataFrame:
    context.add_output_metadata({"by_reason": _by_reason(renders.rejected)})
    return renders.rejected


# ---------------------------------------------------------------------------------------------- lossmasks
def _preview_markdown(stats: dict, path: str, lossmasks: pl.DataFrame, renders_df: pl.DataFrame, tok) -> str:
    lines = [
        f"Full preview (every token, masked ones highlighted): `{path}`",
        "",
        "| policy | rows | masked tokens | fraction | rejected |",
        "|---|---:|---:|---:|---:|",
    ]
    for pol, s in stats.items():
        lines.append(
            f"| {pol} | {s['rows']} | {s['masked_tokens']} | {s['masked_fraction']:.1%} | {s.get('rejected', 0)} |"
        )
    # one short excerpt per policy: masked text wrapped in [[ ]]
    if lossmasks.height:
        first = lossmasks.sort("n_tokens").head(1)["trace_id"][0]
        r = renders_df.filter(pl.col("trace_id") == first).row(0, named=True)
        lines += ["", f"Sample `{first[:16]}` (masked text between `[[` and `]]`, first 600 chars):", ""]
        for row in lossmasks.filter(pl.col("trace_id") == first).iter_rows(named=True):
            ids = r["input_ids"]
            pieces, pos = [], 0
            for sp in row["mask_spans"]:
                pieces.append(tok.decode(ids[pos : sp["token_start"]]))
                pieces.append("[[" + tok.decode(ids[sp["token_start"] : sp["token_end"]]) + "]]")
                pos = sp["token_end"]
            pieces.append(tok.decode(ids[pos:]))
            text = "".join(pieces)[:600].replace("```", "'''")
            lines += [f"**{row['policy']}**", "", "```", text, "```", ""]
    return "\n".join(lines)


def _inline_preview(lossmasks: pl.DataFrame, renders_df: pl.DataFrame, tok, samples: int, max_chars: int = 1500) -> str:
    """The mask preview as Markdown the asset page renders in one click: per policy, a few samples with the
    masked tokens in <mark> (text HTML-escaped; the full file is linked from `preview_url`)."""
    import html

    ids_of = dict(zip(renders_df["trace_id"].to_list(), renders_df["input_ids"].to_list()))
    out = ["Masked tokens are highlighted; each sample's first characters.", ""]
    for pol in lossmasks["policy"].unique(maintain_order=True).to_list():
        rows = lossmasks.filter(pl.col("policy") == pol).sort("n_tokens").head(samples)
        out += [f"**{pol}**", ""]
        for row in rows.iter_rows(named=True):
            ids = ids_of.get(row["trace_id"])
            if ids is None:
                continue
            pieces, pos = [], 0
            for sp in row["mask_spans"]:
                pieces.append(html.escape(tok.decode(ids[pos : sp["token_start"]])))
                pieces.append("<mark>" + html.escape(tok.decode(ids[sp["token_start"] : sp["token_end"]])) + "</mark>")
                pos = sp["token_end"]
            pieces.append(html.escape(tok.decode(ids[pos:])))
            text = "".join(pieces)[:max_chars].replace("\n", "<br>")
            out += [f"<p><code>{row['trace_id'][:12]}</code> ({row['n_masked']}/{row['n_tokens']} tokens)<br>{text}</p>", ""]
    return "\n".join(out)


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
    from cb_core.preview import mask_preview_html

    lcfg = LossmaskConfig.load(config.config_file)
    mwcs = MixtureSchedule.load(config.mwcs)
    stats: dict = {}
    t0 = time.perf_counter()
    generated = {"ds_completions": ds_completions, "dr_completions": dr_completions,
                 "adversarial_safe": adversarial_safe}
    traces = with_generated(traces, generated)
    df, rejected = build_lossmasks(renders, traces, lcfg.policies, mwcs.base_weights(), stats=stats)
    dt = time.perf_counter() - t0
    if df.height == 0:
        kept = keep_rejects("lossmasks", rejected)
        raise dg.Failure(
            f"lossmasks: no mask written ({stats.get('training_bound', 0)} training-bound of {renders.height} "
            f"renders; {rejected.height} rejected); nothing written; rejected rows kept in {kept}"
        )
    n_in = max(1, stats.get("training_bound", 0) * len(lcfg.policies))
    stop_the_line("lossmasks", n_in, rejected, datasets.config().max_reject_fraction)
    validate_or_fail(LossmaskModel, df, "lossmasks")
    validate_or_fail(QuarantineModel, rejected, "lossmasks_quarantine")
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
            "mask_preview": dg.MetadataValue.md(_inline_preview(df, renders, tok, lcfg.preview_samples)),
            "preview": dg.MetadataValue.md(_preview_markdown(per_policy, str(path), df, renders, tok)),
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
            "by_reason": _by_reason(q),
            "by_severity": dg.MetadataValue.json(dict(q.group_by("severity").len().iter_rows())),
        }
    )
    return q


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
