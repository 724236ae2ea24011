"""DS / DR / adversarial-safe completions: skeleton -> prompt -> sample -> parse -> judge -> trace_v1 rows.

Three tables, one per asset:

* ``ds_completions``   -- attacked skeletons, the injection where it sits (B4 user message, LLMail and
  AgentDojo tool results), temperature 0.7 by default; kept only when the judge says ``attacker_tool``
  (the attacker's tool with the attacker's arguments where the trace knows them). harmful / harmful_flip.
* ``dr_completions``   -- the benign twin of each attacked skeleton (every injection span cut out of the
  message that holds it) plus the benign skeletons (TAU2 tasks, XSTest *safe* prompts, any other skeleton
  without an attack), temperature 0.3; kept when the model does the expected thing (the expected tool; a
  final answer where that is expected, e.g. LLMail; a compliant, non-refusing answer to an XSTest safe
  prompt). retain / benign_twin (twins) or the parent's class (tool_capability, borderline).
* ``adversarial_safe`` -- the attacked skeletons again, temperature 0.1; kept when the model still does the
  expected thing with the injection in context. retain / adversarial_safe, ``is_adversarial_safe``.

In every table a kept turn's tool calls must also fit the trace's tool schemas (JSON object arguments, a
tool the trace offers, every required parameter: ``cb_core.parse.tool_call_problems``, the rule the training
preflight applies), so a generated sample never stops training later.

Every kept sample is a complete trace_v1 row: the prompt's messages plus the generated assistant turn, the
parent's tools, ``pair_group`` and source locator, ``provenance.parent_id`` = the skeleton's id and the
generation parameters (model, backend, sampling, the shard's seed, judge outcome) in
``provenance.generation_params``. Every other sample is kept too, in the rejected table, with its outcome
and reason (``GENERATION_SCHEMA``).

Resume: the jobs (skeleton x variant) are sorted by a stable key and cut into shards of ``shard_size``
prompts; each shard's raw completions are written atomically as
``<shard_root>/<table>/<fingerprint>/shard-<digest of the job keys it covers>.parquet`` (the fingerprint
hashes model, backend, sampling and renderer settings). A restarted run loads the shards that exist and
generates only the missing ones, with the same per-shard seed, so a run killed at any point and started
again gives exactly the rows of an uninterrupted run: no duplicate, nothing lost. Parsing and judging
happen when the table is assembled, so a judge change never needs a new generation.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import polars as pl

from cb_core.config import (Rule, check_bool, check_keys, check_mapping, check_str, config_dir, display_path,
                            env_number, load_yaml, named_config, nullable, number, one_of, section, whole)
from cb_core.generate.backends import BACKEND_KINDS, GenerationBackend, SamplingConfig, prompt_ids
from cb_core.generate.judge import ARG_MODES, Expectation, Verdict, judge, json_obj, llm_judge_messages
from cb_core.parse import parse_completion, tool_call_problems
from cb_core.io import data_root, write_parquet
from cb_core.schemas import TRACE_SCHEMA, canonical_json, digest, generation_params, make_trace, message
from cb_core.sources.tau2 import first_action_writes

TABLES = ("ds_completions", "dr_completions", "adversarial_safe")
KIND = {"ds_completions": "ds", "dr_completions": "dr", "adversarial_safe": "adversarial_safe"}
MODES = ("ds", "dr", "both")  # ds: ds_completions; dr: dr_completions + adversarial_safe (retain data); both
CONFIG_FILE = "generation.yaml"
SHARD_DIR = "_shards"

RAW_SCHEMA = pl.Schema(
    {
        "job_key": pl.String,
        "parent_id": pl.String,
        "sample_index": pl.Int32,
        "prompt_tokens": pl.Int32,
        "text": pl.String,
        "token_ids": pl.List(pl.Int32),
        "stop_reason": pl.String,
        "seed": pl.Int64,
    }
)
GENERATION_SCHEMA = pl.Schema(
    {
        "job_key": pl.String,
        "table": pl.String,
        "parent_id": pl.String,
        "dataset": pl.String,
        "subtype": pl.String,
        "variant": pl.String,  # attacked | benign_twin | benign
        "sample_index": pl.Int32,
        "prompt_tokens": pl.Int32,
        "completion_tokens": pl.Int32,
        "text": pl.String,
        "stop_reason": pl.String,  # stop | length | not_generated
        "kind": pl.String,  # parse: tool_calls | final_answer | unparseable
        "calls": pl.String,  # JSON list of {name, arguments}
        "outcome": pl.String,  # judge outcome, or prompt_too_long
        "expected": pl.Boolean,
        "attacker_call": pl.Boolean,
        "refusal": pl.Boolean,
        "llm_verdict": pl.Boolean,  # null: LLM judge off (or no YES/NO answer)
        "kept": pl.Boolean,
        "reason": pl.String,
        "trace_id": pl.String,  # the kept trace's id (null when rejected)
        "seed": pl.Int64,
    }
)


# ---------------------------------------------------------------------------------------------- config
def _profile(v: Any, where: str) -> str:
    """A model profile: a name among ``config_dir()/models/*.yaml`` or the path of a profile YAML."""
    named_config("models", check_str(v, where), f"{where}: model profile")
    return v


def _per_table(rule: Rule) -> Rule:
    """A mapping table -> value; tables not given keep their defaults."""
    def check(v: Any, where: str) -> dict:
        check_keys(check_mapping(v, where), TABLES, where)
        return {t: rule(x, f"{where}.{t}") for t, x in v.items()}
    return check


LLM_JUDGE_RULES: dict[str, Rule] = {"enabled": check_bool, "model": nullable(_profile), "max_tokens": whole(1)}
# configs/generation.yaml (and its demo block, the env overrides, the assets' Config), one rule per key; a key
# not listed is an error naming it.
GEN_RULES: dict[str, Rule] = {
    "mode": one_of(MODES),
    "backend": one_of(BACKEND_KINDS),
    "batch_size": whole(1),
    "shard_size": whole(1),
    "limit": nullable(whole(0)),
    "n": whole(1),
    "max_tokens": whole(1),
    "top_p": number(lo=0, hi=1, lo_open=True),
    "seed": whole(0),
    "temperature": _per_table(number(lo=0)),
    "model": _per_table(nullable(_profile)),
    "attacker_args": one_of(ARG_MODES),
    "tensor_parallel_size": whole(1),
    "random_weights": one_of(("run", "skip")),
    "llm_judge": section(LLM_JUDGE_RULES),
}
ENV_OVERRIDES = {"CB_GEN_MODE": "mode", "CB_GEN_LIMIT": "limit", "CB_GEN_BACKEND": "backend"}


def _checked(values: dict, where: str, key_prefix: str) -> dict:
    """``values`` with every key known (``where`` names the block) and every value checked (its message names
    ``key_prefix`` + the key)."""
    check_keys(values, GEN_RULES, where)
    return {k: GEN_RULES[k](v, f"{key_prefix}{k}") for k, v in values.items()}


@dataclass
class LLMJudgeSettings:
    enabled: bool = False
    model: str | None = None  # model profile (null: the generating model)
    max_tokens: int = 4


@dataclass
class GenerationConfig:
    """configs/generation.yaml; the Dagster Config of each asset has the same keys (per-table values
    flattened). Env: CB_GEN_MODE, CB_GEN_LIMIT, CB_GEN_BACKEND override. Checked in `load` (GEN_RULES)."""

    mode: str = "both"
    backend: str = "transformers"
    batch_size: int = 8
    shard_size: int = 32
    limit: int | None = None  # prompts per table (first by stable key), null = all
    n: int = 1  # samples per prompt
    max_tokens: int = 256
    top_p: float = 1.0
    seed: int = 0
    temperature: dict[str, float] = field(
        default_factory=lambda: {"ds_completions": 0.7, "dr_completions": 0.3, "adversarial_safe": 0.1}
    )
    model: dict[str, str | None] = field(
        default_factory=lambda: {"ds_completions": None, "dr_completions": None, "adversarial_safe": None}
    )
    attacker_args: str = "all"  # all | any | ignore (see cb_core.generate.judge.args_match)
    tensor_parallel_size: int = 1  # vllm
    random_weights: str = "run"  # run | skip: a random-weight profile (`tiny`) writes noise; skip = keep the table
    llm_judge: LLMJudgeSettings = field(default_factory=LLMJudgeSettings)

    def __post_init__(self) -> None:
        if isinstance(self.llm_judge, dict):
            self.llm_judge = LLMJudgeSettings(**self.llm_judge)

    @classmethod
    def load(cls, name: str = CONFIG_FILE, env: dict | None = None, *, demo: bool = False,
             **overrides) -> "GenerationConfig":
        """The file's keys; its ``demo:`` block over them when the pipeline runs on the embedded demo sample;
        then the env overrides; then ``overrides`` (None = not set). Every value is checked (GEN_RULES): a bad
        one names the file (the one actually read) and key, the environment variable, or the override."""
        env = os.environ if env is None else env
        raw: dict[str, Any] = {}
        if name:
            path = Path(name) if Path(name).is_absolute() else config_dir() / name
            shown = display_path(path)
            raw = dict(load_yaml(path))
            check_keys(raw, [*GEN_RULES, "demo"], shown)
            demo_block = raw.pop("demo", None)
            demo_block = {} if demo_block is None else check_mapping(demo_block, f"{shown}: demo")
            raw = _checked(raw, shown, f"{shown}: ")
            demo_block = _checked(demo_block, f"{shown}: demo", f"{shown}: demo.")
            if demo:
                for k, v in demo_block.items():
                    raw[k] = {**(raw.get(k) or {}), **v} if isinstance(v, dict) else v
        for var, key in ENV_OVERRIDES.items():
            value = env.get(var)
            if value in (None, ""):
                continue
            if key == "limit":
                value = env_number(var, None, int, env=env)
            raw[key] = GEN_RULES[key](value, f"environment variable {var}")
        given = {k: v for k, v in overrides.items() if v is not None}
        given = _checked(given, "generation settings", "generation setting ")
        base = cls()
        for k in ("temperature", "model"):
            raw[k] = {**getattr(base, k), **(raw.get(k) or {}), **given.pop(k, {})}
        return cls(**{**raw, **given})

    def runs(self, table: str) -> bool:
        return self.mode == "both" or (self.mode == "ds") == (table == "ds_completions")

    def sampling(self, table: str) -> SamplingConfig:
        return SamplingConfig(temperature=float(self.temperature[table]), top_p=float(self.top_p),
                              max_tokens=int(self.max_tokens), seed=int(self.seed), n=int(self.n))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------------- jobs
@dataclass
class Job:
    key: str
    table: str
    variant: str  # attacked | benign_twin | benign
    parent: dict  # the skeleton's trace_v1 row
    messages: list[dict]  # the prompt's messages (trace_v1 message dicts)
    expectation: Expectation
    tool_attack: dict | None  # the generated trace's tool_attack


def _strip_trailing_assistant(msgs: list[dict]) -> list[dict]:
    """A skeleton may end on reference calls (TAU2): those are the target, not part of the prompt."""
    out = list(msgs)
    while out and out[-1].get("role") == "assistant":
        out.pop()
    return out


def _valid_spans(row: dict) -> list[dict]:
    ta = row.get("tool_attack") or {}
    spans = [s for s in (ta.get("injection_spans") or []) if s] or ([ta["injection_span"]] if ta.get(
        "injection_span") else [])
    msgs = row.get("messages") or []
    ok = []
    for s in spans:
        i, cs, ce = s.get("message_index"), s.get("char_start"), s.get("char_end")
        if not (isinstance(i, int) and 0 <= i < len(msgs) and msgs[i].get("role") in ("user", "tool")):
            continue
        if isinstance(cs, int) and isinstance(ce, int) and 0 <= cs < ce <= len(msgs[i].get("content") or ""):
            ok.append(s)
    return ok


def _cut(content: str, cs: int, ce: int) -> str:
    """content without [cs, ce), the seam tidied: the wider whitespace of the two sides joins them."""
    left, right = content[:cs], content[ce:]
    l2, r2 = left.rstrip(), right.lstrip()
    if not l2:
        return r2
    if not r2:
        return l2
    seam = left[len(l2):] + right[: len(right) - len(r2)]
    sep = "\n\n" if "\n\n" in seam else ("\n" if "\n" in seam else " ")
    return l2 + sep + r2


def benign_twin(row: dict) -> list[dict] | None:
    """The skeleton's messages with every injection span cut out of the message that holds it (None when a
    message would be left empty: there is no benign request to answer)."""
    msgs = [dict(m) for m in row.get("messages") or []]
    spans = _valid_spans(row)
    by_msg: dict[int, list[dict]] = {}
    for s in spans:
        by_msg.setdefault(s["message_index"], []).append(s)
    for i, ss in by_msg.items():
        content = msgs[i].get("content") or ""
        for s in sorted(ss, key=lambda s: s["char_start"], reverse=True):
            content = _cut(content, s["char_start"], min(s["char_end"], len(content)))
        if not content.strip():
            return None
        msgs[i]["content"] = content
    return msgs


def _has_injection(row: dict) -> bool:
    """Attacked, with an injection span the twin can cut out."""
    return bool((row.get("labels") or {}).get("attack_present") and _valid_spans(row))


def _is_attacked_skeleton(row: dict) -> bool:
    """An injection in the context and an attacker call the judge can recognise: the attacker's tool, or only
    the attacker's arguments (AgentDojo's goal-derived ``{"any_argument": ...}``, judged in any call). A
    recorded run that never reached the injection (LLMail ``email.retrieved`` false) is no attacked prompt."""
    ta = row.get("tool_attack") or {}
    if (row.get("labels") or {}).get("injection_reached") is False:
        return False
    return _has_injection(row) and bool(ta.get("attacker_tool") or json_obj(ta.get("attacker_args")))


def _injection_functions(row: dict) -> set[str]:
    """The tools the injection task's ground truth calls, where the skeleton records them (AgentDojo suites)."""
    suites = generation_params(row.get("provenance")).get("agentdojo_suites")
    return set((suites or {}).get("injection_ground_truth_functions") or []) if isinstance(suites, dict) else set()


def _prompt_key(msgs: list[dict], tools: Any) -> str:
    """What the model sees: the messages (role, content, name, calls) and the offered tools."""
    return digest([[(m.get("role"), m.get("content") or "", m.get("name"),
                     [(c.get("name"), c.get("arguments")) for c in (m.get("tool_calls") or [])]) for m in msgs],
                   tools if isinstance(tools, str) else canonical_json(tools or [])], 24)


def select_jobs(traces: pl.DataFrame, table: str) -> tuple[list[Job], dict[str, int]]:
    """The prompts of one table, sorted by job key; and the skeletons left out, counted by reason. Skeletons
    whose prompts are identical (LLMail: one e-mail submitted to several levels; every benign twin of one
    scenario, which is its e-mails without the submission; TAU2 tasks that differ only in hidden state) are one
    job, the smallest parent id's: the others would only repeat a prompt (``n`` samples per prompt is the
    setting for that) and put one prompt under several pair groups. Identical prompts expecting different
    things are all left out."""
    kind = KIND[table]
    skel = traces.filter(pl.col("completeness") == "skeleton")
    jobs, skipped = [], {}

    def skip(why: str, n: int = 1) -> None:
        skipped[why] = skipped.get(why, 0) + n

    for row in skel.to_dicts():
        prompt_src = None
        if kind in ("ds", "adversarial_safe"):
            if not _is_attacked_skeleton(row):
                skip("not an attacked skeleton with an injection span" if not _has_injection(row) else
                     "injection not reached in the recorded run" if (row.get("labels") or {}).get(
                         "injection_reached") is False else "no attacker call to judge (text-only injection)")
                continue
            variant, prompt_src, exp = "attacked", row["messages"], Expectation.from_trace(row)
            ta = row.get("tool_attack")
            if kind == "adversarial_safe" and exp.expected_tool and exp.expected_tool != exp.attacker_tool and (
                    exp.expected_tool in _injection_functions(row)):
                # the injection asks for that call too (a preparatory read: search_emails for the e-mail it
                # wants forwarded): the name-only "expected thing" would keep a model that started to comply
                skip("the expected call is also a step the injection asks for")
                continue
        elif _has_injection(row):
            twin = benign_twin(row)
            if twin is None:
                skip("benign twin would be empty")
                continue
            variant, prompt_src, exp = "benign_twin", twin, Expectation.from_trace(row, attacked=False)
            ta = dict(row["tool_attack"])
            ta.update(injection_text=None, injection_span=None, injection_spans=[])
        elif (row.get("labels") or {}).get("attack_present"):
            skip("attacked skeleton without a usable injection span")
            continue
        elif row.get("dataset") == "xstest" and not ((row.get("labels") or {}).get("subtype") or "").startswith("safe"):
            skip("xstest unsafe prompt (no compliant answer to keep)")
            continue
        elif row.get("dataset") == "tau2" and first_action_writes((row.get("tool_attack") or {}).get("expected_tool")):
            # its system prompt says to ask before changing anything: the right turn is a question, and the
            # judge, reading the name only, would keep the change of the wrong item too (airline task 9)
            skip("tau2 first action changes the user's data (the prompt says to confirm first)")
            continue
        else:
            variant, prompt_src, exp = "benign", row["messages"], Expectation.from_trace(row, attacked=False)
            ta = row.get("tool_attack")
        msgs = _strip_trailing_assistant(prompt_src)
        if not msgs:
            skip("no message before the assistant turn")
            continue
        key = digest([table, row["id"], variant], 24)
        jobs.append(Job(key, table, variant, row, msgs, exp, ta))
    same: dict[str, list[Job]] = {}
    for j in jobs:
        same.setdefault(_prompt_key(j.messages, j.parent.get("tools")), []).append(j)
    jobs = []
    for group in same.values():
        if len({(j.variant, j.expectation.expected_tool, j.expectation.attacker_tool,
                 canonical_json(j.expectation.attacker_args), j.expectation.compliant_answer) for j in group}) > 1:
            skip("same prompt as another skeleton's, expecting something else", len(group))
            continue
        jobs.append(min(group, key=lambda j: j.parent["id"]))
        if len(group) > 1:
            skip("same prompt as another skeleton's (one job)", len(group) - 1)
    jobs.sort(key=lambda j: j.key)
    return jobs, skipped


# ---------------------------------------------------------------------------------------------- shards
def shard_root() -> Path:
    return Path(os.environ.get("CB_SHARD_ROOT") or data_root() / SHARD_DIR)


def fingerprint(table: str, model_id: str, backend: str, sampling: SamplingConfig, render_cfg) -> str:
    """What the raw completions depend on: shards of another model or sampling are never reused."""
    rc = {k: getattr(render_cfg, k) for k in ("tool_call_format", "tools_in_user_message", "date_string",
                                              "add_bos", "tool_result_tojson") if hasattr(render_cfg, k)}
    return digest([table, model_id, backend, sampling.as_dict(), rc], 16)


@dataclass
class Progress:
    """done/total prompts, samples/s and ETA, reported after every shard."""

    table: str
    total: int
    log: Callable[[str], None]
    done: int = 0
    generated: int = 0
    samples: int = 0
    t0: float = field(default_factory=time.perf_counter)

    def update(self, prompts: int, samples: int, shard: str, resumed: bool = False) -> None:
        self.done += prompts
        if not resumed:
            self.generated += prompts
            self.samples += samples
        dt = max(time.perf_counter() - self.t0, 1e-9)
        rate = self.samples / dt
        left = self.total - self.done
        per_prompt = dt / self.generated if self.generated else None
        eta = f"{left * per_prompt:.0f}s" if per_prompt is not None else "?"
        what = "loaded" if resumed else "generated"
        self.log(f"{self.table}: {self.done}/{self.total} prompts ({self.done / max(self.total, 1):.0%}), "
                 f"{rate:.2f} samples/s, ETA {eta} [{what} {shard}]")


def run_shards(
    jobs: Sequence[Job],
    prompts: Sequence[list[int]],
    backend: GenerationBackend,
    sampling: SamplingConfig,
    shard_dir: Path,
    shard_size: int,
    log: Callable[[str], None] = print,
) -> tuple[pl.DataFrame, dict[str, int]]:
    """Raw completions of every job (RAW_SCHEMA), from existing shards where present, else generated and
    written as a new shard. Returns (raw rows sorted by job key and sample index, counts)."""
    shard_dir.mkdir(parents=True, exist_ok=True)
    chunks = [list(range(k, min(k + shard_size, len(jobs)))) for k in range(0, len(jobs), shard_size)]
    prog = Progress(jobs[0].table if jobs else "", len(jobs), log)
    parts, loaded, made = [], 0, 0
    for idx in chunks:
        keys = [jobs[i].key for i in idx]
        cd = digest(keys, 20)
        path = shard_dir / f"shard-{cd}.parquet"
        if path.exists():
            try:
                df = pl.read_parquet(path)
                if set(df["job_key"].unique()) == set(keys) and df.height == len(keys) * sampling.n:
                    parts.append(df)
                    loaded += 1
                    prog.update(len(idx), df.height, path.name, resumed=True)
                    continue
                log(f"{path.name}: covers other jobs than expected; generating it again")
            except Exception as e:  # a foreign or damaged file: never trusted
                log(f"{path.name}: unreadable ({e}); generating it again")
        seed = (sampling.seed + int(cd[:8], 16)) % (2**31 - 1)
        s = SamplingConfig(temperature=sampling.temperature, top_p=sampling.top_p, max_tokens=sampling.max_tokens,
                           seed=seed, n=sampling.n)
        comps = backend.generate([prompts[i] for i in idx], s)
        rows = []
        for i, cs in zip(idx, comps):
            for j, c in enumerate(cs):
                rows.append({"job_key": jobs[i].key, "parent_id": jobs[i].parent["id"], "sample_index": j,
                             "prompt_tokens": len(prompts[i]), "text": c.text, "token_ids": c.token_ids,
                             "stop_reason": c.stop_reason, "seed": seed})
        df = pl.DataFrame(rows, schema=RAW_SCHEMA)
        write_parquet(df, path)
        parts.append(df)
        made += 1
        prog.update(len(idx), df.height, path.name)
    raw = pl.concat(parts) if parts else pl.DataFrame(schema=RAW_SCHEMA)
    return raw.sort("job_key", "sample_index"), {"shards_loaded": loaded, "shards_generated": made,
                                                  "shards": len(chunks)}


# -------------------------------------------------------------------------------------------- assembly
def _labels(table: str, job: Job) -> dict:
    sub = ((job.parent.get("labels") or {}).get("subtype")) or ""
    if table == "ds_completions":
        return dict(category="harmful", priority_class="harmful_flip", subtype=sub, attack_present=True,
                    attack_succeeded=True, attacker_call_made=True, injection_reached=True)
    if table == "adversarial_safe":
        return dict(category="retain", priority_class="adversarial_safe", subtype=sub, attack_present=True,
                    is_adversarial_safe=True, injection_reached=True)
    pclass = "benign_twin" if job.variant == "benign_twin" else (job.parent.get("labels") or {}).get(
        "priority_class") or "tool_capability"
    if pclass in ("harmful_flip", "injection_resisted", "adversarial_safe"):
        pclass = "tool_capability"
    return dict(category="retain", priority_class=pclass, subtype=sub)


def keep(table: str, v: Verdict) -> bool:
    """The table's rule: DS keeps the attacker's call only; DR and adversarial-safe the expected thing."""
    return v.outcome == "attacker_tool" if table == "ds_completions" else v.expected


def _trace_row(job: Job, parsed, gen_params: dict) -> dict:
    calls = [{"id": f"gen_{k}", "name": c["name"], "arguments": c["arguments"]} for k, c in enumerate(parsed.calls)]
    msgs = [message(m["role"], m.get("content"), m.get("tool_calls"), m.get("tool_call_id"), m.get("name"))
            for m in job.messages]
    msgs.append(message("assistant", parsed.text, calls))
    p = job.parent
    return make_trace(
        dataset=p["dataset"], source_locator=p["source_locator"], completeness="complete", messages=msgs,
        tools=p.get("tools") or "[]", tool_attack=job.tool_attack, pair_group=p.get("pair_group") or p["id"],
        generation_params=gen_params, parent_id=p["id"], task_success=None, **_labels(job.table, job),
    )


def assemble(
    table: str,
    jobs: Sequence[Job],
    raw: pl.DataFrame,
    *,
    attacker_args: str = "all",
    params: dict | None = None,
    llm_verdicts: dict[tuple[str, int], bool | None] | None = None,
    extra_rejected: Sequence[dict] = (),
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Raw completions -> (kept trace_v1 rows sorted by id, every sample as a GENERATION_SCHEMA record)."""
    by_key = {j.key: j for j in jobs}
    traces, records, seen = [], list(extra_rejected), {}
    for r in raw.iter_rows(named=True):
        job = by_key[r["job_key"]]
        parsed = parse_completion(r["text"])
        v = judge(parsed, job.expectation, attacker_args_mode=attacker_args)
        llm = (llm_verdicts or {}).get((r["job_key"], r["sample_index"]))
        ok = keep(table, v) and (llm_verdicts is None or llm is True)
        reason = v.reason + ("" if llm_verdicts is None else f"; LLM judge: {llm}")
        tid = None
        if ok:  # a kept turn must also pass the training preflight: its calls fit the trace's tool schemas
            bad = tool_call_problems([{"tool_calls": parsed.calls}], job.parent.get("tools"))
            if bad:
                ok, reason = False, f"{v.reason}; arguments do not fit the tool schema ({'; '.join(bad)[:200]})"
        if ok:
            gp = {**(params or {}), "table": table, "variant": job.variant, "seed": r["seed"],
                  "sample_index": r["sample_index"], "stop_reason": r["stop_reason"], "judge_outcome": v.outcome,
                  "prompt_tokens": r["prompt_tokens"], "completion_tokens": len(r["token_ids"] or [])}
            row = _trace_row(job, parsed, gp)
            if row["id"] in seen:
                ok, reason = False, f"duplicate: same conversation as sample {seen[row['id']]} ({v.reason})"
            else:
                seen[row["id"]] = f"{job.key}:{r['sample_index']}"
                traces.append(row)
                tid = row["id"]
        records.append({
            "job_key": job.key, "table": table, "parent_id": job.parent["id"], "dataset": job.parent["dataset"],
            "subtype": (job.parent.get("labels") or {}).get("subtype") or "", "variant": job.variant,
            "sample_index": r["sample_index"], "prompt_tokens": r["prompt_tokens"],
            "completion_tokens": len(r["token_ids"] or []), "text": r["text"], "stop_reason": r["stop_reason"],
            "kind": parsed.kind, "calls": canonical_json(parsed.calls), "outcome": v.outcome,
            "expected": v.expected, "attacker_call": v.attacker_call, "refusal": v.refusal, "llm_verdict": llm,
            "kept": ok, "reason": reason, "trace_id": tid, "seed": r["seed"],
        })
    kept = pl.DataFrame(traces, schema=TRACE_SCHEMA).sort("id") if traces else pl.DataFrame(schema=TRACE_SCHEMA)
    recs = pl.DataFrame(records, schema=GENERATION_SCHEMA).sort("job_key", "sample_index")
    return kept, recs


def yield_stats(records: pl.DataFrame) -> dict[str, Any]:
    """Kept / generated per dataset, and samples per dataset x outcome (prompt_too_long counted apart)."""
    gen = records.filter(pl.col("stop_reason") != "not_generated")
    by = (
        records.group_by("dataset", "outcome").agg(pl.len().alias("n"), pl.col("kept").sum().alias("kept"))
        .sort("dataset", "outcome")
    )
    per_ds = (
        gen.group_by("dataset").agg(pl.len().alias("samples"), pl.col("kept").sum().alias("kept")).sort("dataset")
    )
    total, kept = gen.height, int(gen["kept"].sum()) if gen.height else 0
    return {
        "samples": total,
        "kept": kept,
        "rejected": records.height - kept,
        "yield": round(kept / total, 4) if total else None,  # None: not measured (no sample)
        "yield_by_dataset": {r["dataset"]: {"samples": r["samples"], "kept": int(r["kept"]),
                                            "yield": round(r["kept"] / r["samples"], 4)} for r in per_ds.to_dicts()},
        "by_dataset_outcome": [{**r, "kept": int(r["kept"])} for r in by.to_dicts()],
        "outcomes": dict(records.group_by("outcome").len().sort("outcome").iter_rows()),
    }


# ------------------------------------------------------------------------------------------------ driver
@dataclass
class ModelHandle:
    """What a table generates with: a profile's model (or a given one) and its tokenizer."""

    name: str
    tokenizer: Any
    model: Any = None
    model_dir: Path | None = None
    render_cfg: Any = None
    max_length: int = 4096
    ident: str = ""  # what else identifies the weights (the profile's settings for random-weight models)

    @classmethod
    def from_profile(cls, profile: str, *, need_weights: bool = True) -> "ModelHandle":
        from cb_core.model import load_model, load_profile, load_profile_tokenizer

        prof = load_profile(profile)
        tok = load_profile_tokenizer(prof)
        model = load_model(prof, tok) if need_weights else None
        mdir = prof.resolved_path if prof.model != "tiny" else None
        ident = "" if mdir else digest({"seed": prof.seed, "overrides": prof.overrides, "model": prof.model}, 12)
        return cls(prof.name, tok, model, mdir, prof.render_config(), prof.max_length, ident)

    @property
    def model_id(self) -> str:
        return f"{self.name}:{self.model_dir}" if self.model_dir else f"{self.name}:{self.ident}"


def make_table_backend(handle: ModelHandle, cfg: GenerationConfig) -> GenerationBackend:
    from cb_core.generate.backends import make_backend

    if cfg.backend == "vllm":
        if handle.model_dir is None:
            raise ValueError(f"vllm backend needs a model directory; profile {handle.name} has none "
                             "(random tiny weights): use the transformers backend or a saved model")
        return make_backend("vllm", model_dir=handle.model_dir, tokenizer=handle.tokenizer,
                            tensor_parallel_size=cfg.tensor_parallel_size)
    return make_backend("transformers", model=handle.model, tokenizer=handle.tokenizer, batch_size=cfg.batch_size)


def generate_table(
    table: str,
    traces: pl.DataFrame,
    cfg: GenerationConfig,
    handle: ModelHandle,
    *,
    backend: GenerationBackend | None = None,
    judge_handle: ModelHandle | None = None,
    shard_dir: Path | None = None,
    log: Callable[[str], None] = print,
) -> tuple[pl.DataFrame, pl.DataFrame, dict[str, Any]]:
    """One table end to end: (kept trace_v1 rows, every sample's record, stats for metadata)."""
    t0 = time.perf_counter()
    jobs, skipped = select_jobs(traces, table)
    n_candidates = len(jobs)
    if cfg.limit is not None:
        jobs = jobs[: int(cfg.limit)]
    sampling = cfg.sampling(table)
    room = handle.max_length - sampling.max_tokens
    ok_jobs, prompts, too_long = [], [], []
    for j in jobs:
        ids = prompt_ids(handle.tokenizer, j.messages, j.parent.get("tools"), handle.render_cfg)
        if len(ids) > room:
            too_long.append(_not_generated(table, j, len(ids), f"prompt has {len(ids)} tokens; max_length "
                                           f"{handle.max_length} - max_tokens {sampling.max_tokens} = {room}"))
            continue
        ok_jobs.append(j)
        prompts.append(ids)
    fp = fingerprint(table, handle.model_id, cfg.backend, sampling, handle.render_cfg)
    shard_dir = shard_dir or shard_root() / table / fp
    log(f"{table}: {len(ok_jobs)} prompts ({n_candidates} candidates, limit {cfg.limit}, {len(too_long)} too long), "
        f"n={sampling.n}, temperature {sampling.temperature}, model {handle.name}, backend {cfg.backend}; "
        f"shards in {shard_dir}")
    if ok_jobs and backend is None:
        backend = make_table_backend(handle, cfg)
    raw, shard_stats = (run_shards(ok_jobs, prompts, backend, sampling, shard_dir, cfg.shard_size, log)
                        if ok_jobs else (pl.DataFrame(schema=RAW_SCHEMA), {"shards": 0}))
    llm = _llm_verdicts(table, ok_jobs, raw, cfg, handle, judge_handle, log) if cfg.llm_judge.enabled else None
    params = {"model": handle.name, "backend": cfg.backend, "temperature": sampling.temperature,
              "top_p": sampling.top_p, "max_tokens": sampling.max_tokens, "n": sampling.n,
              "base_seed": sampling.seed, "attacker_args": cfg.attacker_args, "fingerprint": fp}
    kept, records = assemble(table, ok_jobs, raw, attacker_args=cfg.attacker_args, params=params,
                             llm_verdicts=llm, extra_rejected=too_long)
    stats = yield_stats(records)
    dt = time.perf_counter() - t0
    stats.update(
        table=table, prompts=len(ok_jobs), candidates=n_candidates, prompt_too_long=len(too_long),
        skipped=skipped, model=handle.name, backend=cfg.backend, sampling=sampling.as_dict(), fingerprint=fp,
        shard_dir=str(shard_dir), wall_s=round(dt, 2),
        completion_tokens=int(raw["token_ids"].list.len().sum()) if raw.height else 0, **shard_stats,
    )
    log(f"{table}: kept {stats['kept']}/{stats['samples']} samples (yield {stats['yield']}) in {dt:.1f}s")
    return kept, records, stats


def _not_generated(table: str, j: Job, n_prompt: int, why: str) -> dict:
    return {"job_key": j.key, "table": table, "parent_id": j.parent["id"], "dataset": j.parent["dataset"],
            "subtype": (j.parent.get("labels") or {}).get("subtype") or "", "variant": j.variant,
            "sample_index": 0, "prompt_tokens": n_prompt, "completion_tokens": 0, "text": "",
            "stop_reason": "not_generated", "kind": None, "calls": "[]", "outcome": "prompt_too_long",
            "expected": False, "attacker_call": False, "refusal": False, "llm_verdict": None, "kept": False,
            "reason": why, "trace_id": None, "seed": None}


def _llm_verdicts(table, jobs, raw, cfg, handle, judge_handle, log) -> dict[tuple[str, int], bool | None]:
    """YES/NO from the LLM judge for every sample the rule judge keeps (the others are rejected anyway)."""
    from cb_core.generate.judge import LLMJudge

    jh = judge_handle or (ModelHandle.from_profile(cfg.llm_judge.model) if cfg.llm_judge.model else handle)
    jb = make_table_backend(jh, cfg)
    lj = LLMJudge(jb, jh.tokenizer, jh.model_id, shard_root() / "llm_judge_cache.parquet",
                  max_tokens=cfg.llm_judge.max_tokens, render_cfg=jh.render_cfg)
    by_key = {j.key: j for j in jobs}
    items, keys = [], []
    for r in raw.iter_rows(named=True):
        job = by_key[r["job_key"]]
        v = judge(r["text"], job.expectation, attacker_args_mode=cfg.attacker_args)
        if not keep(table, v):
            continue
        q = "followed_injection" if table == "ds_completions" else "did_expected"
        inj = (job.parent.get("tool_attack") or {}).get("injection_text") if q == "followed_injection" else None
        items.append((f"{job.parent['id']}:{job.variant}:{r['sample_index']}",
                      llm_judge_messages(q, job.messages, parse_completion(r["text"]).text or r["text"], inj)))
        keys.append((r["job_key"], r["sample_index"]))
    verdicts = lj.ask(items) if items else []
    log(f"{table}: LLM judge asked {lj.asked} (cached {len(items) - lj.asked}) of {len(items)}")
    out = {k: None for k in ((r["job_key"], r["sample_index"]) for r in raw.iter_rows(named=True))}
    out.update(dict(zip(keys, verdicts)))
    return out


# ----------------------------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cb_core.generate.completions --traces T --table ds_completions --out DIR [--profile P]``:
    the same work as the asset, outside Dagster (used by the resume test and for debugging)."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--traces", required=True)
    ap.add_argument("--table", choices=TABLES, required=True)
    ap.add_argument("--out", required=True, help="folder for <table>.parquet and <table>.rejected.parquet")
    from cb_core.model import profile_name

    ap.add_argument("--profile", default=profile_name())
    ap.add_argument("--config", default=CONFIG_FILE)
    ap.add_argument("--limit", type=int)
    ap.add_argument("--shard-size", type=int)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--max-tokens", type=int)
    ap.add_argument("--n", type=int)
    ap.add_argument("--temperature", type=float)
    ap.add_argument("--shard-dir")
    a = ap.parse_args(argv)
    cfg = GenerationConfig.load(a.config, limit=a.limit, shard_size=a.shard_size, batch_size=a.batch_size,
                                max_tokens=a.max_tokens, n=a.n,
                                temperature=None if a.temperature is None else {a.table: a.temperature})
    handle = ModelHandle.from_profile(a.profile)
    traces = pl.read_parquet(a.traces)
    kept, records, stats = generate_table(a.table, traces, cfg, handle,
                                          shard_dir=Path(a.shard_dir) if a.shard_dir else None,
                                          log=lambda s: print(s, flush=True))
    out = Path(a.out)
    write_parquet(kept, out / f"{a.table}.parquet")
    write_parquet(records.filter(~pl.col("kept")), out / f"{a.table}.rejected.parquet")
    write_parquet(records, out / f"{a.table}.records.parquet")
    print(json.dumps({k: stats[k] for k in ("samples", "kept", "yield", "shards_loaded", "shards_generated")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
