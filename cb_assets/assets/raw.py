"""Tier A: one asset per source, each the source's records as trace_v1 rows plus its rejected records."""

import time

import dagster as dg
import polars as pl

from cb_assets.resources import DatasetsResource
from cb_assets.validation import stop_the_line, validate_or_fail
from cb_core.config import SOURCE_ENV, ConfigError, resolve_source_paths
from cb_core.schemas import DATASETS, QuarantineModel, TraceModel, empty_quarantine, empty_traces
from cb_core.sources import SourceError, SourceResult, get_reader

RAW_GROUP = "raw"


def source_path(dataset: str, datasets: DatasetsResource) -> str | None:
    """The path a source reads from: configured path, or the embedded demo sample in demo mode."""
    sel = datasets.selection()
    if dataset not in sel.selected:
        return None
    if sel.demo:
        from cb_core.demo import write_demo_sources

        return str(write_demo_sources(datasets.data_root() / "demo_sources")[dataset])
    return sel.path_for(dataset)


def load_source(dataset: str, datasets: DatasetsResource, log=None) -> tuple[SourceResult, dict]:
    """Read one source with stop-the-line validation; returns the result and its asset metadata."""
    try:
        spec = source_path(dataset, datasets)
    except ConfigError as err:
        raise dg.Failure(str(err)) from err
    if spec is None:
        meta = {"selected": False, "note": f"{dataset} not in CB_DATASETS; empty table"}
        return SourceResult(empty_traces(), empty_quarantine()), meta
    paths = resolve_source_paths(spec)
    if not paths:
        raise dg.Failure(
            f"{dataset}: path '{spec}' matches no file; set {SOURCE_ENV[dataset]} to a file, folder or glob"
        )
    cfg = getattr(datasets.config(), dataset)
    t0 = time.perf_counter()
    try:
        result = get_reader(dataset)(paths, cfg)
    except (SourceError, ConfigError, FileNotFoundError) as err:
        raise dg.Failure(f"{dataset}: {err}") from err
    secs = time.perf_counter() - t0
    validate_or_fail(TraceModel, result.good, f"raw_{dataset}")
    validate_or_fail(QuarantineModel, result.rejected, f"raw_{dataset} quarantine")

    reasons = (
        result.rejected.group_by("reason").len().sort("len", descending=True).head(10).to_dicts()
        if result.rejected.height
        else []
    )
    meta = {
        "selected": True,
        "demo": datasets.selection().demo,
        "source": spec,
        "files": len(paths),
        "records": result.n_records,
        "traces": result.good.height,
        "rejected": result.rejected.height,
        "rejected_malformed": result.rejected.filter(pl.col("severity") == "malformed").height,
        "reject_reasons": dg.MetadataValue.json(reasons),
        "records_per_s": round(result.n_records / secs, 1) if secs else 0.0,
        **{f"meta_{k}": v for k, v in result.meta.items() if isinstance(v, (int, float, str, bool))},
    }
    stop_the_line(
        f"raw_{dataset}", result.n_records, result.rejected, datasets.config().max_reject_fraction, meta
    )
    if log:
        log.info(f"{dataset}: {result.good.height} traces, {result.rejected.height} rejected in {secs:.2f}s")
    return result, meta


def _raw_asset(dataset: str) -> dg.AssetsDefinition:
    @dg.asset(
        name=f"raw_{dataset}",
        group_name=RAW_GROUP,
        kinds={"polars"},
        tags={"cb/tier": "A", "cb/compute": "cpu"},
        description=f"Tier A `{dataset}` records as trace_v1 rows (+ `.rejected.parquet` with quarantined "
        f"records). Path: ${SOURCE_ENV[dataset]} or configs/datasets.yaml.",
    )
    def _asset(context: dg.AssetExecutionContext, datasets: DatasetsResource) -> SourceResult:
        result, meta = load_source(dataset, datasets, context.log)
        context.add_output_metadata(meta)
        return result

    return _asset


raw_assets = [_raw_asset(ds) for ds in DATASETS]
