"""What a model's assistant turn says: tool calls, a final answer, or a parse failure with its reason.

One parser for generation, the judge and evaluation (``cb_core.render.parse_tool_calls`` delegates here).
Forms read (what Llama-3.1-style models really emit; see the tests for one example of each):

* ``<|python_tag|>{"name": N, "parameters": {...}}<|eom_id|>`` (or ending on ``<|eot_id|>``), optionally
  after free text (the text before the tag is the message content);
* plain ``{"name": N, "parameters": {...}}<|eot_id|>`` (the official template's form), at the start or
  after free text;
* several calls one after another, separated by ``;``, ``,`` or whitespace/newlines;
* ``"arguments"`` instead of ``"parameters"``, arguments as a JSON object or as JSON text of one
  (OpenAI style); the OpenAI envelope ``{"type": "function", "function": {...}}``;
* pythonic calls ``name(arg=value, ...)`` / ``[f(a=1), g(b="x")]`` / ``brave_search.call(query="...")``
  (keyword arguments with literal values only; read with ``ast``, never evaluated);
* trailing text after the calls (kept in ``text``).

The turn ends at the first ``<|eot_id|>``, ``<|eom_id|>``, ``<|end_of_text|>`` (or a new
``<|start_header_id|>``, a model starting the next turn by itself); that token is reported as ``end_token``.
A leading ``<|start_header_id|>assistant<|end_header_id|>`` (a whole rendered turn) is skipped.
A call-looking turn that does not parse (cut-off JSON, arguments that are not an object, positional
arguments, ``<|python_tag|>`` followed by prose) is ``unparseable`` with the reason; an empty turn too.
Everything else is a ``final_answer``.
"""
from __future__ import annotations

import ast
import functools
import json
import re
from dataclasses import dataclass, field
from typing import Any

from cb_core.schemas import lone_surrogate

PYTHON_TAG = "<|python_tag|>"
END_TOKENS = ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|start_header_id|>")
KINDS = ("tool_calls", "final_answer", "unparseable")

_DECODER = json.JSONDecoder()
_CALL_START = re.compile(r'\{\s*"(?:name|type|function)"\s*:')
_NAME_START = re.compile(r'\{\s*"name"\s*:')
_PY_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")
_SEPARATORS = " \t\r\n;,"


@dataclass
class ParsedCompletion:
    kind: str  # tool_calls | final_answer | unparseable
    calls: list[dict] = field(default_factory=list)  # [{"name": str, "arguments": dict}]
    text: str = ""  # free text (the answer; the content around calls; the raw turn when unparseable)
    reason: str | None = None  # why it is unparseable
    end_token: str | None = None  # the token the turn ended on (None: cut off, no end token)
    form: str | None = None  # python_tag | json | pythonic (tool_calls only)

    @property
    def names(self) -> list[str]:
        return [c["name"] for c in self.calls]


class _CallError(ValueError):
    pass


def _cut_end(text: str) -> tuple[str, str | None]:
    if text.startswith("<|start_header_id|>"):  # a whole turn, header included: read its body
        h = text.find("<|end_header_id|>")
        text = text[h + len("<|end_header_id|>") :].lstrip("\n") if h >= 0 else text
    best, tok = len(text), None
    for t in END_TOKENS:
        i = text.find(t)
        if 0 <= i < best:
            best, tok = i, t
    return text[:best], tok


def _as_call(obj: Any, *, strict: bool) -> dict | None:
    """A decoded JSON object -> {"name", "arguments"}; None when it is not a call. ``strict`` (plain JSON,
    no python_tag): a call must carry "parameters" or "arguments"; after the tag a bare {"name": N} is a
    call without arguments. Raises _CallError for a call whose arguments are not an object."""
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("function"), dict) and obj.get("type", "function") == "function":
        obj = obj["function"]
    name = obj.get("name")
    if not isinstance(name, str) or not name.strip():
        return None
    has_args = "parameters" in obj or "arguments" in obj
    if not has_args and (strict or set(obj) - {"name", "type"}):
        return None
    args = obj.get("parameters", obj.get("arguments"))
    if args is None:
        args = {}
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            raise _CallError(f"arguments of {name!r} are a string that is not JSON ({e.msg})") from None
    if not isinstance(args, dict):
        raise _CallError(f"arguments of {name!r} are a JSON {type(args).__name__}, not an object")
    return {"name": name.strip(), "arguments": args}


def _balanced_end(s: str, i: int) -> int:
    """Index just past the bracket group opening at s[i] ('(' or '['), quotes respected; -1 if unclosed."""
    pairs = {"(": ")", "[": "]", "{": "}"}
    stack, q, k = [], None, i
    while k < len(s):
        ch = s[k]
        if q:
            if ch == "\\":
                k += 2
                continue
            if ch == q:
                q = None
        elif ch in "\"'":
            q = ch
        elif ch in pairs:
            stack.append(pairs[ch])
        elif ch in ")]}":
            if not stack or stack.pop() != ch:
                return -1
            if not stack:
                return k + 1
        k += 1
    return -1


def _py_call(node: ast.AST) -> dict:
    if not isinstance(node, ast.Call):
        raise _CallError("not a function call")
    parts, f = [], node.func
    while isinstance(f, ast.Attribute):
        parts.append(f.attr)
        f = f.value
    if not isinstance(f, ast.Name):
        raise _CallError("call target is not a name")
    parts.append(f.id)
    parts.reverse()
    if len(parts) > 1 and parts[-1] == "call":  # Llama built-in tools: brave_search.call(query=...)
        parts = parts[:-1]
    name = ".".join(parts)
    if node.args:
        raise _CallError(f"positional arguments in pythonic call {name}(...): names unknown")
    args = {}
    for kw in node.keywords:
        if kw.arg is None:
            raise _CallError(f"**kwargs in pythonic call {name}(...)")
        try:
            args[kw.arg] = ast.literal_eval(kw.value)
        except (ValueError, SyntaxError, TypeError):
            raise _CallError(f"argument {kw.arg!r} of {name}(...) is not a literal") from None
    return {"name": name, "arguments": args}


def _pythonic_at(s: str, i: int) -> tuple[list[dict], int] | None:
    """Pythonic call(s) starting at s[i]: ``name(...)`` or ``[name(...), ...]``. None when s[i:] does not
    start like one; raises _CallError when it does but does not parse."""
    if s.startswith("[", i):
        k = i + 1
        while k < len(s) and s[k] in " \t\r\n":
            k += 1
        m = _PY_NAME.match(s, k)
        if not m or not s[m.end() :].lstrip().startswith("("):
            return None
        end = _balanced_end(s, i)
        if end < 0:
            raise _CallError("unclosed [ ... ] of pythonic calls")
        try:
            node = ast.parse(s[i:end], mode="eval").body
        except SyntaxError as e:
            raise _CallError(f"pythonic call list does not parse ({e.msg})") from None
        if not isinstance(node, ast.List) or not node.elts:
            raise _CallError("not a list of calls")
        return [_py_call(e) for e in node.elts], end
    m = _PY_NAME.match(s, i)
    if not m or not s.startswith("(", m.end()):
        return None
    end = _balanced_end(s, m.end())
    if end < 0:
        raise _CallError(f"unclosed pythonic call {m.group(0)}(...")
    try:
        node = ast.parse(s[i:end], mode="eval").body
    except SyntaxError as e:
        raise _CallError(f"pythonic call {m.group(0)}(...) does not parse ({e.msg})") from None
    return [_py_call(node)], end


def _call_sequence(s: str, *, strict: bool) -> tuple[list[dict], str, str | None]:
    """Calls one after another from the start of ``s`` (after the python_tag): (calls, trailing text, form).
    Raises _CallError when the first thing is no call."""
    calls: list[dict] = []
    form = None
    i, n = 0, len(s)
    while True:
        j = i
        while j < n:  # separators, and a repeated tag before the next call ("{...}; <|python_tag|>{...}")
            if s[j] in _SEPARATORS:
                j += 1
            elif s.startswith(PYTHON_TAG, j):
                j += len(PYTHON_TAG)
            else:
                break
        if j >= n:
            return calls, "", form
        if s[j] == "{":
            try:
                obj, end = _DECODER.raw_decode(s, j)
            except json.JSONDecodeError as e:
                if calls:
                    return calls, s[i:].strip(), form
                raise _CallError(f"call JSON does not parse ({e.msg} at char {e.pos - j})") from None
            call = _as_call(obj, strict=strict)
            if call is None:
                if calls:
                    return calls, s[i:].strip(), form
                raise _CallError("JSON object is not a call (no \"name\" with \"parameters\"/\"arguments\")")
            calls.append(call)
            form = form or "json"
            i = end
            continue
        py = _pythonic_at(s, j) if not calls or form == "pythonic" else None
        if py is None:
            if calls:
                return calls, s[i:].strip(), form
            raise _CallError(f"no tool call after {PYTHON_TAG}: {s[j:j + 60]!r}")
        calls.extend(py[0])
        form = "pythonic"
        i = py[1]


def _json_calls_anywhere(body: str) -> tuple[list[dict], str]:
    """Plain-JSON calls anywhere in ``body`` (text before, between or after them is the content)."""
    calls, kept, i = [], [], 0
    for m in _CALL_START.finditer(body):
        j = m.start()
        if j < i:
            continue
        try:
            obj, end = _DECODER.raw_decode(body, j)
        except json.JSONDecodeError:
            continue
        call = _as_call(obj, strict=True)
        if call is None:
            continue
        calls.append(call)
        kept.append(body[i:j])
        i = end
    kept.append(body[i:])
    text = "\n".join(p.strip(_SEPARATORS) for p in kept if p.strip(_SEPARATORS))
    return calls, text


def parse_completion(text: str) -> ParsedCompletion:
    """One assistant turn (decoded with special tokens kept) -> ParsedCompletion. Model output no one has
    seen never raises: what the JSON and literal parsers refuse past their limits (nesting deeper than the
    recursion limit, an integer over Python's 4,300 digits) is unparseable with that reason, and so is a call
    whose arguments hold a lone surrogate escape (no table can store it)."""
    try:
        parsed = _parse(text)
    except (RecursionError, ValueError, OverflowError, MemoryError) as e:
        body, end = _cut_end(text or "")
        why = "nested deeper than the parser's recursion limit" if isinstance(e, RecursionError) else str(e)
        return ParsedCompletion("unparseable", text=body.strip(), reason=f"call does not parse ({why})", end_token=end)
    where = lone_surrogate(parsed.calls) if parsed.calls else None
    if where is not None:
        return ParsedCompletion("unparseable", text=_cut_end(text or "")[0].strip(), end_token=parsed.end_token,
                                reason=f"call {where} holds a lone surrogate escape (half a UTF-16 pair)")
    return parsed


def _parse(text: str) -> ParsedCompletion:
    body, end = _cut_end(text or "")
    tag = body.find(PYTHON_TAG)
    if tag >= 0:
        pre, post = body[:tag].strip(), body[tag + len(PYTHON_TAG) :]
        try:
            calls, rest, form = _call_sequence(post, strict=False)
        except _CallError as e:
            return ParsedCompletion("unparseable", text=body.strip(), reason=str(e), end_token=end)
        if not calls:
            return ParsedCompletion(
                "unparseable", text=body.strip(), reason=f"nothing after {PYTHON_TAG}", end_token=end
            )
        try:  # a plain-JSON call before the tag was made first: it is the turn's first call, not its text
            pre_calls, pre = _json_calls_anywhere(pre) if "{" in pre else ([], pre)
        except _CallError as e:
            return ParsedCompletion("unparseable", text=body.strip(), reason=str(e), end_token=end)
        content = "\n".join(p for p in (pre, rest.replace(PYTHON_TAG, "").strip()) if p)
        return ParsedCompletion("tool_calls", pre_calls + calls, content, None, end,
                                "python_tag" if form == "json" else form)

    stripped = body.strip()
    if not stripped:
        why = "empty completion" if end else "empty completion (no end token)"
        return ParsedCompletion("unparseable", text="", reason=why, end_token=end)
    try:
        calls, content = _json_calls_anywhere(body)
    except _CallError as e:
        return ParsedCompletion("unparseable", text=stripped, reason=str(e), end_token=end)
    if calls:
        return ParsedCompletion("tool_calls", calls, content, None, end, "json")
    try:
        py = _pythonic_at(stripped, 0)
    except _CallError as e:
        return ParsedCompletion("unparseable", text=stripped, reason=str(e), end_token=end)
    if py is not None:
        return ParsedCompletion("tool_calls", py[0], stripped[py[1] :].strip(_SEPARATORS), None, end, "pythonic")
    m = _NAME_START.search(body)
    if m is not None or stripped.startswith("{"):
        j = m.start() if m is not None else body.find("{")
        try:
            obj, _ = _DECODER.raw_decode(body, j)
            why = "JSON object is not a call (no \"name\" with \"parameters\"/\"arguments\")"
            try:
                if isinstance(obj, dict) and _as_call(obj, strict=False) is not None:
                    why = "call JSON without \"parameters\"/\"arguments\" outside <|python_tag|>"
            except _CallError as e:
                why = str(e)
        except json.JSONDecodeError as e:
            why = f"call JSON does not parse ({e.msg} at char {e.pos - j})"
        return ParsedCompletion("unparseable", text=stripped, reason=why, end_token=end)
    return ParsedCompletion("final_answer", text=stripped, end_token=end)


def tool_calls(text: str) -> list[dict]:
    """Just the calls (``[]`` for a final answer or an unparseable turn)."""
    return parse_completion(text).calls


# ------------------------------------------------------------------------------------------ schema rule
def schema_fn(schema: Any) -> dict:
    """The function object of one tool schema (OpenAI-style ``{"type": "function", "function": {...}}`` or bare)."""
    if isinstance(schema, dict) and isinstance(schema.get("function"), dict):
        return schema["function"]
    return schema if isinstance(schema, dict) else {}


def schema_name(schema: Any) -> str | None:
    return schema_fn(schema).get("name")


@functools.lru_cache(maxsize=64)
def _schemas_by_name(tools: str) -> dict[str, dict] | None:
    """A `tools` JSON text's function objects by name (None: not JSON). Cached: a suite's 20 kB tool set is one
    text across its thousands of traces. Callers only read it."""
    try:
        schemas = json.loads(tools)
    except (TypeError, ValueError):
        return None
    return {schema_name(s): schema_fn(s) for s in (schemas if isinstance(schemas, list) else [])}


def tool_call_problems(msgs: list[dict], tools: str | None) -> list[str]:
    """What is wrong with the tool calls of ``msgs`` against the trace's tool schemas (``tools``, JSON text):
    arguments that are not a JSON object, a tool the trace does not offer, a required parameter missing.
    The one rule behind the training preflight and the generation judge's keep decision."""
    calls = [(i, c) for i, m in enumerate(msgs or []) for c in ((m or {}).get("tool_calls") or [])]
    if not calls:
        return []
    if not tools:
        by_name: dict[str, dict] | None = {}
    else:
        by_name = _schemas_by_name(tools) if isinstance(tools, str) else None
    if by_name is None:
        return ["tools is not valid JSON"]
    out = []
    for i, c in calls:
        name = c.get("name")
        raw = c.get("arguments")
        try:
            args = raw if isinstance(raw, dict) else json.loads(raw or "{}")
        except (TypeError, ValueError):
            out.append(f"message {i}: tool call {name!r} arguments are not valid JSON")
            continue
        if not isinstance(args, dict):
            out.append(f"message {i}: tool call {name!r} arguments are not a JSON object")
            continue
        if name not in by_name:
            out.append(f"message {i}: tool {name!r} is not in the trace's tool schemas")
            continue
        params = by_name[name].get("parameters") or {}
        required = (params.get("required") or []) if isinstance(params, dict) else []
        missing = [p for p in required if p not in args]
        if missing:
            out.append(f"message {i}: tool call {name!r} lacks required parameter(s) {missing}")
    return out
