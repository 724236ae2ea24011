"""Fujitsu B4 orchestrator tool-flip attacks (JSONL) -> trace_v1 skeletons.

Accepted shapes: one or more JSONL files (a file, a folder of files or a glob; `resolve_source_paths` does
that). Each line is one record with `attack_id`, `category`, `subtype`, `benign_query`,
`malicious_injection`, `combined_query`, `expected_tool`, `simulated_tool`, `success`, ... (see the data
README). Blank lines are skipped and counted in `meta["blank_lines"]`.

Each good record becomes a **skeleton** trace:
  messages = [system (from the tool-schema file), user = `combined_query`], tools = the schema file's tools.
  labels: harmful / `harmful_flip` when `success` is true (the real set holds successful attacks only: the
  orchestrator called `simulated_tool` where `expected_tool` was right, so attacker_call_made = success); a
  record with `success == false` is retain / `injection_resisted`. attack_present is always true.
  tool_attack: expected_tool, attacker_tool = simulated_tool, injection_text, injection_spans (each
  {message_index: 1 (the user message), char_start, char_end} into `combined_query`), injection_span = the first.
  Spans: every occurrence of `malicious_injection` in `combined_query` (sandwich attacks repeat it), those inside
  what `combined_query` adds to `benign_query` preferred (the injection's words may also be the user's); when it
  is "" or not found there, that added text (around `benign_query` when it occurs whole, else the differing
  window), whitespace trimmed, and injection_text is then that text. Nothing but whitespace added -> excluded.
  subtype = `subtype` (else `category`); pair_group = `fujitsu_b4:` + digest of `benign_query` (the task
  identity: every attack built on one benign query is one group; DS/DR twins generated later inherit it);
  tools = the schema file's FULL tool set for every record (never derived from the record's tools);
  injection_reached = True (the injection is in the user message); source_locator = the file's path relative
  to the folder the files were given from, so ids survive copying the data.

Quarantined (file, 1-based line, field, reason, raw line): invalid JSON / not an object (field ""), a line
that is not UTF-8 (raw = `base64:` of its bytes), a missing or empty required field (field = its name), a
badly typed field (`success` not a boolean, `expected_tool` a list, a non-string query: field = its name), a
tool name outside the schema (field `expected_tool` / `simulated_tool`). Excluded by policy (severity "excluded",
`meta["no_flip"]`): `simulated_tool == expected_tool`, no tool flip to learn from (as harmful it would teach the
breaker to refuse the right tool); (`meta["no_injection"]`, field `combined_query`) a record whose combined query
adds nothing but whitespace to the benign one: no injection, and its DS prompt would equal its DR twin's. A file with no record at all (0 bytes,
blank lines only) fails the source (SourceError naming it).

cfg keys (configs/datasets.yaml `fujitsu_b4:`): `tool_schema` (path of the schema JSON), `required_fields`.
"""
from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any


from cb_core.config import config_path
from cb_core.schemas import BadRecord, canonical_json, digest, message, reject
from cb_core.sources import SourceError, SourceResult
from cb_core.sources._common import (WIPE, SharedToolsTraces, fill_tools, json_loads, json_reason, relative_names,
                                     strip_bom)

DATASET = "fujitsu_b4"
DEFAULT_SCHEMA = "configs/tool_schemas/b4_standard_v1.json"
DEFAULT_REQUIRED = ("combined_query", "expected_tool", "simulated_tool", "success")


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
    schema["_path"] = path
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


def _benign_window(benign: str | None, combined: str) -> tuple[int, int] | None:
    """[start, end) of what `combined` adds to `benign`: the text around `benign` when it occurs whole in
    `combined` (a prefix, a suffix or in the middle), else the minimal differing window; whitespace trimmed.
    None when nothing but whitespace differs."""
    if not isinstance(benign, str) or benign == combined:
        return None
    if benign.strip() and combined.startswith(benign):
        a, b = len(benign), len(combined)
    elif benign.strip() and combined.endswith(benign):
        a, b = 0, len(combined) - len(benign)
    else:
        a, b = diff_span(benign, combined)
    seg = combined[a:b]
    if not seg.strip():
        return None
    return a + len(seg) - len(seg.lstrip()), b - (len(seg) - len(seg.rstrip()))


def injection_span(combined: str, injection: str, benign: str | None) -> tuple[str, list[dict]]:
    """(injection_text, spans relative to the user message) for one record: every occurrence of the
    injection (a sandwich attack repeats it), preferring occurrences inside what `combined` adds to `benign`
    (the injection's words may also occur in the user's own request); else what `combined` adds to `benign`.
    [] when nothing but whitespace was added."""
    window = _benign_window(benign, combined)
    for text in (injection, injection.strip()) if injection else ():
        if not text:
            continue
        hits = [m.start() for m in re.finditer(re.escape(text), combined)]
        if window is not None:
            inside = [i for i in hits if i < window[1] and i + len(text) > window[0]]
            hits = inside or hits
        if hits:
            return text, [{"message_index": 1, "char_start": i, "char_end": i + len(text)} for i in hits]
    if window is not None:
        a, b = window
        return combined[a:b], [{"message_index": 1, "char_start": a, "char_end": b}]
    return injection or "", []


def _lines(path: Path) -> list[str | bytes]:
    data = strip_bom(path.read_bytes())
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


def _check(rec: dict, required: tuple[str, ...], names: frozenset, schema_path: Path | str = DEFAULT_SCHEMA) -> None:
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
            near = v.strip().removesuffix("()").strip().lower()  # `Search_Web()` for search_web
            hint = f" (did you mean '{near}'?)" if near in names else (
                f" ({schema_path}: add the tool there, or set fujitsu_b4.tool_schema to a schema that has it)")
            raise BadRecord(fld, f"tool '{v}' is not in the B4 tool schema{hint}")


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
    blank = no_flip = no_injection = 0
    files = [Path(p) for p in paths if Path(p).suffix.lower() in (".jsonl", ".json", ".ndjson")]
    if not files:
        raise SourceError(f"no .jsonl file among {[str(p) for p in paths]} (set CB_FUJITSU_B4_PATH)")
    rel = relative_names(files)
    for path in files:
        fname = str(path)
        lines = _lines(path)
        if not any(not isinstance(x, str) or x.strip() for x in lines):
            raise SourceError(f"{path} holds no records (empty or blank lines only){WIPE}", file=path)
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
                rec = json_loads(line)
            except ValueError as e:
                field, reason = json_reason(e)
                bad.append(reject(dataset=DATASET, file=fname, line=lineno, field=field, reason=reason, raw=line))
                continue
            try:
                if not isinstance(rec, dict):
                    raise BadRecord("", f"record is a JSON {type(rec).__name__}, not an object")
                _check(rec, required, names, schema["_path"])
                if rec["simulated_tool"] == rec["expected_tool"]:
                    no_flip += 1
                    bad.append(reject(dataset=DATASET, file=fname, line=lineno, field="simulated_tool",
                                      reason=f"no tool flip: simulated_tool equals expected_tool "
                                             f"({rec['expected_tool']!r}); nothing to learn as harmful",
                                      raw=line, severity="excluded"))
                    continue
                combined = rec["combined_query"]
                inj = rec.get("malicious_injection")
                benign = rec.get("benign_query")
                inj_text, spans = injection_span(combined, inj or "", benign)
                if not spans:
                    no_injection += 1
                    bad.append(reject(dataset=DATASET, file=fname, line=lineno, field="combined_query",
                                      reason="no injection: combined_query adds nothing but whitespace to "
                                             "benign_query and malicious_injection is empty or absent from it; "
                                             "a flip without an injection is no attack to learn from",
                                      raw=line, severity="excluded"))
                    continue
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
                        attacker_call_made=succeeded,
                        injection_reached=True,
                        tool_attack={
                            "expected_tool": rec["expected_tool"],
                            "attacker_tool": rec["simulated_tool"],
                            "attacker_args": None,
                            "injection_text": inj_text,
                            "injection_span": spans[0],
                            "injection_spans": spans,
                        },
                        pair_group=group,
                    )
                )
            except BadRecord as e:
                bad.append(reject(dataset=DATASET, file=fname, line=lineno, field=e.field, reason=e.reason, raw=line))
    res = SourceResult.from_rows(good, bad, files=len(files), blank_lines=blank, no_flip=no_flip, no_injection=no_injection,
                                 tool_schema=schema.get("name", ""))
    return fill_tools(res, {"b4": tools_json})
