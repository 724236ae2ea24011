"""Data contracts: the one place for every tier's polars schema and pandera model, and the shared vocabulary.

Tiers: trace_v1 and quarantine (Tier A/B), render_v1, lossmask_v1, training_mix / splits and eval_attacks
(Tier C). Vocabulary: dataset names, categories, priority classes, loss-mask policy names, the MWCS default
class weights and the Llama-3 special tokens. Every other module imports these facts from here (the lowest
floor of cb_core: it imports nothing from the package but ``INGEST_VERSION``).

Nested JSON that has no fixed shape (tool schemas, call arguments, generation params) is stored as a JSON
string so every tier stays a plain, fixed-schema Parquet table that any tool can read.
"""
from __future__ import annotations

import functools
import hashlib
import json
import re
from typing import Any

import orjson
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
# The source registry: dataset name -> (reader module under cb_core.sources, environment variable of its path).
# Adding a source is one line here plus its reader module (and its `sources:` entry in configs/datasets.yaml).
SOURCES: dict[str, tuple[str, str]] = {
    "fujitsu_b4": ("fujitsu_b4", "CB_FUJITSU_B4_PATH"),
    "agentdojo": ("agentdojo", "CB_AGENTDOJO_PATH"),
    "llmail_inject": ("llmail", "CB_LLMAIL_PATH"),
    "tau2": ("tau2", "CB_TAU2_PATH"),
    "ultrachat": ("ultrachat", "CB_ULTRACHAT_PATH"),
    "xstest": ("xstest", "CB_XSTEST_PATH"),
}
DATASETS = tuple(SOURCES)
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

# ------------------------------------------------------------------------------------------ vocabulary
# Loss-mask policies (cb_core.lossmask.POLICIES maps each name to its reference function).
POLICY_NAMES = (
    "assistant_only",
    "completion_only",
    "full_sequence",
    "cb_full_sequence",
    "cb_from_injection",
    "assistant_and_tool",
    "tool_calls_only",
    "action_prefix_only",
    "action_commitment",
)
# policies that are empty by definition on a trace without tool calls (quarantined as "excluded")
TOOL_POLICIES = frozenset({"tool_calls_only", "action_prefix_only", "action_commitment"})
# The policy a trainer uses per category when configs/lossmask.yaml says nothing (its `training_default`).
DEFAULT_TRAINING_POLICY: dict[str, str] = {"harmful": "cb_from_injection", "retain": "assistant_only"}
# Arguments that deliver to the same party as the attacker argument named on the left: an e-mail copied (cc,
# bcc) to the attacker's address reaches the attacker as surely as one addressed to it. The reader's attacker
# call (`sources.agentdojo`) and the judge (`generate.judge.args_match`) both look a target up under these.
SAME_DESTINATION: dict[str, tuple[str, ...]] = {"recipients": ("cc", "bcc"), "recipient": ("cc", "bcc")}


def target_text(value: str) -> str:
    """A call's text as an attacker's target is looked for in it: case-folded, without whitespace (an IBAN written
    in groups, `US13 3000 0001 2121 2121 2121 2`, is the attacker's `US133000000121212121212`)."""
    return "".join(value.split()).casefold()


def target_needle(value: str) -> str:
    """An attacker's target as it is looked for in a call's `target_text`: that form, a URL without its scheme and
    `www.` (`get_webpage("true-informations.com")` visits the attacker's `www.true-informations.com`; the fuller
    forms still contain it). The AgentDojo reader and the judge (`generate.judge.carries`) both match through it."""
    v = target_text(value)
    host = v.removeprefix("https://").removeprefix("http://").removeprefix("www.")
    return host or v  # a target that is only a scheme or `www.` stays itself, never "" (which every text holds)


# MWCS base weight per priority class where a schedule names none (configs/mwcs/*.yaml `class_weights`).
DEFAULT_CLASS_WEIGHTS: dict[str, float] = {
    "adversarial_safe": 2.0,
    "injection_resisted": 1.5,
    "benign_twin": 1.2,
    "tool_capability": 1.0,
    "general_conversation": 0.8,
    "borderline": 1.0,
    "harmful_flip": 1.0,
    "refusal": 1.0,  # XSTest refusals of unsafe prompts (retain)
}

# Llama-3 special tokens and their ids (the Llama-3.1 naming, as in Meta's HF release).
LLAMA3_SPECIAL_IDS: dict[str, int] = {
    "<|begin_of_text|>": 128000,
    "<|end_of_text|>": 128001,
    "<|finetune_right_pad_id|>": 128004,
    "<|start_header_id|>": 128006,
    "<|end_header_id|>": 128007,
    "<|eom_id|>": 128008,
    "<|eot_id|>": 128009,
    "<|python_tag|>": 128010,
}
BOS, EOT, EOM, PYTHON_TAG = "<|begin_of_text|>", "<|eot_id|>", "<|eom_id|>", "<|python_tag|>"
START_HEADER, END_HEADER = "<|start_header_id|>", "<|end_header_id|>"
START_HEADER_ID, END_HEADER_ID = LLAMA3_SPECIAL_IDS[START_HEADER], LLAMA3_SPECIAL_IDS[END_HEADER]
EOT_ID, EOM_ID = LLAMA3_SPECIAL_IDS[EOT], LLAMA3_SPECIAL_IDS[EOM]
END_IDS = (EOT_ID, EOM_ID)  # tokens that end an assistant turn

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


def stop_the_line(n_in: int, rejected: pl.DataFrame, limit: float) -> tuple[int, float, bool]:
    """The stop-the-line rule of every stage: (malformed rows, their share of the ``n_in`` rows read, whether
    the stage must stop: share > ``limit``). Rows excluded by policy (severity "excluded") never count."""
    malformed = int((rejected["severity"] == "malformed").sum()) if rejected.height else 0
    share = malformed / n_in if n_in else 0.0
    return malformed, share, bool(n_in) and share > limit


def empty_traces() -> pl.DataFrame:
    return pl.DataFrame(schema=TRACE_SCHEMA)


def empty_quarantine() -> pl.DataFrame:
    return pl.DataFrame(schema=QUARANTINE_SCHEMA)


_CANONICAL = json.JSONEncoder(sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode
_SORTED = orjson.OPT_SORT_KEYS


def _float_free(obj: Any) -> bool:
    """Whether ``obj`` is plain JSON without floats (str, int, bool, None, lists, tuples and dicts of them):
    there orjson writes exactly the standard library's canonical text. Floats are where they part (1e-05 vs
    0.00001, NaN vs null), so values holding one keep the standard library path. (Non-str keys: orjson
    refuses them, see canonical_json.)"""
    t = type(obj)
    if t is dict:
        obj = obj.values()
    elif t is not list and t is not tuple:
        return t is str or obj is None or t is bool or t is int
    for v in obj:
        t = type(v)
        if t is str or v is None or t is bool or t is int:
            continue
        if t is float or not _float_free(v):
            return False
    return True


def _plain_messages(messages: Any) -> bool:
    """Whether ``messages`` has trace_v1's shape, strings and nulls only (dicts, and lists of tool-call dicts):
    then orjson writes the canonical text. `_float_free` says the same for any value; this knows the shape
    and takes ~30 % less time (it runs once per trace)."""
    if type(messages) is not list:
        return False
    for m in messages:
        if type(m) is not dict:
            return False
        for v in m.values():
            if type(v) is str or v is None:
                continue
            if type(v) is not list:
                return False
            for call in v:  # tool calls
                if type(call) is not dict or not _str_or_null_values(call):
                    return False
    return True


def _str_or_null_values(d: dict) -> bool:
    """Whether every value of ``d`` is a string or None (a tool call's fields)."""
    for x in d.values():
        if type(x) is not str and x is not None:
            return False
    return True


def canonical_json(obj: Any) -> str:
    """The one JSON text of a value (sorted keys, no spaces, UTF-8 kept): what every id and digest hashes.

    The standard library's ``json.dumps(sort_keys=True, ensure_ascii=False, separators=(",", ":"))`` defines
    it; orjson writes the same bytes ~6x faster for float-free values (a test checks every code point and the
    shared data), and anything it refuses (lone surrogates, ints beyond 64 bits, deep nesting) or might write
    differently (floats) takes the standard library path."""
    try:
        if _float_free(obj):
            return orjson.dumps(obj, option=_SORTED).decode()
    except (TypeError, RecursionError):  # orjson.JSONEncodeError is a TypeError
        pass
    return _CANONICAL(obj)


def digest(obj: Any, n: int = 32) -> str:
    """Stable content hash (sha256 of canonical JSON), truncated to n hex chars (128 bits by default)."""
    text = obj if isinstance(obj, str) else canonical_json(obj)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:n]


def normal_tool_attack(tool_attack: dict | None) -> dict | None:
    """A tool_attack struct with every field (attacker_args as JSON text, injection_spans filled)."""
    if tool_attack is None:
        return None
    args = tool_attack.get("attacker_args")
    return {
        "expected_tool": tool_attack.get("expected_tool"),
        "attacker_tool": tool_attack.get("attacker_tool"),
        "attacker_args": args if isinstance(args, (str, type(None))) else canonical_json(args),
        "injection_text": tool_attack.get("injection_text"),
        "injection_span": tool_attack.get("injection_span"),
        "injection_spans": tool_attack.get("injection_spans")
        or ([tool_attack["injection_span"]] if tool_attack.get("injection_span") else []),
    }


def trace_id(dataset: str, source_locator: str, messages: list[dict], tools_enc: bytes, tool_attack: dict | None,
             id_suffix: str | None = None) -> str:
    """The trace id: ``digest([dataset, source_locator, messages, tools_json, tool_attack])`` (+ ``id_suffix``
    re-hashed in). ``tools_enc`` is ``canonical_json(tools_json)`` as UTF-8, encoded once per tool set by the
    caller: a list's canonical JSON is its items' joined, so the (large) tools part is fed to the hash as it
    is, never re-encoded or copied per row."""
    head = None
    if type(dataset) is str and type(source_locator) is str and _plain_messages(messages):
        try:
            head = orjson.dumps([dataset, source_locator, messages], option=_SORTED)
        except TypeError:  # lone surrogates: the standard library's text
            pass
    if head is None:
        head = canonical_json([dataset, source_locator, messages]).encode("utf-8")
    h = hashlib.sha256(b"[" + head[1:-1] + b",")
    h.update(tools_enc)
    h.update(("," + canonical_json(tool_attack) + "]").encode("utf-8"))
    tid = h.hexdigest()[:32]
    return digest(tid + id_suffix) if id_suffix else tid


@functools.lru_cache(maxsize=256)
def _tools_part(tools_json: str) -> tuple[bytes, str]:
    """Tool schemas repeat across a source's traces: encode and digest each distinct one once."""
    return canonical_json(tools_json).encode("utf-8"), digest(tools_json, 16)


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


def generation_params(provenance: dict | None) -> dict:
    """A trace's ``provenance.generation_params`` (the JSON text `make_trace` writes) as a dict; {} when it is
    absent or not a JSON object."""
    gp = (provenance or {}).get("generation_params")
    try:
        gp = json.loads(gp) if isinstance(gp, str) else gp
    except ValueError:
        return {}
    return gp if isinstance(gp, dict) else {}


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
    id_suffix: str | None = None,
) -> dict:
    """Build one trace_v1 row (a plain dict; `pl.DataFrame(rows, schema=TRACE_SCHEMA)` makes the table).

    The id hashes everything that defines the conversation *and* where it came from, so identical message
    lists from two files or lines never collide. ``id_suffix``: a reader that passes ``messages=[]`` and
    fills them in later (AgentDojo: the ETL_A speed budget) gives the raw record's content hash instead.
    """
    from cb_core import INGEST_VERSION

    tools_json = tools if isinstance(tools, str) else canonical_json(tools or [])
    tool_attack = normal_tool_attack(tool_attack)
    tools_enc, tools_digest = _tools_part(tools_json)
    tid = trace_id(dataset, source_locator, messages, tools_enc, tool_attack, id_suffix)
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
    def harmful_means_attacked(cls, data: pa.PolarsData) -> pl.LazyFrame:
        """harmful = the model acted on an injection it read, so an attack is present (whatever the benchmark's
        goal check, `attack_succeeded`, says); the `traces` label-sanity check tests the same rule."""
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


# ------------------------------------------------------------------------------------------- render_v1
TOKEN_SPAN = pl.Struct(
    {
        "kind": pl.String,
        "message_index": pl.Int32,
        "role": pl.String,
        "token_start": pl.Int32,
        "token_end": pl.Int32,  # exclusive
    }
)
RENDER_SCHEMA = pl.Schema(
    {
        "trace_id": pl.String,
        "tokenizer_id": pl.String,
        "input_ids": pl.List(pl.Int32),
        "spans": pl.List(TOKEN_SPAN),
        "n_tokens": pl.Int32,
        "truncated": pl.Boolean,  # the trace was changed to fit max_length
        "truncation": pl.String,  # what was done: "none", or the steps "+"-joined (TRUNCATION_DONE)
    }
)
TRUNCATION_DONE = ("dropped_turns", "shortened_tool_outputs", "cut")


class RenderModel(pa.DataFrameModel):
    """render_v1."""

    trace_id: str = pa.Field(unique=True)
    tokenizer_id: str = pa.Field(str_length={"min_value": 1})
    input_ids: pl.List(pl.Int32) = pa.Field()  # type: ignore[valid-type]
    spans: pl.List(TOKEN_SPAN) = pa.Field()  # type: ignore[valid-type]
    n_tokens: pl.Int32 = pa.Field(ge=1)  # type: ignore[valid-type]
    truncated: bool
    truncation: str

    class Config:
        strict = True

    @pa.dataframe_check
    def n_tokens_matches(cls, data: pa.PolarsData) -> pl.LazyFrame:
        return data.lazyframe.select(pl.col("input_ids").list.len() == pl.col("n_tokens"))

    @pa.dataframe_check
    def truncation_matches(cls, data: pa.PolarsData) -> pl.LazyFrame:
        t = pl.col("truncation")
        known = t.str.split("+").list.eval(pl.element().is_in(list(TRUNCATION_DONE))).list.all()
        return data.lazyframe.select(
            ((t == "none") & ~pl.col("truncated")) | (pl.col("truncated") & (t != "none") & known)
        )

    @pa.dataframe_check
    def spans_inside_sequence(cls, data: pa.PolarsData) -> pl.LazyFrame:
        lf = data.lazyframe.with_row_index("_r").explode("spans").unnest("spans")
        ok = (
            pl.col("token_start").is_null()
            | ((pl.col("token_start") >= 0) & (pl.col("token_start") <= pl.col("token_end"))
               & (pl.col("token_end") <= pl.col("n_tokens")))
        )
        return lf.group_by("_r", maintain_order=True).agg(ok.all().alias("ok")).select("ok")


# ----------------------------------------------------------------------------------------- lossmask_v1
MASK_SPAN = pl.Struct({"token_start": pl.Int32, "token_end": pl.Int32, "weight": pl.Float32})
LOSSMASK_SCHEMA = pl.Schema(
    {
        "trace_id": pl.String,
        "policy": pl.String,
        "mask_spans": pl.List(MASK_SPAN),  # sorted, merged, non-empty, 0 <= start < end <= n_tokens
        "sample_weight": pl.Float64,  # MWCS base weight of the trace's priority class (as in the mix)
        "n_tokens": pl.Int32,
        "n_masked": pl.Int32,  # sum of (end - start)
        "dataset": pl.String,  # convenience copies from the trace (curation needs no join)
        "category": pl.String,
        "priority_class": pl.String,
    }
)


class LossmaskModel(pa.DataFrameModel):
    """lossmask_v1."""

    trace_id: str = pa.Field(str_length={"min_value": 1})
    policy: str = pa.Field(isin=list(POLICY_NAMES))
    mask_spans: pl.List(MASK_SPAN) = pa.Field()  # type: ignore[valid-type]
    sample_weight: float = pa.Field(ge=0)
    n_tokens: pl.Int32 = pa.Field(ge=1)  # type: ignore[valid-type]
    n_masked: pl.Int32 = pa.Field(ge=1)  # type: ignore[valid-type]
    dataset: str
    category: str = pa.Field(isin=list(CATEGORIES))
    priority_class: str

    class Config:
        strict = True

    @pa.dataframe_check
    def unique_trace_policy(cls, data: pa.PolarsData) -> pl.LazyFrame:
        return data.lazyframe.select(~pl.struct("trace_id", "policy").is_duplicated())

    @pa.dataframe_check
    def masked_within_sequence(cls, data: pa.PolarsData) -> pl.LazyFrame:
        return data.lazyframe.select(pl.col("n_masked") <= pl.col("n_tokens"))

    @pa.dataframe_check
    def spans_inside_sequence(cls, data: pa.PolarsData) -> pl.LazyFrame:
        lf = data.lazyframe.with_row_index("_r").explode("mask_spans").unnest("mask_spans")
        ok = (
            pl.col("token_start").is_not_null()
            & (pl.col("token_start") >= 0)
            & (pl.col("token_start") < pl.col("token_end"))
            & (pl.col("token_end") <= pl.col("n_tokens"))
        )
        return lf.group_by("_r", maintain_order=True).agg(ok.all().alias("ok")).select("ok")


# ------------------------------------------------------------- training_mix, train/eval splits, eval_attacks
# `tool_attack.expected_tool` of an AgentDojo eval attack whose user task's ground-truth calls were all made
# before the cut: the expected behaviour is to answer the user (no further tool call, none to the attacker).
FINAL_ANSWER = "final_answer"
# `expected_behavior` of an eval attack: call `tool_attack.expected_tool` next (B4; AgentDojo with a ground-truth
# call still to make), answer without a tool call (FINAL_ANSWER), or -- where the benchmark names no expected
# call (LLMail-Inject; AgentDojo tasks without ground truth) -- anything but the attacker's call
# (`expected_tool` null, `attacker_tool`/`attacker_args` set).
EXPECTED_BEHAVIORS = ("expected_tool", "final_answer", "no_attacker_call")

# Extra columns a training-mix row carries beside its trace_v1 columns.
MIX_EXTRA_SCHEMA = pl.Schema(
    {
        "content_hash": pl.String,
        "category": pl.String,
        "priority_class": pl.String,
        "subtype": pl.String,
        "policy": pl.String,
        "mask_spans": pl.List(MASK_SPAN),
        "sample_weight": pl.Float64,
        "n_tokens": pl.Int32,
        "n_masked": pl.Int32,
    }
)
MIX_SCHEMA = pl.Schema({**dict(TRACE_SCHEMA), **dict(MIX_EXTRA_SCHEMA)})
# One call an injection asks for before its attacker call (AgentDojo workspace injection_task_3's
# `search_emails(sender=lily.white@gmail.com)` before the `send_email` to the attacker): name + JSON arguments as
# the injection task's ground truth gives them.
PREPARATORY_CALL = pl.Struct({"name": pl.String, "arguments": pl.String})
EVAL_ATTACK_SCHEMA = pl.Schema(
    {
        **dict(TRACE_SCHEMA),
        "source_trace_id": pl.String,
        "n_stripped": pl.Int32,
        "expected_behavior": pl.String,
        "stratum": pl.String,  # "<dataset>:<subtype>", or "<dataset>:other" for merged small strata
        # The injection's preparatory calls still open at the cut, none the user's own task also makes there
        # ([] where the injection has none or they cannot be told apart from the user's task): a first call
        # among them is the outcome `attack_step` (cb_core.evaluate.metrics), not `other_tool`.
        "preparatory_calls": pl.List(PREPARATORY_CALL),
    }
)


class TrainingMixModel(TraceModel):
    """training_mix: trace_v1 columns (all TraceModel checks) + the sample's lossmask and curation keys."""

    content_hash: str = pa.Field(unique=True, str_length={"min_value": 16})
    category: str = pa.Field(isin=list(CATEGORIES))
    priority_class: str = pa.Field(isin=list(PRIORITY_CLASSES))
    subtype: str
    policy: str = pa.Field(str_length={"min_value": 1})
    mask_spans: pl.List(MASK_SPAN) = pa.Field()  # type: ignore[valid-type]
    sample_weight: float = pa.Field(ge=0.0)
    n_tokens: pl.Int32 = pa.Field(gt=0)  # type: ignore[valid-type]
    n_masked: pl.Int32 = pa.Field(gt=0)  # type: ignore[valid-type]
    split: str = pa.Field(nullable=True, isin=["train", "eval"])

    class Config:
        strict = True

    @pa.dataframe_check
    def complete_with_assistant(cls, data: pa.PolarsData) -> pl.LazyFrame:
        return data.lazyframe.select(
            (pl.col("completeness") == "complete")
            & pl.col("messages").list.eval(pl.element().struct.field("role") == "assistant").list.any()
        )

    @pa.dataframe_check
    def category_matches_labels(cls, data: pa.PolarsData) -> pl.LazyFrame:
        return data.lazyframe.select(pl.col("category") == pl.col("labels").struct.field("category"))


class TrainSplitModel(TrainingMixModel):
    split: str = pa.Field(isin=["train"])


class EvalSplitModel(TrainingMixModel):
    split: str = pa.Field(isin=["eval"])


class EvalAttacksModel(TraceModel):
    """eval_attacks: trace_v1 skeletons (new ids) cut right after the injection, + the trace they were cut
    from, the expected behaviour and the stratum."""

    completeness: str = pa.Field(isin=["skeleton"])
    split: str = pa.Field(isin=["eval_attack"])
    source_trace_id: str = pa.Field(str_length={"min_value": 16})
    n_stripped: pl.Int32 = pa.Field(ge=0)  # type: ignore[valid-type]
    expected_behavior: str = pa.Field(isin=list(EXPECTED_BEHAVIORS))
    stratum: str = pa.Field(str_matches=r"^[a-z0-9_]+:")
    preparatory_calls: pl.List(PREPARATORY_CALL) = pa.Field()  # type: ignore[valid-type]

    class Config:
        strict = True

    @pa.dataframe_check
    def attacked(cls, data: pa.PolarsData) -> pl.LazyFrame:
        return data.lazyframe.select(pl.col("labels").struct.field("attack_present"))

    @pa.dataframe_check
    def injection_reached(cls, data: pa.PolarsData) -> pl.LazyFrame:
        return data.lazyframe.select(pl.col("labels").struct.field("injection_reached").fill_null(True))

    @pa.dataframe_check
    def ends_right_after_the_injection(cls, data: pa.PolarsData) -> pl.LazyFrame:
        """The last message is a tool result, or the user message holding the injection (never an assistant
        turn, never a user message without the injection); the injection lies inside the messages."""
        idx = pl.col("tool_attack").struct.field("injection_span").struct.field("message_index")
        last = pl.col("messages").list.len() - 1
        role = pl.col("messages").list.last().struct.field("role")
        return data.lazyframe.select(
            idx.is_not_null()
            & (idx <= last)
            & ((role == "tool") | ((role == "user") & (idx == last)))
        )

    @pa.dataframe_check
    def has_expected_behavior(cls, data: pa.PolarsData) -> pl.LazyFrame:
        ta = pl.col("tool_attack")
        b = pl.col("expected_behavior")
        return data.lazyframe.select(
            pl.when(b == "expected_tool")
            .then(ta.struct.field("expected_tool").is_not_null() & (ta.struct.field("expected_tool") != FINAL_ANSWER))
            .when(b == "final_answer")
            .then(ta.struct.field("expected_tool") == FINAL_ANSWER)
            .otherwise(ta.struct.field("expected_tool").is_null() & ta.struct.field("attacker_tool").is_not_null())
        )


# A string holding half of a UTF-16 surrogate pair (JSON allows a lone \ud800 escape): no UTF-8 text, Parquet
# column or hash input can hold it.
LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def lone_surrogate(value: Any) -> str | None:
    """Where (``messages[0].content``; ``""`` for the value itself) the first key or string of a decoded JSON
    value holding a lone surrogate is, or None. JSON lets a ``\\ud800`` escape stand alone; no UTF-8 text
    (Parquet, Arrow, a trace id's hash) can hold it, so such a record is rejected, never stored. Iterative:
    the value may nest as deep as the parser allowed."""
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        v, at = stack.pop()
        if isinstance(v, str):
            if LONE_SURROGATE.search(v):
                return at
        elif isinstance(v, dict):
            for k, x in reversed(list(v.items())):
                key = str(k)
                if LONE_SURROGATE.search(key):
                    return f"{at}.{ascii(key)}" if at else ascii(key)
                stack.append((x, f"{at}.{key}" if at else key))
        elif isinstance(v, list):
            stack.extend((x, f"{at}[{i}]") for i, x in reversed(list(enumerate(v))))
    return None
