"""Watching the Tier A source files: the source sensor's pure decision step (no Dagster here).

Per file: size, mtime and a SHA-256 of the content, kept in a JSON cursor; the content is re-hashed only when
size or mtime moved. A dataset's fingerprint is the hash of its (path, size, sha256) list, so a file added,
removed or edited changes it and a bare `touch` does not. `evaluate_sources` turns (cursor, source specs, now)
into (new cursor, datasets to fire for, notes) with the baseline / settle / max-wait rules that
`cb_assets.automation.source_sensor` documents.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from cb_core.config import resolve_source_paths

MISSING = "<missing>"
CURSOR_VERSION = 1
_HASH_CHUNK = 1 << 20


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def watched_files(spec: str) -> list[Path]:
    """The files a source spec stands for, as its reader may read them: a folder with everything below it
    (readers look into subfolders: XSTest's `completions/`, TAU2's `domains/<d>/tasks.json`, LLMail's
    `emails/`), hidden files aside; a file or glob as `resolve_source_paths` gives it."""
    p = Path(spec).expanduser()
    if p.is_dir():
        return sorted(x for x in p.rglob("*") if x.is_file()
                      and not any(part.startswith(".") for part in x.relative_to(p).parts))
    return resolve_source_paths(spec)


def scan_sources(
    specs: dict[str, str], known: dict[str, list]
) -> tuple[dict[str, dict[str, list]], dict[str, str], list[str]]:
    """Stat (and, where size/mtime moved, hash) every file of every source.

    Returns ({dataset: {path: [size, mtime_ns, sha256]}}, {dataset: fingerprint}, [notes]); a dataset that
    matches no file gets the fingerprint MISSING. Files that vanish mid-scan are skipped, never raised.
    """
    files: dict[str, dict[str, list]] = {}
    fps: dict[str, str] = {}
    notes: list[str] = []
    for ds, spec in sorted(specs.items()):
        entries: dict[str, list] = {}
        try:
            paths = watched_files(spec)
        except OSError as err:
            notes.append(f"{ds}: cannot list {spec}: {err}")
            paths = []
        for p in paths:
            key = str(p)
            try:
                st = p.stat()
                prev = known.get(key)
                if prev and prev[0] == st.st_size and prev[1] == st.st_mtime_ns and prev[2]:
                    digest = prev[2]
                else:
                    digest = _sha256(p)
                entries[key] = [st.st_size, st.st_mtime_ns, digest]
            except OSError as err:  # vanished between listing and reading, or unreadable
                notes.append(f"{ds}: {key} vanished or unreadable during the scan ({err.__class__.__name__})")
        files[ds] = entries
        if entries:
            blob = "\n".join(f"{p}\t{v[0]}\t{v[2]}" for p, v in sorted(entries.items()))
            fps[ds] = hashlib.sha256(blob.encode()).hexdigest()
        else:
            fps[ds] = MISSING
    return files, fps, notes


def load_cursor(raw: str | None) -> dict[str, Any] | None:
    if not raw:
        return None
    try:
        cur = json.loads(raw)
    except ValueError:
        return None
    return cur if isinstance(cur, dict) and cur.get("v") == CURSOR_VERSION else None


def evaluate_sources(
    cursor: dict[str, Any] | None,
    specs: dict[str, str],
    now: float,
    max_wait_s: float = 900.0,
) -> tuple[dict[str, Any], list[str], list[str]]:
    """Pure decision step of the sensor: (new cursor, datasets to fire for, notes for the skip reason/log)."""
    known = {p: v for ds_files in ((cursor or {}).get("files") or {}).values() for p, v in ds_files.items()}
    files, fps, notes = scan_sources(specs, known)

    for ds, prev_files in sorted(((cursor or {}).get("files") or {}).items()):
        if ds in files:
            gone = sorted(set(prev_files) - set(files[ds]))
            if gone:
                notes.append(f"{ds}: {len(gone)} file(s) vanished: {', '.join(gone[:3])}")
    missing = sorted(ds for ds, fp in fps.items() if fp == MISSING)
    for ds in missing:
        notes.append(f"{ds}: source path {specs[ds]!r} matches no file (vanished?); not fired")

    if cursor is None:
        new = {"v": CURSOR_VERSION, "files": files, "baseline": fps, "pending": {}, "pending_since": None,
               "fired": 0}
        n = sum(len(v) for v in files.values())
        notes.insert(0, f"baseline recorded: {n} file(s) in {len(fps)} source(s); later changes trigger runs")
        return new, [], notes

    baseline = dict(cursor.get("baseline") or {})
    # A dataset that vanished keeps its baseline (fires when it comes back changed, not when it comes back same).
    files = {ds: (files[ds] if fps[ds] != MISSING else (cursor.get("files") or {}).get(ds, {})) for ds in files}
    changed = {ds: fp for ds, fp in fps.items() if fp != MISSING and baseline.get(ds) != fp}
    pending = dict(cursor.get("pending") or {})
    pending_since = cursor.get("pending_since")
    new = {"v": CURSOR_VERSION, "files": files, "baseline": baseline, "pending": {}, "pending_since": None,
           "fired": int(cursor.get("fired") or 0)}
    if not changed:
        notes.insert(0, f"no change in {sum(len(v) for v in files.values())} watched file(s)")
        return new, [], notes
    settled = changed == pending
    overdue = pending_since is not None and now - float(pending_since) >= max_wait_s
    if settled or overdue:
        baseline.update(changed)
        new["fired"] += 1
        why = "settled" if settled else f"still changing after {max_wait_s:.0f}s; firing anyway"
        notes.insert(0, f"change in {', '.join(sorted(changed))} ({why})")
        return new, sorted(changed), notes
    new["pending"] = changed
    new["pending_since"] = pending_since if pending else now
    notes.insert(0, f"change seen in {', '.join(sorted(changed))}; waiting one tick for it to settle")
    return new, [], notes
