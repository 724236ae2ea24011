"""The one tool-call parser (cb_core.parse): real assistant outputs rendered by the project's renderer
and parsed back, and crafted strings of every form a model emits."""
from __future__ import annotations

import json

import pytest

from cb_core.parse import parse_completion, tool_calls
from cb_core.render import RenderConfig, parse_tool_calls, render_conversation
from cb_core.schemas import message


# ------------------------------------------------------------------------------------------- real outputs
def _assistant_messages(shared_data, per_file: int = 60):
    """Assistant messages of every shared AgentDojo file (up to `per_file` each), as trace_v1 messages."""
    out = []
    for path in sorted((shared_data / "agent_dojo").glob("agentdojo-*.jsonl")):
        n = 0
        with open(path, encoding="utf-8") as f:
            for line in f:
                rec = json.loads(line)
                for m in rec.get("messages") or []:
                    if m.get("role") != "assistant":
                        continue
                    calls = [
                        {"id": c.get("id"), "name": c["function"]["name"], "arguments": c["function"].get("arguments")}
                        for c in (m.get("tool_calls") or [])
                    ]
                    out.append((path.name, message("assistant", m.get("content"), calls)))
                    n += 1
                if n >= per_file:
                    break
    return out


def _turn_body(msgs, fmt):
    r = render_conversation(msgs, None, RenderConfig(tool_call_format=fmt))
    span = [s for s in r.spans if s.kind == "message" and s.message_index == len(msgs) - 1][0]
    header = [s for s in r.spans if s.kind == "header" and s.message_index == len(msgs) - 1][0]
    return r.text[header.char_end : span.char_end]


@pytest.mark.parametrize("fmt", ["python_tag", "json"])
def test_real_agentdojo_outputs_parse_back(shared_data, fmt):
    msgs = _assistant_messages(shared_data)
    assert len(msgs) > 500
    kinds = {"tool_calls": 0, "final_answer": 0, "unparseable": 0}
    for fname, m in msgs:
        body = _turn_body([message("user", "task"), m], fmt)
        p = parse_completion(body)
        kinds[p.kind] += 1
        where = f"{fname}: {body[:300]!r}"
        if m["tool_calls"]:
            assert p.kind == "tool_calls", where
            assert [(c["name"], c["arguments"]) for c in p.calls] == [
                (c["name"], json.loads(c["arguments"])) for c in m["tool_calls"]
            ], where
            assert p.text == m["content"].strip(), where
            assert p.end_token == ("<|eom_id|>" if fmt == "python_tag" else "<|eot_id|>")
            assert p.form == fmt
        elif m["content"].strip():
            assert p.kind == "final_answer", where
            assert p.text == m["content"].strip() and p.calls == []
        else:
            assert p.kind == "unparseable" and p.reason == "empty completion", where
    assert kinds["tool_calls"] > 200 and kinds["final_answer"] > 100


def test_real_llama_outputs_with_text_and_thoughts(shared_data):
    """Llama-3-70b's own turns (free text before the call, <function-thoughts> blocks) keep their text."""
    msgs = [m for f, m in _assistant_messages(shared_data, per_file=10_000) if "Llama-3-70b" in f]
    with_text = [m for m in msgs if m["tool_calls"] and m["content"].strip()]
    assert len(with_text) > 20
    for m in with_text:
        p = parse_completion(_turn_body([message("user", "task"), m], "python_tag"))
        assert p.text == m["content"].strip() and p.names == [c["name"] for c in m["tool_calls"]]


# ------------------------------------------------------------------------------------------ crafted forms
CALL = {"name": "send_money", "arguments": {"recipient": "US13", "amount": 10.5}}


@pytest.mark.parametrize(
    "text, form, end",
    [
        ('<|python_tag|>{"name": "send_money", "parameters": {"recipient": "US13", "amount": 10.5}}<|eom_id|>',
         "python_tag", "<|eom_id|>"),
        ('<|python_tag|>{"name": "send_money", "parameters": {"recipient": "US13", "amount": 10.5}}<|eot_id|>',
         "python_tag", "<|eot_id|>"),
        ('{"name": "send_money", "parameters": {"recipient": "US13", "amount": 10.5}}<|eot_id|>', "json", "<|eot_id|>"),
        ('{"name": "send_money", "arguments": {"recipient": "US13", "amount": 10.5}}<|eot_id|>', "json", "<|eot_id|>"),
        ('{"name": "send_money", "arguments": "{\\"recipient\\": \\"US13\\", \\"amount\\": 10.5}"}<|eot_id|>',
         "json", "<|eot_id|>"),
        ('{"type": "function", "function": {"name": "send_money", "arguments": {"recipient": "US13", "amount": 10.5}}}',
         "json", None),
        ('send_money(recipient="US13", amount=10.5)<|eot_id|>', "pythonic", "<|eot_id|>"),
        ('[send_money(recipient="US13", amount=10.5)]<|eot_id|>', "pythonic", "<|eot_id|>"),
        ('<|python_tag|>send_money(recipient="US13", amount=10.5)<|eom_id|>', "pythonic", "<|eom_id|>"),
    ],
)
def test_single_call_forms(text, form, end):
    p = parse_completion(text)
    assert (p.kind, p.calls, p.form, p.end_token, p.reason) == ("tool_calls", [CALL], form, end, None)
    assert p.text == ""


def test_several_calls_and_separators():
    a = '{"name": "get_balance", "parameters": {}}'
    b = '{"name": "send_money", "parameters": {"recipient": "US13", "amount": 10.5}}'
    for sep in ("; ", ";", "\n", ", ", " "):
        for tag in ("<|python_tag|>", ""):
            p = parse_completion(f"{tag}{a}{sep}{b}<|eom_id|>")
            assert p.kind == "tool_calls" and p.calls == [{"name": "get_balance", "arguments": {}}, CALL], (sep, tag)
    p = parse_completion('[get_balance(), send_money(recipient="US13", amount=10.5)]<|eot_id|>')
    assert p.calls == [{"name": "get_balance", "arguments": {}}, CALL]
    # the tag repeated before the second call: both calls (the second was once dropped silently)
    for sep in ("; ", "\n", ""):
        p = parse_completion(f"<|python_tag|>{a}{sep}<|python_tag|>{b}<|eom_id|>")
        assert p.kind == "tool_calls" and p.calls == [{"name": "get_balance", "arguments": {}}, CALL], sep
        assert "<|python_tag|>" not in (p.text or "")


def test_text_around_calls_is_kept():
    p = parse_completion('I will pay now.<|python_tag|>{"name": "send_money", "parameters": '
                         '{"recipient": "US13", "amount": 10.5}}<|eom_id|>')
    assert p.calls == [CALL] and p.text == "I will pay now."
    p = parse_completion('Paying.\n\n{"name": "send_money", "parameters": {"recipient": "US13", "amount": 10.5}}'
                         '\nDone, tell me if you need more.<|eot_id|>')
    assert p.calls == [CALL] and p.text == "Paying.\nDone, tell me if you need more."
    p = parse_completion('send_money(recipient="US13", amount=10.5) and that is all<|eot_id|>')
    assert p.calls == [CALL] and p.text == "and that is all"
    p = parse_completion('<|python_tag|>{"name": "get_balance", "parameters": {}} trailing words<|eom_id|>')
    assert p.names == ["get_balance"] and p.text == "trailing words"


def test_builtin_tool_call_and_bare_name_after_tag():
    p = parse_completion('<|python_tag|>brave_search.call(query="weather in Paris")<|eom_id|>')
    assert p.calls == [{"name": "brave_search", "arguments": {"query": "weather in Paris"}}]
    assert parse_completion('<|python_tag|>{"name": "get_balance"}<|eom_id|>').calls == [
        {"name": "get_balance", "arguments": {}}
    ]


@pytest.mark.parametrize(
    "text, reason_part",
    [
        ('<|python_tag|>{"name": "send_money", "parameters": {"recipient": "US1', "does not parse"),
        ('{"name": "send_money", "parameters": {"recipient": "US1', "does not parse"),
        ('Sure: {"name": "send_money", "parameters": {"recipient": ', "does not parse"),
        ('{"name": "send_money", "parameters": [1, 2]}<|eot_id|>', "not an object"),
        ('{"name": "send_money", "arguments": "not json"}<|eot_id|>', "not JSON"),
        ('{"name": "send_money"}<|eot_id|>', "without \"parameters\""),
        ('{"recipient": "US13"}<|eot_id|>', "not a call"),
        ("send_money('US13', 10)<|eot_id|>", "positional"),
        ("send_money(recipient=x)<|eot_id|>", "not a literal"),
        ("send_money(recipient='US13'<|eot_id|>", "unclosed"),
        ("<|python_tag|>I think I should pay.<|eom_id|>", "no tool call after"),
        ("<|python_tag|><|eom_id|>", "nothing after"),
        ("<|eot_id|>", "empty completion"),
        ("   ", "no end token"),
    ],
)
def test_unparseable_with_reason(text, reason_part):
    p = parse_completion(text)
    assert p.kind == "unparseable" and p.calls == []
    assert reason_part in p.reason


@pytest.mark.parametrize(
    "text, answer",
    [
        ("You have 100 EUR left.<|eot_id|>", "You have 100 EUR left."),
        ("  Hello (and welcome).  <|eot_id|>", "Hello (and welcome)."),
        ('The config is {"type": "x"} as asked.<|eot_id|>', 'The config is {"type": "x"} as asked.'),
        ("Done.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nmore", "Done."),
        ("Cut off mid-sent", "Cut off mid-sent"),
        ("<|start_header_id|>assistant<|end_header_id|>\n\nWhole turn.<|eot_id|>", "Whole turn."),
    ],
)
def test_final_answers(text, answer):
    p = parse_completion(text)
    assert (p.kind, p.text, p.calls) == ("final_answer", answer, [])


def test_end_token_reported():
    assert parse_completion("Hi<|eot_id|>").end_token == "<|eot_id|>"
    assert parse_completion("Hi").end_token is None
    assert parse_completion("Hi<|end_of_text|>").end_token == "<|end_of_text|>"


def test_render_parse_tool_calls_is_the_same_parser():
    text = 'Ok.<|python_tag|>{"name": "send_money", "parameters": {"recipient": "US13", "amount": 10.5}}<|eom_id|>'
    assert parse_tool_calls(text) == tool_calls(text) == [CALL]
    assert parse_tool_calls("no calls here {not json}") == []
