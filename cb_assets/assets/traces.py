"""ETL_A: the six Tier A tables become one `traces` table (trace_v1) and one `quarantine` table."""

import dagster as dg
import polars as pl

from cb_assets.resources import DatasetsResource
from cb_assets.tags import cpu_tags
from cb_assets.validation import pandera_check, rows_check, validate_or_fail
from cb_core.schemas import DATASETS, QuarantineModel, TraceModel, empty_quarantine
from cb_core.sources import SourceResult

ETL_A_GROUP = "etl_a"
# The IO manager hands these back as SourceResult (good rows + rejected rows), see io_manager.py.
RAW_INS = {f"raw_{ds}": dg.AssetIn(key=f"raw_{ds}", metadata={"cb/load": "source_result"}) for ds in DATASETS}


def selection_mismatch(results: dict[str, SourceResult], selected: list[str]) -> str | None:
    """Why the raw tables on disk are not the current selection's, or None. A selected source's raw table is never
    empty (an empty source fails its asset), so an empty one was written while the source was unselected (by
    another CB_DATASETS, or by a run that then failed); a non-empty table of an unselected source is left from
    an earlier selection. Either way `traces` would silently be another selection's."""
    empty = [ds for ds in DATASETS if ds in selected and not results[f"raw_{ds}"].good.height]
    stale = [ds for ds in DATASETS if ds not in selected and results[f"raw_{ds}"].good.height]
    if not empty and not stale:
        return None
    parts = []
    if empty:
        parts.append(f"selected source(s) {empty} have an empty raw table (written while unselected)")
    if stale:
        parts.append(f"unselected source(s) {stale} still have rows from an earlier selection")
    return ("traces: the raw tables do not match the current source selection (CB_DATASETS / configured paths: "
            f"{selected}): {'; '.join(parts)}. Materialize them with it, e.g. --select '+traces'; nothing written")


def combine_traces(results: dict[str, SourceResult]) -> pl.DataFrame:
    return pl.concat([r.good for r in results.values()], how="vertical")


def trace_stats(df: pl.DataFrame) -> list[dict]:
    lab = pl.col("labels")
    return (
        df.group_by(
            "dataset",
            lab.struct.field("category").alias("category"),
            lab.struct.field("priority_class").alias("priority_class"),
        )
        .agg(
            pl.len().alias("n"),
            lab.struct.field("attack_present").sum().alias("attacked"),
            lab.struct.field("attack_succeeded").sum().alias("succeeded"),
        )
        .sort("dataset", "category", "priority_class")
        .to_dicts()
    )


@dg.asset(
    ins=RAW_INS,
    group_name=ETL_A_GROUP,
    kinds={"polars"},
    tags=cpu_tags("B"),
    description="Every record ETL_A rejected: dataset, file, line, field, reason, severity, raw text.",
)
def quarantine(context: dg.AssetExecutionContext, **raws: SourceResult) -> pl.DataFrame:
    parts = [r.rejected for r in raws.values() if r.rejected.height]
    df = pl.concat(parts, how="vertical") if parts else empty_quarantine()
    validate_or_fail(QuarantineModel, df, "quarantine")
    context.add_output_metadata(
        {
            "by_dataset": dg.MetadataValue.json(dict(df.group_by("dataset").len().sort("dataset").iter_rows())),
            "by_reason": dg.MetadataValue.json(
                df.group_by("reason").len().sort("len", descending=True).head(20).to_dicts()
            ),
        }
    )
    return df


@dg.asset(
    ins=RAW_INS,
    # Rejects are recorded before the tier is published, and `--select +traces` materializes both.
    deps=["quarantine"],
    group_name=ETL_A_GROUP,
    kinds={"polars"},
    tags=cpu_tags("B"),
    description="trace_v1: one row per conversation from every selected source (skeleton or complete).",
)
def traces(context: dg.AssetExecutionContext, datasets: DatasetsResource, **raws: SourceResult) -> pl.DataFrame:
    try:
        selected = datasets.selection().selected
    except ValueError as err:  # ConfigError: the raw assets report it too
        raise dg.Failure(str(err)) from err
    mismatch = selection_mismatch(raws, selected)
    if mismatch:
        raise dg.Failure(mismatch)
    df = combine_traces(raws)
    if df.height == 0:
        raise dg.Failure("traces: every selected source produced zero traces (empty tier); nothing written")
    validate_or_fail(TraceModel, df, "traces")  # unique ids across sources included
    context.add_output_metadata(
        {
            "by_dataset": dg.MetadataValue.json(
                dict(df.group_by("dataset").len().sort("dataset").iter_rows())
            ),
            "stats": dg.MetadataValue.json(trace_stats(df)),
            "skeleton": df.filter(pl.col("completeness") == "skeleton").height,
            "complete": df.filter(pl.col("completeness") == "complete").height,
        }
    )
    return df


# ----------------------------------------------------------------------------- blocking checks on traces
@dg.asset_check(asset=traces, blocking=True, description="trace_v1 schema (pandera TraceModel)")
def traces_schema(traces: pl.DataFrame) -> dg.AssetCheckResult:
    return pandera_check(TraceModel, traces)


@dg.asset_check(asset=traces, blocking=True, description="ids are unique")
def traces_unique_ids(traces: pl.DataFrame) -> dg.AssetCheckResult:
    return rows_check(traces, pl.col("id").is_duplicated(), "duplicate trace ids", verified="every trace id is unique")


@dg.asset_check(
    asset=traces,
    blocking=True,
    description="label sanity: succeeded implies attacked; harmful implies attacked; adversarial-safe implies "
    "attacked and no attacker call; in a complete trace an injection never reached is no attack",
)
def traces_label_sanity(traces: pl.DataFrame) -> dg.AssetCheckResult:
    lab = pl.col("labels")
    attacked = lab.struct.field("attack_present").fill_null(False)
    succeeded = lab.struct.field("attack_succeeded").fill_null(False)
    bad = (
        (succeeded & ~attacked)
        | ((lab.struct.field("category") == "harmful") & ~attacked)
        | (lab.struct.field("is_adversarial_safe").fill_null(False)
           & (~attacked | lab.struct.field("attacker_call_made").fill_null(False)))
        # a complete trace whose run never read the injection is no attack (null: none configured); a
        # skeleton's context is rebuilt with the injection in it, whatever the original run retrieved
        | ((lab.struct.field("injection_reached") == False) & attacked  # noqa: E712
           & (pl.col("completeness") == "complete"))
    )
    result = rows_check(traces, bad, "rows violating label sanity",
                        verified="every row's labels are consistent")
    counts = traces.select(attacked.sum().alias("attacked"), succeeded.sum().alias("succeeded")).row(0, named=True)
    return dg.AssetCheckResult(
        passed=result.passed and counts["succeeded"] <= counts["attacked"],
        description=result.description,
        metadata={**result.metadata, **{k: int(v) for k, v in counts.items()}},
    )


@dg.asset_check(asset=quarantine, blocking=False, description="quarantine schema (pandera QuarantineModel)")
def quarantine_schema(quarantine: pl.DataFrame) -> dg.AssetCheckResult:
    return pandera_check(QuarantineModel, quarantine)
