"""Tier A: one asset per source, each the source's records as trace_v1 rows plus its rejected records."""

import time

import dagster as dg
import polars as pl

from cb_assets.resources import DatasetsResource
from cb_assets.tags import cpu_tags
from cb_assets.validation import keep_rejects, stop_the_line, validate_or_fail
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


def _fail_keeping(what: str, message: str, rejected: pl.DataFrame, metadata: dict | None = None) -> dg.Failure:
    """A failure that loses nothing: any rejected rows go to _failed/ and the message says where."""
    metadata = dict(metadata or {})
    if rejected.height:
        kept = keep_rejects(what, rejected)
        message += f"; rejected rows kept in {kept}"
        metadata["rejected_rows_file"] = dg.MetadataValue.path(str(kept))
    return dg.Failure(message, metadata=metadata)


def load_source(dataset: str, datasets: DatasetsResource, log=None) -> tuple[SourceResult, dict]:
    """Read one source with stop-the-line validation; returns the result and its asset metadata.
    Fails (nothing written, the previous table kept) on a config problem, an unreadable file, a file
    problem reported as a line-0 quarantine row, an empty source, or too many malformed records."""
    what = f"raw_{dataset}"
    try:
        spec = source_path(dataset, datasets)
        cfg_all = datasets.config()
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
    empty_files = [str(p) for p in paths if p.stat().st_size == 0]
    if empty_files:
        raise dg.Failure(
            f"{dataset}: {', '.join(empty_files)} is empty (0 bytes); an empty source would wipe its traces; "
            f"nothing written, the previous {what} table is kept. Fix or remove the file, or drop {dataset} "
            f"from CB_DATASETS"
        )
    cfg = getattr(cfg_all, dataset)
    t0 = time.perf_counter()
    try:
        result = get_reader(dataset)(paths, cfg)
    except SourceError as err:
        named = [f"{k} {v}" for k, v in (("file", err.file), ("field", err.field)) if v and v not in str(err)]
        raise _fail_keeping(
            what, f"{dataset}: {err}" + (f" ({', '.join(named)})" if named else "") + "; nothing written",
            err.rejected_frame(), {"file": err.file or "", "field": err.field or ""},
        ) from err
    except (ConfigError, FileNotFoundError) as err:
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
        "source_files": dg.MetadataValue.json([str(p) for p in paths[:50]]),
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
    whole_file = result.rejected.filter((pl.col("line") <= 0) & (pl.col("severity") == "malformed"))
    if whole_file.height:
        first = whole_file.row(0, named=True)
        field = f", field '{first['field']}'" if first["field"] else ""
        raise _fail_keeping(
            what,
            f"{dataset}: {first['file']}{field}: {first['reason']} (the whole file is unreadable, "
            f"{whole_file.height} such file(s)); nothing written",
            result.rejected, meta,
        )
    if result.good.height == 0:
        files = ", ".join(str(p) for p in paths[:5]) + (" ..." if len(paths) > 5 else "")
        found = (f"all {result.rejected.height} record(s) rejected" if result.rejected.height
                 else "no record (empty or header-only file?)")
        raise _fail_keeping(
            what,
            f"{dataset}: {files}: {found}; a selected source with zero traces would wipe its traces; nothing "
            f"written, the previous {what} table is kept. Fix the input or drop {dataset} from CB_DATASETS",
            result.rejected, meta,
        )
    stop_the_line(what, result.n_records, result.rejected, cfg_all.max_reject_fraction, meta)
    if log:
        log.info(f"{dataset}: {result.good.height} traces, {result.rejected.height} rejected in {secs:.2f}s")
    return result, meta


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
