"""Derive the AgentDojo suites' tool schemas and task ground truth from the MIT `agentdojo` package.

Why: recorded AgentDojo runs carry only the calls the model made; the tools the environment really offered
(and what the user task expected) live in the benchmark package. Shipping them as project config keeps the
pipeline free of that heavy dependency at run time, and keeps the tool list from leaking the label.

Run it in a throwaway venv (the package pulls every LLM provider SDK):

    python3 -m venv /tmp/advenv && /tmp/advenv/bin/pip install agentdojo==0.1.35
    /tmp/advenv/bin/python scripts/derive_agentdojo_config.py            # writes the three files below
    /tmp/advenv/bin/python scripts/derive_agentdojo_config.py --check    # exit 1 if the committed files differ

Output (JSON, UTF-8, keys in the package's order, versions oldest first: v1, v1.1, ..., v1.2.2):

configs/tool_schemas/agentdojo.json
    {version: {suite: [schema, ...]}}: every tool of the suite, in the order the suite registers them, each
    an OpenAI-style function schema exactly as AgentDojo's OpenAI adapter builds it:
    {"type": "function", "function": {"name", "description", "parameters": <pydantic JSON schema>}}.

configs/agentdojo/user_tasks.json
    {version: {suite: {user_task_id: {
        "prompt": str,                        # the user's request (task.PROMPT)
        "ground_truth_functions": [str],      # the ordered tool names of task.ground_truth(default env)
        "ground_truth_calls": [{"function": str, "args": {...}}],   # same calls with their arguments
        "difficulty": str                     # e.g. "EASY"
    }}}}

configs/agentdojo/injection_tasks.json
    {version: {suite: {injection_task_id: {
        "goal": str,                          # the attacker's goal text (task.GOAL)
        "ground_truth_calls": [{"function": str, "args": {...}}],
        "difficulty": str
    }}}}

Ground-truth calls are computed against the suite's default environment (a fresh copy per task), as AgentDojo
itself does; arguments that are not JSON types (dates) are written as their string form. Task ids are sorted
by their number (user_task_2 before user_task_10).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUTPUTS = {
    "tools": Path("configs/tool_schemas/agentdojo.json"),
    "user_tasks": Path("configs/agentdojo/user_tasks.json"),
    "injection_tasks": Path("configs/agentdojo/injection_tasks.json"),
}


def _task_key(task_id: str) -> tuple[str, int]:
    m = re.match(r"(.*?)(\d+)$", task_id)
    return (m.group(1), int(m.group(2))) if m else (task_id, -1)


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def _calls(task: Any, suite: Any) -> list[dict]:
    env = suite.load_and_inject_default_environment({})
    return [{"function": c.function, "args": _jsonable(dict(c.args))} for c in task.ground_truth(env)]


def _difficulty(task: Any) -> str:
    d = getattr(task, "DIFFICULTY", None)
    return getattr(d, "name", str(d)) if d is not None else ""


def derive() -> dict[str, dict]:
    from agentdojo.task_suite.load_suites import _SUITES, get_suites  # the registry of benchmark versions

    tools: dict[str, dict] = {}
    users: dict[str, dict] = {}
    injections: dict[str, dict] = {}
    for version in _SUITES:  # registered oldest first
        tools[version], users[version], injections[version] = {}, {}, {}
        for name, suite in get_suites(version).items():
            tools[version][name] = [
                {
                    "type": "function",
                    "function": {
                        "name": f.name,
                        "description": f.description,
                        "parameters": f.parameters.model_json_schema(),
                    },
                }
                for f in suite.tools
            ]
            users[version][name] = {}
            for tid in sorted(suite.user_tasks, key=_task_key):
                task = suite.user_tasks[tid]
                calls = _calls(task, suite)
                users[version][name][tid] = {
                    "prompt": task.PROMPT,
                    "ground_truth_functions": [c["function"] for c in calls],
                    "ground_truth_calls": calls,
                    "difficulty": _difficulty(task),
                }
            injections[version][name] = {}
            for tid in sorted(suite.injection_tasks, key=_task_key):
                task = suite.injection_tasks[tid]
                injections[version][name][tid] = {
                    "goal": task.GOAL,
                    "ground_truth_calls": _calls(task, suite),
                    "difficulty": _difficulty(task),
                }
    return {"tools": tools, "user_tasks": users, "injection_tasks": injections}


def _dump(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, indent=1) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT, help="project root to write under (default: this repo)")
    ap.add_argument("--check", action="store_true", help="compare with the files on disk, write nothing")
    args = ap.parse_args(argv)
    data = derive()
    stale = []
    for key, rel in OUTPUTS.items():
        path = args.out / rel
        text = _dump(data[key])
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(str(rel))
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
        print(f"wrote {rel} ({len(text):,} bytes; versions {', '.join(data[key])})")
    if stale:
        print("out of date: " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
