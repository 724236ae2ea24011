"""Fujitsu B4 orchestrator tool-flip attacks (JSONL) -> trace_v1 skeletons.

Accepted shapes: one or more JSONL files (a file, a folder of files or a glob; `resolve_source_paths` does
that). Each line is one record with `attack_id`, `category`, `subtype`, `benign_query`,
`malicious_injection`, `combined_query`, `expected_tool`, `simulated_tool`, `success`, ... (see the data
README). Blank lines are skipped and counted in `meta["blank_lines"]`.

Each good record becomes a **skeleton** trace:
  messages = [system (from the tool-schema file), user = `combined_query`], tools = the schema file's tools.
  labels: harmful / `harmful_flip` when `success` is true (the real set holds successful attacks only);
  a record with `success == false` is retain / `injection_resisted`. attack_present is always true.
  tool_attack: expected_tool, attacker_tool = simulated_tool, injection_text, injection_span
  {message_index: 1 (the user message), char_start, char_end} into `combined_query`.
  Span: where `malicious_injection` occurs in `combined_query`; when it is "" or not found there, the part of
  `combined_query` that differs from `benign_query` (common prefix and suffix trimmed), and injection_text is
  then that differing text. No difference at all -> span null, injection_text "".
  subtype = `subtype` (else `category`); pair_group = `fujitsu_b4:` + digest of `benign_query` (the task
  identity: every attack built on one benign query is one group; DS/DR twins generated later inherit it);
  tools = the schema file's FULL tool set for every record (never derived from the record's tools);
  injection_reached = True (the injection is in the user message); source_locator = the file's path relative
  to the folder the files were given from, so ids survive copying the data.

Quarantined (file, 1-based line, field, reason, raw line): invalid JSON / not an object (field ""), a line
that is not UTF-8 (raw = `base64:` of its bytes), a missing or empty required field (field = its name), a
badly typed field (`success` not a boolean, `expected_tool` a list, a non-string query: field = its name), a
tool name outside the schema (field `expected_tool` / `simulated_tool`). A file with no record at all (0 bytes,
blank lines only) fails the source (SourceError naming it).

cfg keys (configs/datasets.yaml `fujitsu_b4:`): `tool_schema` (path of the schema JSON), `required_fields`.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import polars as pl

from cb_core.config import config_path
from cb_core.schemas import BadRecord, canonical_json, digest, message, reject
from cb_core.sources import SourceError, SourceResult

_WIPE = "; an empty source would wipe its traces"
DATASET = "fujitsu_b4"
DEFAULT_SCHEMA = "configs/tool_schemas/b4_standard_v1.json"
DEFAULT_REQUIRED = ("combined_query", "expected_tool", "simulated_tool", "success")


_enc = json.JSONEncoder(sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode


class SharedToolsTraces:
    """`make_trace` for many rows that offer the same tools, without re-encoding the (large) tools JSON into
    every row's id hash. Produces exactly the row `make_trace` produces (same id, same fields; a test checks
    it): the id is sha256 of the canonical JSON list [dataset, locator, messages, tools_json, tool_attack],
    and a list's canonical JSON is its items' canonical JSON joined, so the tools part is encoded once."""

    def __init__(self, dataset: str, tools_json: str, placeholder: str | None = None):
        from cb_core import INGEST_VERSION

        self.dataset = dataset
        self.tools_json = tools_json
        # rows may carry a short placeholder instead of the tools JSON: building the frame from thousands of
        # copies of a large string dominates the reader's time; `fill_tools` swaps the real JSON in afterwards
        self.placeholder = placeholder
        self._head = "[" + _enc(dataset) + ","
        self._tools = "," + _enc(tools_json) + ","
        self._provenance = {"ingest_version": INGEST_VERSION, "tool_schema_digest": digest(tools_json, 16)}

    def __call__(self, *, source_locator: str, completeness: str, messages: list[dict], category: str,
                 priority_class: str, subtype: str = "", attack_present: bool = False,
                 attack_succeeded: bool = False, is_adversarial_safe: bool = False,
                 attacker_call_made: bool = False, injection_reached: bool | None = None,
                 task_success: bool | None = None, tool_attack: dict | None = None,
                 pair_group: str | None = None, generation_params: dict | None = None) -> dict:
        if tool_attack is not None:
            args = tool_attack.get("attacker_args")
            tool_attack = {
                "expected_tool": tool_attack.get("expected_tool"),
                "attacker_tool": tool_attack.get("attacker_tool"),
                "attacker_args": args if isinstance(args, (str, type(None))) else _enc(args),
                "injection_text": tool_attack.get("injection_text"),
                "injection_span": tool_attack.get("injection_span"),
                "injection_spans": tool_attack.get("injection_spans")
                or ([tool_attack["injection_span"]] if tool_attack.get("injection_span") else []),
            }
        text = self._head + _enc(source_locator) + "," + _enc(messages) + self._tools + _enc(tool_attack) + "]"
        tid = hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]
        return {
            "id": tid,
            "dataset": self.dataset,
            "source_locator": source_locator,
            "completeness": completeness,
            "messages": messages,
            "tools": self.placeholder if self.placeholder is not None else self.tools_json,
            "labels": {
                "category": category,
                "priority_class": priority_class,
                "subtype": subtype,
                "attack_present": attack_present,
                "attack_succeeded": attack_succeeded,
                "is_adversarial_safe": is_adversarial_safe,
                "attacker_call_made": attacker_call_made,
                "injection_reached": injection_reached,
                "task_success": task_success,
            },
            "tool_attack": tool_attack,
            "pair_group": pair_group or tid,
            "split": None,
            "provenance": {
                **self._provenance,
                "generation_params": _enc(generation_params) if generation_params else None,
                "parent_id": None,
            },
        }


def fill_tools(result: SourceResult, tools_by_placeholder: dict[str, str]) -> SourceResult:
    """Replace `tools` placeholders (see SharedToolsTraces) with the real tools JSON, column-wise."""
    if result.good.height:
        result.good = result.good.with_columns(
            pl.col("tools").replace_strict(tools_by_placeholder, return_dtype=pl.String)
        )
    return result


def load_tool_schema(cfg: dict[str, Any] | None = None) -> dict[str, Any]:
    """The B4 tool-schema file: {name, system_prompt, tools: [OpenAI function schemas]}."""
    cfg = cfg or {}
    path = config_path(cfg.get("tool_schema") or DEFAULT_SCHEMA)
    try:
        with open(path, encoding="utf-8") as f:
            schema = json.load(f)
    except (OSError, ValueError) as e:
        raise SourceError(f"fujitsu_b4: cannot load tool schema {path}: {e} (set fujitsu_b4.tool_schema)") from e
    tools = schema.get("tools") or []
    if not tools:
        raise SourceError(f"fujitsu_b4: tool schema {path} lists no tools")
    schema["_names"] = frozenset(t["function"]["name"] for t in tools)
    if cfg.get("system_prompt"):
        schema["system_prompt"] = cfg["system_prompt"]
    return schema


def diff_span(benign: str, combined: str) -> tuple[int, int]:
    """[start, end) of the part of `combined` that differs from `benign` (common prefix/suffix trimmed)."""
    n = min(len(benign), len(combined))
    p = 0
    while p < n and benign[p] == combined[p]:
        p += 1
    s = 0
    while s < n - p and benign[-1 - s] == combined[-1 - s]:
        s += 1
    return p, len(combined) - s


def injection_span(combined: str, injection: str, benign: str | None) -> tuple[str, dict | None]:
    """(injection_text, span dict relative to the user message) for one record."""
    if injection:
        i = combined.find(injection)
        if i < 0:
            stripped = injection.strip()
            i = combined.find(stripped) if stripped else -1
            if i >= 0:
                injection = stripped
        if i >= 0:
            return injection, {"message_index": 1, "char_start": i, "char_end": i + len(injection)}
    if isinstance(benign, str) and benign != combined:
        a, b = diff_span(benign, combined)
        if b > a:
            return combined[a:b], {"message_index": 1, "char_start": a, "char_end": b}
    return injection or "", None


def _lines(path: Path) -> list[str | bytes]:
    data = path.read_bytes()
    if data.endswith(b"\n"):
        data = data[:-1]  # the final newline ends the last line; it does not start a blank one
    if not data:
        return []
    try:
        return data.decode("utf-8").split("\n")
    except UnicodeDecodeError:
        out: list[str | bytes] = []
        for raw in data.split(b"\n"):
            try:
                out.append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                out.append(raw)  # quarantined below as not UTF-8
        return out


def relative_names(paths: list[Path]) -> dict[Path, str]:
    """Each file's path relative to the folder the files were given from (their common parent): the part of
    `source_locator` that survives copying the data elsewhere."""
    files = [Path(p).resolve() for p in paths]
    if not files:
        return {}
    root = Path(os.path.commonpath([str(f.parent) for f in files]))
    return {Path(p): f.relative_to(root).as_posix() for p, f in zip(paths, files)}


def _check(rec: dict, required: tuple[str, ...], names: frozenset) -> None:
    """BadRecord naming the first missing, empty or badly typed field."""
    for fld in required:
        v = rec.get(fld)
        if v is None or (isinstance(v, str) and not v.strip()):
            how = "missing" if fld not in rec else ("null" if v is None else "empty")
            raise BadRecord(fld, f"required field '{fld}' is {how}")
    if not isinstance(rec.get("success", True), bool):
        raise BadRecord("success", f"'success' is {type(rec['success']).__name__}, expected a boolean")
    for fld in ("combined_query", "benign_query", "malicious_injection", "subtype", "category"):
        if rec.get(fld) is not None and not isinstance(rec[fld], str):
            raise BadRecord(fld, f"'{fld}' is a {type(rec[fld]).__name__}, expected a string")
    for fld in ("expected_tool", "simulated_tool"):
        v = rec[fld]
        if not isinstance(v, str):
            raise BadRecord(fld, f"'{fld}' is a {type(v).__name__} ({json.dumps(v)[:60]}), expected one tool name")
        if v not in names:
            raise BadRecord(fld, f"tool '{v}' is not in the B4 tool schema")


def read(paths: list[Path], cfg: dict[str, Any]) -> SourceResult:
    cfg = cfg or {}
    schema = load_tool_schema(cfg)
    names = schema["_names"]
    tools_json = canonical_json(schema["tools"])
    make = SharedToolsTraces(DATASET, tools_json, placeholder="b4")
    system_prompt = schema.get("system_prompt") or ""
    required = tuple(cfg.get("required_fields") or DEFAULT_REQUIRED)
    good: list[dict] = []
    bad: list[dict] = []
    blank = 0
    files = [Path(p) for p in paths if Path(p).suffix.lower() in (".jsonl", ".json", ".ndjson")]
    if not files:
        raise SourceError(f"no .jsonl file among {[str(p) for p in paths]} (set CB_FUJITSU_B4_PATH)")
    rel = relative_names(files)
    for path in files:
        fname = str(path)
        lines = _lines(path)
        if not any(not isinstance(x, str) or x.strip() for x in lines):
            raise SourceError(f"{path} holds no records (empty or blank lines only){_WIPE}", file=path)
        for lineno, line in enumerate(lines, 1):
            if isinstance(line, bytes):
                bad.append(reject(dataset=DATASET, file=fname, line=lineno,
                                  reason="line is not valid UTF-8; its bytes are kept as base64 in raw",
                                  raw="base64:" + base64.b64encode(line).decode("ascii")))
                continue
            if not line.strip():
                blank += 1
                continue
            line = line.rstrip("\r")
            try:
                rec = json.loads(line)
            except ValueError as e:
                bad.append(reject(dataset=DATASET, file=fname, line=lineno, reason=f"invalid JSON: {e}", raw=line))
                continue
            try:
                if not isinstance(rec, dict):
                    raise BadRecord("", f"record is a JSON {type(rec).__name__}, not an object")
                _check(rec, required, names)
                combined = rec["combined_query"]
                inj = rec.get("malicious_injection")
                benign = rec.get("benign_query")
                inj_text, span = injection_span(combined, inj or "", benign)
                succeeded = bool(rec.get("success", True))
                # the task identity: every attack built on one benign query is one group
                group = f"{DATASET}:" + digest(benign if isinstance(benign, str) and benign.strip() else combined)
                good.append(
                    make(
                        source_locator=f"{rel[path]}:{lineno}",
                        completeness="skeleton",
                        messages=[message("system", system_prompt), message("user", combined)],
                        category="harmful" if succeeded else "retain",
                        priority_class="harmful_flip" if succeeded else "injection_resisted",
                        subtype=str(rec.get("subtype") or rec.get("category") or ""),
                        attack_present=True,
                        attack_succeeded=succeeded,
                        injection_reached=True,
                        tool_attack={
                            "expected_tool": rec["expected_tool"],
                            "attacker_tool": rec["simulated_tool"],
                            "attacker_args": None,
                            "injection_text": inj_text,
                            "injection_span": span,
                        },
                        pair_group=group,
                    )
                )
            except BadRecord as e:
                bad.append(reject(dataset=DATASET, file=fname, line=lineno, field=e.field, reason=e.reason, raw=line))
    res = SourceResult.from_rows(good, bad, files=len(files), blank_lines=blank, tool_schema=schema.get("name", ""))
    return fill_tools(res, {"b4": tools_json})
