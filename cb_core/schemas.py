"""Data contracts: polars dtypes and pandera models for every tier.

Nested JSON that has no fixed shape (tool schemas, call arguments, generation params) is stored as a JSON
string so every tier stays a plain, fixed-schema Parquet table that any tool can read.
"""
from __future__ import annotations

import functools
import hashlib
import json
from typing import Any

import pandera.polars as pa
import polars as pl

# ----------------------------------------------------------------------------------------------- trace_v1
TOOL_CALL = pl.Struct({"id": pl.String, "name": pl.String, "arguments": pl.String})  # arguments: JSON text
MESSAGE = pl.Struct(
    {
        "role": pl.String,  # system | user | assistant | tool
        "content": pl.String,  # never null ("" when the source had null)
        "tool_calls": pl.List(TOOL_CALL),
        "tool_call_id": pl.String,
        "name": pl.String,  # tool name on tool messages
    }
)
LABELS = pl.Struct(
    {
        "category": pl.String,  # harmful | retain
        "priority_class": pl.String,  # see PRIORITY_CLASSES
        "subtype": pl.String,  # stratum inside a dataset (suite, domain, B4 subtype, xstest type...)
        "attack_present": pl.Boolean,
        "attack_succeeded": pl.Boolean,
        "is_adversarial_safe": pl.Boolean,
        # An assistant call made *after* the injection was read that carries the attacker's target.
        "attacker_call_made": pl.Boolean,
        # null: no attack was configured for this run; False: configured but never read (no attack at all);
        # True: the injection is in the context (then attack_present is True).
        "injection_reached": pl.Boolean,
        # The benchmark's own utility check (AgentDojo `metadata.success`); null where the source has none.
        "task_success": pl.Boolean,
    }
)
INJECTION_SPAN = pl.Struct({"message_index": pl.Int32, "char_start": pl.Int32, "char_end": pl.Int32})
TOOL_ATTACK = pl.Struct(
    {
        "expected_tool": pl.String,
        "attacker_tool": pl.String,
        "attacker_args": pl.String,  # JSON text
        "injection_text": pl.String,
        "injection_span": INJECTION_SPAN,  # the first injection (kept for readers of one span)
        "injection_spans": pl.List(INJECTION_SPAN),  # every injection in the trace, in message order
    }
)
PROVENANCE = pl.Struct(
    {
        "ingest_version": pl.String,
        "generation_params": pl.String,
        "tool_schema_digest": pl.String,
        "parent_id": pl.String,  # generated traces: the id of the skeleton they complete; null otherwise
    }
)
TRACE_SCHEMA = pl.Schema(
    {
        "id": pl.String,
        "dataset": pl.String,
        "source_locator": pl.String,  # "<file>:<line>" (line 1-based; JSON arrays: "<file>:<index>")
        "completeness": pl.String,  # skeleton | complete
        "messages": pl.List(MESSAGE),
        "tools": pl.String,  # JSON list of OpenAI-style function schemas offered ("[]" when none)
        "labels": LABELS,
        "tool_attack": TOOL_ATTACK,  # null for traces without a tool attack
        "pair_group": pl.String,
        "split": pl.String,  # null until Tier C
        "provenance": PROVENANCE,
    }
)
DATASETS = ("fujitsu_b4", "agentdojo", "llmail_inject", "tau2", "ultrachat", "xstest")
CATEGORIES = ("harmful", "retain")
PRIORITY_CLASSES = (
    "harmful_flip",
    "adversarial_safe",
    "injection_resisted",
    "benign_twin",
    "tool_capability",
    "general_conversation",
    "borderline",
    "refusal",
)
ROLES = ("system", "user", "assistant", "tool")

QUARANTINE_SCHEMA = pl.Schema(
    {
        "stage": pl.String,  # etl_a | renders | ...
        "dataset": pl.String,
        "file": pl.String,
        "line": pl.Int64,  # 1-based; 0 when the problem is the whole file
        "field": pl.String,  # the offending field ("" when not field-specific)
        "reason": pl.String,
        "severity": pl.String,  # malformed (counts toward stop-the-line) | excluded (a policy decision)
        "raw": pl.String,  # the record's original text, so nothing is lost
    }
)


class BadRecord(Exception):
    """A record-level problem naming the offending field: the reader turns it into one quarantine row
    (file, line, field, reason) and goes on with the next record."""

    def __init__(self, field: str, reason: str):
        super().__init__(reason)
        self.field = field
        self.reason = reason


def arguments_json(args: Any, field: str = "tool_calls.arguments") -> str:
    """Tool-call arguments as canonical JSON object text. A call's arguments must be a JSON object (a dict, or
    text that parses to one); anything else (`{not json`, `[1,2]`, `5`) raises BadRecord naming the field."""
    if args is None:
        return "{}"
    if isinstance(args, str):
        try:
            parsed = json.loads(args) if args.strip() else {}
        except ValueError as e:
            raise BadRecord(field, f"arguments are not valid JSON ({e.msg}): {args[:80]!r}") from None
        if not isinstance(parsed, dict):
            raise BadRecord(field, f"arguments are JSON {type(parsed).__name__}, not an object: {args[:80]!r}")
        return canonical_json(parsed)
    if not isinstance(args, dict):
        raise BadRecord(field, f"arguments are a {type(args).__name__}, not a JSON object: {str(args)[:80]!r}")
    return canonical_json(args)


def empty_traces() -> pl.DataFrame:
    return pl.DataFrame(schema=TRACE_SCHEMA)


def empty_quarantine() -> pl.DataFrame:
    return pl.DataFrame(schema=QUARANTINE_SCHEMA)


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def digest(obj: Any, n: int = 32) -> str:
    """Stable content hash (sha256 of canonical JSON), truncated to n hex chars (128 bits by default)."""
    text = obj if isinstance(obj, str) else canonical_json(obj)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:n]


@functools.lru_cache(maxsize=256)
def _tools_part(tools_json: str) -> tuple[str, str]:
    """Tool schemas repeat across a source's traces: encode and digest each distinct one once."""
    return canonical_json(tools_json), digest(tools_json, 16)


def message(
    role: str,
    content: str | None = "",
    tool_calls: list[dict] | None = None,
    tool_call_id: str | None = None,
    name: str | None = None,
) -> dict:
    """One trace_v1 message. Tool-call arguments are normalised to canonical JSON object text (BadRecord
    naming the field when they are not an object)."""
    calls = []
    for i, c in enumerate(tool_calls or []):
        args = arguments_json(c.get("arguments"), f"tool_calls[{i}].arguments")
        calls.append({"id": c.get("id") or "", "name": c["name"], "arguments": args})
    return {
        "role": role,
        "content": content or "",
        "tool_calls": calls,
        "tool_call_id": tool_call_id,
        "name": name,
    }


def make_trace(
    *,
    dataset: str,
    source_locator: str,
    completeness: str,
    messages: list[dict],
    tools: list | str | None,
    category: str,
    priority_class: str,
    subtype: str = "",
    attack_present: bool = False,
    attack_succeeded: bool = False,
    is_adversarial_safe: bool = False,
    attacker_call_made: bool = False,
    injection_reached: bool | None = None,
    task_success: bool | None = None,
    tool_attack: dict | None = None,
    pair_group: str | None = None,
    generation_params: dict | None = None,
    ingest_version: str | None = None,
    parent_id: str | None = None,
) -> dict:
    """Build one trace_v1 row (a plain dict; `pl.DataFrame(rows, schema=TRACE_SCHEMA)` makes the table).

    The id hashes everything that defines the conversation *and* where it came from, so identical message
    lists from two files or lines never collide.
    """
    from cb_core import INGEST_VERSION

    tools_json = tools if isinstance(tools, str) else canonical_json(tools or [])
    if tool_attack is not None:
        tool_attack = {
            "expected_tool": tool_attack.get("expected_tool"),
            "attacker_tool": tool_attack.get("attacker_tool"),
            "attacker_args": (
                tool_attack.get("attacker_args")
                if isinstance(tool_attack.get("attacker_args"), (str, type(None)))
                else canonical_json(tool_attack.get("attacker_args"))
            ),
            "injection_text": tool_attack.get("injection_text"),
            "injection_span": tool_attack.get("injection_span"),
            "injection_spans": tool_attack.get("injection_spans")
            or ([tool_attack["injection_span"]] if tool_attack.get("injection_span") else []),
        }
    tools_enc, tools_digest = _tools_part(tools_json)
    # Same bytes as digest([dataset, source_locator, messages, tools_json, tool_attack]), cheaper.
    tid = digest(
        "["
        + ",".join(
            [canonical_json(dataset), canonical_json(source_locator), canonical_json(messages), tools_enc,
             canonical_json(tool_attack)]
        )
        + "]"
    )
    return {
        "id": tid,
        "dataset": dataset,
        "source_locator": source_locator,
        "completeness": completeness,
        "messages": messages,
        "tools": tools_json,
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
            "ingest_version": ingest_version or INGEST_VERSION,
            "generation_params": canonical_json(generation_params) if generation_params else None,
            "tool_schema_digest": tools_digest,
            "parent_id": parent_id,
        },
    }


def split_locator(loc: str | None) -> tuple[str, int]:
    """"<file>:<line>" -> (file, line); (loc, 0) when there is no line part."""
    if not loc:
        return "", 0
    head, sep, tail = loc.rpartition(":")
    if sep and tail.isdigit():
        return head, int(tail)
    return loc, 0


def reject(
    *,
    dataset: str,
    file: str,
    line: int,
    reason: str,
    raw: str,
    field: str = "",
    stage: str = "etl_a",
    severity: str = "malformed",
) -> dict:
    """One quarantine row. `severity="excluded"` marks records dropped by policy (empty runs, provider
    errors) rather than broken input; only malformed ones count toward the stop-the-line threshold."""
    return {
        "stage": stage,
        "dataset": dataset,
        "file": file,
        "line": line,
        "field": field,
        "reason": reason,
        "severity": severity,
        "raw": raw,
    }


# ------------------------------------------------------------------------------------------ pandera models
class TraceModel(pa.DataFrameModel):
    """trace_v1. Nested fields are checked by dtype here and by the dataframe-level checks below."""

    id: str = pa.Field(unique=True, str_length={"min_value": 16})
    dataset: str = pa.Field(isin=list(DATASETS))
    source_locator: str = pa.Field(str_length={"min_value": 1})
    completeness: str = pa.Field(isin=["skeleton", "complete"])
    messages: pl.List(MESSAGE) = pa.Field()  # type: ignore[valid-type]
    tools: str
    labels: LABELS = pa.Field()  # type: ignore[valid-type]
    tool_attack: TOOL_ATTACK = pa.Field(nullable=True)  # type: ignore[valid-type]
    pair_group: str
    split: str = pa.Field(nullable=True)
    provenance: PROVENANCE = pa.Field()  # type: ignore[valid-type]

    class Config:
        strict = True

    @pa.dataframe_check
    def label_values(cls, data: pa.PolarsData) -> pl.LazyFrame:
        lab = pl.col("labels")
        return data.lazyframe.select(
            lab.struct.field("category").is_in(list(CATEGORIES))
            & lab.struct.field("priority_class").is_in(list(PRIORITY_CLASSES))
        )

    @pa.dataframe_check
    def succeeded_implies_attacked(cls, data: pa.PolarsData) -> pl.LazyFrame:
        lab = pl.col("labels")
        return data.lazyframe.select(
            ~lab.struct.field("attack_succeeded") | lab.struct.field("attack_present")
        )

    @pa.dataframe_check
    def harmful_means_succeeded(cls, data: pa.PolarsData) -> pl.LazyFrame:
        lab = pl.col("labels")
        return data.lazyframe.select(
            (lab.struct.field("category") != "harmful") | lab.struct.field("attack_present")
        )

    @pa.dataframe_check
    def has_messages(cls, data: pa.PolarsData) -> pl.LazyFrame:
        return data.lazyframe.select(pl.col("messages").list.len() > 0)


class QuarantineModel(pa.DataFrameModel):
    stage: str
    dataset: str
    file: str
    line: int = pa.Field(ge=0)
    field: str
    reason: str = pa.Field(str_length={"min_value": 1})
    severity: str = pa.Field(isin=["malformed", "excluded"])
    raw: str

    class Config:
        strict = True
