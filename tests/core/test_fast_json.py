"""The fast JSON paths give exactly the standard library's results (issue 15, ETL_A): canonical JSON via
orjson, decoding via msgspec, TAU2 tasks split into their own texts, and the trace id hashed in pieces."""
from __future__ import annotations

import gc
import hashlib
import json
import math
import random
import struct

import pytest

from cb_core import schemas
from cb_core.schemas import canonical_json, make_trace, message
from cb_core.sources import SourceError, get_reader
from cb_core.sources._common import UnstorableText, json_loads, json_reason, record_json

STDLIB = json.JSONEncoder(sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode


def test_canonical_json_equals_the_standard_library_on_every_code_point():
    chunk = 4096
    for lo in range(0, 0x110000, chunk):
        text = "".join(chr(c) for c in range(lo, min(lo + chunk, 0x110000)) if not 0xD800 <= c < 0xE000)
        value = {"k" + text[:3]: [text, {"z": text, "a": None}]}
        assert canonical_json(value) == STDLIB(value), hex(lo)


@pytest.mark.parametrize("value", [
    1e-05, 1.5e-7, 0.00012, 1e16, 1e22, -0.0, 5e-324, float("nan"), float("inf"), -float("inf"),
    2 ** 64, -(2 ** 63) - 1, 2 ** 63, {1: "a", 2: "b"}, {"a": [1, {"b": 2.5}]}, ("x", 1, True, None),
    "\ud800 lone surrogate", {"\udc80": 1}, [[[[[]]]]], {"b": 1, "a": 2, "é": 3, "\U0001F600": 4, "Z": 5},
])
def test_canonical_json_equals_the_standard_library_on_the_edges(value):
    assert canonical_json(value) == STDLIB(value)


def test_canonical_json_refuses_what_the_standard_library_refuses():
    with pytest.raises(TypeError):
        canonical_json({"a": object()})
    with pytest.raises(TypeError):
        canonical_json({1: "a", "b": 2})  # mixed keys cannot be sorted


def test_canonical_json_equals_the_standard_library_on_shared_data(shared_data):
    values = []
    for f in sorted((shared_data / "agent_dojo").glob("*.jsonl")):
        for line in f.read_bytes().splitlines():
            try:
                values.append(json.loads(line))
            except ValueError:
                pass
    for f in sorted((shared_data / "tau2").rglob("*.json")):
        try:
            values.extend(json.loads(f.read_text(encoding="utf-8")))
        except ValueError:
            pass
    assert len(values) > 5000
    assert all(canonical_json(v) == STDLIB(v) for v in values)


def _random_floats(n: int) -> list[float]:
    rng = random.Random(0)
    out = []
    while len(out) < n:
        f = struct.unpack("d", struct.pack("Q", rng.getrandbits(64)))[0]
        if not (math.isnan(f) or math.isinf(f)):
            out.append(f)
    return out


@pytest.mark.parametrize("text", [
    b'{"a": 1, "a": 2}', b"[18446744073709551616, -9223372036854775809, 123456789012345678901234567890]",
    b"[NaN, Infinity, -Infinity]", b"[1e400, -1e400, 0.1e-400]", b'"\\ud83d\\ude00 paired"',
    b"\xef\xbb\xbf[1]", b" [1]\r\n", b'{"k": "caf\xc3\xa9 \\u00e9 \\n"}', b"[1.0E+2, -0, -0.0]",
    " ".join(repr(f) for f in _random_floats(2000)).replace(" ", ",").join("[]").encode(),
    ",".join("%.17e" % f for f in _random_floats(2000)).join("[]").encode(),
])
def test_json_loads_returns_the_standard_librarys_values(text):
    ours, std = json_loads(text), json.loads(text)
    assert STDLIB(ours) == STDLIB(std)  # NaN != NaN: compare the texts (repr of every float, signs kept)
    assert [type(x) for x in (ours if isinstance(ours, list) else [ours])] == \
        [type(x) for x in (std if isinstance(std, list) else [std])]


@pytest.mark.parametrize("text", [b'{"a": 1', b"[1,]", b"", b"nul", b'{"a": "\xff"}'])
def test_json_loads_raises_the_standard_librarys_error(text):
    with pytest.raises(Exception) as ours:
        json_loads(text)
    with pytest.raises(Exception) as std:
        json.loads(text)
    assert type(ours.value) is type(std.value) and str(ours.value) == str(std.value)


@pytest.mark.parametrize("text, where", [
    (b'"\\ud800"', ""), (b'["ok", "x\\udc00x"]', "[1]"), (b'{"m": [{"content": "\\udbff"}]}', "m[0].content"),
    (b'{"\\ud800k": 1}', "'\\ud800k'"), (b'{"a": {"\\udfffk": 1}}', "a.'\\udfffk'"),
])
def test_json_loads_refuses_a_lone_surrogate_naming_where(text, where):
    """JSON allows a lone surrogate escape; no UTF-8 text (Parquet, a trace id's hash) can hold one, so the
    record is refused as a ValueError a reader quarantines, naming the field."""
    json.loads(text)  # valid JSON
    with pytest.raises(UnstorableText) as err:
        json_loads(text)
    assert isinstance(err.value, ValueError) and err.value.field == where
    assert json_reason(err.value) == (where, str(err.value)) and "lone surrogate" in str(err.value)
    assert json_reason(ValueError("x")) == ("", "invalid JSON: x")


def test_json_loads_turns_deep_nesting_into_a_value_error():
    with pytest.raises(ValueError, match="nested deeper"):
        json_loads(b"[" * 100_000)


def test_record_json_keeps_order_text_and_non_finite_floats():
    rec = {"z": "café", "a": [1, 2.5, None], "n": 2 ** 70}
    assert json.loads(record_json(rec)) == rec and list(json.loads(record_json(rec))) == ["z", "a", "n"]
    assert "café" in record_json(rec)
    assert record_json({"x": float("nan")}, strict=False) == '{"x": NaN}'
    assert record_json({"s": "\ud800", "t": "é"}) == json.dumps({"s": "\ud800", "t": "é"})  # escaped: storable
    assert record_json({"s": "\ud800", "t": "é"}).encode("utf-8")


def _old_trace_id(dataset, locator, messages, tools_json, tool_attack, suffix=None):
    """The id as it was defined before the pieces were hashed one by one (the standard library, joined)."""
    text = ("[" + STDLIB(dataset) + "," + STDLIB(locator) + "," + STDLIB(messages) + "," + STDLIB(tools_json)
            + "," + STDLIB(tool_attack) + "]")
    tid = hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]
    return hashlib.sha256((tid + suffix).encode()).hexdigest()[:32] if suffix else tid


@pytest.mark.parametrize("suffix", [None, "abc"])
def test_trace_ids_are_unchanged(suffix):
    tools = [{"type": "function", "function": {"name": "pay", "parameters": {"amount": {"default": 1e-05}}}}]
    msgs = [message("system", "sé"), message("user", "pay 1e-7 €"),
            message("assistant", "", [{"id": "c", "name": "pay", "arguments": {"amount": 1.5e-7, "n": 2 ** 70}}])]
    attack = {"expected_tool": None, "attacker_tool": "pay", "attacker_args": None, "injection_text": "x",
              "injection_span": {"message_index": 1, "char_start": 0, "char_end": 3}}
    row = make_trace(dataset="d", source_locator="f.jsonl:3", completeness="complete", messages=msgs, tools=tools,
                     category="retain", priority_class="tool_capability", tool_attack=attack, id_suffix=suffix)
    assert row["id"] == _old_trace_id("d", "f.jsonl:3", msgs, STDLIB(tools), schemas.normal_tool_attack(attack),
                                      suffix)


@pytest.mark.parametrize("msgs", [
    [message("user", "plain é \U0001F600 \x00 \u2028")],
    [{"role": "user", "content": 1e-05, "tool_calls": [], "tool_call_id": None, "name": None}],  # off the shape
    [{"role": "assistant", "content": "", "tool_calls": [{"id": "c", "name": "f", "arguments": 2.5}]}],
    [{"role": "user", "content": "lone \ud800 surrogate"}],
    [{"role": "user", "content": "x", 1: "non-string key"}],
    [{"role": "user", "content": ("tuple", 1e16)}],
    (message("user", "a tuple of messages"),),
    [],
])
def test_trace_ids_are_unchanged_whatever_the_messages_hold(msgs):
    """trace_id writes trace_v1-shaped messages (strings and nulls) with orjson; anything else takes the
    standard library's text, so the id never depends on which path wrote it."""
    try:
        want = _old_trace_id("d", "f:1", msgs, "[]", None)
    except (UnicodeEncodeError, TypeError) as e:  # the definition itself refuses it: so must trace_id
        with pytest.raises(type(e)):
            schemas.trace_id("d", "f:1", msgs, b"\"[]\"", None)
        return
    assert schemas.trace_id("d", "f:1", msgs, b"\"[]\"", None) == want


def test_readers_run_with_the_collector_paused_and_restore_it(monkeypatch):
    from cb_core.sources import tau2

    seen = []
    monkeypatch.setattr(tau2, "read", lambda paths, cfg: seen.append(gc.isenabled()) or "done")
    assert gc.isenabled()
    assert get_reader("tau2")([], {}) == "done"
    assert seen == [False] and gc.isenabled()
    gc.disable()
    try:  # a caller that had it off keeps it off
        get_reader("tau2")([], {})
        assert not gc.isenabled()
    finally:
        gc.enable()


# ------------------------------------------------------------------------------------------- TAU2 tasks
def _tasks_file(tmp_path, text: str):
    f = tmp_path / "domains" / "mock" / "tasks.json"
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(text, encoding="utf-8")
    return f


def test_tau2_tasks_keep_their_exact_text_for_quarantine(tmp_path):
    from cb_core.sources import tau2

    text = ('[\n  {"id": "1", "user_scenario": {"instructions": "hi"},\n   "evaluation_criteria": {},'
            ' "initial_state": {"big": [1, 2.50, "é"]}},\n  [1, 2],\n  {"id": 3, "userScenario": {"instructions":'
            ' "x"}, "evaluation_criteria": null}\n]\n')
    tasks, raw, unstorable = tau2._load_tasks(_tasks_file(tmp_path, text))
    assert unstorable == {}
    assert tasks[0] == {"id": "1", "user_scenario": {"instructions": "hi"}, "evaluation_criteria": {},
                        "ticket": None, "description": None,
                        "initial_state": {"message_history": None}}  # only the fields the reader uses ("big" is not)
    assert tasks[1] == [1, 2]  # not an object: the whole value, for the reader to report
    assert "userScenario" in tasks[2]  # no user_scenario: every key, for the misspelled-key lookup
    assert raw(0) == text[text.index("{"):text.index("}},") + 2]  # the task's own bytes, 2.50 kept
    assert raw(1) == "[1, 2]" and json.loads(raw(2)) == json.loads(text)[2]


def test_tau2_tasks_msgspec_refuses_take_the_standard_library(tmp_path):
    from cb_core.sources import tau2

    tasks, raw, unstorable = tau2._load_tasks(_tasks_file(tmp_path, '[{"id": "1", "score": NaN}, {"id": 2}]'))
    assert tasks[1] == {"id": 2} and math.isnan(tasks[0]["score"])
    assert raw(0) == '{"id": "1", "score": NaN}' and unstorable == {}  # non-finite floats survive in raw
    # a lone surrogate: that task is named (index, where), its raw stays storable; a BOM is not data
    tasks, raw, unstorable = tau2._load_tasks(_tasks_file(
        tmp_path, '\ufeff[{"id": "1"}, {"id": "2", "user_scenario": {"instructions": "x\\ud800"}}]'))
    assert unstorable == {1: "user_scenario.instructions"} and tasks[0] == {"id": "1"}
    assert raw(1) == '{"id": "2", "user_scenario": {"instructions": "x\\ud800"}}'
    with pytest.raises(SourceError, match="nested deeper") as err:
        tau2._load_tasks(_tasks_file(tmp_path, "[" + "[" * 100_000))
    assert err.value.file is not None
    with pytest.raises(SourceError, match=r"invalid or truncated JSON at line 2 column \d+"):
        tau2._load_tasks(_tasks_file(tmp_path, '[{"id": "1"},\n {"id": '))
    with pytest.raises(SourceError, match="must be a JSON list"):
        tau2._load_tasks(_tasks_file(tmp_path, '{"id": "1"}'))
    with pytest.raises(SourceError, match="holds no tasks"):
        tau2._load_tasks(_tasks_file(tmp_path, "[]"))
