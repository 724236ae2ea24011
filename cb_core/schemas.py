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
    }
)
INJECTION_SPAN = pl.Struct({"message_index": pl.Int32, "char_start": pl.Int32, "char_end": pl.Int32})
TOOL_ATTACK = pl.Struct(
    {
        "expected_tool": pl.String,
        "attacker_tool": pl.String,
        "attacker_args": pl.String,  # JSON text
        "injection_text": pl.String,
        "injection_span": INJECTION_SPAN,
    }
)
PROVENANCE = pl.Struct(
    {"ingest_version": pl.String, "generation_params": pl.String, "tool_schema_digest": pl.String}
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
    """One trace_v1 message. Tool-call arguments are normalised to canonical JSON text."""
    calls = []
    for c in tool_calls or []:
        args = c.get("arguments")
        if not isinstance(args, str):
            args = canonical_json(args if args is not None else {})
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
    tool_attack: dict | None = None,
    pair_group: str | None = None,
    generation_params: dict | None = None,
    ingest_version: str | None = None,
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
        },
        "tool_attack": tool_attack,
        "pair_group": pair_group or tid,
        "split": None,
        "provenance": {
            "ingest_version": ingest_version or INGEST_VERSION,
            "generation_params": canonical_json(generation_params) if generation_params else None,
            "tool_schema_digest": tools_digest,
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
