"""Helpers every Tier A reader shares (one copy each): the trace builder for rows that offer one tool set,
file names relative to the folder given, CSV records with their exact bytes, and the wording of errors."""
from __future__ import annotations

import csv
import io
import json
import os
import re
from pathlib import Path
from typing import Any

import msgspec
import orjson
import polars as pl

from cb_core.schemas import LONE_SURROGATE as _LONE, lone_surrogate, make_trace
from cb_core.sources import SourceError, SourceResult

WIPE = "; an empty source would wipe its traces"  # the tail of every "no record" SourceError
SURROGATE = re.compile("[\udc80-\udcff]")  # invalid UTF-8 read with surrogateescape
# the read buffer of a JSONL reader: records run to many kB (AgentDojo ~8 kB), and a line past the default
# 8 kB buffer is read in pieces and joined (iterating AgentDojo's 26 MB: 34 ms by default, 9 ms with this)
LINE_BUFFER = 1 << 20


class SharedToolsTraces:
    """`make_trace` for many rows that offer the same tools, whose rows may carry a short placeholder instead of
    the tools JSON: building the frame from thousands of copies of a large string dominates a reader's time;
    `fill_tools` swaps the real JSON in afterwards. The id is make_trace's (the tools part is encoded once per
    tool set there); a test checks the rows equal make_trace's."""

    def __init__(self, dataset: str, tools_json: str, placeholder: str | None = None):
        self.dataset = dataset
        self.tools_json = tools_json
        self.placeholder = placeholder

    def __call__(self, **fields) -> dict:
        row = make_trace(dataset=self.dataset, tools=self.tools_json, **fields)
        if self.placeholder is not None:
            row["tools"] = self.placeholder
        return row


def fill_tools(result: SourceResult, tools_by_placeholder: dict[str, str]) -> SourceResult:
    """Replace `tools` placeholders (see SharedToolsTraces) with the real tools JSON, column-wise."""
    if result.good.height:
        result.good = result.good.with_columns(
            pl.col("tools").replace_strict(tools_by_placeholder, return_dtype=pl.String)
        )
    return result


def relative_names(paths: list[Path]) -> dict[Path, str]:
    """Each file's path relative to the folder the files were given from (their common parent): the part of
    `source_locator` that survives copying the data elsewhere."""
    files = [Path(p).resolve() for p in paths]
    if not files:
        return {}
    root = Path(os.path.commonpath([str(f.parent) for f in files]))
    return {Path(p): f.relative_to(root).as_posix() for p, f in zip(paths, files)}


FIELD_LIMIT = 2**31 - 1  # the csv module's largest field: any field a file can hold


def strip_bom(data: bytes) -> bytes:
    """A file's bytes without a leading UTF-8 byte order mark (editors on Windows write one; it is not data)."""
    return data[3:] if data.startswith(b"\xef\xbb\xbf") else data


def read_csv_records(path: Path, expected: str) -> tuple[list[str], list[tuple[int, list[str], bytes]]]:
    """(header, [(physical start line, fields, the record's exact bytes or None)]). Invalid UTF-8 survives
    as surrogate escapes (the bytes are recovered exactly); the bytes are given only for a record holding
    some (None for the rest: slicing and re-encoding every record was a tenth of LLMail's read). Broken
    quoting -> SourceError naming the line. ``expected``: what the file should hold, for the message on an
    empty file."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SourceError(f"cannot read {path}: {e}", file=path) from e
    data = strip_bom(data)
    if not data.strip():
        raise SourceError(f"{path} is empty (no record){WIPE}: expected a header and {expected}", file=path)
    try:  # valid UTF-8 (the usual case) needs no scan for escaped bytes
        text, dirty = data.decode("utf-8"), False
    except UnicodeDecodeError:
        text = data.decode("utf-8", "surrogateescape")
        dirty = True  # not valid UTF-8 somewhere
    lines = io.StringIO(text, newline="").readlines()
    if csv.field_size_limit() < FIELD_LIMIT:  # the default 128 kB would fail a file over one long e-mail
        csv.field_size_limit(FIELD_LIMIT)
    reader = csv.reader(lines, strict=True)
    records: list[tuple[int, list[str], bytes]] = []
    header: list[str] | None = None
    prev = 0
    while True:
        start = prev + 1
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise SourceError(f"{path}: broken CSV in the record starting at line {start} (read up to line "
                              f"{reader.line_num}): {e}", file=path) from None
        end, prev = reader.line_num, reader.line_num
        if not fields:  # blank line
            continue
        if header is None:
            header = [h.strip() for h in fields]
            continue
        raw = None
        if dirty:
            record = "".join(lines[start - 1:end])
            if SURROGATE.search(record):
                raw = record.encode("utf-8", "surrogateescape")
        records.append((start, fields, raw))
    if header is None:
        raise SourceError(f"{path} has no header line", file=path)
    return header, records


def record_json(obj: Any, strict: bool = True) -> str:
    """A parsed record as JSON text for a quarantine row's ``raw`` (key order and UTF-8 kept): orjson, ~10x
    ``json.dumps``. ``json.dumps`` where orjson refuses the value (lone surrogates, ints beyond 64 bits) or
    where the file held NaN/Infinity (``strict=False``: orjson would write them as null)."""
    if strict:
        try:
            return orjson.dumps(obj).decode()
        except TypeError:  # orjson.JSONEncodeError
            pass
    text = json.dumps(obj, ensure_ascii=False, default=str)
    # a lone surrogate stays a \u escape: the row must be storable as UTF-8
    return json.dumps(obj, default=str) if _LONE.search(text) else text


_DECODE = msgspec.json.Decoder().decode


class UnstorableText(ValueError):
    """Valid JSON, but the string at ``field`` holds a lone surrogate escape: quarantined naming that field."""

    def __init__(self, field: str):
        self.field = field
        super().__init__(f"the string at {field or 'the top level'} holds a lone surrogate escape (\\ud800-\\udfff "
                         "without its pair): not a character, no UTF-8 text can store it")


def json_reason(e: ValueError) -> tuple[str, str]:
    """(field, reason) for a quarantine row of a record `json_loads` refused."""
    return (e.field, str(e)) if isinstance(e, UnstorableText) else ("", f"invalid JSON: {e}")


def json_loads(data: bytes | str) -> Any:
    """``json.loads``: its values and its errors. msgspec decodes (1.4x faster on AgentDojo lines; the same
    values, floats and big ints included: tested); what msgspec refuses (invalid JSON or UTF-8, NaN/Infinity,
    a BOM, lone surrogates, deep nesting) goes through ``json.loads``, which returns the value or raises
    its own error, so quarantine reasons read as before. Two values ``json.loads`` would return or raise
    as something else become ``ValueError``s a reader quarantines like any bad line: nesting past the
    recursion limit, and a string with a lone surrogate escape (`UnstorableText`, naming where)."""
    try:
        return _DECODE(data)
    except (msgspec.DecodeError, RecursionError):
        pass
    try:
        value = json.loads(data)
    except RecursionError:
        raise ValueError("invalid JSON: nested deeper than the parser's recursion limit") from None
    where = lone_surrogate(value)
    if where is not None:
        raise UnstorableText(where)
    return value
