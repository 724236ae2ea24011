"""tau2-bench task sets -> trace_v1 retain skeletons (`tool_capability`, subtype = domain).

Accepted shapes (whatever `resolve_source_paths` returns for them, or the folders themselves):
  * the tau2 root folder `{root}` (resolve gives `{root}/tool_schemas.json`): every `{root}/domains/*/tasks.json`;
  * `{root}/tool_schemas.json` itself: same as the root;
  * a domain folder `{root}/domains/<d>` (gives its `tasks.json` + `split_tasks.json`) or its `tasks.json`,
    or a glob over `tasks.json` files: those domains only; tool schemas are read from
    `{root}/tool_schemas.json` two levels up (or `cfg["tool_schemas"]`).
`split_tasks.json` is not used (splits are made later, hash-based on pair_group). `cfg["domains"]` (a list)
restricts the domains read.

One task -> one skeleton: system = `cfg["system_prompt"]` (with `{domain}`), user = the task's request in the
user's own words, built from `user_scenario.instructions`: `known_info`, `reason_for_call`, `unknown_info` and
the `task_instructions` sentences a caller could say (the simulator's meta rules -- "ground your responses on
tool calls", "never make up ...", "use ... tactics" -- and its plans for later turns, any sentence about "the
agent" in the third person -- "If the agent asks ...", "Tell the agent ..." -- are left out), turned from the scenario's second person into the first
("You want to cancel ..." -> "I want to cancel ...": `you` is "me" only after a verb/preposition that takes an
object, "I" otherwise). String instructions (mock) are used whole; without instructions, `ticket`, then
`description.purpose`.
  tools = the domain's full `agent_tools` (assistant side; telecom's `user_tools` are not offered), never
  derived from the task's calls. A domain without schemas fails the source.
  Expected behaviour = the FIRST assistant action of `evaluation_criteria.actions` (`requestor` absent or
  "assistant"; telecom's `requestor: "user"` actions are what the user does on their own phone). Its name is in
  `tool_attack.expected_tool` (attacker fields null, attack_present False); the rest of what the benchmark
  checks is in `provenance.generation_params["tau2"]`: task_id, expected_first_action {name, arguments},
  reference_actions (all assistant actions), user_actions, nl_assertions, communicate_info (e.g. "Agent should
  refuse"), the instructions as given.
  pair_group = `tau2:<domain>:<task id>`; source_locator = `domains/<domain>/tasks.json:<index + 1>` (relative to
  the tau2 root, so ids survive copying the data elsewhere).

Kept only where the user turn carries what the answer depends on; excluded (quarantine, severity "excluded",
counted in `meta["excluded"]`), with the reason:
  * `prior_conversation`: `initial_state.message_history` is not empty: the task starts after a conversation
    the agent has already had (mock "update_task_with_message_history"), which a system + one user turn
    skeleton would drop;
  * `no_expected_action`: no assistant action at all. The benchmark then checks only that nothing changed
    (and what is said), not the first move: that is often a lookup (airline "cancel reservation EHGLP3", which
    policy refuses after checking it), and the mock "create a task" task without actions plainly wants a call,
    so "answer without a tool call" (`final_answer`) would be a wrong label. Such a task still counts towards
    `ambiguous_prompt` for the tasks that share its user message;
  * `unsupported_first_action`: the first action's compared argument values (every scalar, e.g. ids, amounts, of
    the arguments its `compare_args` names, all of them when it names none; `[]`: the tool name alone, e.g.
    `transfer_to_human_agents` with a free-text summary) do not all appear in the user's message (telecom's
    `refuel_data(customer_id="C1001", ...)` needs a lookup first);
  * `ambiguous_prompt`: several tasks of a domain share the same user message but expect different first
    actions (telecom's hidden `initial_state`): all of them are excluded, so in what is kept identical
    messages always mean identical expected first actions.
Quarantined as malformed (file, list index + 1, field, reason, raw task JSON): a task that is not an object,
no usable user request, a badly typed field (instructions, actions, arguments that are not a JSON object), an
action without a name, an assistant action naming a tool the domain's schema does not offer. A tasks file
that cannot be read as a whole (invalid/truncated JSON, not a list, empty) fails the source (SourceError).
Missing `persona` / `initial_state` is fine.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, Optional

import msgspec

from cb_core.config import config_path, did_you_mean
from cb_core.schemas import BadRecord, arguments_json, canonical_json, message, reject
from cb_core.sources import SourceError, SourceResult
from cb_core.sources._common import (WIPE, SharedToolsTraces, UnstorableText, fill_tools, json_loads,
                                     lone_surrogate, record_json, strip_bom)

DATASET = "tau2"
# Tools that only read (every tau2 agent tool is named so): a first action outside these changes the user's data,
# which DEFAULT_SYSTEM (and the domains' policies) say to confirm with the user first, so a one-turn prompt does
# not expect that call (generation and the capability eval leave such skeletons out: `first_action_writes`).
READ_ONLY_TOOL = re.compile(r"^(?:get|find|search|list|calculate|think)(?:_|$)")


def first_action_writes(expected_tool: str | None) -> bool:
    """Does a TAU2 skeleton's expected first call change the user's data (not a `READ_ONLY_TOOL`)?"""
    return bool(expected_tool) and not READ_ONLY_TOOL.match(expected_tool)


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


def relative_name(tasks_file: Path) -> str:
    """`domains/<d>/tasks.json` (the path below the tau2 root), whatever folder the data was copied to."""
    return f"domains/{tasks_file.parent.name}/{tasks_file.name}"


def _load_schemas(files: list[Path], cfg: dict[str, Any]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    if cfg.get("tool_schemas"):
        files = [config_path(cfg["tool_schemas"]), *files]
    for f in files:
        try:
            with open(f, encoding="utf-8-sig") as fh:
                data = json.load(fh)
        except (ValueError, RecursionError) as e:
            raise SourceError(f"cannot read tool schemas {f}: invalid JSON: {e}", file=f) from e
        except OSError as e:
            raise SourceError(f"cannot read tool schemas {f}: {e}", file=f) from e
        if not isinstance(data, dict):
            raise SourceError(f"{f} must map domain -> {{agent_tools: [...], user_tools: [...]}}", file=f)
        for domain, entry in data.items():
            tools = entry.get("agent_tools") if isinstance(entry, dict) else entry
            if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
                raise SourceError(f"{f}: {domain}.agent_tools must be a list of function schemas", file=f,
                                  field=f"{domain}.agent_tools")
            for i, t in enumerate(tools):  # OpenAI-style {"type": "function", "function": {...}} or the function
                fn = t.get("function", t)
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
                    raise SourceError(f"{f}: {domain}.agent_tools[{i}] has no function name (expected "
                                      f"{{\"function\": {{\"name\": ...}}}} or {{\"name\": ...}}): {str(t)[:120]}",
                                      file=f, field=f"{domain}.agent_tools[{i}]")
            out.setdefault(domain, tools)
    return out


class _InitialState(msgspec.Struct):
    """Of a task's `initial_state`, only the conversation the agent has already had (`message_history`)."""
    message_history: Any = None


class _TaskFields(msgspec.Struct):
    """The task fields the reader uses: msgspec validates the rest of a task (persona, initial_state's data,
    ...) but never builds it."""
    id: Any = None
    user_scenario: Any = None
    evaluation_criteria: Any = None
    ticket: Any = None
    description: Any = None
    initial_state: Optional[_InitialState] = None


_SPLIT = msgspec.json.Decoder(list[msgspec.Raw])  # the tasks array -> each task's exact text
_FIELDS = msgspec.json.Decoder(_TaskFields)
_ANY = msgspec.json.Decoder()
_KEYS = tuple(_TaskFields.__struct_fields__)


def _task(raw: msgspec.Raw) -> Any:
    """One task as a dict of the fields the reader uses; the whole value when it is not an object or lacks
    user_scenario / evaluation_criteria (the reader then looks for a misspelled key among all of them)."""
    try:
        t = _FIELDS.decode(raw)
    except msgspec.ValidationError:  # not an object: the reader reports what it is
        return _ANY.decode(raw)
    if t.user_scenario is None or t.evaluation_criteria is None:
        return _ANY.decode(raw)
    out = {k: getattr(t, k) for k in _KEYS}
    if t.initial_state is not None:
        out["initial_state"] = {"message_history": t.initial_state.message_history}
    return out


def _load_tasks(tf: Path) -> tuple[list, Callable[[int], str], dict[int, str]]:
    """(the tasks file's tasks, ``raw(i)``: task ``i`` as text for its quarantine row, {task index: where
    a lone surrogate sits} for the tasks no UTF-8 text can store), or a SourceError naming the file (a
    truncated file must not pass as zero tasks).

    msgspec splits the array into each task's exact text and decodes only the fields the reader uses (2.5x
    ``json.load`` on the 14 MB telecom file); a quarantined task keeps its own text. A file msgspec refuses
    (invalid JSON, NaN/Infinity, a BOM, lone surrogates) goes through ``json.loads``, which decides: its
    error (with line and column) or its values, with ``raw`` re-serialised (`record_json`)."""
    try:
        data = strip_bom(tf.read_bytes())
    except OSError as e:
        raise SourceError(f"cannot read {tf}: {e}", file=tf) from e
    unstorable: dict[int, str] = {}
    try:
        raws = _SPLIT.decode(data)
        tasks = [_task(r) for r in raws]

        def raw(i: int) -> str:
            try:  # msgspec does not check the UTF-8 of keys it skips; the standard library would refuse the file
                return bytes(raws[i]).decode("utf-8")
            except UnicodeDecodeError as e:
                raise SourceError(f"cannot read {tf}: task {i + 1} is not valid UTF-8 ({e})", file=tf) from None
    except (msgspec.DecodeError, RecursionError):  # the standard library decides (the same values, or its error)
        try:
            text = data.decode("utf-8")
            tasks = json.loads(text)
        except json.JSONDecodeError as e:
            raise SourceError(f"{tf}: invalid or truncated JSON at line {e.lineno} column {e.colno}: {e.msg}",
                              file=tf) from None
        except UnicodeDecodeError as e:
            raise SourceError(f"cannot read {tf}: {e}", file=tf) from e
        except RecursionError:
            raise SourceError(f"{tf}: invalid JSON: nested deeper than the parser's recursion limit",
                              file=tf) from None
        strict = "NaN" not in text and "Infinity" not in text
        if isinstance(tasks, list):
            unstorable = {i: at for i, t in enumerate(tasks) if (at := lone_surrogate(t)) is not None}

        def raw(i: int) -> str:
            return record_json(tasks[i], strict)
    if not isinstance(tasks, list):
        raise SourceError(f"{tf}: the tasks file must be a JSON list of tasks, got a {type(tasks).__name__}",
                          file=tf)
    if not tasks:
        raise SourceError(f"{tf} holds no tasks (an empty list, no record){WIPE}", file=tf)
    return tasks, raw, unstorable


# -------------------------------------------------------------------------------------- user message text
_PRONOUNS = {
    "you are": "I am", "you're": "I'm", "you were": "I was", "you have": "I have", "you've": "I've",
    "you'd": "I'd", "you'll": "I'll", "yourself": "myself", "yours": "mine", "your": "my",
}
_PRONOUN_RX = re.compile(
    r"\b(?:" + "|".join(sorted((re.escape(k) for k in _PRONOUNS), key=len, reverse=True)) + r")\b", re.IGNORECASE
)
# "You mobile data" (a typo in the telecom set) reads as "your"
_TYPO_RX = re.compile(r"\bYou (?=mobile|phone|account|internet|data|name|user id|email|order|zip)\b")
# "you" right after one of these words is an object ("told you", "for you") -> "me"; everywhere else it is the
# subject ("you want", "do you want", "the trip you want") -> "I"
_OBJECT_BEFORE = re.compile(
    r"\b(?:to|for|with|at|from|about|by|of|on|into|onto|than|like|without|towards?|upon|against|behind|around|"
    r"through|tells?|told|telling|ask(?:s|ed|ing)?|gives?|gave|given|giving|offer(?:s|ed)?|help(?:s|ed)?|lets?|"
    r"sends?|sent|call(?:s|ed)?|contact(?:s|ed)?|charge[sd]?|provide[sd]?|show(?:s|ed)?|remind(?:s|ed)?|"
    r"transfer(?:s|red)?|inform(?:s|ed)?|assure[sd]?|pays?|paid|bother(?:s|ed)?|allow(?:s|ed)?|wants?|needs?|"
    r"convince[sd]?|guide[sd]?|instruct(?:s|ed)?|reach(?:es)?|makes?|notif(?:y|ies|ied)|warn(?:s|ed)?|"
    r"persuade[sd]?|pressure[sd]?|grant(?:s|ed)?|connect(?:s|ed)?|assist(?:s|ed)?|keeps?|kept|"
    r"compensate[sd]?|compensating|saves?|saved|saving)\s+$",
    re.IGNORECASE,
)
_YOU = re.compile(r"\b[Yy]ou\b")
# "caused you to miss", "made you wait", "refunded you": an object after a past-tense verb, or before "to"
_OBJECT_AFTER_VERB = re.compile(r"\b(?:caus|forc|refund|bill|upsett?|disappoint|annoy|frustrat|confus|surpris|"
                                r"lett)ed\s+$|\b(?:made|had|got|left)\s+$", re.IGNORECASE)
_TO_AFTER = re.compile(r"\s+to\s")


def _pronoun(m: re.Match) -> str:
    word = m.group(0)
    rep = _PRONOUNS[word.lower()]
    return rep[0].upper() + rep[1:] if word[0].isupper() else rep


def first_person(text: str) -> str:
    """Turn a tau2 scenario written to the user simulator ("You want to ...") into the user's own words."""
    text = _PRONOUN_RX.sub(_pronoun, _TYPO_RX.sub("Your ", text))
    out, last = [], 0
    for m in _YOU.finditer(text):
        out.append(text[last:m.start()])
        before = text[max(0, m.start() - 24): m.start()]
        obj = (_OBJECT_BEFORE.search(before) or _OBJECT_AFTER_VERB.search(before)
               or _TO_AFTER.match(text, m.end()))
        out.append("me" if obj else "I")
        last = m.end()
    out.append(text[last:])
    return "".join(out).strip()


# Sentences of task_instructions that steer the simulator rather than say anything a caller would say.
_META = re.compile(
    r"tool call|\bground (?:your|my|the)|make up|simulat|\bpersona\b|for example|transcript|###|\bSTOP\b"
    r"|\btactics?\b",
    re.IGNORECASE,
)
# In any field: a sentence about "the agent" in the third person ("If the agent asks ...", "Tell the agent ...")
# tells the simulator how to play the call later; a caller's first message speaks to the agent, not about it
# ("another agent", "a human agent", "a service agent" stay: those are requests or backstory).
_PLAN = re.compile(r"\bthe\s+(?:[\w-]+\s+){0,2}agent\b|(?:^|\b(?:if|when|unless)\s+)agent\b", re.IGNORECASE)
_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+")
# In any field: a sentence that tells the simulator how to act later in the call ("Be persistent.", "Insist that
# ...", "When asked for order ID, provide ... first.", "Make sure you mention ...", "For that you make up a
# story ...") is no part of what a caller says first; nor is a sentence without a word (task_instructions ".").
_DIRECTIVE = re.compile(
    r"^(?:(?:if|when) (?:you are |you're )?asked\b|insist\b|be (?:very )?(?:insistent|persistent|polite)\b|"
    r"make sure (?:you|to) mention\b|mention the\b|don't accept the first offer\b|halfway through\b|"
    r"after asserting\b|if that (?:doesn't work|does not work|fails),? (?:then )?(?:say|respond)\b|"
    r"(?:for that,? )?you make up\b)", re.IGNORECASE)
_WORD = re.compile(r"\w")


# every literal _META needs, lower-cased: an ASCII sentence holding none of them cannot match (a cheap
# prefilter; non-ASCII sentences always go through the regex, IGNORECASE folds beyond str.lower there)
_META_WORDS = ("tool call", "ground ", "make up", "simulat", "persona", "for example", "transcript", "###", "stop",
               "tactic")


def _is_meta(s: str) -> bool:
    if s.isascii():
        low = s.lower()
        if not any(w in low for w in _META_WORDS):
            return False
    return _META.search(s) is not None


def _is_plan(s: str) -> bool:
    return ("agent" in s.lower() or not s.isascii()) and _PLAN.search(s) is not None


def _spoken(text: str, drop_meta: bool, cache: dict | None = None) -> list[str]:
    """The sentences of ``text`` in the user's words. ``cache`` (one per read): the same instruction texts
    repeat across a domain's tasks (telecom: 3 distinct texts per field over 2285 tasks)."""
    key = (text, drop_meta)
    if cache is not None and key in cache:
        return cache[key]
    out = []
    for s in _SENTENCE.split(text):
        s = " ".join(s.split())  # == re.sub(r"\s+", " ", s).strip(): str.split and re's \s agree on whitespace
        if _WORD.search(s) and not _is_plan(s) and not _DIRECTIVE.search(s) and not (drop_meta and _is_meta(s)):
            out.append(first_person(s) + ("" if s[-1] in ".!?:;\"')" else "."))
    if cache is not None:
        cache[key] = out
    return out


def _find_key(obj: dict, test) -> Any:
    return next((v for k, v in obj.items() if isinstance(k, str) and test(k.lower())), None)


def user_request(task: dict, cache: dict | None = None) -> str | None:
    """The user's first message. BadRecord when a field the text comes from has the wrong type. ``cache``:
    see `_spoken`."""
    scen = task.get("user_scenario")
    if scen is None:  # misspelled / missing key: find a key that looks like it
        scen = _find_key(task, lambda k: k.startswith("user") or "scen" in k)
    if scen is not None and not isinstance(scen, dict):
        raise BadRecord("user_scenario", f"user_scenario is a {type(scen).__name__}, not an object")
    instr = None
    if isinstance(scen, dict):
        instr = scen.get("instructions")
        if instr is None:
            instr = _find_key(scen, lambda k: k.startswith("instr"))
    parts: list[str] = []
    if isinstance(instr, str):
        parts = _spoken(instr, True, cache)  # the simulator's rules are no more speakable in one string
    elif isinstance(instr, dict):
        for key in ("known_info", "reason_for_call", "unknown_info", "task_instructions"):
            v = instr.get(key)
            if v is None:
                continue
            if not isinstance(v, str):
                raise BadRecord(f"user_scenario.instructions.{key}", f"{key} is a {type(v).__name__}, not text")
            parts += _spoken(v, key == "task_instructions", cache)
    elif instr is not None:
        raise BadRecord("user_scenario.instructions",
                        f"instructions is a {type(instr).__name__}, not text or an object")
    if not parts:
        for fallback in (task.get("ticket"), (task.get("description") or {}).get("purpose")
                         if isinstance(task.get("description"), dict) else None):
            if isinstance(fallback, str) and fallback.strip():
                return re.sub(r"\s+", " ", fallback).strip()
        return None
    return " ".join(parts).strip() or None


# ---------------------------------------------------------------------------------- expected first action
def _scalars(v: Any):
    if isinstance(v, dict):
        for x in v.values():
            yield from _scalars(x)
    elif isinstance(v, list):
        for x in v:
            yield from _scalars(x)
    elif v is not None:
        yield v


def unsupported_values(arguments: dict, text: str) -> list:
    """Argument values (scalars) of a call that the text does not contain (case-insensitive); a float that
    is a whole number also matches its integer form (2.0 ~ "2 GB"). Booleans never appear in prose."""
    low = text.lower()
    missing = []
    for v in _scalars(arguments):
        if isinstance(v, bool):
            missing.append(v)
            continue
        forms = {str(v).lower()}
        if isinstance(v, float) and v.is_integer():
            forms.add(str(int(v)))
        if isinstance(v, (int, float)):
            if not any(re.search(rf"(?<![\d.]){re.escape(f)}(?![\d])", low) for f in forms):
                missing.append(v)
        elif not any(f in low for f in forms):
            missing.append(v)
    return missing


def _actions(task: dict, tool_names: set[str], domain: str) -> tuple[list[dict], list[str]]:
    """(assistant actions [{name, arguments, action_id}], user-side action names). BadRecord on bad types."""
    crit = task.get("evaluation_criteria")
    if crit is None:
        crit = _find_key(task, lambda k: k.startswith("evaluation"))
    if crit is None:
        return [], []
    if not isinstance(crit, dict):
        raise BadRecord("evaluation_criteria", f"evaluation_criteria is a {type(crit).__name__}, not an object")
    actions = crit.get("actions")
    if actions is None:
        return [], []
    if not isinstance(actions, list):
        raise BadRecord("evaluation_criteria.actions", f"actions is a {type(actions).__name__}, not a list")
    out, user = [], []
    for j, act in enumerate(actions):
        fld = f"evaluation_criteria.actions[{j}]"
        if not isinstance(act, dict):
            raise BadRecord(fld, f"action is a {type(act).__name__}, not an object")
        name = act.get("name")
        if not isinstance(name, str) or not name:
            raise BadRecord(f"{fld}.name", "action without a tool name")
        if act.get("requestor", "assistant") not in (None, "assistant"):
            user.append(name)  # user-side device action (telecom)
            continue
        if name not in tool_names:
            raise BadRecord(f"{fld}.name", f"tool '{name}' is not among the {domain} agent tools")
        args = json_loads(arguments_json(act.get("arguments"), f"{fld}.arguments"))
        compared = act.get("compare_args")
        if compared is not None and not (isinstance(compared, list) and all(isinstance(k, str) for k in compared)):
            raise BadRecord(f"{fld}.compare_args", f"compare_args is {json.dumps(compared)[:60]}, not a list of "
                                                   "argument names")
        out.append({"name": name, "arguments": args, "action_id": act.get("action_id"), "compare_args": compared})
    return out, user


def compared_arguments(action: dict) -> dict:
    """The arguments the benchmark compares for an action: those named in its `compare_args` (tau2: `[]` = the
    name alone, e.g. `transfer_to_human_agents` whose `summary` is free text), all of them when it has none."""
    if action.get("compare_args") is None:
        return action["arguments"]
    return {k: v for k, v in action["arguments"].items() if k in action["compare_args"]}


def _crit_field(task: dict, key: str) -> Any:
    crit = task.get("evaluation_criteria")
    if crit is None:
        crit = _find_key(task, lambda k: k.startswith("evaluation"))
    return crit.get(key) if isinstance(crit, dict) else None


# --------------------------------------------------------------------------------------------- reading
def _parse_tasks(tasks: list, raw: Callable[[int], str], tool_names: set, domain: str, fname: str,
                 unstorable: dict[int, str]) -> tuple[list[dict], list[dict]]:
    """Pass 1: (candidates without the task itself, quarantine rows). One process: since the prompt
    texts are cached per read, a forked half costs more than it saves (measured)."""
    cands: list[dict] = []
    bad: list[dict] = []
    spoken: dict = {}
    for idx, task in enumerate(tasks, 1):
        try:
            if idx - 1 in unstorable:
                raise BadRecord(unstorable[idx - 1], str(UnstorableText(unstorable[idx - 1])))
            if not isinstance(task, dict):
                raise BadRecord("", f"task is a JSON {type(task).__name__}, not an object")
            tid = task.get("id")
            if not isinstance(tid, (str, int)) or isinstance(tid, bool) or str(tid) == "":
                raise BadRecord("id", "task id is missing or not a string/integer")
            text = user_request(task, spoken)
            if not text:
                raise BadRecord("user_scenario.instructions", "no user request (user_scenario.instructions, "
                                                              "ticket, description.purpose all missing)")
            calls, user_actions = _actions(task, tool_names, domain)
        except BadRecord as e:
            bad.append(reject(dataset=DATASET, file=fname, line=idx, field=e.field, reason=e.reason,
                              raw=raw(idx - 1)))
            continue
        first = calls[0] if calls else None
        checked = compared_arguments(first) if first else {}
        state = task.get("initial_state")
        cands.append({
            "idx": idx, "tid": str(tid), "text": text, "first": first, "calls": calls,
            "user_actions": user_actions,
            "key": canonical_json([first["name"], checked]) if first else "",  # "": no action
            "missing": unsupported_values(checked, text) if first else [],
            "history": bool(state.get("message_history")) if isinstance(state, dict) else False,
        })
    return cands, bad


def read(paths: list[Path], cfg: dict[str, Any]) -> SourceResult:
    cfg = cfg or {}
    schema_files, task_files = _roots_and_task_files([Path(p) for p in paths])
    if cfg.get("domains"):
        wanted = set(cfg["domains"])
        found = sorted({f.parent.name for f in task_files})
        unknown = sorted(wanted - set(found))
        if unknown and found:  # a misspelt domain would silently read the others only
            raise SourceError(
                f"tau2.domains: no domain {unknown[0]!r} among the tasks found ({found})"
                f"{did_you_mean(unknown[0], found)}; fix tau2.domains in configs/datasets.yaml",
                field="tau2.domains")
        task_files = [f for f in task_files if f.parent.name in wanted]
    if not task_files:
        raise SourceError(
            f"no domains/<domain>/tasks.json found from {[str(p) for p in paths]} "
            "(set CB_TAU2_PATH to the tau2 folder that holds tool_schemas.json and domains/)"
        )
    schemas = _load_schemas(schema_files, cfg)
    system_tpl = cfg.get("system_prompt") or DEFAULT_SYSTEM
    good: list[dict] = []
    bad: list[dict] = []
    per_domain: dict[str, int] = {}
    excluded: dict[str, int] = {"prior_conversation": 0, "no_expected_action": 0, "unsupported_first_action": 0,
                                "ambiguous_prompt": 0}
    tools_by_file: dict[str, str] = {}
    for tf in task_files:
        domain = tf.parent.name
        fname, rel = str(tf), relative_name(tf)
        tasks, raw, unstorable = _load_tasks(tf)
        if domain not in schemas:
            raise SourceError(
                f"no agent tool schemas for domain '{domain}' ({tf}) in {[str(f) for f in schema_files]} "
                "(tau2 traces offer the domain's full tool set: add it to tool_schemas.json or cfg tool_schemas)",
                file=tf)
        tools = schemas[domain]
        tools_json = canonical_json(tools)
        make = SharedToolsTraces(DATASET, tools_json, placeholder=rel)
        tools_by_file[rel] = tools_json
        tool_names = {t.get("function", t).get("name") for t in tools}
        system = message("system", system_tpl.format(domain=domain))
        # pass 1: prompt text and expected actions per task; pass 2 needs them all
        cands, rejected = _parse_tasks(tasks, raw, tool_names, domain, fname, unstorable)
        bad.extend(rejected)
        # pass 2: one prompt must mean one expected first action
        keys_by_text: dict[str, set[str]] = {}
        for c in cands:  # a task with no assistant action counts: its hidden state may make the prompt need none
            keys_by_text.setdefault(c["text"], set()).add(c["key"])
        n_ok = 0
        for c in cands:
            first = c["first"]
            reason = field = None
            if c["history"]:
                excluded["prior_conversation"] += 1
                field = "initial_state.message_history"
                reason = ("prior_conversation: the task starts after a conversation the agent has already had "
                          "(initial_state.message_history); a skeleton of the system prompt and one user turn "
                          "would drop what the expected action follows from")
            elif first is None:
                excluded["no_expected_action"] += 1
                field = "evaluation_criteria.actions"
                reason = ("no_expected_action: evaluation_criteria.actions holds no assistant action, so the right "
                          "first move (a lookup, a question, a refusal) is not given; answering without a tool "
                          "call is not it")
            elif c["missing"]:
                excluded["unsupported_first_action"] += 1
                field = "evaluation_criteria.actions"
                reason = (f"unsupported_first_action: the first expected action {first['name']} needs values the "
                          f"user's message does not contain: {c['missing'][:6]}")
            elif len(keys_by_text[c["text"]]) > 1:
                excluded["ambiguous_prompt"] += 1
                field = "user_scenario.instructions"
                reason = (f"ambiguous_prompt: {len(keys_by_text[c['text']])} different first actions are expected "
                          f"for this same user message in {domain} (they depend on state the prompt does not show)")
            if reason:
                bad.append(reject(dataset=DATASET, file=fname, line=c["idx"], field=field, reason=reason,
                                  raw=raw(c["idx"] - 1), severity="excluded"))
                continue
            task = tasks[c["idx"] - 1]
            instr = task.get("user_scenario", {}).get("instructions") if isinstance(
                task.get("user_scenario"), dict) else None
            good.append(make(
                source_locator=f"{rel}:{c['idx']}",
                completeness="skeleton",
                messages=[system, message("user", c["text"])],
                category="retain",
                priority_class="tool_capability",
                subtype=domain,
                tool_attack={"expected_tool": first["name"], "attacker_tool": None,
                             "attacker_args": None, "injection_text": None, "injection_span": None},
                pair_group=f"{DATASET}:{domain}:{c['tid']}",
                generation_params={"tau2": {
                    "task_id": c["tid"],
                    "domain": domain,
                    "expected_first_action": {"name": first["name"], "arguments": first["arguments"],
                                              "compare_args": first["compare_args"]},
                    "reference_actions": [{"name": a["name"], "arguments": a["arguments"]} for a in c["calls"]],
                    "user_actions": c["user_actions"],
                    "nl_assertions": _crit_field(task, "nl_assertions"),
                    "communicate_info": _crit_field(task, "communicate_info"),
                    "instructions": instr,
                }},
            ))
            n_ok += 1
        per_domain[domain] = n_ok
    res = SourceResult.from_rows(good, bad, tasks_per_domain=per_domain, task_files=len(task_files),
                                 excluded=sum(excluded.values()), **{f"excluded_{k}": v for k, v in excluded.items()})
    return fill_tools(res, tools_by_file)
