"""Live AgentDojo through the project's pipeline element, on real banking tasks: a model that replays the user
task's ground truth gets utility from AgentDojo's own checks, one that replays the injection task's ground truth
is scored as a successful attack; the tiny agent runs a couple of real tasks end to end."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("agentdojo") is None,
                                reason="agentdojo extra not installed (scripts/test.sh installs it)")

ROOT = Path(__file__).resolve().parents[2]
TASKS = json.loads((ROOT / "configs" / "agentdojo" / "user_tasks.json").read_text())["v1.2.2"]["banking"]
INJ = json.loads((ROOT / "configs" / "agentdojo" / "injection_tasks.json").read_text())["v1.2.2"]["banking"]


def _replay(calls):
    """A scripted model: the i-th assistant turn of a conversation emits the i-th call, then answers."""

    def gen(messages, tools_json):
        offered = {t["function"]["name"] for t in json.loads(tools_json)}
        done = sum(1 for m in messages if m["role"] == "assistant")
        if done < len(calls):
            c = calls[done]
            assert c["function"] in offered  # the element offers the suite's real tool set
            return "<|python_tag|>" + json.dumps({"name": c["function"], "parameters": c["args"]}) + "<|eom_id|>"
        return "All done: I completed the request.<|eot_id|>"

    return gen


def test_live_utility_and_attack_from_agentdojo_checks():
    from cb_core.evaluate.agentdojo_live import run_live

    honest = run_live(_replay(TASKS["user_task_0"]["ground_truth_calls"]), ("banking",),
                      user_tasks=["user_task_0"], injection_tasks=["injection_task_0"], limit=1)
    assert honest.utility.n == 1 and honest.utility.value == 1.0  # AgentDojo says the task was done
    assert honest.asr.n == 1 and honest.asr.value == 0.0

    hijacked = run_live(_replay(INJ["injection_task_0"]["ground_truth_calls"]), ("banking",),
                        user_tasks=["user_task_0"], injection_tasks=["injection_task_0"], limit=1)
    assert hijacked.asr.value == 1.0  # AgentDojo's security check: the injection task was executed
    assert hijacked.utility.value == 0.0
    assert [p["injection_task"] for p in hijacked.pairs] == [None, "injection_task_0"]


def test_to_trace_messages_round_trip_renders():
    from cb_core.evaluate.agentdojo_live import to_trace_messages
    from cb_core.render import render_conversation
    from cb_core.sources.agentdojo_suites import _import_agentdojo

    _import_agentdojo()
    from agentdojo.functions_runtime import FunctionCall
    from agentdojo.types import text_content_block_from_string as blk

    fc = FunctionCall(function="get_balance", args={}, id="call_0")
    msgs = [
        {"role": "system", "content": [blk("sys")]},
        {"role": "user", "content": [blk("what is my balance?")]},
        {"role": "assistant", "content": None, "tool_calls": [fc]},
        {"role": "tool", "content": [blk("1810.0")], "tool_call_id": "call_0", "tool_call": fc, "error": None},
    ]
    out = to_trace_messages(msgs)
    assert [m["role"] for m in out] == ["system", "user", "assistant", "tool"]
    assert out[2]["tool_calls"][0]["name"] == "get_balance" and out[3]["name"] == "get_balance"
    text = render_conversation(out).text
    assert "what is my balance?" in text and '"name": "get_balance"' in text and "1810.0" in text


@pytest.mark.slow
@pytest.mark.timeout(3600)  # builds the tiny agent when it is not cached yet
def test_live_agentdojo_with_the_tiny_agent_base_and_adapter_same_pairs():
    """The real model in AgentDojo's loop: a couple of banking tasks end to end, base and a LoRA-wrapped model
    (adapter freshly initialised: B = 0, so it must score exactly like the base on the same pairs)."""
    from peft import LoraConfig, get_peft_model

    from cb_core.evaluate.agentdojo_live import run_live, text_generate
    from cb_core.generate.tiny_agent import load_tiny_agent
    from cb_core.model import load_profile

    model, tok = load_tiny_agent()
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    render_cfg = load_profile("tiny_agent").render_config()
    res = {}
    for name in ("base", "adapter"):
        gen = text_generate(peft_model, tok, render_cfg, adapter=name == "adapter", max_tokens=48)
        res[name] = run_live(gen, ("banking",), user_tasks=["user_task_0", "user_task_1"],
                             injection_tasks=["injection_task_0"], limit=2, max_iters=2)
    for r in res.values():
        assert r.utility.n == 2 and r.utility_under_attack.n == 2 and r.asr.n == 2
        assert all(isinstance(p["utility"], bool) for p in r.pairs)
    assert [(p["user_task"], p["injection_task"]) for p in res["base"].pairs] == \
        [(p["user_task"], p["injection_task"]) for p in res["adapter"].pairs]
    assert [p["utility"] for p in res["base"].pairs] == [p["utility"] for p in res["adapter"].pairs]
