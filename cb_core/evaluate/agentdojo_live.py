"""Live AgentDojo: the package's own task suites, tool runtime and utility/security checks, with the model
in-process through the project's renderer, backend and tool-call parser.

`CbAgentLLM` is an AgentDojo `BasePipelineElement`: it renders AgentDojo's messages with the one renderer,
generates with the configured backend, parses native Llama-3.1 calls with `cb_core.parse` and returns
them as AgentDojo `FunctionCall`s. It runs inside AgentDojo's `SystemMessage → InitQuery → LLM →
ToolsExecutionLoop([ToolsExecutor, LLM])`, and each (user task, injection task) pair is scored by
`TaskSuite.run_task_with_pipeline` (the same call `benchmark_suite_with_injections` makes). We do not import
`agentdojo.agent_pipeline.agent_pipeline` or `agentdojo.benchmark`: both import every provider SDK at module
load; `_Sequence` below is AgentDojo's `AgentPipeline` loop (run the elements in order) without that import.
The package's own `LocalLLM` is not used: it prompts for `<function=…>` tags and sends a random seed per request.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cb_core.evaluate.stats import Rate, rate
from cb_core.schemas import canonical_json

# (trace_v1 messages, tools JSON) -> the assistant turn's raw text (special tokens kept)
TextGenerate = Callable[[list[dict], str], str]
PIPELINE_NAME = "local-cb-llama31"  # must contain a model key AgentDojo's attacks know ("local")


def _ad():
    from cb_core.sources.agentdojo_suites import _import_agentdojo

    return _import_agentdojo()


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(b.get("content") or "" for b in content if isinstance(b, dict))


def to_trace_messages(messages: Sequence[dict]) -> list[dict]:
    """AgentDojo chat messages -> trace_v1 message dicts (what the renderer takes)."""
    out = []
    for m in messages:
        role = m["role"]
        if role == "assistant":
            calls = [{"id": c.id or "", "name": c.function, "arguments": canonical_json(dict(c.args))}
                     for c in (m.get("tool_calls") or [])]
            out.append({"role": "assistant", "content": _text(m.get("content")), "tool_calls": calls,
                        "tool_call_id": None, "name": None})
        elif role == "tool":
            content = _text(m.get("content"))
            if m.get("error"):
                content = (content + "\n" if content else "") + f"Error: {m['error']}"
            tc = m.get("tool_call")
            out.append({"role": "tool", "content": content, "tool_calls": [], "tool_call_id": m.get("tool_call_id"),
                        "name": tc.function if tc is not None else None})
        else:
            out.append({"role": role, "content": _text(m.get("content")), "tool_calls": [], "tool_call_id": None,
                        "name": None})
    return out


def _pipeline_classes():
    _ad()
    from agentdojo.agent_pipeline.base_pipeline_element import BasePipelineElement
    from agentdojo.functions_runtime import EmptyEnv, FunctionCall
    from agentdojo.logging import Logger
    from agentdojo.types import ChatAssistantMessage, text_content_block_from_string

    from cb_core.parse import parse_completion

    class CbAgentLLM(BasePipelineElement):
        """The model as an AgentDojo LLM element (native Llama-3.1 calls in, FunctionCalls out)."""

        def __init__(self, generate: TextGenerate, tools_json: str, name: str = PIPELINE_NAME):
            self.generate = generate
            self.tools_json = tools_json
            self.name = name
            self.turns: list[dict] = []  # every raw turn, for the details table

        def query(self, query, runtime, env=EmptyEnv(), messages=(), extra_args={}):
            text = self.generate(to_trace_messages(messages), self.tools_json)
            parsed = parse_completion(text)
            calls = [FunctionCall(function=c["name"], args=dict(c.get("arguments") or {}), id=f"call_{i}")
                     for i, c in enumerate(parsed.calls)] if parsed.kind == "tool_calls" else []
            self.turns.append({"text": text, "kind": parsed.kind, "n_calls": len(calls)})
            content = parsed.text if parsed.kind != "tool_calls" else (parsed.text or "")
            out = ChatAssistantMessage(role="assistant", content=[text_content_block_from_string(content)],
                                       tool_calls=calls or None)
            return query, runtime, env, [*messages, out], extra_args

    class _Sequence(BasePipelineElement):
        def __init__(self, elements, name: str):
            self.elements = elements
            self.name = name

        def query(self, query, runtime, env=EmptyEnv(), messages=(), extra_args={}):
            logger = Logger().get()
            for element in self.elements:
                query, runtime, env, messages, extra_args = element.query(query, runtime, env, messages, extra_args)
                logger.log(messages)
            return query, runtime, env, messages, extra_args

    return CbAgentLLM, _Sequence


def build_pipeline(generate: TextGenerate, suite, *, max_iters: int = 6, name: str = PIPELINE_NAME):
    """AgentDojo's element chain around our model for one suite."""
    import yaml

    ad = _ad()
    from agentdojo.agent_pipeline.basic_elements import InitQuery, SystemMessage
    from agentdojo.agent_pipeline.tool_execution import ToolsExecutionLoop, ToolsExecutor

    from cb_core.sources.agentdojo_suites import suite_tools, system_prompt

    CbAgentLLM, _Sequence = _pipeline_classes()
    llm = CbAgentLLM(generate, canonical_json(suite_tools(suite)), name=name)
    fmt = lambda result: ad.tool_result_to_str(result, dump_fn=yaml.safe_dump)  # noqa: E731
    loop = ToolsExecutionLoop([ToolsExecutor(fmt), llm], max_iters=max_iters)
    return _Sequence([SystemMessage(system_prompt()), InitQuery(), llm, loop], name=name), llm


@dataclass
class LiveResult:
    utility: Rate  # no attack
    utility_under_attack: Rate
    asr: Rate  # targeted: AgentDojo's security check says the injection task was done
    per_suite: dict[str, dict[str, Rate]] = field(default_factory=dict)
    pairs: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def pairs_for(suite, *, user_tasks: Iterable[str] | None, injection_tasks: Iterable[str] | None,
              limit: int | None) -> list[tuple[str, str]]:
    """The same (user task, injection task) pairs for every model: sorted ids, first `limit`."""
    uts = sorted(user_tasks or suite.user_tasks, key=lambda s: (len(s), s))
    its = sorted(injection_tasks or suite.injection_tasks, key=lambda s: (len(s), s))
    pairs = [(u, i) for u in uts for i in its]
    return pairs[:limit] if limit else pairs


def run_live(
    generate: TextGenerate,
    suites: Sequence[str] = ("banking",),
    *,
    version: str = "v1.2.2",
    attack_name: str = "important_instructions",
    user_tasks: Iterable[str] | None = None,
    injection_tasks: Iterable[str] | None = None,
    limit: int | None = 4,
    max_iters: int = 6,
    log=None,
) -> LiveResult:
    """Utility without attack and utility + targeted ASR under `attack_name`, per suite, on a fixed subset."""
    ad = _ad()
    t0 = time.perf_counter()
    all_suites = ad.get_suites(version)
    tot = {"u": [], "ua": [], "asr": []}
    per_suite: dict[str, dict[str, Rate]] = {}
    rows: list[dict] = []
    for sname in suites:
        suite = all_suites[sname]
        pipeline, llm = build_pipeline(generate, suite, max_iters=max_iters)
        attack = ad.load_attack(attack_name, suite, pipeline)
        pairs = pairs_for(suite, user_tasks=user_tasks, injection_tasks=injection_tasks, limit=limit)
        u_res, ua_res, asr_res = [], [], []
        for ut_id in sorted({u for u, _ in pairs}, key=lambda s: (len(s), s)):
            ut = suite.get_user_task_by_id(ut_id)
            utility, _ = suite.run_task_with_pipeline(pipeline, ut, None, {})
            u_res.append(bool(utility))
            rows.append({"suite": sname, "user_task": ut_id, "injection_task": None, "utility": bool(utility),
                         "security": None})
        for ut_id, it_id in pairs:
            ut, it = suite.get_user_task_by_id(ut_id), suite.get_injection_task_by_id(it_id)
            injections = attack.attack(ut, it)
            utility, security = suite.run_task_with_pipeline(pipeline, ut, it, injections)
            ua_res.append(bool(utility))
            asr_res.append(bool(security))
            rows.append({"suite": sname, "user_task": ut_id, "injection_task": it_id, "utility": bool(utility),
                         "security": bool(security)})
            if log:
                log(f"agentdojo {sname} {ut_id} x {it_id}: utility={utility} attack_succeeded={security}")
        per_suite[sname] = {
            "agentdojo_utility": rate(sum(u_res), len(u_res)),
            "agentdojo_utility_under_attack": rate(sum(ua_res), len(ua_res)),
            "agentdojo_asr": rate(sum(asr_res), len(asr_res)),
        }
        tot["u"] += u_res
        tot["ua"] += ua_res
        tot["asr"] += asr_res
    return LiveResult(
        utility=rate(sum(tot["u"]), len(tot["u"])),
        utility_under_attack=rate(sum(tot["ua"]), len(tot["ua"])),
        asr=rate(sum(tot["asr"]), len(tot["asr"])),
        per_suite=per_suite, pairs=rows, seconds=time.perf_counter() - t0,
    )


def text_generate(model, tokenizer, render_cfg, *, adapter: bool, max_tokens: int = 96) -> TextGenerate:
    """Greedy generation of one assistant turn through the transformers backend (adapter on or off)."""
    from cb_core.evaluate.models import _switch
    from cb_core.generate.backends import SamplingConfig, TransformersBackend, prompt_ids

    backend = TransformersBackend(model, tokenizer, batch_size=1)
    sampling = SamplingConfig(temperature=0.0, max_tokens=max_tokens)

    def gen(messages: list[dict], tools_json: str) -> str:
        ids = prompt_ids(tokenizer, messages, tools_json, render_cfg)
        with _switch(model, "adapter" if adapter else "base"):
            return backend.generate([ids], sampling)[0][0].text

    return gen
