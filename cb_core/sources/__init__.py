"""Tier A readers: one module per source, each `read(paths, cfg) -> SourceResult`.

A reader never drops a record silently: every record becomes either a trace_v1 row or a quarantine row
with the file, line, field and reason.
"""
from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import polars as pl

from cb_core import forking
from cb_core.schemas import QUARANTINE_SCHEMA, SOURCES, TRACE_SCHEMA


_TRACE_ARROW = None


def trace_frame(rows: list[dict]) -> pl.DataFrame:
    """trace_v1 rows (dicts) -> frame through Arrow's row converter: several times faster than
    ``pl.DataFrame(rows, schema=TRACE_SCHEMA)`` on the nested message/label structs, same frame."""
    global _TRACE_ARROW
    if not rows:
        return pl.DataFrame(schema=TRACE_SCHEMA)
    import pyarrow as pa

    if _TRACE_ARROW is None:
        _TRACE_ARROW = pl.DataFrame(schema=TRACE_SCHEMA).to_arrow().schema
    return pl.from_arrow(pa.Table.from_pylist(rows, schema=_TRACE_ARROW)).cast(TRACE_SCHEMA)


@dataclass
class SourceResult:
    good: pl.DataFrame  # trace_v1 rows
    rejected: pl.DataFrame  # quarantine rows
    meta: dict[str, Any] = field(default_factory=dict)  # counts for asset metadata (e.g. header_lines)

    @classmethod
    def from_rows(cls, good: list[dict], rejected: list[dict], **meta: Any) -> "SourceResult":
        return cls(
            good=trace_frame(good),
            rejected=pl.DataFrame(rejected, schema=QUARANTINE_SCHEMA),
            meta=meta,
        )

    @property
    def n_records(self) -> int:
        return self.good.height + self.rejected.height

    @property
    def reject_fraction(self) -> float:
        return self.rejected.height / self.n_records if self.n_records else 0.0


class SourceError(ValueError):
    """A whole source (or one whole file of it) is unusable: missing file, unreadable header, a column or
    key every record needs. The message names the file and what to fix; `file`/`field` repeat them for
    the asset metadata, and `rejected` (quarantine rows, optional) holds records already rejected, which
    the asset keeps in `_failed/` so nothing is lost. Never a line-0 quarantine row: that would let the
    run pass with the whole file gone."""

    def __init__(self, message: str, *, file: str | Path | None = None, field: str | None = None,
                 rejected: list[dict] | pl.DataFrame | None = None):
        super().__init__(message)
        self.file = str(file) if file is not None else None
        self.field = field
        self.rejected = rejected

    def rejected_frame(self) -> pl.DataFrame:
        r = self.rejected
        if r is None:
            return pl.DataFrame(schema=QUARANTINE_SCHEMA)
        return r if isinstance(r, pl.DataFrame) else pl.DataFrame(r, schema=QUARANTINE_SCHEMA)


Reader = Callable[[list[Path], dict[str, Any]], SourceResult]

# dataset name -> module under cb_core.sources exposing `read(paths, cfg)` (the registry: cb_core.schemas.SOURCES)
READERS = {name: module for name, (module, _env) in SOURCES.items()}


def get_reader(dataset: str) -> Reader:
    """The source's ``read``, run with the cyclic garbage collector paused (`forking.gc_paused`: 20-35 %
    of AgentDojo's and TAU2's read time)."""
    read = importlib.import_module(f"cb_core.sources.{READERS[dataset]}").read

    @functools.wraps(read)
    def paused(paths: list[Path], cfg: dict[str, Any]) -> SourceResult:
        with forking.gc_paused():
            return read(paths, cfg)

    return paused
