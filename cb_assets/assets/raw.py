"""Tier A: one asset per source, each the source's records as trace_v1 rows plus its rejected records."""

import dagster as dg
import polars as pl

from cb_assets.resources import DatasetsResource
from cb_assets.tags import cpu_tags
from cb_assets.validation import keep_rejects, validate_or_fail
from cb_core.config import SOURCE_ENV, ConfigError, resolve_source_paths
from cb_core.schemas import DATASETS, QuarantineModel, TraceModel, empty_quarantine, empty_traces
from cb_core.sources import SourceResult
from cb_core.sources.load import SourceLoadError, read_source

RAW_GROUP = "raw"


def source_path(dataset: str, datasets: DatasetsResource) -> str | None:
    """The path a source reads from: configured path, or the embedded demo sample in demo mode."""
    sel = datasets.selection()
    if dataset not in sel.selected:
        return None
    if sel.demo:
        from cb_core.sources.demo import write_demo_sources

        return str(write_demo_sources(datasets.data_root() / "demo_sources")[dataset])
    return sel.path_for(dataset)


def _fail_keeping(what: str, message: str, rejected: pl.DataFrame, metadata: dict | None = None) -> dg.Failure:
    """A failure that loses nothing: any rejected rows go to _failed/ and the message says where."""
    metadata = dict(metadata or {})
    if rejected.height:
        kept = keep_rejects(what, rejected)
        message += f"; rejected rows kept in {kept}"
        metadata["rejected_rows_file"] = dg.MetadataValue.path(str(kept))
    return dg.Failure(message, metadata=metadata)


def load_source(dataset: str, datasets: DatasetsResource, log=None) -> tuple[SourceResult, dict]:
    """Read one source (`cb_core.sources.load.read_source`: every whole-source rule) and return it with its
    asset metadata. Fails (nothing written, the previous table kept, rejected rows kept in _failed/) on a config
    problem, an unreadable or empty source, or too many malformed records."""
    try:
        spec = source_path(dataset, datasets)
        cfg_all = datasets.config()
    except ConfigError as err:
        raise dg.Failure(str(err)) from err
    if spec is None:
        meta = {"selected": False, "note": f"{dataset} not in CB_DATASETS; empty table"}
        return SourceResult(empty_traces(), empty_quarantine()), meta
    paths = resolve_source_paths(spec)
    head = {"selected": True, "demo": datasets.selection().demo,
            "source_files": dg.MetadataValue.json([str(p) for p in paths[:50]]), "source": spec}
    try:
        result, stats = read_source(dataset, spec, paths, getattr(cfg_all, dataset), cfg_all.max_reject_fraction)
    except SourceLoadError as err:
        meta = {**head, **{k: (dg.MetadataValue.json(v) if isinstance(v, (list, dict)) else v)
                           for k, v in err.meta.items() if k != "seconds"}}
        raise _fail_keeping(f"raw_{dataset}", str(err), err.rejected if err.rejected is not None
                            else empty_quarantine(), meta) from err
    secs = stats.pop("seconds")
    stats["reject_reasons"] = dg.MetadataValue.json(stats["reject_reasons"])
    validate_or_fail(TraceModel, result.good, f"raw_{dataset}")
    validate_or_fail(QuarantineModel, result.rejected, f"raw_{dataset} quarantine")
    if log:
        log.info(f"{dataset}: {result.good.height} traces, {result.rejected.height} rejected in {secs:.2f}s")
    return result, {**head, **stats}


def _raw_asset(dataset: str) -> dg.AssetsDefinition:
    @dg.asset(
        name=f"raw_{dataset}",
        group_name=RAW_GROUP,
        kinds={"polars"},
        tags=cpu_tags("A"),
        description=f"Tier A `{dataset}` records as trace_v1 rows (+ `.rejected.parquet` with quarantined "
        f"records). Path: ${SOURCE_ENV[dataset]} or configs/datasets.yaml.",
    )
    def _asset(context: dg.AssetExecutionContext, datasets: DatasetsResource) -> SourceResult:
        result, meta = load_source(dataset, datasets, context.log)
        context.add_output_metadata(meta)
        return result

    return _asset


raw_assets = [_raw_asset(ds) for ds in DATASETS]
