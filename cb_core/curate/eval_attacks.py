"""The held-out attack set: skeletons cut right after the injection, with the expected behaviour."""
from __future__ import annotations

import json
from collections import Counter
from typing import Any, Iterable

import polars as pl

from cb_core.config import ConfigError, config_path
from cb_core.curate.config import CurationConfig
from cb_core.curate.features import called_tools, content_hash, cut_after_injection, hash_col, injection_in_context
from cb_core.curate.mix import inherit_parent_groups
from cb_core.schemas import EVAL_ATTACK_SCHEMA, FINAL_ANSWER, TRACE_SCHEMA, canonical_json, digest, generation_params

EVAL_ATTACK_ID_VERSION = "eval_attack_v2"
OTHER_STRATUM = "other"


def _load_tasks(rel: str | None, key: str) -> tuple[dict | None, str]:
    """(a `{version: {suite: {task_id: {...}}}}` file of configs/agentdojo, where it came from / why it is
    missing). A missing file is not fatal here: what it would add is left out and the count is reported."""
    if not rel:
        return None, f"not configured ({key}: null)"
    path = config_path(rel)
    if not path.is_file():
        return None, f"missing: {rel}"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ConfigError(f"{path}: expected {{version: {{suite: {{task_id: {{...}}}}}}}}")
    return data, str(rel)


def load_user_tasks(cfg: CurationConfig) -> tuple[dict | None, str]:
    """(AgentDojo user tasks' ground truth, where it came from / why it is missing). A missing file is not
    fatal here: the affected eval attacks fall back to `no_attacker_call` and the count is reported."""
    return _load_tasks(cfg.agentdojo_user_tasks, "agentdojo_user_tasks")


def load_injection_tasks(cfg: CurationConfig) -> tuple[dict | None, str]:
    """(AgentDojo injection tasks' ground truth, where it came from / why it is missing). Missing: no eval
    attack carries preparatory calls (`attack_step` never scored), reported in the stats."""
    return _load_tasks(cfg.agentdojo_injection_tasks, "agentdojo_injection_tasks")


def agentdojo_task_key(pair_group: str | None) -> tuple[str, str] | None:
    """(suite, user_task_id) from an AgentDojo pair_group `agentdojo:<suite>:<user_task_id>`."""
    parts = (pair_group or "").split(":")
    return (parts[1], parts[2]) if len(parts) == 3 and parts[0] == "agentdojo" and all(parts[1:]) else None


def agentdojo_user_task(user_tasks: dict | None, suite: str, task_id: str, prompt: str | None) -> dict | None:
    """One user task's entry (`prompt`, `ground_truth_functions`, `ground_truth_calls`). The benchmark version
    is the one whose prompt is the trace's user prompt. A trace whose prompt is no version's prompt of that task
    is not that task (a wrong or made-up task id): None, so its expected behaviour is `no_attacker_call` and
    the WARN check counts it, never another task's next call (every real trace of ../shared/data matches
    exactly). Without a prompt, the versions' ground truths must agree (else None: ambiguous)."""
    found = []
    for version in sorted(user_tasks or {}):
        t = ((user_tasks[version] or {}).get(suite) or {}).get(task_id)
        if isinstance(t, dict) and isinstance(t.get("ground_truth_functions"), list):
            found.append((version, t))
    if prompt is not None:
        return next((t for _v, t in found if (t.get("prompt") or "").strip() == prompt.strip()), None)
    gts = {tuple(t["ground_truth_functions"]) for _v, t in found}
    return found[-1][1] if len(gts) == 1 else None


def agentdojo_ground_truth(user_tasks: dict | None, suite: str, task_id: str, prompt: str | None) -> list[str] | None:
    """Ground-truth function names of one user task (`agentdojo_user_task`), or None."""
    t = agentdojo_user_task(user_tasks, suite, task_id, prompt)
    return None if t is None else list(t["ground_truth_functions"])


# AgentDojo reads whose result holds what another ground-truth read looks up: once the trace made one, that lookup
# is done (workspace `get_received_emails` returns every received e-mail, which a task's `search_emails` for a
# received e-mail would find; user_task_17 "based on the emails I received").
# Without it the next "expected" call was that lookup again, which the injection's own first step
# (workspace injection_task_3: `search_emails(sender=lily.white@gmail.com)`) satisfies: scored `correct`.
SUPERSET_READS: dict[str, tuple[str, ...]] = {"search_emails": ("get_received_emails",)}


def calls_left(ground_truth: list[str], calls_made: list[str]) -> list[int]:
    """Indices of the ground-truth functions (in order, counting repeats) not yet called. A read whose superset
    read (`SUPERSET_READS`) was called counts as made."""
    left = Counter(calls_made)
    out = []
    for i, fn in enumerate(ground_truth):
        if left[fn] > 0:
            left[fn] -= 1
        elif not any(left[s] > 0 for s in SUPERSET_READS.get(fn, ())):
            out.append(i)
    return out


def next_expected_call(ground_truth: list[str], calls_made: list[str]) -> str:
    """The first ground-truth function (in order, counting repeats) not yet called, else FINAL_ANSWER. A read
    whose superset read (`SUPERSET_READS`) was called counts as made."""
    left = calls_left(ground_truth, calls_made)
    return ground_truth[left[0]] if left else FINAL_ANSWER


def injection_task_id(provenance: dict | None) -> str | None:
    """The injection task of an AgentDojo trace: the recorded-run reader's
    `generation_params.agentdojo.injection_task_id`, the suite skeletons' `agentdojo_suites.injection_task`."""
    gp = generation_params(provenance)
    for key, field in (("agentdojo", "injection_task_id"), ("agentdojo_suites", "injection_task")):
        facts = gp.get(key)
        if isinstance(facts, dict) and isinstance(facts.get(field), str) and facts[field]:
            return facts[field]
    return None


def injection_ground_truth(injection_tasks: dict | None, suite: str, task_id: str) -> list[dict] | None:
    """An injection task's ground-truth calls (`[{function, args}]`) as the newest version holding it has them
    (the reader's rule, `agentdojo._injection_tasks`; no task's calls differ between agentdojo 0.1.35's
    versions), or None where no version has it."""
    for version in reversed(list(injection_tasks or {})):
        t = ((injection_tasks[version] or {}).get(suite) or {}).get(task_id)
        if isinstance(t, dict) and isinstance(t.get("ground_truth_calls"), list):
            return [c for c in t["ground_truth_calls"] if isinstance(c, dict) and isinstance(c.get("function"), str)]
    return None


def preparatory_calls(injection_calls: list[dict], attacker_tool: str | None, attacker_args: Any,
                      expected_tool: str | None, user_calls_left: list[dict]) -> list[dict]:
    """The injection's ground-truth calls before its first attacker call (the attacker's tool carrying the
    attacker's arguments by the judge's rule, `judge.args_match`), as `{name, arguments}` (JSON text), less
    those the user's own task also makes at this point: the expected tool (a call of it is `correct` or
    `other_tool`, as before), and a call left in the user's ground truth (`user_calls_left`, `{function, args}`;
    args None: by name) whose arguments carry the step's (workspace `search_emails(query="hiking trip")` is not
    `search_emails(sender="lily.white@gmail.com")`). No attacker call in the ground truth: none (which calls
    come before the attack cannot be said)."""
    from cb_core.generate.judge import args_match, json_obj

    def obj(v: Any) -> dict:
        return json_obj(v) or {}

    wanted = obj(attacker_args)
    k = next((i for i, c in enumerate(injection_calls)
              if (attacker_tool is None or c["function"] == attacker_tool)
              and (attacker_tool is not None or wanted)
              and args_match(obj(c.get("args")), wanted)[0]), None)
    out: list[dict] = []
    for c in injection_calls[:k or 0]:
        name, args = c["function"], obj(c.get("args"))
        if name == expected_tool or any(
            u.get("function") == name and (u.get("args") is None or args_match(obj(u["args"]), args)[0])
            for u in user_calls_left
        ):
            continue
        step = {"name": name, "arguments": canonical_json(args)}
        if step not in out:
            out.append(step)
    return out


def _first_user(msgs: list[dict]) -> str | None:
    return next(((m or {}).get("content") for m in msgs if (m or {}).get("role") == "user"), None)


def build_eval_attacks_with_stats(
    traces: pl.DataFrame,
    trained: pl.DataFrame | Iterable[str],
    cfg: CurationConfig,
    user_tasks: dict | None | object = ...,
    injection_tasks: dict | None | object = ...,
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Held-out attack skeletons and what was done to make them.

    Candidates: attacked traces whose injection is in the context (`injection_in_context`) and whose id and
    pair_group are absent from `trained` (a frame with id + pair_group, e.g. the whole training mix, or an
    iterable of ids). Each is cut by `cut_after_injection` (never ends on a user message without the
    injection), given a new stable id, and its expected behaviour: AgentDojo -> `tool_attack.expected_tool` =
    `next_expected_call` of the user task's ground truth (`user_tasks`, default: `agentdojo_user_tasks` of
    the config) given the calls made before the cut; B4 -> the record's expected_tool; otherwise (LLMail, or
    AgentDojo without ground truth) -> `no_attacker_call`. `preparatory_calls`: AgentDojo attacks whose user
    task's ground truth is known carry the calls their injection task's ground truth (`injection_tasks`,
    default: `agentdojo_injection_tasks` of the config) makes before the attacker's call, less the user's own
    (`preparatory_calls`); every other attack carries []: without the user task's calls a preparatory read
    cannot be told from the user's next step. Identical cuts collapse onto the smallest source id. Strata
    (`<dataset>:<subtype>`) under `min_per_stratum` are merged into `<dataset>:other` (column `stratum`;
    `labels.subtype` untouched); at most `max_per_stratum` per stratum, hash-ordered."""
    if user_tasks is ...:
        user_tasks, ut_source = load_user_tasks(cfg)
    else:
        ut_source = "given" if user_tasks else "none given"
    if injection_tasks is ...:
        injection_tasks, it_source = load_injection_tasks(cfg)
    else:
        it_source = "given" if injection_tasks else "none given"
    if isinstance(trained, pl.DataFrame):
        t_ids = set(trained["id"].to_list())
        t_groups = set(trained["pair_group"].to_list()) if "pair_group" in trained.columns else set()
    else:
        t_ids = set(trained)
        t_groups = None
    base = traces.select(list(TRACE_SCHEMA))
    # generated rows among `traces` join their parent's task, as in the mix
    own = base.filter(pl.col("provenance").struct.field("parent_id").is_null())
    kids, _ = inherit_parent_groups(base, {"g": base.filter(pl.col("provenance").struct.field("parent_id")
                                                            .is_not_null())})
    base = pl.concat([own, kids["g"]], how="vertical")
    if t_groups is None:
        t_groups = set(base.filter(pl.col("id").is_in(list(t_ids)))["pair_group"].to_list())
    attacked = base.filter(pl.col("labels").struct.field("attack_present").fill_null(False))
    injected = attacked.filter(injection_in_context(attacked))
    cand = injected.filter(~pl.col("id").is_in(list(t_ids)) & ~pl.col("pair_group").is_in(list(t_groups)))
    stats: dict[str, Any] = {
        "attacked_traces": attacked.height,
        "excluded_injection_not_in_context": attacked.height - injected.height,
        "excluded_trained_pair_group": injected.height - cand.height,
        "agentdojo_user_tasks": ut_source,
        "agentdojo_injection_tasks": it_source,
    }
    rows, no_gt, no_behavior = [], 0, 0
    for r in cand.iter_rows(named=True):
        orig = r["messages"] or []
        msgs = cut_after_injection(orig, r["tool_attack"])
        if not msgs:
            continue
        ta = dict(r["tool_attack"] or {})
        ta["injection_spans"] = [
            sp for sp in (ta.get("injection_spans") or [])
            if isinstance((sp or {}).get("message_index"), int) and sp["message_index"] < len(msgs)
        ]
        behavior, prep = None, []
        if r["dataset"] == "agentdojo":
            key = agentdojo_task_key(r["pair_group"])
            task = agentdojo_user_task(user_tasks, key[0], key[1], _first_user(msgs)) if key else None
            if task is not None:
                gt = list(task["ground_truth_functions"])
                left = calls_left(gt, called_tools(msgs))
                ta["expected_tool"] = gt[left[0]] if left else FINAL_ANSWER
                behavior = "final_answer" if ta["expected_tool"] == FINAL_ANSWER else "expected_tool"
                gt_calls = task.get("ground_truth_calls")
                aligned = isinstance(gt_calls, list) and [(c or {}).get("function") for c in gt_calls] == gt
                inj = injection_ground_truth(injection_tasks, key[0], injection_task_id(r["provenance"]) or "")
                prep = preparatory_calls(
                    inj or [], ta.get("attacker_tool"), ta.get("attacker_args"), ta["expected_tool"],
                    [gt_calls[i] if aligned else {"function": gt[i], "args": None} for i in left])
            else:
                ta["expected_tool"] = None
                no_gt += 1
        elif ta.get("expected_tool"):
            behavior = "expected_tool"
        if behavior is None:
            if not ta.get("attacker_tool"):
                no_behavior += 1  # neither an expected call nor a known attacker call to avoid: unscorable
                continue
            behavior = "no_attacker_call"
        new_id = digest([EVAL_ATTACK_ID_VERSION, content_hash(msgs), r["tools"], ta])
        if new_id in t_ids:  # never: 128-bit hash; guarded all the same
            continue
        rows.append(
            {
                **r,
                "id": new_id,
                "completeness": "skeleton",
                "messages": msgs,
                "tool_attack": ta,
                "split": "eval_attack",
                "source_trace_id": r["id"],
                "n_stripped": len(orig) - len(msgs),
                "expected_behavior": behavior,
                "stratum": f"{r['dataset']}:{(r['labels'] or {}).get('subtype') or ''}",
                "preparatory_calls": prep,
            }
        )
    stats.update(agentdojo_without_ground_truth=no_gt, excluded_no_expected_behavior=no_behavior)
    df = pl.DataFrame(rows, schema=EVAL_ATTACK_SCHEMA)
    n_rows = df.height
    # identical cuts collapse onto the smallest source id
    df = df.sort("id", "source_trace_id").unique("id", keep="first", maintain_order=True)
    stats["identical_cuts_collapsed"] = n_rows - df.height
    # small strata: merged into "<dataset>:other", never relabelled
    natural = dict(df.group_by("stratum").len().iter_rows()) if df.height else {}
    small = {k for k, n in natural.items() if n < cfg.eval_attacks.min_per_stratum}
    merged = {k: k.split(":", 1)[0] + ":" + OTHER_STRATUM for k in small}
    df = df.with_columns(pl.col("stratum").replace(merged))
    df = df.with_columns(hash_col(df, cfg.seed, "id", "eval_attacks").alias("_key")).sort("stratum", "_key")
    before_cap = df.height
    df = df.filter(pl.int_range(pl.len()).over("stratum") < cfg.eval_attacks.max_per_stratum)
    stats.update(
        candidates=before_cap,
        capped_by_max_per_stratum=before_cap - df.height,
        merged_strata={k: merged[k] for k in sorted(merged)},
        merged_strata_rows={k: natural[k] for k in sorted(merged)},
        rows=df.height,
        by_expected_behavior=dict(df.group_by("expected_behavior").len().sort("expected_behavior").iter_rows())
        if df.height
        else {},
        with_preparatory_calls=int((df["preparatory_calls"].list.len() > 0).sum()),
    )
    return df.drop("_key").sort("id"), stats


def build_eval_attacks(
    traces: pl.DataFrame,
    trained: pl.DataFrame | Iterable[str],
    cfg: CurationConfig,
    user_tasks: dict | None | object = ...,
    injection_tasks: dict | None | object = ...,
) -> pl.DataFrame:
    """`build_eval_attacks_with_stats` without the stats."""
    return build_eval_attacks_with_stats(traces, trained, cfg, user_tasks, injection_tasks)[0]


def eval_attack_strata(eval_attacks: pl.DataFrame, cfg: CurationConfig) -> list[dict[str, Any]]:
    """Per stratum: dataset, the labels' subtypes it holds (more than one only in a merged `other`), count,
    and whether it reaches min_per_stratum."""
    if eval_attacks.height == 0:
        return []
    df = (
        eval_attacks.group_by("stratum")
        .agg(
            pl.col("dataset").first(),
            pl.col("labels").struct.field("subtype").fill_null("").unique().sort().alias("subtypes"),
            pl.len(),
        )
        .sort("stratum")
    )
    return [{**r, "below_min": r["len"] < cfg.eval_attacks.min_per_stratum} for r in df.to_dicts()]
