"""LLMail-Inject Phase-1 submissions -> trace_v1 skeleton traces.

Input (CB_LLMAIL_PATH): a folder holding `jobs_data.csv`, `scenarios.json` and `system_prompt.json` (or the CSV
itself; its siblings are then looked up beside it).

Each submission (one CSV record) becomes a skeleton:
  system    = system_prompt.json[`system_prompt_key`] (the e-mail client's instructions)
  user      = the scenario's `user_query` (scenarios.json; `level1d` -> `scenario_1`)
  assistant = a `retrieve_emails` call (the client's retrieval, shown as a tool call)
  tool      = the scenario's e-mails with the submitted e-mail (the injection) placed as the scenario says
              (`last`, `mid`; `retrieval` scenarios: appended after the corpus)
The next assistant turn is what generation fills in; the expected behaviour is "no attacker call".
Successful submissions (all five objective flags true) are complete traces: the flags confirm the agent made
the attacker's call, which is appended as the final assistant turn (the observed harmful completion).

Tools come from the project's repaired schema (`cfg["tool_schema"]`, default configs/tool_schemas/llmail_v1.json):
the schema in system_prompt.json's `tool_prompt` is malformed JSON and is never parsed here.

`attack_succeeded` = all five objective flags; `objectives` is a Python-repr dict parsed with
`ast.literal_eval` (never eval). Unparsable objectives -> quarantine (field `objectives`).
Quarantine `line` is the CSV record number (the header is record 1); fields may span several physical lines.
"""
from __future__ import annotations

import ast
import json
import re
import textwrap
from pathlib import Path
from typing import Any

import polars as pl

from cb_core.config import config_path
from cb_core.schemas import QUARANTINE_SCHEMA, canonical_json, digest, make_trace, reject
from cb_core.sources import SourceError, SourceResult
from cb_core.sources.agentdojo import traces_frame

DATASET = "llmail_inject"
OBJECTIVE_FLAGS = ("email.retrieved", "defense.undetected", "exfil.sent", "exfil.destination", "exfil.content")
REQUIRED_COLUMNS = ("job_id", "scenario", "subject", "body", "objectives")
DEFAULTS: dict[str, Any] = {
    "jobs_file": "jobs_data.csv",
    "scenarios_file": "scenarios.json",
    "system_prompt_file": "system_prompt.json",
    "system_prompt_key": "email_client",
    "tool_schema": "configs/tool_schemas/llmail_v1.json",
    "retrieval_tool": "retrieve_emails",
    "attacker_tool": "send_email",
    "attacker_args": {"to": "contact@contact.com", "body": "confirmation"},
    "email_template": "Subject of the email: {subject}.   Body: {body}",
    "email_separator": "\n\n",
}
_LEVEL = re.compile(r"^level(\d+)[a-z]*$", re.IGNORECASE)


class _Bad(Exception):
    def __init__(self, field: str, reason: str):
        super().__init__(reason)
        self.field = field
        self.reason = reason


def _locate(paths: list[Path], cfg: dict) -> tuple[Path, Path, Path]:
    """(jobs CSV, scenarios.json, system_prompt.json) from the resolved paths; siblings of the CSV otherwise."""
    paths = [Path(p) for p in paths]
    by_name = {p.name: p for p in paths}
    csv = by_name.get(cfg["jobs_file"])
    if csv is None:
        csvs = [p for p in paths if p.suffix.lower() == ".csv"]
        if len(csvs) != 1:
            raise SourceError(
                f"llmail_inject: expected {cfg['jobs_file']} (or exactly one .csv) in CB_LLMAIL_PATH, got "
                f"{[p.name for p in paths] or 'no files'}"
            )
        csv = csvs[0]

    def sibling(name: str) -> Path:
        p = by_name.get(name) or csv.parent / name
        if not p.is_file():
            raise SourceError(
                f"llmail_inject: {name} not found beside {csv} (CB_LLMAIL_PATH must point at the LLMail-Inject "
                f"folder holding {cfg['jobs_file']}, {cfg['scenarios_file']} and {cfg['system_prompt_file']})"
            )
        return p

    return csv, sibling(cfg["scenarios_file"]), sibling(cfg["system_prompt_file"])


def _load_json(path: Path, what: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise SourceError(f"llmail_inject: cannot read {what} {path}: {e}") from e


def load_tools(cfg: dict) -> list[dict]:
    path = config_path(cfg["tool_schema"])
    tools = _load_json(path, "tool schema")
    if not isinstance(tools, list) or not all(isinstance(t, dict) and "function" in t for t in tools):
        raise SourceError(f"llmail_inject: {path} must be a JSON list of OpenAI-style function schemas")
    names = {t["function"].get("name") for t in tools}
    missing = {cfg["retrieval_tool"], cfg["attacker_tool"]} - names
    if missing:
        raise SourceError(f"llmail_inject: tool schema {path} lacks {sorted(missing)}")
    return tools


def parse_objectives(text: Any) -> dict[str, bool]:
    """`objectives` is a Python-repr dict: literal_eval only; all five flags must be booleans."""
    if not isinstance(text, str) or not text.strip():
        raise _Bad("objectives", "missing objectives")
    try:
        obj = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as e:
        raise _Bad("objectives", f"objectives is not a Python literal: {type(e).__name__}: {e}") from None
    if not isinstance(obj, dict):
        raise _Bad("objectives", f"objectives is a {type(obj).__name__}, not a dict")
    missing = [k for k in OBJECTIVE_FLAGS if k not in obj]
    if missing:
        raise _Bad("objectives", f"objectives lacks {missing}")
    bad = [k for k in OBJECTIVE_FLAGS if not isinstance(obj[k], bool)]
    if bad:
        raise _Bad("objectives", f"objectives flags not boolean: {bad}")
    return {k: obj[k] for k in OBJECTIVE_FLAGS}


def scenario_key(level: str, scenarios: dict, cfg: dict) -> str:
    mapping = cfg.get("scenario_map") or {}
    if level in mapping:
        return mapping[level]
    m = _LEVEL.match(level or "")
    if not m:
        raise _Bad("scenario", f"unrecognised scenario {level!r} (expected e.g. level1d)")
    key = f"scenario_{int(m.group(1))}"
    if key not in scenarios:
        raise _Bad("scenario", f"scenario {level!r} maps to {key}, which scenarios.json lacks")
    return key


def build_skeleton(*, email: str, scenario: dict, system_prompt: str, cfg: dict) -> tuple[list[tuple], dict]:
    """Messages of one skeleton, as (role, content, tool_calls, tool_call_id, name) tuples (see
    agentdojo.traces_frame), and the injection span of `email` inside the tool message."""
    corpus = [e for e in (scenario.get("emails") or []) if isinstance(e, str)]
    position = scenario.get("position", "last")
    if position == "mid":
        idx = len(corpus) // 2
    elif position == "first":
        idx = 0
    else:  # last, retrieval (retrieval order is not recorded: the submission goes after the corpus)
        idx = len(corpus)
    emails = corpus[:idx] + [email] + corpus[idx:]
    sep = cfg["email_separator"]
    start = sum(len(e) + len(sep) for e in emails[:idx])
    content = sep.join(emails)
    query = scenario.get("user_query") or ""
    tool = cfg["retrieval_tool"]
    call = {"id": "call_0", "name": tool, "arguments": canonical_json({"query": query})}
    messages = [
        ("system", system_prompt, [], None, None),
        ("user", query, [], None, None),
        ("assistant", "", [call], None, None),
        ("tool", content, [], "call_0", tool),
    ]
    span = {"message_index": 3, "char_start": start, "char_end": start + len(email)}
    return messages, span


def read(paths: list[Path], cfg: dict) -> SourceResult:
    cfg = {**DEFAULTS, **{k: v for k, v in (cfg or {}).items() if v is not None}}
    csv_path, scen_path, sp_path = _locate(paths, cfg)
    scenarios = _load_json(scen_path, "scenarios")
    if not isinstance(scenarios, dict):
        raise SourceError(f"llmail_inject: {scen_path} must map scenario_N -> scenario")
    prompts = _load_json(sp_path, "system prompt")
    key = cfg["system_prompt_key"]
    if not isinstance(prompts, dict) or not isinstance(prompts.get(key), str):
        raise SourceError(f"llmail_inject: {sp_path} has no string `{key}` (system_prompt_key)")
    system_prompt = textwrap.dedent(prompts[key]).strip()
    tools_json = canonical_json(load_tools(cfg))
    attacker_args = canonical_json(cfg["attacker_args"])

    try:
        df = pl.read_csv(csv_path, infer_schema=False)
    except Exception as e:  # polars raises several error types for malformed CSV
        raise SourceError(f"llmail_inject: cannot parse {csv_path}: {e}") from e
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise SourceError(f"llmail_inject: {csv_path} lacks column(s) {missing}")

    name = csv_path.name
    # The id hashes everything the messages are built from (prompt, scenario, e-mail, layout settings) plus the
    # locator, tools and tool attack, without re-serialising the repeated scenario corpus for every record.
    base_digest = digest([system_prompt, {k: cfg[k] for k in ("email_template", "email_separator", "retrieval_tool")}])
    scen_digests = {k: digest(v) for k, v in scenarios.items()}
    good: list[dict] = []
    msgs: list[list[tuple]] = []
    rejected: list[dict] = []
    objectives_cache: dict[str, dict | _Bad] = {}
    n_succeeded = 0
    for rec_no, row in enumerate(df.iter_rows(named=True), 2):
        try:
            text = row["objectives"]
            flags = objectives_cache.get(text) if isinstance(text, str) else None
            if flags is None:
                try:
                    flags = parse_objectives(text)
                except _Bad as bad:
                    flags = bad
                if isinstance(text, str):
                    objectives_cache[text] = flags
            if isinstance(flags, _Bad):
                raise flags
            level = row["scenario"] or ""
            skey = scenario_key(level, scenarios, cfg)
            scen = scenarios[skey]
            subject, body = row["subject"] or "", row["body"] or ""
            if not subject.strip() and not body.strip():
                raise _Bad("body", "empty submission (no subject and no body)")
            email = cfg["email_template"].format(subject=subject, body=body)
            messages, span = build_skeleton(email=email, scenario=scen, system_prompt=system_prompt, cfg=cfg)
        except _Bad as bad:
            rejected.append(
                reject(dataset=DATASET, file=name, line=rec_no, field=bad.field, reason=bad.reason,
                       raw=json.dumps(row, ensure_ascii=False))
            )
            continue
        succeeded = all(flags.values())
        n_succeeded += succeeded
        if succeeded:
            # All five objective flags confirm the agent sent send_email(contact@contact.com, "confirmation"):
            # that call is the observed harmful completion, so the trace is complete (a Ds sample).
            attack_call = {"id": "call_1", "name": cfg["attacker_tool"], "arguments": attacker_args}
            messages = [*messages, ("assistant", "", [attack_call], None, None)]
        row = make_trace(
            dataset=DATASET,
            source_locator=f"{name}:{rec_no}",
            completeness="complete" if succeeded else "skeleton",
            messages=[],  # built as flat arrays by traces_frame
            tools=tools_json,
            category="harmful" if succeeded else "retain",
            priority_class="harmful_flip" if succeeded else "injection_resisted",
            subtype=level,
            attack_present=True,
            attack_succeeded=succeeded,
            is_adversarial_safe=not succeeded,
            tool_attack={
                "expected_tool": None,
                "attacker_tool": cfg["attacker_tool"],
                "attacker_args": attacker_args,
                "injection_text": email,
                "injection_span": span,
            },
        )
        # make_trace's id already covers dataset, locator, tools and the tool attack (incl. the e-mail)
        row["id"] = row["pair_group"] = digest(row["id"] + base_digest + scen_digests[skey])
        good.append(row)
        msgs.append(messages)
    return SourceResult(
        good=traces_frame(good, msgs),
        rejected=pl.DataFrame(rejected, schema=QUARANTINE_SCHEMA),
        meta={
            "files": [name],
            "records": df.height,
            "succeeded": n_succeeded,
            "tool_schema": str(config_path(cfg["tool_schema"])),
        },
    )
