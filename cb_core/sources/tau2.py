"""tau2-bench task sets -> trace_v1 retain skeletons (`tool_capability`, subtype = domain).

Accepted shapes (whatever `resolve_source_paths` returns for them, or the folders themselves):
  * the tau2 root folder `{root}` (resolve gives `{root}/tool_schemas.json`): every `{root}/domains/*/tasks.json`;
  * `{root}/tool_schemas.json` itself: same as the root;
  * a domain folder `{root}/domains/<d>` (gives its `tasks.json` + `split_tasks.json`) or its `tasks.json`,
    or a glob over `tasks.json` files: those domains only; tool schemas are read from
    `{root}/tool_schemas.json` two levels up (or `cfg["tool_schemas"]`).
`split_tasks.json` is not used (splits are made later, hash-based on pair_group). `cfg["domains"]` (a list)
restricts the domains read.

One task -> one trace:
  system = `cfg["system_prompt"]` (with `{domain}`), user = a first-person message built from
  `user_scenario.instructions` (a string, or a dict whose `known_info` + `reason_for_call` are used;
  `task_instructions`/`unknown_info` steer the user simulator and are not what the user says), turned from
  the scenario's second person ("You want to cancel ...") into first person ("I want to cancel ...").
  When `evaluation_criteria.actions` holds calls made by the assistant (`requestor` absent or "assistant";
  telecom's `requestor: "user"` actions are things the user does on their own phone and are left out), one
  assistant message carries them all as tool calls, in order. There are no tool results in tau2 tasks, so
  the trace is a **skeleton**: the reference calls are a target for generation, not a finished conversation
  (a trace ending on unanswered tool calls cannot be rendered as complete). Tasks without assistant
  actions (policy refusals, nl-assertion tasks) keep system + user only.
  tools = the domain's `agent_tools` (assistant side; telecom's `user_tools` are not offered).

Quarantined (file, list index + 1, field, reason, raw task JSON): a task that is not an object, has no usable
user request (missing/misspelled `user_scenario`/`instructions`: the reader falls back to `ticket`, then
`description.purpose`, before giving up), an action without a name, or an assistant action naming a tool
the domain's schema does not offer. A tasks file that is not a JSON list is quarantined whole (line 0).
Missing `persona` / `initial_state` is fine.
"""
from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

from cb_core.config import config_path
from cb_core.schemas import canonical_json, message, reject
from cb_core.sources import SourceError, SourceResult
from cb_core.sources.fujitsu_b4 import SharedToolsTraces, fill_tools

DATASET = "tau2"
DEFAULT_SYSTEM = (
    "You are a customer service agent for the {domain} domain. Help the user with their request by calling "
    "the provided tools. Follow the domain policy, verify the user's identity before changing anything, and "
    "ask before taking any action that modifies their account."
)


# ------------------------------------------------------------------------------------------ path handling
def _roots_and_task_files(paths: list[Path]) -> tuple[list[Path], list[Path]]:
    """(tool-schema files, tasks.json files) implied by the given paths, deduplicated, sorted."""
    schemas: set[Path] = set()
    tasks: set[Path] = set()
    for p in paths:
        p = Path(p)
        if p.is_dir():
            if (p / "domains").is_dir() or (p / "tool_schemas.json").is_file():
                root = p
            elif (p / "tasks.json").is_file():
                tasks.add(p / "tasks.json")
                if (p.parent.parent / "tool_schemas.json").is_file():
                    schemas.add(p.parent.parent / "tool_schemas.json")
                continue
            else:
                tasks.update(p.glob("domains/*/tasks.json"))
                continue
        elif p.name == "tool_schemas.json":
            root = p.parent
        elif p.name == "tasks.json":
            tasks.add(p)
            if (p.parent.parent.parent / "tool_schemas.json").is_file():
                schemas.add(p.parent.parent.parent / "tool_schemas.json")
            continue
        else:  # split_tasks.json, READMEs, ...
            continue
        if (root / "tool_schemas.json").is_file():
            schemas.add(root / "tool_schemas.json")
        tasks.update(root.glob("domains/*/tasks.json"))
    return sorted(schemas), sorted(tasks)


def _load_schemas(files: list[Path], cfg: dict[str, Any]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    if cfg.get("tool_schemas"):
        files = [config_path(cfg["tool_schemas"]), *files]
    for f in files:
        try:
            with open(f, encoding="utf-8") as fh:
                data = json.load(fh)
        except (OSError, ValueError) as e:
            raise SourceError(f"tau2: cannot read tool schemas {f}: {e}") from e
        for domain, entry in (data or {}).items():
            tools = entry.get("agent_tools") if isinstance(entry, dict) else entry
            if isinstance(tools, list):
                out.setdefault(domain, tools)
    return out


# -------------------------------------------------------------------------------------- user message text
_PRONOUNS = {
    "you are": "I am", "you're": "I'm", "you were": "I was", "you have": "I have", "you've": "I've",
    "you'd": "I'd", "you'll": "I'll", "yourself": "myself", "yours": "mine", "your": "my",
}
_PRONOUN_RX = re.compile(
    r"\b(?:" + "|".join(sorted((re.escape(k) for k in _PRONOUNS), key=len, reverse=True)) + r")\b", re.IGNORECASE
)
# "You mobile data" (a typo in the telecom set) reads as "your"
_TYPO_RX = re.compile(r"\bYou (?=mobile|phone|account|internet|data)\b")
# "you" after these words is the subject ("... and you want") -> "I"; otherwise an object ("told you") -> "me"
_SUBJECT_BEFORE = re.compile(
    r"(?:^|[.!?:;\n]\s*|\b(?:and|but|or|if|that|because|when|so|since|unless|while|then|as|where|although)\s+)$",
    re.IGNORECASE,
)
_YOU = re.compile(r"\b[Yy]ou\b")


def _pronoun(m: re.Match) -> str:
    word = m.group(0)
    rep = _PRONOUNS[word.lower()]
    return rep[0].upper() + rep[1:] if word[0].isupper() else rep


@functools.lru_cache(maxsize=65536)
def first_person(text: str) -> str:
    """Turn a tau2 scenario written to the user simulator ("You want to ...") into the user's own words."""
    text = _PRONOUN_RX.sub(_pronoun, _TYPO_RX.sub("Your ", text))
    out, last = [], 0
    for m in _YOU.finditer(text):
        out.append(text[last:m.start()])
        out.append("I" if _SUBJECT_BEFORE.search(text[max(0, m.start() - 16): m.start()]) or m.start() == 0
                   else "me")
        last = m.end()
    out.append(text[last:])
    return "".join(out).strip()


def user_request(task: dict) -> str | None:
    scen = task.get("user_scenario")
    if not isinstance(scen, dict):  # misspelled / missing key: find a key that looks like it
        scen = next((v for k, v in task.items()
                     if isinstance(v, dict) and (k.lower().startswith("user") or "scen" in k.lower())), None)
    instr = None
    if isinstance(scen, dict):
        instr = scen.get("instructions")
        if instr is None:
            instr = next((v for k, v in scen.items() if k.lower().startswith("instr")), None)
    parts: list[str] = []
    if isinstance(instr, str):
        parts.append(instr)
    elif isinstance(instr, dict):
        for key in ("known_info", "reason_for_call"):
            v = instr.get(key)
            if isinstance(v, str) and v.strip():
                parts.append(v.strip())
        if not parts and isinstance(instr.get("task_instructions"), str):
            parts.append(instr["task_instructions"])
    if not parts:
        if isinstance(task.get("ticket"), str) and task["ticket"].strip():
            return task["ticket"].strip()
        desc = task.get("description")
        if isinstance(desc, dict) and isinstance(desc.get("purpose"), str) and desc["purpose"].strip():
            return desc["purpose"].strip()
        return None
    text = " ".join(first_person(p) for p in parts)
    return re.sub(r"[ \t]*\n\s*", " ", text).strip() or None


# --------------------------------------------------------------------------------------------- reading
def read(paths: list[Path], cfg: dict[str, Any]) -> SourceResult:
    cfg = cfg or {}
    schema_files, task_files = _roots_and_task_files([Path(p) for p in paths])
    if cfg.get("domains"):
        wanted = set(cfg["domains"])
        task_files = [f for f in task_files if f.parent.name in wanted]
    if not task_files:
        raise SourceError(
            f"tau2: no domains/<domain>/tasks.json found from {[str(p) for p in paths]} "
            "(set CB_TAU2_PATH to the tau2 folder that holds tool_schemas.json and domains/)"
        )
    schemas = _load_schemas(schema_files, cfg)
    system_tpl = cfg.get("system_prompt") or DEFAULT_SYSTEM
    good: list[dict] = []
    bad: list[dict] = []
    per_domain: dict[str, int] = {}
    tools_by_file: dict[str, str] = {}
    for tf in task_files:
        domain = tf.parent.name
        fname = str(tf)
        try:
            with open(tf, encoding="utf-8") as fh:
                tasks = json.load(fh)
        except (OSError, ValueError) as e:
            bad.append(reject(dataset=DATASET, file=fname, line=0, reason=f"unreadable tasks file: {e}", raw=""))
            continue
        if not isinstance(tasks, list):
            bad.append(reject(dataset=DATASET, file=fname, line=0, reason="tasks file is not a JSON list",
                              raw=json.dumps(tasks, ensure_ascii=False)[:100_000]))
            continue
        tools = schemas.get(domain, [])
        tools_json = canonical_json(tools)
        make = SharedToolsTraces(DATASET, tools_json, placeholder=fname)
        tools_by_file[fname] = tools_json
        tool_names = {t.get("function", t).get("name") for t in tools}
        system = message("system", system_tpl.format(domain=domain))
        n_ok = 0
        for idx, task in enumerate(tasks, 1):
            def bad_task(fld: str, reason: str) -> None:
                bad.append(reject(dataset=DATASET, file=fname, line=idx, field=fld, reason=reason,
                                  raw=json.dumps(task, ensure_ascii=False)))

            if not isinstance(task, dict):
                bad_task("", f"task is a JSON {type(task).__name__}, not an object")
                continue
            text = user_request(task)
            if not text:
                bad_task("user_scenario.instructions", "no user request (user_scenario.instructions, ticket, "
                                                       "description.purpose all missing)")
                continue
            crit = task.get("evaluation_criteria")
            actions = (crit.get("actions") if isinstance(crit, dict) else None) or []
            calls, problem = [], None
            for j, act in enumerate(actions if isinstance(actions, list) else []):
                if not isinstance(act, dict) or not act.get("name"):
                    problem = (f"evaluation_criteria.actions[{j}].name", "action without a tool name")
                    break
                if act.get("requestor", "assistant") not in (None, "assistant"):
                    continue  # user-side device action (telecom)
                if tools and act["name"] not in tool_names:
                    problem = (f"evaluation_criteria.actions[{j}].name",
                               f"tool '{act['name']}' is not among the {domain} agent tools")
                    break
                args = act.get("arguments")
                calls.append({"id": f"call_{act.get('action_id') or j}", "name": act["name"],
                              "arguments": args if isinstance(args, dict) else {}})
            if problem:
                bad_task(*problem)
                continue
            msgs = [system, message("user", text)]
            if calls:
                msgs.append(message("assistant", "", tool_calls=calls))
            good.append(
                make(
                    source_locator=f"{fname}:{idx}",
                    completeness="skeleton",
                    messages=msgs,
                    category="retain",
                    priority_class="tool_capability",
                    subtype=domain,
                )
            )
            n_ok += 1
        per_domain[domain] = n_ok
    res = SourceResult.from_rows(good, bad, tasks_per_domain=per_domain, task_files=len(task_files))
    return fill_tools(res, tools_by_file)
