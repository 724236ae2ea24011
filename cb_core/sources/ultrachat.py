"""UltraChat 200k (`HuggingFaceH4/ultrachat_200k`) -> complete retain traces (`general_conversation`).

Accepted shapes: Parquet files (`*.parquet`, e.g. the `train_sft` shards), or JSONL files (`*.jsonl`,
`*.ndjson`) with the same rows `{prompt, prompt_id, messages: [{role, content}]}`; a folder gives its
top-level files, other file types in it are skipped (counted in `meta["skipped_files"]`). A file named after an
UltraChat split (`train_sft`, `test_sft`, `train_gen`, `test_gen`: the HF dataset's `data/` shards) is read only
when `cfg["splits"]` (default `[train_sft]`) lists it: the test splits are UltraChat's held-out data, and a
sorted folder would otherwise give them first (skipped ones in `meta["skipped_splits"]`). A folder with no
readable file but a `data/` folder (the HF repository's root) reads that folder. `cfg["max_rows"]` caps the
number of rows read over all files (in file order; the rest is not read and not quarantined).

Each row -> one complete trace with no tools: its `messages` as they are (roles system/user/assistant).
subtype = the file's stem (e.g. `train_sft-00000-of-00003`), so a split's provenance stays visible.
pair_group = `ultrachat:<prompt_id>`; source_locator = the file's path relative to the folder given + row.
No row at all over the files read (empty file) fails the source (SourceError); a JSONL line that is not UTF-8
is quarantined with `raw = "base64:<bytes>"`.
Quarantined (file, 1-based row/line, field, reason, raw row as JSON): invalid JSON line, `messages` missing or
empty or not a list, a message that is not {role, content} with a known role and string content, a
conversation without any assistant turn or whose first turn is the assistant's. Excluded by policy (severity
"excluded"): a row with an empty user or assistant turn (an empty answer must not be trained as retain data).
Trailing user turns after the last answer are dropped (the trace ends on the assistant).
"""
from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any, Iterator

import polars as pl

from cb_core.schemas import digest, make_trace, message, reject
from cb_core.sources import SourceError, SourceResult
from cb_core.sources._common import LINE_BUFFER, WIPE, UnstorableText, json_loads, relative_names, strip_bom

DATASET = "ultrachat"
PARQUET = (".parquet", ".pq")
JSONL = (".jsonl", ".ndjson")
ROLES = ("system", "user", "assistant")


def _parquet_rows(path: Path, limit: int | None) -> Iterator[tuple[int, Any, str | None]]:
    try:
        cols = pl.read_parquet_schema(path)
    except (OSError, pl.exceptions.PolarsError) as e:
        raise SourceError(f"cannot read {path} as Parquet: {e}", file=path) from None
    if "messages" not in cols:
        raise SourceError(f"{path} has no 'messages' column (columns: {list(cols)})", file=path, field="messages")
    use = [c for c in ("prompt_id", "messages") if c in cols]
    try:  # a sound footer says nothing of the pages: a corrupt one fails here
        df = pl.read_parquet(path, columns=use, n_rows=limit)
    except (OSError, pl.exceptions.PolarsError) as e:
        raise SourceError(f"cannot read {path} as Parquet: {e}", file=path) from None
    for i, rec in enumerate(df.iter_rows(named=True), 1):
        yield i, rec, None


def _jsonl_rows(path: Path, limit: int | None) -> Iterator[tuple[int, Any, str | None]]:
    n = 0
    with open(path, "rb", buffering=LINE_BUFFER) as f:
        for i, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            if limit is not None and n >= limit:
                return
            n += 1
            if i == 1:
                raw = strip_bom(raw)
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                yield i, UnicodeError("line is not valid UTF-8; its bytes are kept as base64 in raw"), \
                    "base64:" + base64.b64encode(raw.rstrip(b"\r\n")).decode("ascii")
                continue
            try:
                yield i, json_loads(line), line
            except ValueError as e:
                yield i, e if isinstance(e, UnstorableText) else ValueError(f"invalid JSON: {e}"), line


def _check(msgs: Any) -> tuple[str, str] | None:
    if not isinstance(msgs, list):
        return ("messages", "'messages' is missing or not a list")
    if not msgs:
        return ("messages", "'messages' is empty")
    for j, m in enumerate(msgs):
        if not isinstance(m, dict):
            return (f"messages[{j}]", "message is not an object")
        if m.get("role") not in ROLES:
            return (f"messages[{j}].role", f"unknown role {m.get('role')!r}")
        if not isinstance(m.get("content"), str):
            return (f"messages[{j}].content", "content is not a string")
    roles = [m["role"] for m in msgs if m["role"] != "system"]
    if not roles or roles[0] != "user":
        return ("messages", "conversation does not start with a user turn")
    if "assistant" not in roles:
        return ("messages", "conversation has no assistant turn")
    return None


def _empty_turn(msgs: list[dict]) -> tuple[str, str] | None:
    """A turn with no text: an empty answer would be trained as retain behaviour (and an empty question is
    none). Excluded by policy, not malformed: the row is well formed."""
    for j, m in enumerate(msgs):
        if m["role"] != "system" and not m["content"].strip():
            return (f"messages[{j}].content", f"empty {m['role']} turn: not trained as retain data")
    return None


SPLITS = ("train_sft", "test_sft", "train_gen", "test_gen")
DEFAULT_SPLITS = ("train_sft",)


def _split_of(path: Path) -> str | None:
    return next((s for s in SPLITS if path.name.lower().startswith(s)), None)


def read(paths: list[Path], cfg: dict[str, Any]) -> SourceResult:
    cfg = cfg or {}
    paths = [Path(p) for p in paths]
    if paths and not any(p.suffix.lower() in PARQUET + JSONL for p in paths):
        data = {p.parent / "data" for p in paths if (p.parent / "data").is_dir()}
        if len(data) == 1:  # the HF repository's root: its shards are in data/
            paths = sorted(p for p in next(iter(data)).iterdir() if p.is_file())
    wanted = set(cfg.get("splits") or DEFAULT_SPLITS)
    skipped_splits = sorted({p.name for p in paths if _split_of(p) not in (None, *wanted)})
    paths = [p for p in paths if p.name not in skipped_splits]
    max_rows = cfg.get("max_rows")
    remaining = int(max_rows) if max_rows else None
    good: list[dict] = []
    bad: list[dict] = []
    skipped: list[str] = []
    files = 0
    n_records = 0
    rel = relative_names([Path(p) for p in paths])
    for path in paths:
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix in PARQUET:
            rows = _parquet_rows(path, remaining)
        elif suffix in JSONL:
            rows = _jsonl_rows(path, remaining)
        else:
            skipped.append(path.name)
            continue
        files += 1
        fname = str(path)
        subtype = path.stem
        for line, rec, raw in rows:
            if remaining is not None:
                if remaining <= 0:
                    break
                remaining -= 1
            n_records += 1
            if isinstance(rec, Exception):
                bad.append(reject(dataset=DATASET, file=fname, line=line, field=getattr(rec, "field", ""),
                                  reason=str(rec), raw=raw))
                continue
            msgs = rec.get("messages") if isinstance(rec, dict) else None
            problem = _check(msgs) if isinstance(rec, dict) else ("", f"row is a {type(rec).__name__}, not an object")
            pid = rec.get("prompt_id") if isinstance(rec, dict) else None
            if problem is None and pid is not None and not isinstance(pid, str):
                problem = ("prompt_id", f"prompt_id is a {type(pid).__name__}, not a string")
            severity = "malformed"
            if problem is None:
                problem, severity = _empty_turn(msgs), "excluded"
            if problem:
                bad.append(reject(dataset=DATASET, file=fname, line=line, field=problem[0], reason=problem[1],
                                  raw=raw if raw is not None else json.dumps(rec, ensure_ascii=False, default=str),
                                  severity=severity))
                continue
            while msgs[-1]["role"] == "user":  # a question left unanswered ends no conversation we can train
                msgs = msgs[:-1]
            good.append(
                make_trace(
                    dataset=DATASET,
                    source_locator=f"{rel[path]}:{line}",
                    completeness="complete",
                    messages=[message(m["role"], m["content"]) for m in msgs],
                    tools=None,
                    category="retain",
                    priority_class="general_conversation",
                    subtype=subtype,
                    # the task identity: UltraChat's prompt_id (else the first user turn)
                    pair_group=f"{DATASET}:" + (pid or digest(next(m["content"] for m in msgs
                                                                  if m["role"] == "user"))),
                )
            )
        if remaining is not None and remaining <= 0:
            break
    if files == 0:
        only = f" (skipped as splits not in ultrachat.splits {sorted(wanted)}: {skipped_splits})" if skipped_splits else ""
        raise SourceError(
            f"no .parquet or .jsonl file among {[str(p) for p in paths]}{only} (set CB_ULTRACHAT_PATH)"
        )
    if n_records == 0:
        read_files = [str(p) for p in paths if Path(p).suffix.lower() in PARQUET + JSONL]
        raise SourceError(f"{', '.join(read_files)}: no rows (empty file, no record){WIPE}",
                          file=read_files[0])
    return SourceResult.from_rows(good, bad, files=files, skipped_files=skipped, skipped_splits=skipped_splits,
                                  max_rows=max_rows)
