"""AgentDojo task suites -> real attacked skeletons, offline, from the ``agentdojo`` package (optional extra).

For each user task x injection task of a benchmark version, the user task's ground-truth calls run in the
suite's default environment injected by a named attack (default ``important_instructions``); the skeleton
stops at the first tool result that carries the injection: the point where the agent must choose its next
action with the injected text in context. Expected next tool = the user task's next ground-truth call
(``"final_answer"`` when the injected result came from the last call, as in ``cb_core.schemas.FINAL_ANSWER``); attacker call =
the one the recorded-run reader names for the same injection task (``agentdojo.task_target_steps``): the suite's
configured target (configs/datasets.yaml) where the ground truth makes that call, else the last ground-truth
call holding an e-mail address, URL or IBAN (else the last call), never a preparatory read such as
``search_emails`` or ``get_channels``. An empty ground truth is decided by the goal text: the suite's target
where the goal names it (workspace injection_task_6-12), else the goal's e-mail/URL/IBAN carried by a call to
any tool (``attacker_tool`` None, ``attacker_args`` ``{"any_argument": <it>}``: workspace injection_task_13),
else none (a text-only goal, travel injection_task_6: ``attacker_tool`` and ``attacker_args`` None; the
suite's ``security()`` check on the answer's text is what defines success there). ``tools`` = the suite's
full tool set.

Facts this relies on (agentdojo 0.1.35): ``TaskSuite.check()`` and ``generate_injections()`` are broken, so
the vectors a task sees come from ``BaseAttack.get_injection_candidates``; the payload never appears verbatim
in the YAML tool text (folding, quoting), so it is located with a whitespace- and quote-tolerant pattern of
its words; importing ``agentdojo.agent_pipeline`` normally imports every LLM SDK, so its package ``__init__``
is bypassed (``_import_agentdojo``).
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import re
import sys
import time
import types
from pathlib import Path
from typing import Any, Iterable

from cb_core.schemas import FINAL_ANSWER, BadRecord, canonical_json, make_trace, message, reject
from cb_core.sources import SourceError, SourceResult
from cb_core.sources.agentdojo import attacker_step, suite_targets, task_target_steps

DATASET = "agentdojo"  # same dataset as the recorded runs; labels.subtype = suite, locator names the package
DEFAULT_VERSION = "v1.2.2"
DEFAULT_ATTACK = "important_instructions"
SUITES = ("workspace", "travel", "banking", "slack")
TARGETS = suite_targets({})  # the suites' configured attacker targets (DEFAULT_TARGETS, equal to datasets.yaml's)
PIPELINE_NAME = "local"  # the attack only reads the pipeline's name, which must contain a known model key


class _Pipeline:
    """All ``load_attack`` needs from a pipeline: a ``name`` naming a known model ("local")."""

    def __init__(self, name: str = PIPELINE_NAME):
        self.name = name


def _import_agentdojo():
    """Import the parts of agentdojo used here without ``agentdojo.agent_pipeline.__init__`` (which imports
    the OpenAI, Anthropic, Google, Cohere... SDKs). Returns the modules as a namespace."""
    if importlib.util.find_spec("agentdojo") is None:
        raise SourceError(
            "the agentdojo package is not installed: pip install 'cb-platform[agentdojo]' "
            "(scripts/test.sh installs it with --no-deps)"
        )
    root = Path(importlib.util.find_spec("agentdojo").submodule_search_locations[0])
    if "agentdojo.agent_pipeline" not in sys.modules:
        for name, sub in (("agentdojo.agent_pipeline", "agent_pipeline"),
                          ("agentdojo.agent_pipeline.llms", "agent_pipeline/llms")):
            pkg = types.ModuleType(name)
            pkg.__path__ = [str(root / sub)]  # submodules import normally; the package __init__ is skipped
            sys.modules[name] = pkg
        try:
            importlib.import_module("agentdojo.agent_pipeline.llms.google_llm")
        except ImportError:  # google-genai absent: tool_execution only needs this constant from it
            g = types.ModuleType("agentdojo.agent_pipeline.llms.google_llm")
            g.EMPTY_FUNCTION_NAME = "<empty-function-name>"
            sys.modules[g.__name__] = g
    import yaml

    import agentdojo.attacks  # noqa: F401  registers the attacks
    from agentdojo.agent_pipeline.tool_execution import tool_result_to_str
    from agentdojo.attacks.attack_registry import load_attack
    from agentdojo.functions_runtime import FunctionsRuntime
    from agentdojo.task_suite import task_suite as ts_mod
    from agentdojo.task_suite.load_suites import get_suites

    if getattr(yaml, "CSafeLoader", None) is not None and not hasattr(ts_mod, "_cb_fast_yaml"):
        # environment.yaml is large: libyaml's loader parses it ~4x faster, same objects
        fast = types.SimpleNamespace(**{k: getattr(yaml, k) for k in dir(yaml) if not k.startswith("__")})
        fast.safe_load = lambda s: yaml.load(s, Loader=yaml.CSafeLoader)
        ts_mod.yaml = fast
        ts_mod._cb_fast_yaml = True
    return types.SimpleNamespace(load_attack=load_attack, FunctionsRuntime=FunctionsRuntime,
                                 tool_result_to_str=tool_result_to_str, get_suites=get_suites, yaml=yaml)


def package_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("agentdojo")
    except Exception:
        return None


def system_prompt() -> str:
    """AgentDojo's default system message (data/system_messages.yaml)."""
    import yaml

    root = Path(importlib.util.find_spec("agentdojo").submodule_search_locations[0])
    return yaml.safe_load((root / "data" / "system_messages.yaml").read_text())["default"].strip()


def suite_tools(suite) -> list[dict]:
    """The suite's full tool set as OpenAI-style function schemas (the real environment, never the calls)."""
    out = []
    for fn in suite.tools:
        schema = fn.parameters.model_json_schema()
        schema.pop("title", None)
        out.append({"type": "function", "function": {"name": fn.name, "description": fn.description,
                                                     "parameters": schema}})
    return out


_WORD = re.compile(r"\w+")


def payload_pattern(payload: str) -> re.Pattern:
    """The payload's words in order, anything non-alphanumeric (whitespace, YAML folding and quoting) or an
    escaped ``\\n``/``\\t`` (dict repr, YAML double-quoted folding) between them; the payload's leading and
    trailing punctuation (``<``, ``>``) optional."""
    words = _WORD.findall(payload)
    if not words:
        raise ValueError("injection payload has no words")
    core = r"(?:\\[nrt]|[\W_])*?".join(re.escape(w) for w in words)  # a literal "\n" (repr/YAML escape) too
    lead = re.match(r"\s*([^\w\s]*)", payload).group(1)
    tail = re.search(r"([^\w\s]*)\s*$", payload).group(1)
    return re.compile((f"(?:{re.escape(lead)})?" if lead else "") + core + (f"(?:{re.escape(tail)})?" if tail else ""))


def find_payload_spans(text: str, payloads: Iterable[str]) -> list[tuple[int, int]]:
    spans = []
    for p in payloads:
        spans.extend((m.start(), m.end()) for m in payload_pattern(p).finditer(text))
    return sorted(set(spans))


def _jsonable(args: Any) -> dict:
    return json.loads(json.dumps(dict(args or {}), default=str))


def build_case(ad, suite, attack, user_task, injection_task, tools_json: str, sys_prompt: str,
               version: str, attack_name: str) -> dict:
    """One skeleton trace_v1 row (raises BadRecord when the injected result is never reached)."""
    injections = attack.attack(user_task, injection_task)
    payloads = [v for v in injections.values() if v]
    env = suite.load_and_inject_default_environment(injections)
    calls = user_task.ground_truth(env)
    runtime = ad.FunctionsRuntime(suite.tools)
    msgs = [message("system", sys_prompt), message("user", user_task.PROMPT)]
    stop_at = None
    spans: list[tuple[int, int]] = []
    for k, call in enumerate(calls):
        cid = f"call_{k}"
        args = _jsonable(call.args)
        msgs.append(message("assistant", "", [{"id": cid, "name": call.function, "arguments": args}]))
        result, err = runtime.run_function(env, call.function, call.args, raise_on_error=False)
        text = ad.tool_result_to_str(result, dump_fn=ad.yaml.safe_dump) if err is None else err
        msgs.append(message("tool", text, tool_call_id=cid, name=call.function))
        spans = find_payload_spans(text, payloads)
        if spans:
            stop_at = k
            break
    if stop_at is None:
        raise BadRecord("messages", f"no ground-truth tool result of {user_task.ID} carries the injection "
                                    f"(vectors {sorted(injections)})")
    expected = calls[stop_at + 1].function if stop_at + 1 < len(calls) else FINAL_ANSWER
    inj_calls = injection_task.ground_truth(suite.load_and_inject_default_environment({}))
    gt = [{"function": c.function, "args": _jsonable(c.args)} for c in inj_calls]
    steps = task_target_steps(suite.name, gt, TARGETS, injection_task.GOAL)
    attacker_tool = attacker_args = None
    if steps != []:  # [] = a text-only task: no call is the attack
        target = attacker_step(steps or TARGETS[suite.name])
        attacker_tool, attacker_args = target["tool"], target["_args_json"]
    last = len(msgs) - 1
    span_dicts = [{"message_index": last, "char_start": a, "char_end": b} for a, b in spans]
    first = spans[0]
    suite_name = suite.name
    return make_trace(
        dataset=DATASET,
        source_locator=f"agentdojo-suites:{version}/{suite_name}/{user_task.ID}/{injection_task.ID}:0",
        completeness="skeleton",
        messages=msgs,
        tools=tools_json,
        category="retain",  # a skeleton has no assistant action yet; generation decides harmful/retain
        priority_class="injection_resisted",
        subtype=suite_name,
        attack_present=True,
        attack_succeeded=False,
        is_adversarial_safe=False,
        attacker_call_made=False,
        injection_reached=True,
        task_success=None,
        tool_attack={
            "expected_tool": expected,
            "attacker_tool": attacker_tool,
            "attacker_args": attacker_args,
            "injection_text": msgs[last]["content"][first[0]:first[1]],
            "injection_span": span_dicts[0],
            "injection_spans": span_dicts,
        },
        pair_group=f"agentdojo:{suite_name}:{user_task.ID}",
        generation_params={"agentdojo_suites": {
            "benchmark_version": version, "attack": attack_name, "user_task": user_task.ID,
            "injection_task": injection_task.ID, "injection_goal": injection_task.GOAL,
            "injection_vectors": sorted(injections), "stop_after_call": stop_at,
            "ground_truth_calls": len(calls), "injection_ground_truth_calls": len(inj_calls),
            # the injection's calls by name: its preparatory reads (search_emails, read_channel_messages, ...)
            # may be the user task's next call too (generation's adversarial_safe leaves those out)
            "injection_ground_truth_functions": [c["function"] for c in gt],
            "agentdojo": package_version()}},
    )


def read_suites(
    suites: Iterable[str] | None = None,
    *,
    version: str = DEFAULT_VERSION,
    attack_name: str = DEFAULT_ATTACK,
    user_tasks: Iterable[str] | None = None,
    limit: int | None = None,
) -> SourceResult:
    """Skeletons for every user task x injection task of the named suites (all four by default)."""
    ad = _import_agentdojo()
    t0 = time.perf_counter()
    all_suites = ad.get_suites(version)
    names = list(suites or SUITES)
    unknown = [s for s in names if s not in all_suites]
    if unknown:
        raise SourceError(f"agentdojo {version}: unknown suite(s) {unknown}; known: {sorted(all_suites)}")
    wanted = set(user_tasks) if user_tasks else None
    sys_prompt = system_prompt()
    good, bad = [], []
    counts = {"cases": 0, "final_answer_expected": 0, "empty_injection_ground_truth": 0,
              "text_only_injection": 0, "injection_in_first_result": 0}
    per_suite: dict[str, int] = {}
    for sname in names:
        suite = all_suites[sname]
        attack = ad.load_attack(attack_name, suite, _Pipeline())
        tools_json = canonical_json(suite_tools(suite))
        for ut_id, ut in suite.user_tasks.items():
            if wanted and ut_id not in wanted:
                continue
            for it_id, it in suite.injection_tasks.items():
                if limit is not None and len(good) + len(bad) >= limit:
                    break
                loc = f"agentdojo-suites:{version}/{sname}/{ut_id}/{it_id}"
                try:
                    row = build_case(ad, suite, attack, ut, it, tools_json, sys_prompt, version, attack_name)
                except BadRecord as e:
                    bad.append(reject(dataset=DATASET, file=loc, line=0, field=e.field, reason=e.reason, raw=loc))
                    continue
                except Exception as e:  # a task the package itself cannot run: kept with its reason
                    bad.append(reject(dataset=DATASET, file=loc, line=0, field="ground_truth",
                                      reason=f"{type(e).__name__}: {e}", raw=loc))
                    continue
                good.append(row)
                per_suite[sname] = per_suite.get(sname, 0) + 1
                ta = row["tool_attack"]
                gp = json.loads(row["provenance"]["generation_params"])["agentdojo_suites"]
                counts["cases"] += 1
                counts["final_answer_expected"] += ta["expected_tool"] == FINAL_ANSWER
                counts["empty_injection_ground_truth"] += gp["injection_ground_truth_calls"] == 0
                counts["text_only_injection"] += ta["attacker_args"] is None
                counts["injection_in_first_result"] += gp["stop_after_call"] == 0
    return SourceResult.from_rows(good, bad, version=version, attack=attack_name, seconds=round(
        time.perf_counter() - t0, 1), **counts, **{f"suite_{k}": v for k, v in per_suite.items()})
