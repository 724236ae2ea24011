"""Llama-3.1 chat rendering with character spans, and the batch ``renders`` core (render_v1).

``render_conversation`` reproduces Meta's official Llama-3.1 chat template
(llama.cpp ``models/templates/meta-llama-Llama-3.1-8B-Instruct.jinja``, i.e. the template shipped with the
HF model) byte for byte, and records the character span of every part it emits. Where the official template
has no answer, the renderer makes a documented choice:

* ``tool_call_format="json"`` is the official form: ``{"name": N, "parameters": ARGS}<|eot_id|>``;
  ``"python_tag"`` is Llama-3.1's other form: ``<|python_tag|>{"name": N, "parameters": ARGS}<|eom_id|>``.
* The official template DROPS the text of an assistant message that also has tool calls. We keep it: the
  (trimmed) content comes first, then the call (json form: separated by ``"\\n\\n"``; python_tag form: the
  ``<|python_tag|>`` token separates them). Byte-exactness therefore holds for tool-call messages with empty
  content only.
* Several tool calls in one message (the official template raises) render one after another, separated by
  ``"\\n"`` (python_tag form: one ``<|python_tag|>`` before the first call).
* Tool results render under the ``ipython`` role; as in the official template a string result is JSON-encoded
  (``tool_result_tojson=True``, the template's ``is iterable`` branch is taken for strings).
* ``tools`` empty or None means no tools (no "Environment: ipython" line).
* ``tools_in_user_message=True`` (the official default) puts the tool definitions in the first user
  message; when the first non-system message is not a plain user message (the template would then label
  that message "user"), the definitions go into the system message instead.

Spans (``CharSpan``; ``message_index`` indexes the caller's message list, -1 for bos, tool_defs and an
injected system preamble):

* top level, tiling the text without gaps or overlaps: ``bos`` and one ``message`` per rendered message
  (header + body + end token);
* nested: ``header`` (``<|start_header_id|>role<|end_header_id|>\\n\\n``), ``content`` (only when non-empty;
  the trimmed text as rendered; for tool results the JSON-encoded string), ``tool_call`` (one per call: the
  call JSON, including ``<|python_tag|>`` for the first call of a python_tag message), ``tool_name`` (the
  name's characters inside the call JSON), ``end_token`` and ``tool_defs`` (the tool instructions and
  definitions block), and ``injection`` (each ``tool_attack.injection_spans`` entry, on the characters it
  renders to: JSON-encoded inside a tool result, shifted by the strip in a user message).

Token spans (``render_traces``): token t belongs to the character span that contains the first character
of t (``offsets[t][0]``). So ``token_start = searchsorted(starts, char_start, "left")`` and
``token_end = searchsorted(starts, char_end, "left")`` (exclusive): character spans that tile the text give
token spans that tile the sequence, and a token that straddles a boundary (BPE can merge a content's final
punctuation with the following separator newline) belongs to the span it begins in. ``injection`` spans
instead cover every token overlapping them (``token_start`` = the first token holding the first character:
BPE splits an emoji into several byte tokens that start at one character), so a mask that starts at the
injection never misses its first byte.

Traces longer than ``max_length``: see ``TruncationConfig`` (drop turns after the last trained message,
shorten tool outputs outside the injection, then quarantine).
"""
from __future__ import annotations

import json
import os
import resource
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import polars as pl

from cb_core import forking
from cb_core.schemas import (  # noqa: F401  (the render_v1 contract and the special tokens, re-exported)
    BOS,
    END_HEADER,
    EOM,
    EOT,
    PYTHON_TAG,
    QUARANTINE_SCHEMA,
    RENDER_SCHEMA,
    START_HEADER,
    TOKEN_SPAN,
    TRUNCATION_DONE,
    RenderModel,
    canonical_json,
    reject,
    split_locator,
)


SPAN_KINDS = (
    "bos", "message", "header", "content", "tool_call", "tool_name", "end_token", "tool_defs", "injection",
)
TOOL_CALL_FORMATS = ("json", "python_tag")

_SYSTEM_TOOLS_PREAMBLE = (
    "You have access to the following functions. To call a function, please respond with JSON for a function call."
    'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.'
    "Do not use variables.\n\n"
)
_USER_TOOLS_PREAMBLE = (
    "Given the following functions, please respond with a JSON for a function call "
    "with its proper arguments that best answers the given prompt.\n\n"
    'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.'
    "Do not use variables.\n\n"
)


class RenderError(ValueError):
    """A conversation the renderer cannot express (unknown role, malformed tool-call arguments...)."""

    def __init__(self, msg: str, field: str = "messages"):
        super().__init__(msg)
        self.field = field


TRUNCATION_STEPS = ("drop_turns", "shorten_tool_outputs", "cut")
DEFAULT_MARKER = "…[truncated {n} chars]…"


@dataclass
class TruncationConfig:
    """What the render stage does with a trace longer than ``max_length``, in order (then quarantine).

    * ``drop_turns``: render only up to the end of the last *trained* message and drop later turns
      (retain: the last assistant message; harmful: the last assistant message after the injection that
      calls the attacker's tool with its target, else the last assistant message).
    * ``shorten_tool_outputs``: cut the middle of every tool output longer than ``tool_output_max_chars``
      (keeping ``head_fraction`` of the cap from its head, the rest from its tail, and every injection span
      whole), replacing each cut with ``marker`` (``{n}`` = characters removed); halve the cap while the
      trace is still too long, down to ``tool_output_min_chars``.
    * ``cut`` (off by default; the old behaviour): keep the first ``max_length`` tokens when the last
      trained message keeps a content/tool-call token. Off because a cut context trains on a trace nobody
      saw and can cut through the injection.
    """

    steps: tuple[str, ...] = ("drop_turns", "shorten_tool_outputs")
    tool_output_max_chars: int = 8000
    tool_output_min_chars: int = 1000
    head_fraction: float = 0.75
    marker: str = DEFAULT_MARKER

    def __post_init__(self) -> None:
        self.steps = tuple(self.steps)
        bad = [s for s in self.steps if s not in TRUNCATION_STEPS]
        if bad:
            raise ValueError(f"truncation.steps: unknown {bad} (known: {list(TRUNCATION_STEPS)})")
        if len(set(self.steps)) != len(self.steps):
            raise ValueError(f"truncation.steps: duplicates in {list(self.steps)}")
        if "cut" in self.steps and self.steps[-1] != "cut":
            raise ValueError("truncation.steps: `cut` must be the last step")
        for k in ("tool_output_max_chars", "tool_output_min_chars"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"truncation.{k} must be an integer >= 1, got {v!r}")
        if self.tool_output_min_chars > self.tool_output_max_chars:
            raise ValueError("truncation.tool_output_min_chars must be <= tool_output_max_chars")
        if isinstance(self.head_fraction, bool) or not isinstance(self.head_fraction, (int, float)) or not (
            0.0 <= self.head_fraction <= 1.0
        ):
            raise ValueError(f"truncation.head_fraction must be a number in [0, 1], got {self.head_fraction!r}")
        if not isinstance(self.marker, str) or "{n}" not in self.marker:
            raise ValueError(f"truncation.marker must be a string holding '{{n}}', got {self.marker!r}")

    @classmethod
    def from_dict(cls, raw: dict | None, source: str = "<dict>") -> "TruncationConfig":
        if raw is None:
            return cls()
        if not isinstance(raw, dict):
            raise ValueError(f"{source}: truncation: expected a mapping, got {type(raw).__name__}")
        known = {"steps", "tool_output_max_chars", "tool_output_min_chars", "head_fraction", "marker"}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"{source}: truncation: unknown keys {sorted(unknown)} (known: {sorted(known)})")
        kw = dict(raw)
        if "steps" in kw:
            st = kw["steps"]
            if st is not None and not isinstance(st, (str, list, tuple)):
                raise ValueError(f"{source}: truncation.steps must be a list of steps, e.g. [drop_turns], got {st!r}")
            kw["steps"] = () if st is None else ((st,) if isinstance(st, str) else tuple(st))
        try:
            return cls(**kw)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: {e}") from None


@dataclass
class RenderConfig:
    tool_call_format: str = "python_tag"  # python_tag | json (json = the official template's form)
    tools_in_user_message: bool = True  # the official template's default
    date_string: str = "26 Jul 2024"
    add_bos: bool = True
    max_length: int = 4096
    tool_result_tojson: bool = True  # official: string tool results are JSON-encoded
    num_workers: int = 1  # render_traces: processes (1 = in-process; 0 = one per core, for >= 256 traces each)
    truncation: TruncationConfig = field(default_factory=TruncationConfig)  # traces over max_length

    def __post_init__(self) -> None:
        if isinstance(self.truncation, dict):
            self.truncation = TruncationConfig.from_dict(self.truncation)
        if self.tool_call_format not in TOOL_CALL_FORMATS:
            raise ValueError(f"tool_call_format must be one of {TOOL_CALL_FORMATS}, got {self.tool_call_format!r}")
        if self.max_length < 1:
            raise ValueError("max_length must be >= 1")


@dataclass(frozen=True)
class CharSpan:
    kind: str
    message_index: int
    char_start: int
    char_end: int  # exclusive
    role: str = ""


@dataclass
class Rendered:
    text: str
    spans: list[CharSpan] = field(default_factory=list)

    def span_text(self, span: CharSpan) -> str:
        return self.text[span.char_start : span.char_end]

    def of_kind(self, kind: str) -> list[CharSpan]:
        return [s for s in self.spans if s.kind == kind]


# ------------------------------------------------------------------------------------------ normalisation
def normalize_tools(tools: Any) -> list[dict] | None:
    """JSON text or list -> list of OpenAI-style ``{"type": "function", "function": {...}}`` (None if empty).
    Bare ``{name, description, parameters}`` schemas are wrapped; key order is kept (it shows in the text)."""
    if tools is None:
        return None
    if isinstance(tools, (str, bytes)):
        tools = json.loads(tools) if tools.strip() else []
    if tools is None:  # JSON null: no tools, as a missing value
        return None
    if isinstance(tools, dict):
        tools = [tools]
    if not isinstance(tools, list):  # a scalar would fail the whole batch, not this trace
        raise RenderError(f"tools must be a JSON list of tool schemas, got a {type(tools).__name__}: {tools!r:.80}")
    out = []
    for t in tools:
        if not isinstance(t, dict):
            raise RenderError(f"tool schema must be an object, got {type(t).__name__}")
        if "function" in t and isinstance(t["function"], dict):
            out.append(t)
        elif "name" in t:
            out.append({"type": "function", "function": t})
        else:
            raise RenderError(f"tool schema without a name: {str(t)[:200]}")
    return out or None


def _call_name_args(call: dict) -> tuple[str, Any]:
    fn = call.get("function") if isinstance(call.get("function"), dict) else call
    name = fn.get("name")
    if not name:
        raise RenderError("tool call without a name")
    args = fn.get("arguments", fn.get("parameters"))
    if isinstance(args, (str, bytes)):
        try:
            args = json.loads(args) if args.strip() else None
        except json.JSONDecodeError as e:
            raise RenderError(f"tool call {name}: arguments are not valid JSON ({e.msg})") from None
    if args is None:  # missing, empty or JSON null: a call without arguments
        args = {}
    if not isinstance(args, dict):  # the readers refuse these (schemas.arguments_json); so does the renderer
        raise RenderError(f"tool call {name}: arguments are a JSON {type(args).__name__}, not an object")
    return str(name), args


# ----------------------------------------------------------------------------------------------- renderer
class _Writer:
    __slots__ = ("parts", "pos", "spans")

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.pos = 0
        self.spans: list[CharSpan] = []

    def emit(self, text: str, kind: str | None = None, index: int = -1, role: str = "") -> tuple[int, int]:
        start = self.pos
        if text:
            self.parts.append(text)
            self.pos += len(text)
        if kind is not None and self.pos > start:
            self.spans.append(CharSpan(kind, index, start, self.pos, role))
        return start, self.pos

    def span(self, kind: str, start: int, index: int, role: str) -> None:
        self.spans.append(CharSpan(kind, index, start, self.pos, role))


def _tool_defs_text(tools: list[dict]) -> str:
    return "".join(json.dumps(t, ensure_ascii=False, indent=4) + "\n\n" for t in tools)


def _injection_map(messages: Sequence[dict], injections: Any) -> dict[int, list[tuple[int, int]]]:
    """``injections`` ((message_index, char_start, char_end) or INJECTION_SPAN dicts, characters of the
    message's raw ``content``) -> {message_index: [(start, end)]}; a span outside its message is a
    RenderError naming ``tool_attack.injection_spans``."""
    out: dict[int, list[tuple[int, int]]] = {}
    for sp in injections or ():
        if sp is None:
            continue
        i, a, b = (sp["message_index"], sp["char_start"], sp["char_end"]) if isinstance(sp, dict) else sp
        if i is None or a is None or b is None:
            raise RenderError(f"injection span with a null field: {sp}", "tool_attack.injection_spans")
        n = len(messages[i].get("content") or "") if 0 <= i < len(messages) else -1
        if n < 0 or not (0 <= a <= b <= n):
            raise RenderError(
                f"injection span {sp} lies outside its message ({len(messages)} messages"
                + (f", content of {n} chars)" if n >= 0 else ")"),
                "tool_attack.injection_spans",
            )
        if b > a:
            out.setdefault(int(i), []).append((int(a), int(b)))
    return out


def _emit_injections(w: "_Writer", spans: list[tuple[int, int]] | None, raw: str, start: int, mode: str,
                     index: int, role: str) -> None:
    """Record ``injection`` spans inside a content span that starts at ``start``. ``mode``: "json" (the
    content was JSON-encoded: encoding is per character, so the prefix's encoded length is the offset),
    "strip" (the content was stripped) or "raw"."""
    if not spans:
        return
    lead = len(raw) - len(raw.lstrip())
    n = len(raw.strip())
    for a, b in spans:
        if mode == "json":
            ca = start + len(json.dumps(raw[:a], ensure_ascii=False)) - 1
            cb = start + len(json.dumps(raw[:b], ensure_ascii=False)) - 1
        elif mode == "strip":
            ca, cb = start + min(max(a - lead, 0), n), start + min(max(b - lead, 0), n)
        else:
            ca, cb = start + a, start + b
        if cb > ca:
            w.spans.append(CharSpan("injection", index, ca, cb, role))


def render_conversation(
    messages: Sequence[dict],
    tools: Any = None,
    cfg: RenderConfig | None = None,
    *,
    injections: Any = None,
    _tool_defs: str | None = None,
) -> Rendered:
    """Render one conversation (trace_v1 messages; OpenAI-style tool_calls also accepted) with spans.
    ``injections`` (trace_v1 ``tool_attack.injection_spans``: character spans of a message's raw content)
    become ``injection`` spans over the same characters as rendered."""
    cfg = cfg or RenderConfig()
    inj = _injection_map(messages, injections)
    tool_list = normalize_tools(tools)
    defs = None if tool_list is None else (_tool_defs if _tool_defs is not None else _tool_defs_text(tool_list))
    w = _Writer()
    if cfg.add_bos:
        w.emit(BOS, "bos", -1)

    indexed = indexed_all = list(enumerate(messages))
    if indexed and indexed[0][1].get("role") == "system":
        sys_index, sys_content = 0, (indexed[0][1].get("content") or "").strip()
        indexed = indexed[1:]
    else:
        sys_index, sys_content = -1, ""

    tools_in_user = defs is not None and cfg.tools_in_user_message
    if tools_in_user:
        if not indexed:
            raise RenderError("tools in the first user message, but there is no message after the system message")
        first = indexed[0][1]
        if first.get("role") != "user" or first.get("tool_calls"):
            tools_in_user = False  # documented fallback: definitions go into the system message

    # --- system message (always emitted, as in the official template)
    start = w.pos
    w.emit(f"{START_HEADER}system{END_HEADER}\n\n", "header", sys_index, "system")
    if defs is not None:
        w.emit("Environment: ipython\n")
    w.emit(f"Cutting Knowledge Date: December 2023\nToday Date: {cfg.date_string}\n\n")
    if defs is not None and not tools_in_user:
        w.emit(_SYSTEM_TOOLS_PREAMBLE + defs, "tool_defs", -1, "system")
    c0, _ = w.emit(sys_content, "content", sys_index, "system")
    if sys_index >= 0:
        _emit_injections(w, inj.get(sys_index), indexed_all[0][1].get("content") or "", c0, "strip", 0, "system")
    w.emit(EOT, "end_token", sys_index, "system")
    w.span("message", start, sys_index, "system")

    # --- first user message carrying the tool definitions
    if tools_in_user:
        i, m = indexed[0]
        indexed = indexed[1:]
        start = w.pos
        w.emit(f"{START_HEADER}user{END_HEADER}\n\n", "header", i, "user")
        w.emit(_USER_TOOLS_PREAMBLE + defs, "tool_defs", -1, "user")
        c0, _ = w.emit((m.get("content") or "").strip(), "content", i, "user")
        _emit_injections(w, inj.get(i), m.get("content") or "", c0, "strip", i, "user")
        w.emit(EOT, "end_token", i, "user")
        w.span("message", start, i, "user")

    python_tag = cfg.tool_call_format == "python_tag"
    for i, m in indexed:
        role = m.get("role")
        content = m.get("content") or ""
        calls = m.get("tool_calls") or []
        start = w.pos
        if role in ("tool", "ipython"):
            w.emit(f"{START_HEADER}ipython{END_HEADER}\n\n", "header", i, role)
            body = json.dumps(content, ensure_ascii=False) if cfg.tool_result_tojson else content
            c0, _ = w.emit(body, "content", i, role)
            _emit_injections(w, inj.get(i), content, c0, "json" if cfg.tool_result_tojson else "raw", i, role)
            w.emit(EOT, "end_token", i, role)
        elif calls:
            if role != "assistant":
                raise RenderError(f"message {i}: tool calls on a {role!r} message")
            w.emit(f"{START_HEADER}assistant{END_HEADER}\n\n", "header", i, role)
            text = content.strip()
            if text:
                c0, _ = w.emit(text, "content", i, role)
                _emit_injections(w, inj.get(i), content, c0, "strip", i, role)
                if not python_tag:
                    w.emit("\n\n")
            for k, call in enumerate(calls):
                name, args = _call_name_args(call)
                if k:
                    w.emit("\n")
                call_start = w.pos
                if python_tag and k == 0:
                    w.emit(PYTHON_TAG)
                w.emit('{"name": "')
                w.emit(name, "tool_name", i, role)
                w.emit('", "parameters": ' + json.dumps(args, ensure_ascii=False) + "}")
                w.span("tool_call", call_start, i, role)
            w.emit(EOM if python_tag else EOT, "end_token", i, role)
        elif role in ("user", "assistant", "system"):
            w.emit(f"{START_HEADER}{role}{END_HEADER}\n\n", "header", i, role)
            c0, _ = w.emit(content.strip(), "content", i, role)
            _emit_injections(w, inj.get(i), content, c0, "strip", i, role)
            w.emit(EOT, "end_token", i, role)
        else:
            raise RenderError(f"message {i}: unknown role {role!r}")
        w.span("message", start, i, role)

    return Rendered("".join(w.parts), w.spans)


def to_template_messages(messages: Sequence[dict]) -> list[dict]:
    """trace_v1 messages -> the shape HF chat templates expect (for comparing with ``apply_chat_template``):
    tool calls as ``{"type": "function", "function": {"name", "arguments": dict}}``, key absent when empty."""
    out = []
    for m in messages:
        d: dict[str, Any] = {"role": m["role"], "content": m.get("content") or ""}
        if m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                name, args = _call_name_args(c)
                calls.append({"type": "function", "function": {"name": name, "arguments": args}})
            d["tool_calls"] = calls
        if m.get("tool_call_id"):
            d["tool_call_id"] = m["tool_call_id"]
        out.append(d)
    return out


# --------------------------------------------------------------------------------------------- parsing
_DECODER = json.JSONDecoder()


def parse_tool_calls(text: str) -> list[dict]:
    """Tool calls in an assistant turn, ``[{"name": str, "arguments": dict}]`` (``[]`` when the turn is a
    final answer or does not parse). The one parser is ``cb_core.parse.parse_completion``, which
    also reports final answers and parse failures with their reason."""
    from cb_core.parse import parse_completion

    return parse_completion(text).calls


# render_v1 (TOKEN_SPAN, RENDER_SCHEMA, TRUNCATION_DONE, RenderModel): cb_core.schemas


_TRAINED_KINDS = ("content", "tool_call")
_KIND_CODE = {k: i for i, k in enumerate(SPAN_KINDS)}


def _reject_row(row: dict, reason: str, field: str = "messages", severity: str = "malformed") -> dict:
    file, line = split_locator(row.get("source_locator"))
    raw = {k: row.get(k) for k in ("id", "dataset", "source_locator", "messages", "tools")}
    out = reject(
        dataset=row.get("dataset") or "",
        file=file,
        line=line,
        reason=reason,
        raw=canonical_json(raw),
        field=field,
        stage="renders",
        severity=severity,
    )
    return out


def _row_injections(row: dict) -> list:
    spans = row.get("_inj") or []
    if not spans and row.get("_inj1"):
        spans = [row["_inj1"]]
    return [s for s in spans if s is not None]


def _render_one(row: dict, messages: Sequence[dict], injections: list, cfg: RenderConfig,
                tool_cache: dict[str, tuple[Any, str | None]]) -> Rendered:
    tools_json = row.get("tools") or "[]"
    cached = tool_cache.get(tools_json)
    if cached is None:
        tl = normalize_tools(tools_json)
        cached = (tl, None if tl is None else _tool_defs_text(tl))
        tool_cache[tools_json] = cached
    return render_conversation(messages, cached[0], cfg, injections=injections, _tool_defs=cached[1])


def _render_rows(rows: list[dict], cfg: RenderConfig, tool_cache: dict) -> tuple[list[tuple[dict, Rendered]], list[dict]]:
    ok, rejected = [], []
    for row in rows:
        try:
            r = _render_one(row, row.get("messages") or [], _row_injections(row), cfg, tool_cache)
        except RenderError as e:
            rejected.append(_reject_row(row, f"render error: {e}", field=e.field))
            continue
        except json.JSONDecodeError as e:
            rejected.append(_reject_row(row, f"render error: {e}", field="tools"))
            continue
        ok.append((row, r))
    return ok, rejected


_INJ_CODE = SPAN_KINDS.index("injection")


def _token_spans(r: Rendered, starts: np.ndarray) -> np.ndarray:
    """(k, 4) int array: kind code, message_index, token_start, token_end (char -> token, start-char rule;
    ``injection`` spans cover every token that overlaps them, so their first token is the one holding the
    injection's first character even when BPE merged it with the character before)."""
    sp = r.spans
    # the starts' own dtype (int32 on the fast path, int64 from HF offsets): searchsorted then casts neither
    cs = np.fromiter((s.char_start for s in sp), starts.dtype, len(sp))
    ce = np.fromiter((s.char_end for s in sp), starts.dtype, len(sp))
    out = np.empty((len(sp), 4), np.int64)
    out[:, 0] = [_KIND_CODE[s.kind] for s in sp]
    out[:, 1] = [s.message_index for s in sp]
    out[:, 2] = np.searchsorted(starts, cs, "left")
    out[:, 3] = np.searchsorted(starts, ce, "left")
    inj = out[:, 0] == _INJ_CODE
    if inj.any():
        k = np.maximum(np.searchsorted(starts, cs[inj], "right") - 1, 0)
        # the first of the tokens sharing that start character (BPE splits one emoji into several byte tokens)
        out[inj, 2] = np.searchsorted(starts, starts[k], "left")
    return out


def _last_trained_message(r: Rendered) -> int | None:
    last = None
    for s in r.spans:
        if s.role == "assistant" and s.kind in _TRAINED_KINDS:
            last = s.message_index if last is None else max(last, s.message_index)
    return last


def _target_strings(attacker_args: str | None) -> list[str]:
    """Leaf strings of the attacker's arguments (the target: an IBAN, an e-mail address, a URL)."""
    if not attacker_args:
        return []
    try:
        obj = json.loads(attacker_args)
    except (json.JSONDecodeError, TypeError):
        return [attacker_args] if isinstance(attacker_args, str) and len(attacker_args) >= 4 else []
    out: list[str] = []
    stack = [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, dict):
            stack.extend(o.values())
        elif isinstance(o, list):
            stack.extend(o)
        elif isinstance(o, str) and len(o) >= 4:
            out.append(o.lower())
    return out


def last_trained_index(messages: Sequence[dict], category: str | None, attacker_tool: str | None = None,
                       attacker_args: str | None = None, injections: Sequence[Any] = ()) -> int | None:
    """Index of the last message the trace's loss mask trains on: for a harmful trace the last assistant
    message after the (first) injection that calls the attacker's tool with its target (any leaf string of
    ``attacker_args`` in the call's arguments), else its last assistant message; for retain the last
    assistant message. None when there is no assistant message (skeletons)."""
    asst = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    if not asst:
        return None
    if category == "harmful":
        starts = [sp["message_index"] if isinstance(sp, dict) else sp[0] for sp in injections or () if sp]
        after = min(starts) if starts else -1
        targets = _target_strings(attacker_args)
        hits = []
        for i in asst:
            if i <= after:
                continue
            for c in messages[i].get("tool_calls") or []:
                name, args = c.get("name") or (c.get("function") or {}).get("name"), c.get("arguments")
                if attacker_tool and name != attacker_tool:
                    continue
                text = (args if isinstance(args, str) else json.dumps(args or {}, ensure_ascii=False)).lower()
                if not targets or any(t in text for t in targets):
                    hits.append(i)
                    break
        if hits:
            return hits[-1]
    return asst[-1]


def shorten_text(content: str, cap: int, protect: Sequence[tuple[int, int]], head_fraction: float = 0.75,
                 marker: str = DEFAULT_MARKER) -> tuple[str, list[tuple[int, int]], int]:
    """Cut ``content`` to about ``cap`` characters: keep ``head_fraction`` of the cap from the head, the
    rest from the tail and every ``protect`` span whole; each removed run becomes ``marker`` with ``{n}``
    = characters removed. Returns (text, the protect spans shifted into it, characters removed)."""
    n = len(content)
    if n <= cap:
        return content, list(protect), 0
    head = int(cap * head_fraction)
    keep = sorted([(0, head), (n - (cap - head), n), *[(a, b) for a, b in protect if b > a]])
    merged: list[list[int]] = []
    for a, b in keep:
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    pieces, removed, shift = [], 0, []  # shift: (orig position, delta applying at/after it)
    delta, pos = 0, 0
    for a, b in merged:
        if a > pos:
            gap = a - pos
            mark = marker.format(n=gap)
            if len(mark) < gap:
                pieces.append(mark)
                delta += len(mark) - gap
                removed += gap
            else:
                pieces.append(content[pos:a])
            shift.append((a, delta))
        pieces.append(content[a:b])
        pos = b
    text = "".join(pieces)

    def moved(x: int) -> int:
        d = 0
        for at, dd in shift:
            if x >= at:
                d = dd
        return x + d

    return text, [(moved(a), moved(b)) for a, b in protect], removed


def shorten_tool_outputs(messages: Sequence[dict], injections: Sequence[Any], cap: int,
                         tc: TruncationConfig) -> tuple[list[dict], list[dict], int]:
    """Every tool message longer than ``cap`` characters shortened by ``shorten_text`` (its injection
    spans kept whole). Returns (messages, injection spans re-based onto them, messages shortened)."""
    by: dict[int, list[tuple[int, int]]] = {}
    for sp in injections:
        by.setdefault(sp["message_index"], []).append((sp["char_start"], sp["char_end"]))
    out, new_inj, n_short = [], [], 0
    for i, m in enumerate(messages):
        prot = by.get(i, [])
        content = m.get("content") or ""
        if m.get("role") in ("tool", "ipython") and len(content) > cap:
            text, prot2, removed = shorten_text(content, cap, prot, tc.head_fraction, tc.marker)
            if removed:
                m = {**m, "content": text}
                prot = prot2
                n_short += 1
        out.append(m)
        new_inj.extend({"message_index": i, "char_start": a, "char_end": b} for a, b in prot)
    return out, new_inj, n_short


_SKIP_FACTOR = 1.5


def _irreducible_tokens(row: dict, r: Rendered, offs: list, tc: TruncationConfig) -> int:
    """A lower bound on the length any truncation step can reach, from the trace's own tokenization: the
    tokens up to the end of the last trained message (drop_turns), minus those inside tool outputs
    (shorten_tool_outputs). The system prompt, tool definitions, user turns and assistant turns stay. A
    trace whose bound is over max_length is quarantined without re-tokenizing it (most traces over 4096
    with real tool schemas: their tool definitions alone are longer)."""
    if "cut" in tc.steps:
        return 0
    starts = _starts(offs)
    end_char = len(r.text)
    if "drop_turns" in tc.steps:
        last = last_trained_index(row.get("messages") or [], row.get("_category"), row.get("_attacker_tool"),
                                  row.get("_attacker_args"), _row_injections(row))
        if last is not None:
            end_char = next(s.char_end for s in r.spans if s.kind == "message" and s.message_index == last)
    bound = int(np.searchsorted(starts, end_char, "left"))
    if "shorten_tool_outputs" in tc.steps:
        tool = [(s.char_start, s.char_end) for s in r.spans
                if s.kind == "content" and s.role in ("tool", "ipython") and s.char_end <= end_char]
        if tool:
            a = np.searchsorted(starts, np.array([t[0] for t in tool]), "left")
            b = np.searchsorted(starts, np.array([t[1] for t in tool]), "left")
            bound -= int((b - a).sum())
    return bound


def _fit(row: dict, r: Rendered, ids: list, offs: list, tokenizer, cfg: RenderConfig, tool_cache: dict):
    """Apply ``cfg.truncation.steps`` to a rendered trace over ``max_length``. Returns (rendered, ids,
    offsets, steps done, saved_by) where saved_by is the step that made it fit ("cut": keep the head), or
    None when nothing made it fit."""
    tc, L = cfg.truncation, cfg.max_length
    msgs = list(row.get("messages") or [])
    inj = [dict(s) for s in _row_injections(row)]
    done: list[str] = []
    per_char = len(ids) / max(1, len(r.text))  # this trace's tokens per character
    if tc.steps and _irreducible_tokens(row, r, offs, tc) > L:
        return r, ids, offs, ["irreducible"], None

    def tok(rr: Rendered, final: bool = False):
        # Tokenizing is the cost (a 140k-token trace takes ~1 s): an intermediate result whose length,
        # estimated from the trace's own tokens per character, is far over max_length is not tokenized;
        # the next step (or a smaller cap) follows. At worst a cap halves once more than needed.
        if not final and len(rr.text) * per_char > _SKIP_FACTOR * L:
            return None, None
        e = tokenizer([rr.text], add_special_tokens=False, return_offsets_mapping=True)
        return e["input_ids"][0], e["offset_mapping"][0]

    for step in tc.steps:
        if step == "drop_turns":
            last = last_trained_index(msgs, row.get("_category"), row.get("_attacker_tool"),
                                      row.get("_attacker_args"), inj)
            if last is None or last + 1 >= len(msgs):
                continue
            msgs = msgs[: last + 1]
            inj = [s for s in inj if s["message_index"] <= last]
            r = _render_one(row, msgs, inj, cfg, tool_cache)
            ids, offs = tok(r)
            done.append("dropped_turns")
        elif step == "shorten_tool_outputs":
            cap, best = tc.tool_output_max_chars, None
            while cap >= tc.tool_output_min_chars:
                m2, inj2, n_short = shorten_tool_outputs(msgs, inj, cap, tc)
                if n_short:
                    r2 = _render_one(row, m2, inj2, cfg, tool_cache)
                    best = (m2, inj2, r2, *tok(r2))
                    if best[3] is not None and len(best[3]) <= L:
                        break
                cap //= 2
            if best is None:
                continue
            msgs, inj, r, ids, offs = best
            done.append("shortened_tool_outputs")
        elif step == "cut":
            if ids is None:
                ids, offs = tok(r, final=True)
            return r, ids, offs, done, "cut"
        if ids is not None and len(ids) <= L:
            return r, ids, offs, done, step
    if ids is None:
        ids, offs = tok(r, final=True)  # for the quarantine reason
    return r, ids, offs, done, None


def _starts(offs) -> np.ndarray:
    """Each token's first character: ``FastEncoder`` gives them as an array, HF as (start, end) pairs."""
    if isinstance(offs, np.ndarray):
        return offs
    return np.fromiter((o[0] for o in offs), np.int64, len(offs))


def _encode_batch(texts: list[str], tokenizer, fe, blocks: list | None = None) -> tuple[list, list]:
    """(ids, start chars) per text: the tiktoken fast path when ``fe`` is set (a text it cannot take, a
    lone surrogate, goes to HF alone), else one HF batch call with offsets. ``blocks``: per text, the
    character ranges the fast path caches whole (the tool definitions)."""
    if not texts:
        return [], []
    if fe is None:
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        return enc["input_ids"], enc["offset_mapping"]
    from cb_core.llama3_fast import Unencodable

    ids, starts = [], []
    for k, t in enumerate(texts):
        try:
            i, st = fe.encode_with_starts(t, blocks[k] if blocks else ())
        except Unencodable:
            e = tokenizer([t], add_special_tokens=False, return_offsets_mapping=True)
            i, st = e["input_ids"][0], e["offset_mapping"][0]
        ids.append(i)
        starts.append(st)
    return ids, starts


_ROLES = ("", "system", "user", "assistant", "tool", "ipython")
_ROLE_CODE = {r: i for i, r in enumerate(_ROLES)}
_WORK: tuple | None = None  # (rows table, tokenizer, fast encoder, tokenizer id, cfg, StepQueue): set before forking


def _process_chunk(args: tuple) -> Iterator[tuple]:
    """Render + tokenize + map rows ``step`` at a time, yielding each step's result (see `_chunk`).
    ``args``: (rows as an Arrow table, tokenizer, fast encoder or None, tok_id, cfg) for all of them in
    order, or (worker index,) in a forked worker, which takes its steps from ``_WORK``'s shared queue
    (nothing big is pickled on the way in; each step's Arrow table comes back). The cyclic garbage
    collector is off meanwhile (`forking.gc_paused`: ~12 % of the time here)."""
    with forking.gc_paused():
        yield from _chunk(args)


# Rows per step on the fast path: render, tokenize and map this many, then the next, so the texts, start
# arrays and row objects of a step die before the next one's are made and their memory is reused. A whole
# share at once kept them all alive: peak memory over all shared traces (16 M tokens) 325 MB against 111 MB
# now, and ~20 k copy-on-write faults per forked worker against ~7 k (the time is the same). It is also the
# longest run of the balance between workers (`forking.StepQueue`: runs shrink to a quarter of this as the
# rows left run out, so the workers finish together). The HF path takes one batch per worker (its batch
# call is what it is fast at).
STEP_ROWS = 32


def _chunk(args: tuple) -> Iterator[tuple]:
    """Yields (first row, render_v1 Arrow table, render rejects, length rejects, timings, truncation counts)
    per step (a run of rows) done."""
    if len(args) == 1:  # worker k: runs of _WORK's rows from the shared queue
        table, tokenizer, fe, tok_id, cfg, queue = _WORK
        k = args[0]

        def claim() -> tuple[int, int] | None:
            return queue.take(k)
    else:
        table, tokenizer, fe, tok_id, cfg = args
        n = table.num_rows
        step = STEP_ROWS if fe is not None else max(n, 1)
        order = iter([(a, min(a + step, n)) for a in range(0, n, step)])

        def claim() -> tuple[int, int] | None:
            return next(order, None)
    tool_cache: dict[str, tuple[Any, str | None]] = {}
    while (run := claim()) is not None:
        s, stop = run
        cpu0 = time.thread_time()  # this worker's own (a process's would add its other threads)
        faults0 = _thread_faults()
        t0 = time.perf_counter()
        rows = table.slice(s, stop - s).to_pylist()  # pyarrow, not polars (not safe after fork)
        t1 = time.perf_counter()
        rendered, rejected = _render_rows(rows, cfg, tool_cache)
        t2 = time.perf_counter()
        blocks = [[(sp.char_start, sp.char_end) for sp in r.spans if sp.kind == "tool_defs"] for _, r in rendered]
        all_ids, all_offs = _encode_batch([r.text for _, r in rendered], tokenizer, fe, blocks)
        t3 = time.perf_counter()
        cols: dict[str, list] = {k: [] for k in _RENDER_COLS}
        late: list[dict] = []
        trunc: dict[str, dict[str, int]] = {}
        _map_rows(rendered, all_ids, all_offs, tokenizer if fe is None else fe, cfg, tool_cache, cols, late, trunc)
        out = _step_table(cols, tok_id)
        t4 = time.perf_counter()
        tm = {"rows_s": t1 - t0, "render_s": t2 - t1, "tokenize_s": t3 - t2, "map_s": t4 - t3,
              "cpu_s": time.thread_time() - cpu0, "faults": _thread_faults() - faults0, "rows": stop - s,
              "end": time.perf_counter()}  # CLOCK_MONOTONIC: comparable across the forked workers
        yield s, out, rejected, late, tm, trunc


def _idle(results: list[list[tuple]]) -> list[float]:
    """Per worker: seconds from the end of its last step to the end of the last step of any worker."""
    ends = [max((d[4]["end"] for d in done), default=None) for done in results]
    last = max((e for e in ends if e is not None), default=0.0)
    return [round(last - e, 4) if e is not None else None for e in ends]


def _thread_faults() -> int:
    """Page faults of this thread so far (first writes to fresh or copy-on-write pages: what a forked worker
    pays that one process does not)."""
    return resource.getrusage(getattr(resource, "RUSAGE_THREAD", resource.RUSAGE_SELF)).ru_minflt


_RENDER_COLS = ("trace_id", "input_ids", "spans", "n_tokens", "truncated", "truncation")


def _map_rows(rendered, all_ids, all_offs, fit_tok, cfg: "RenderConfig", tool_cache: dict, cols: dict[str, list],
              rejected: list[dict], trunc: dict[str, dict[str, int]]) -> None:
    """Token spans for each rendered row (truncating one over ``cfg.max_length``), appended to ``cols``."""
    L = cfg.max_length
    for j, (row, r) in enumerate(rendered):
        ids = all_ids[j]
        offs = all_offs[j]
        n0 = len(ids)
        how, cut = "none", False
        if n0 > L:
            c = trunc.setdefault(row.get("dataset") or "", dict.fromkeys(_TRUNC_COUNTS, 0))
            c["over_length"] += 1
            try:
                r, ids, offs, done, saved_by = _fit(row, r, ids, offs, fit_tok, cfg, tool_cache)
            except RenderError as e:  # not expected (the full trace rendered); never fail the batch on it
                c["quarantined"] += 1
                rejected.append(_reject_row(row, f"render error while truncating: {e}", field=e.field))
                continue
            if saved_by is None:
                c["quarantined"] += 1
                if done == ["irreducible"]:
                    why = (f"; its {_irreducible_tokens(row, r, offs, cfg.truncation)} tokens outside later turns "
                           f"and tool outputs alone exceed it")
                elif done:
                    why = f"; still {len(ids)} after {'+'.join(done)}"
                else:
                    why = "; no truncation step applies" if cfg.truncation.steps else "; no truncation step configured"
                rejected.append(_reject_row(row, f"too long: {n0} tokens > max_length={L}{why}", severity="excluded"))
                continue
            cut = saved_by == "cut"
            how = "+".join(done + (["cut"] if cut else [])) or "none"
        ts = _token_spans(r, _starts(offs))
        n = len(ids)
        keep = np.ones(len(ts), bool)
        if cut:
            ids = ids[:L]
            keep = ts[:, 2] < L
            ts[:, 3] = np.minimum(ts[:, 3], L)
            last = _last_trained_message(r)
            if last is not None:
                alive = any(
                    keep[k] and ts[k, 3] > ts[k, 2]
                    for k, s in enumerate(r.spans)
                    if s.message_index == last and s.kind in _TRAINED_KINDS and s.role == "assistant"
                )
                if not alive:
                    c["quarantined"] += 1
                    rejected.append(
                        _reject_row(
                            row,
                            f"truncated: trained span cut away (no content/tool-call token of the last assistant "
                            f"message, index {last}, within max_length={L}; trace has {n} tokens)",
                            severity="excluded",
                        )
                    )
                    continue
            n = L
        if how != "none":
            c[_SAVED_BY[saved_by]] += 1
        cols["trace_id"].append(row["id"])
        cols["input_ids"].append(np.asarray(ids[:n], np.int32))
        sp = np.empty((int(keep.sum()), 5), np.int32)  # kind code, message_index, role code, start, end
        sp[:, [0, 1, 3, 4]] = ts[keep]
        sp[:, 2] = [_ROLE_CODE.get(s.role, 0) for k, s in enumerate(r.spans) if keep[k]]
        cols["spans"].append(sp)
        cols["n_tokens"].append(n)
        cols["truncated"].append(how != "none")
        cols["truncation"].append(how)


# per-dataset counts of the truncation policy (renders metadata "truncation")
_SAVED_BY = {"drop_turns": "saved_by_drop_turns", "shorten_tool_outputs": "saved_by_shorten_tool_outputs",
             "cut": "saved_by_cut"}
_TRUNC_COUNTS = ("over_length", *_SAVED_BY.values(), "quarantined")


def _inline_views(names: Sequence[str]) -> np.ndarray:
    """Arrow string-view entries (16 bytes: length, then the bytes inline) of short strings, one row per
    name: a column of codes becomes a string-view column with one numpy gather."""
    out = np.zeros((len(names), 16), np.uint8)
    for i, name in enumerate(names):
        b = name.encode("utf-8")
        if len(b) > 12:  # Arrow keeps only strings of up to 12 bytes inline
            raise ValueError(f"{name!r}: longer than an inline string view")
        out[i, :4] = np.frombuffer(np.int32(len(b)).tobytes(), np.uint8)
        out[i, 4:4 + len(b)] = np.frombuffer(b, np.uint8)
    return out


_KIND_VIEWS = _inline_views(SPAN_KINDS)
_ROLE_VIEWS = _inline_views(_ROLES)


def _coded_strings(codes: np.ndarray, views: np.ndarray):
    """Codes -> a string-view Arrow array (polars' own string layout: it takes the column without a
    conversion; large_string spans cost 2-3 ms to convert per 1000 renders, in the serial stacking)."""
    import pyarrow as pa

    return pa.Array.from_buffers(pa.string_view(), len(codes), [None, pa.py_buffer(views[codes])])


def _step_table(cols: dict[str, list], tok_id: str):
    """One step's per-trace numpy arrays -> render_v1 columns as an Arrow table (list arrays over one flat
    buffer, no Python object per token or span; strings as string views, polars' layout). Built in the
    worker that rendered the step, so the copying is shared out too; `render_traces` only stacks the
    steps' tables (no copy)."""
    import pyarrow as pa

    n = len(cols["trace_id"])
    ids = cols["input_ids"]
    id_off = np.zeros(n + 1, np.int64)
    np.cumsum([len(x) for x in ids], out=id_off[1:])
    sp = cols["spans"]
    sp_off = np.zeros(n + 1, np.int64)
    np.cumsum([len(x) for x in sp], out=sp_off[1:])
    flat = np.concatenate(sp) if sp_off[-1] else np.zeros((0, 5), np.int32)
    struct = pa.StructArray.from_arrays(
        [_coded_strings(flat[:, 0], _KIND_VIEWS), pa.array(flat[:, 1], pa.int32()),
         _coded_strings(flat[:, 2], _ROLE_VIEWS), pa.array(flat[:, 3], pa.int32()), pa.array(flat[:, 4], pa.int32())],
        names=["kind", "message_index", "role", "token_start", "token_end"],
    )
    flat_ids = np.concatenate(ids).astype(np.int32, copy=False) if n else np.zeros(0, np.int32)
    return pa.table({
        "trace_id": pa.array(cols["trace_id"], pa.string_view()),
        "tokenizer_id": pa.array([tok_id] * n, pa.string_view()),
        "input_ids": pa.LargeListArray.from_arrays(pa.array(id_off), pa.array(flat_ids)),
        "spans": pa.LargeListArray.from_arrays(pa.array(sp_off), struct),
        "n_tokens": pa.array(np.asarray(cols["n_tokens"], np.int32)),
        "truncated": pa.array(cols["truncated"], pa.bool_()),
        "truncation": pa.array(cols["truncation"], pa.string_view()),
    })


AUTO_MIN_ROWS_PER_WORKER = 256


def _render_shares(frame: pl.DataFrame, tokenizer, fe, tok_id: str, cfg: "RenderConfig", workers: int,
                   timings: dict | None = None) -> list[tuple]:
    """Render the rows in ``workers`` processes: this one and forked children (``cb_core.forking.fork_map``:
    they inherit the rows as one Arrow table, the tokenizer and the block cache; only a worker index goes in,
    each step's render_v1 Arrow table comes back, streamed into the child's file as it is done). The rows
    are cut into steps that the workers take from one ``forking.StepQueue``: each starts on its own
    contiguous part of the input (neighbours share tool outputs and prompts, so they hit one block cache)
    and then helps with what is left of the others, so both finish together; `render_traces` puts the
    steps back in order. A static split did not balance:
    cutting by characters or pair groups left one process up to 1.5x the other's time (cache hits and
    per-piece costs vary by suite)."""
    global _WORK
    n = frame.height
    step = STEP_ROWS if fe is not None else -(-n // workers)
    queue = forking.StepQueue(n, workers, max_run=step, min_run=max(1, step // 4) if fe is not None else step)
    # polars' newest Arrow level shares its string views with the frame: no copy (10-17 ms for 1000 traces)
    _WORK = (frame.to_arrow(compat_level=pl.CompatLevel.newest()), tokenizer, fe, tok_id, cfg, queue)
    try:
        return forking.fork_map(_process_chunk, [(k,) for k in range(workers)], what="render worker", stream=True,
                                timings=timings)
    finally:
        _WORK = None
        queue.close()


def _render_frame(traces: pl.DataFrame) -> pl.DataFrame:
    """The columns of a trace_v1 frame the renderer reads (the label and attack fields it needs flattened)."""
    cols_needed = ["id", "dataset", "source_locator", "messages", "tools"]
    sel = [c for c in cols_needed if c in traces.columns]
    if "labels" in traces.columns:
        sel.append(pl.col("labels").struct.field("category").alias("_category"))
    if "tool_attack" in traces.columns:
        ta = pl.col("tool_attack")
        sel += [
            ta.struct.field("injection_spans").alias("_inj"),
            ta.struct.field("injection_span").alias("_inj1"),
            ta.struct.field("attacker_tool").alias("_attacker_tool"),
            ta.struct.field("attacker_args").alias("_attacker_args"),
        ]
    return traces.select(sel)


def render_traces(
    traces: pl.DataFrame,
    tokenizer,
    cfg: RenderConfig | None = None,
    *,
    num_workers: int | None = None,
    stats: dict | None = None,
    fast: bool = True,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """trace_v1 frame -> (render_v1 frame, quarantine rows with stage="renders").

    Renders every trace once (spans recorded, injection spans from ``tool_attack.injection_spans``),
    tokenizes it, and maps character spans to token spans with ``searchsorted``. A Llama-3 tokenizer is run
    through ``cb_core.llama3_fast`` (tiktoken core between special tokens, repeated blocks cached, token
    start characters from byte lengths: the same ids as HF, tested); any other tokenizer (or
    ``fast=False``) takes one HF batch call with offsets. A trace longer than ``cfg.max_length`` goes through ``cfg.truncation.steps`` in order
    (see ``TruncationConfig``; re-rendered and re-tokenized alone after each step) until it fits; the row
    records ``truncated`` and ``truncation`` (the steps done, "+"-joined, or "none"). A trace no step makes
    fit goes to quarantine (severity "excluded", the reason names its length). Traces without assistant
    turns (skeletons) render normally. ``num_workers`` (default ``cfg.num_workers``) > 1 shares the rows
    out, step by step, among that many processes (this one and forked children, see ``_render_shares``);
    the result is the same as one process's. 0 picks one per core when each gets
    ``AUTO_MIN_ROWS_PER_WORKER`` rows. ``stats``, if given, receives timings and counts (per worker: steps
    taken and their CPU seconds; with more than one, ``forking.fork_map``'s timings), and
    ``truncation``: per dataset, traces over the length, saved by each step, and quarantined.
    """
    from cb_core.tokenizer import tokenizer_id

    cfg = cfg or RenderConfig()
    workers = int(num_workers if num_workers is not None else cfg.num_workers)
    if workers <= 0:  # auto: one per core, when each gets enough traces to pay for the fork and the gather
        from cb_core.forking import cores

        workers = max(1, min(cores(), traces.height // AUTO_MIN_ROWS_PER_WORKER))
    tok_id = tokenizer_id(tokenizer)
    from cb_core.llama3_fast import fast_encoder

    fe = fast_encoder(tokenizer) if fast else None
    frame = _render_frame(traces)
    t0 = time.perf_counter()
    n_rows = frame.height
    shares_timing: dict = {}
    if workers == 1 or n_rows < 2 * workers:
        workers = 1
        results = [list(_process_chunk((frame.to_arrow(compat_level=pl.CompatLevel.newest()), tokenizer, fe, tok_id, cfg)))]
    else:
        results = _render_shares(frame, tokenizer, fe, tok_id, cfg, workers, shares_timing)
    t1 = time.perf_counter()
    # every worker's steps in input order: the renders, then the render errors and the length rejects each
    # in row order, as one process makes them
    steps = sorted((d for done in results for d in done), key=lambda d: d[0])
    rejected = [r for d in steps for r in d[2]] + [r for d in steps for r in d[3]]
    timing = {k: sum(d[4][k] for d in steps) for k in ("rows_s", "render_s", "tokenize_s", "map_s", "cpu_s")}
    trunc: dict[str, dict[str, int]] = {}
    for d in steps:
        for ds, cnt in d[5].items():
            acc = trunc.setdefault(ds, dict.fromkeys(_TRUNC_COUNTS, 0))
            for k, v in cnt.items():
                acc[k] += v
    if steps:
        import pyarrow as pa

        # one chunk per step, not copied into one (a rechunk took ~20 ms of page faults on fresh memory for
        # 1000 traces; the chunks cost less than that when the frame is written or read)
        renders = pl.from_arrow(pa.concat_tables([d[1] for d in steps]))
        if renders.schema != RENDER_SCHEMA:  # the steps' tables are built to it: a no-op cast took 1-4 ms
            renders = renders.cast(RENDER_SCHEMA)
    else:
        renders = pl.DataFrame(schema=RENDER_SCHEMA)
    timing["frame_s"] = time.perf_counter() - t1
    quarantine = pl.DataFrame(rejected, schema=QUARANTINE_SCHEMA) if rejected else pl.DataFrame(schema=QUARANTINE_SCHEMA)
    if stats is not None:
        stats.update(timing)
        stats.update(
            wall_s=time.perf_counter() - t0,
            n_in=n_rows,
            n_rendered=renders.height,
            n_rejected=len(rejected),
            n_truncated=int(renders["truncated"].sum()) if renders.height else 0,
            n_tokens=int(renders["n_tokens"].sum()) if renders.height else 0,
            workers=workers,
            worker_steps=[len(done) for done in results],
            worker_rows=[sum(d[4]["rows"] for d in done) for done in results],
            worker_cpu_s=[round(sum(d[4]["cpu_s"] for d in done), 4) for done in results],
            worker_faults=[sum(d[4]["faults"] for d in done) for done in results],
            # how long each worker had nothing left to take while another finished its last step
            worker_idle_s=_idle(results),
            **shares_timing,
            truncation=dict(sorted(trunc.items())),
        )
    return renders, quarantine


def decode_span(tokenizer, input_ids: Sequence[int], span: dict) -> str:
    """The text of one token span (handy in tests and previews)."""
    return tokenizer.decode(list(input_ids[span["token_start"] : span["token_end"]]), skip_special_tokens=False)


# ----------------------------------------------------------------------------------- official template
OFFICIAL_TEMPLATE_NAME = "meta-llama-Llama-3.1-8B-Instruct.jinja"


def official_llama31_template(cache_dir: str | os.PathLike | None = None, timeout: int = 600) -> str:
    """Meta's Llama-3.1 chat template as vendored by llama.cpp, fetched from the llama-cpp-python sdist
    (``pip download --no-deps --no-binary :all:``) and cached (``$CB_CACHE_DIR/templates`` or
    ``~/.cache/cb_platform/templates``). For tests and benchmarks; the renderer itself never needs it.
    Raises ``RuntimeError`` when it cannot be fetched."""
    import subprocess
    import sys
    import tarfile
    import tempfile
    from pathlib import Path

    if cache_dir is None:
        root = os.environ.get("CB_CACHE_DIR")
        cache_dir = (Path(root).expanduser() if root else Path.home() / ".cache" / "cb_platform") / "templates"
    cache = Path(cache_dir)
    target = cache / OFFICIAL_TEMPLATE_NAME
    if target.is_file():
        return target.read_text(encoding="utf-8")
    names = (
        f"vendor/llama.cpp/models/templates/{OFFICIAL_TEMPLATE_NAME}",
        "vendor/llama.cpp/models/templates/meta-llama-Meta-Llama-3.1-8B-Instruct.jinja",
    )
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "llama-cpp-python",
             "-d", tmp],
            capture_output=True, text=True, timeout=timeout,
        )
        sdists = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if not sdists:
            raise RuntimeError(f"could not download the llama-cpp-python sdist: {proc.stderr[-2000:]}")
        with tarfile.open(sdists[0]) as tf:
            member = next((m for m in tf.getmembers() if m.name.split("/", 1)[-1] in names), None)
            if member is None:
                raise RuntimeError(f"{sdists[0].name} has no {OFFICIAL_TEMPLATE_NAME}")
            text = tf.extractfile(member).read().decode("utf-8")
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmpf = tempfile.mkstemp(dir=cache, prefix=".tpl.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmpf, target)
    return text
