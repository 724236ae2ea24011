"""Reading one configured source with every whole-source rule in one place (no Dagster here): missing or
empty files, a reader's whole-source error, whole-file quarantine rows, a source with zero traces, and the
stop-the-line fraction of malformed records. The `raw_<source>` assets call this and turn a `SourceLoadError`
into a failure that keeps the rejected rows; tests and scripts can call it directly.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import polars as pl

from cb_core.config import SOURCE_ENV, ConfigError, config_dir, display_path, located
from cb_core.schemas import stop_the_line
from cb_core.sources import SourceError, SourceResult, get_reader


class SourceLoadError(Exception):
    """A source that must not be written: the message names file, field and what to fix; ``rejected`` holds
    the records already quarantined (to be kept, never lost) and ``meta`` what was counted so far."""

    def __init__(self, message: str, rejected: pl.DataFrame | None = None, meta: dict | None = None):
        super().__init__(message)
        self.rejected = rejected
        self.meta = dict(meta or {})


def read_source(dataset: str, spec: str, paths: list[Path], cfg: Any, max_reject_fraction: float) -> tuple[SourceResult, dict]:
    """Run the source's reader on ``paths`` (resolved from ``spec``); returns the result and its counts
    (`records`, `traces`, `rejected`, ...). Raises `SourceLoadError` when the source must not be written."""
    what = f"raw_{dataset}"
    if not paths:
        env = SOURCE_ENV[dataset]
        origin = (f"from the environment variable {env}" if os.environ.get(env) else
                  f"from {located(display_path(config_dir() / 'datasets.yaml') + f': sources.{dataset}.path')}; "
                  f"fix it there or set {env}")
        raise SourceLoadError(f"{dataset}: path '{spec}' ({origin}) matches no file; give a file, folder or glob "
                              "(a relative path is taken from the project root)")
    empty_files = [str(p) for p in paths if p.stat().st_size == 0]
    if empty_files:
        raise SourceLoadError(
            f"{dataset}: {', '.join(empty_files)} is empty (0 bytes); an empty source would wipe its traces; "
            f"nothing written, the previous {what} table is kept. Fix or remove the file, or drop {dataset} "
            f"from CB_DATASETS")
    t0 = time.perf_counter()
    try:
        result = get_reader(dataset)(paths, cfg)
    except SourceError as err:
        named = [f"{k} {v}" for k, v in (("file", err.file), ("field", err.field)) if v and v not in str(err)]
        raise SourceLoadError(f"{dataset}: {err}" + (f" ({', '.join(named)})" if named else "") + "; nothing written",
                              err.rejected_frame(), {"file": err.file or "", "field": err.field or ""}) from err
    except (ConfigError, FileNotFoundError) as err:
        raise SourceLoadError(f"{dataset}: {err}") from err
    secs = time.perf_counter() - t0
    rej = result.rejected
    stats = {
        "files": len(paths),
        "records": result.n_records,
        "traces": result.good.height,
        "rejected": rej.height,
        "rejected_malformed": rej.filter(pl.col("severity") == "malformed").height,
        "reject_reasons": (rej.group_by("reason").len().sort("len", descending=True).head(10).to_dicts()
                           if rej.height else []),
        "records_per_s": round(result.n_records / secs, 1) if secs else 0.0,
        "seconds": secs,
        **{f"meta_{k}": v for k, v in result.meta.items() if isinstance(v, (int, float, str, bool))},
    }
    whole_file = rej.filter((pl.col("line") <= 0) & (pl.col("severity") == "malformed"))
    if whole_file.height:
        first = whole_file.row(0, named=True)
        field = f", field '{first['field']}'" if first["field"] else ""
        raise SourceLoadError(f"{dataset}: {first['file']}{field}: {first['reason']} (the whole file is unreadable, "
                              f"{whole_file.height} such file(s)); nothing written", rej, stats)
    if result.good.height == 0:
        files = ", ".join(str(p) for p in paths[:5]) + (" ..." if len(paths) > 5 else "")
        found = f"all {rej.height} record(s) rejected" if rej.height else "no record (empty or header-only file?)"
        raise SourceLoadError(
            f"{dataset}: {files}: {found}; a selected source with zero traces would wipe its traces; nothing "
            f"written, the previous {what} table is kept. Fix the input or drop {dataset} from CB_DATASETS",
            rej, stats)
    n_malformed, frac, stop = stop_the_line(result.n_records, rej, max_reject_fraction)
    if stop:
        malformed = rej.filter(pl.col("severity") == "malformed")
        examples = malformed.select("dataset", "file", "line", "field", "reason").head(5).to_dicts()
        by_field = malformed.group_by("field").len().sort(["len", "field"], descending=[True, False]).head(3).rows()
        first = examples[0] if examples else None
        why = "; by field: " + ", ".join(f"{f or '(whole line)'} {n}" for f, n in by_field) + (
            f"; e.g. {first['file']}:{first['line']} {first['field'] or '(line)'}: {first['reason']}" if first else "")
        raise SourceLoadError(f"{what}: {n_malformed}/{result.n_records} rows malformed ({frac:.1%} > "
                              f"{max_reject_fraction:.0%} stop-the-line){why}; nothing written", rej,
                              {**stats, "stop_the_line": True, "examples": examples})
    return result, stats
