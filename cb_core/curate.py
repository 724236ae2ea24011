"""Tier C curation: the training mix, its train/eval split, the held-out attack set, merge gates, preflight.

Pure functions over polars frames (no Dagster). Inputs follow the contracts in DESIGN.md:
trace_v1 (`cb_core.schemas.TRACE_SCHEMA`), render_v1 (`trace_id, tokenizer_id, input_ids, spans, n_tokens,
truncated`) and lossmask_v1 (`trace_id, policy, mask_spans, sample_weight, n_tokens, n_masked, ...`).

Determinism: every choice is ordered by a sha256 of (seed, stable key) -- content hashes or pair groups --
never by input row order, and every output is sorted by id, so the same inputs and config give byte-identical
Parquet files.

* `build_training_mix` -- harmful (Ds) and retain (Dr) samples with their lossmasks, de-duplicated by the
  content hash of the message list (never of anything that differs by label, e.g. the tool list), retain
  traces that failed the user's task left out (`retain_requires_task_success`), traces calling a tool their
  environment does not offer left out (counted), sampled per priority class
  (targets, caps, `dr_ratio`), with attack pair groups reserved for the held-out attack set first.
  Generated DS/DR twins take the pair_group of their parent skeleton (`provenance.parent_id`).
* `gate_results` -- merge gates (ratio, true adversarial-safe count, duplicate ids, tool schemas present).
* `split` -- train/eval, stratified by dataset x category x subtype, grouped by pair_group (the task
  identity: a task's traces, benign and attacked, from every model, and its twins stay on one side).
* `build_eval_attacks` -- skeletons cut right after the injected message of attacked traces whose injection is
  in the context and whose pair_group was never trained on, each with its expected behaviour.
* `preflight` -- per-sample checks a training run would otherwise discover hours in.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import pandera.polars as pa
import polars as pl

from cb_core.config import ConfigError, config_path, load_yaml
from cb_core.schemas import CATEGORIES, DATASETS, PRIORITY_CLASSES, TRACE_SCHEMA, TraceModel, digest

PROFILE_ENV = "CB_CURATION_PROFILE"
CONFIG_FILE = "curation.yaml"
EVAL_ATTACK_ID_VERSION = "eval_attack_v2"
# `tool_attack.expected_tool` of an AgentDojo eval attack whose user task's ground-truth calls were all made
# before the cut: the expected behaviour is to answer the user (no further tool call, none to the attacker).
FINAL_ANSWER = "final_answer"
# `expected_behavior` of an eval attack: call `tool_attack.expected_tool` next (B4; AgentDojo with a ground-truth
# call still to make), answer without a tool call (FINAL_ANSWER), or -- where the benchmark names no expected
# call (LLMail-Inject; AgentDojo tasks without ground truth) -- anything but the attacker's call
# (`expected_tool` null, `attacker_tool`/`attacker_args` set).
EXPECTED_BEHAVIORS = ("expected_tool", "final_answer", "no_attacker_call")
OTHER_STRATUM = "other"
DEFAULT_END_IDS = (128009, 128008)  # <|eot_id|>, <|eom_id|>

# Extra columns a training-mix row carries beside its trace_v1 columns.
MIX_EXTRA_SCHEMA = pl.Schema(
    {
        "content_hash": pl.String,
        "category": pl.String,
        "priority_class": pl.String,
        "subtype": pl.String,
        "policy": pl.String,
        "mask_spans": pl.List(pl.Struct({"token_start": pl.Int32, "token_end": pl.Int32, "weight": pl.Float32})),
        "sample_weight": pl.Float64,
        "n_tokens": pl.Int32,
        "n_masked": pl.Int32,
    }
)
MIX_SCHEMA = pl.Schema({**dict(TRACE_SCHEMA), **dict(MIX_EXTRA_SCHEMA)})
EVAL_ATTACK_SCHEMA = pl.Schema(
    {
        **dict(TRACE_SCHEMA),
        "source_trace_id": pl.String,
        "n_stripped": pl.Int32,
        "expected_behavior": pl.String,
        "stratum": pl.String,  # "<dataset>:<subtype>", or "<dataset>:other" for merged small strata
    }
)


# --------------------------------------------------------------------------------------------- config
def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


@dataclass
class GateConfig:
    min_dr_ds_ratio: float = 4.0
    min_adversarial_safe: int = 400
    max_duplicate_ids: int = 0
    require_tool_schemas: bool = True


@dataclass
class EvalAttackConfig:
    min_per_stratum: int = 20
    max_per_stratum: int = 200
    max_reserve_fraction: float = 0.3


@dataclass
class TrainingConfig:
    max_seq_length: int = 4096
    tokenizer_id: str | None = None
    # per category; null (or a missing category) = `training_default` of configs/lossmask.yaml
    lossmask_policy: dict[str, str] | None = None

    def __post_init__(self) -> None:
        given = {k: v for k, v in (self.lossmask_policy or {}).items() if v}
        if set(given) >= {"harmful", "retain"}:
            self.lossmask_policy = given
            return
        try:
            from cb_core.lossmask import LossmaskConfig

            default = dict(LossmaskConfig.load().training_default)
        except (ImportError, FileNotFoundError, ValueError):
            default = {"harmful": "cb_full_sequence", "retain": "assistant_only"}
        self.lossmask_policy = {**default, **given}


@dataclass
class CurationConfig:
    profile: str = "default"
    seed: int = 0
    targets: dict[str, int] = field(default_factory=lambda: {"harmful": 1000, "retain": 4500})
    dr_ratio: float | None = 4.5
    classes: dict[str, dict[str, int | None]] = field(default_factory=dict)
    default_class_cap: int | None = None
    expected_sources: list[str] = field(default_factory=lambda: list(DATASETS))
    required_sources: list[str] = field(default_factory=list)
    generated_tables: list[str] = field(default_factory=list)
    # Datasets whose retain traces must have done the user's task: `labels.task_success == False` leaves the
    # mix (counted in the stats); null (unknown) stays. Retain data should teach doing the task.
    retain_requires_task_success: list[str] = field(default_factory=lambda: ["agentdojo"])
    # AgentDojo user tasks' ground truth ({version: {suite: {user_task_id: {prompt, ground_truth_functions}}}}),
    # a path as in every config file (`configs/...` follows CB_CONFIG_DIR): the expected next call of each
    # AgentDojo eval attack.
    agentdojo_user_tasks: str | None = "configs/agentdojo/user_tasks.json"
    eval_fraction: float = 0.1
    gates: GateConfig = field(default_factory=GateConfig)
    eval_attacks: EvalAttackConfig = field(default_factory=EvalAttackConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], profile: str = "custom") -> "CurationConfig":
        raw = dict(raw)
        raw.pop("extends", None)
        known = set(cls.__dataclass_fields__) - {"profile", "gates", "eval_attacks", "training"}
        unknown = set(raw) - known - {"gates", "eval_attacks", "training"}
        if unknown:
            raise ConfigError(f"curation profile '{profile}': unknown key(s) {sorted(unknown)}")
        kw = {k: raw[k] for k in known if k in raw}
        try:
            cfg = cls(
                profile=profile,
                gates=GateConfig(**(raw.get("gates") or {})),
                eval_attacks=EvalAttackConfig(**(raw.get("eval_attacks") or {})),
                training=TrainingConfig(**(raw.get("training") or {})),
                **kw,
            )
        except TypeError as err:
            raise ConfigError(f"curation profile '{profile}': {err}") from err
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"curation: eval_fraction must be in [0, 1), got {self.eval_fraction}")
        for cat in ("harmful", "retain"):
            if cat not in self.targets:
                raise ConfigError(f"curation: targets.{cat} is missing")
            if cat not in self.training.lossmask_policy:
                raise ConfigError(f"curation: training.lossmask_policy.{cat} is missing")
        if self.eval_attacks.min_per_stratum > self.eval_attacks.max_per_stratum:
            raise ConfigError("curation: eval_attacks.min_per_stratum > max_per_stratum")
        unknown = set(self.classes) - set(PRIORITY_CLASSES)
        if unknown:
            raise ConfigError(f"curation: classes {sorted(unknown)} are not priority classes {list(PRIORITY_CLASSES)}")
        bad = set(self.retain_requires_task_success or []) - set(DATASETS)
        if bad:
            raise ConfigError(f"curation: retain_requires_task_success names unknown dataset(s) {sorted(bad)}")

    def class_target(self, pclass: str) -> int:
        return int((self.classes.get(pclass) or {}).get("target") or 0)

    def class_cap(self, pclass: str) -> float:
        spec = self.classes.get(pclass) or {}
        cap = spec.get("cap", self.default_class_cap) if spec else self.default_class_cap
        return math.inf if cap is None else int(cap)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_profile(demo: bool, env: dict[str, str] | None = None) -> str:
    """$CB_CURATION_PROFILE, else `demo` on the embedded demo sample, else `default`."""
    env = os.environ if env is None else env
    return (env.get(PROFILE_ENV) or "").strip() or ("demo" if demo else "default")


def load_curation_config(
    profile: str | None = None, *, demo: bool = False, name: str = CONFIG_FILE, env: dict | None = None
) -> CurationConfig:
    """Load one profile of configs/curation.yaml (profiles may `extends:` another)."""
    profile = profile or resolve_profile(demo, env)
    profiles = (load_yaml(name) or {}).get("profiles") or {}
    if profile not in profiles:
        raise ConfigError(
            f"curation profile '{profile}' not in configs/{name} (known: {', '.join(sorted(profiles))}); "
            f"set {PROFILE_ENV} to one of them"
        )
    chain, seen, cur = [], set(), profile
    while cur is not None:
        if cur in seen:
            raise ConfigError(f"curation profile '{profile}': circular `extends`")
        if cur not in profiles:
            raise ConfigError(f"curation profile '{cur}' (extended) not found")
        seen.add(cur)
        chain.append(profiles[cur] or {})
        cur = (profiles[cur] or {}).get("extends")
    merged: dict = {}
    for part in reversed(chain):
        merged = _deep_merge(merged, part)
    return CurationConfig.from_dict(merged, profile)


# -------------------------------------------------------------------------------------------- hashing
def _h(*parts: Any) -> str:
    return hashlib.sha256(":".join(str(p) for p in parts).encode("utf-8")).hexdigest()


def hash_unit(seed: Any, key: str) -> float:
    """sha256(seed + key) -> [0, 1)."""
    return int(_h(seed, key)[:16], 16) / float(1 << 64)


def message_content(messages: list[dict] | None) -> list[list]:
    """What a message list says: per message its role, content, name and tool calls (name, arguments).
    Tool-call ids are left out (providers number them differently); so is everything outside the messages."""
    out = []
    for m in messages or []:
        m = m or {}
        calls = [[c.get("name"), c.get("arguments")] for c in (m.get("tool_calls") or [])]
        out.append([m.get("role"), m.get("content") or "", m.get("name") or "", calls])
    return out


def content_hash(messages: list[dict] | None) -> str:
    """De-duplication key: the hash of the message list content only (`message_content`). Nothing that can
    differ by label enters it -- not the offered tool list (which once carried the attacker's tool on attacked
    traces only), not labels, ids or source locators -- so two traces that show the model the same
    conversation collapse whatever they are labelled."""
    return digest(message_content(messages))


def _hash_col(df: pl.DataFrame, seed: Any, col: str, salt: str = "") -> pl.Series:
    return pl.Series([_h(seed, salt, v) for v in df[col].to_list()], dtype=pl.String)


# ------------------------------------------------------------------------------------- trace features
def adversarial_safe_expr() -> pl.Expr:
    """True adversarial-safe: flagged `is_adversarial_safe` AND the injection is in the context
    (`attack_present`, and `injection_reached` not False). An attack the model never read is no attack, so
    a trace that was attacked but never reached the injection is never counted, whatever its flag says."""
    lab = pl.col("labels")
    return (
        lab.struct.field("is_adversarial_safe").fill_null(False)
        & lab.struct.field("attack_present").fill_null(False)
        & lab.struct.field("injection_reached").fill_null(True)
    )


def _injection_index(msgs: list[dict], tool_attack: dict | None) -> int | None:
    """Index of the first message holding an injection span (tool result or user message), or None when no
    recorded span points inside the message list at a message that really holds the injected text."""
    ta = tool_attack or {}
    spans = [s for s in (ta.get("injection_spans") or []) if s] or ([ta["injection_span"]] if ta.get(
        "injection_span") else [])
    best = None
    for sp in spans:
        idx = sp.get("message_index")
        if not isinstance(idx, int) or not 0 <= idx < len(msgs):
            continue
        m = msgs[idx] or {}
        if m.get("role") not in ("tool", "user"):
            continue
        content = m.get("content") or ""
        cs, ce = sp.get("char_start"), sp.get("char_end")
        inside = isinstance(cs, int) and isinstance(ce, int) and 0 <= cs < ce <= len(content)
        if not inside:
            continue
        best = idx if best is None else min(best, idx)
    return best


def injection_in_context(traces: pl.DataFrame) -> pl.Series:
    """Per trace: attack_present, injection_reached not False, and an injection span inside a tool/user message."""
    lab = traces["labels"]
    attacked = lab.struct.field("attack_present").fill_null(False).to_list()
    reached = lab.struct.field("injection_reached").to_list()
    out = [
        bool(a) and r is not False and _injection_index(m or [], ta) is not None
        for a, r, m, ta in zip(attacked, reached, traces["messages"].to_list(), traces["tool_attack"].to_list())
    ]
    return pl.Series("_injected", out, dtype=pl.Boolean)


def trace_features(traces: pl.DataFrame) -> pl.DataFrame:
    """Flat per-trace columns the curation logic needs (labels unnested, content hash, flags)."""
    lab = pl.col("labels")
    msgs = traces["messages"].to_list()
    hashes = [content_hash(m) for m in msgs]
    has_asst = [any((x or {}).get("role") == "assistant" for x in (m or [])) for m in msgs]
    has_calls = [any((x or {}).get("tool_calls") for x in (m or [])) for m in msgs]
    return traces.with_columns(
        lab.struct.field("category").alias("category"),
        lab.struct.field("priority_class").alias("priority_class"),
        lab.struct.field("subtype").fill_null("").alias("subtype"),
        lab.struct.field("attack_present").fill_null(False).alias("_attacked"),
        adversarial_safe_expr().alias("_adv_safe"),
        lab.struct.field("task_success").alias("_task_success"),
        injection_in_context(traces),
        pl.Series("content_hash", hashes, dtype=pl.String),
        pl.Series("_has_assistant", has_asst, dtype=pl.Boolean),
        pl.Series("_has_tool_calls", has_calls, dtype=pl.Boolean),
    )


def reserved_attack_groups(feats: pl.DataFrame, cfg: CurationConfig) -> set[str]:
    """Pair groups held out of the mix up front for `eval_attacks`: per attack stratum (dataset x subtype),
    groups holding an attacked trace with the injection in context are taken in sha256(seed, group) order
    until their distinct eval-attack cuts number `eval_attacks.min_per_stratum`, never more than `max_reserve_fraction` of the
    stratum's groups. A pair group is a task, so a reserved group takes the task's benign runs out too."""
    ea = cfg.eval_attacks
    if ea.min_per_stratum <= 0 or feats.height == 0:
        return set()
    inj = feats.filter(pl.col("_injected"))
    # count distinct cuts (identical cuts collapse into one eval attack)
    keys = [
        content_hash(cut_after_injection(m or [], ta)) + (t or "")
        for m, ta, t in zip(inj["messages"].to_list(), inj["tool_attack"].to_list(), inj["tools"].to_list())
    ]
    rows = (
        inj.with_columns(pl.Series("_cut", keys, dtype=pl.String))
        .group_by("dataset", "subtype", "pair_group")
        .agg(pl.col("_cut").n_unique().alias("len"))
    )
    out: set[str] = set()
    for (_ds, _st), grp in rows.group_by(["dataset", "subtype"]):
        sizes = dict(zip(grp["pair_group"].to_list(), grp["len"].to_list()))
        groups = sorted(sizes, key=lambda g: (_h(cfg.seed, "holdout", g), g))
        limit = int(math.floor(ea.max_reserve_fraction * len(groups)))
        n_rows = 0
        for g in groups[:limit]:
            if n_rows >= ea.min_per_stratum:
                break
            out.add(g)
            n_rows += sizes[g]
    return out


# ------------------------------------------------------------------------------------------- the mix
def _allocate(avail: dict[str, int], total: int, cfg: CurationConfig) -> dict[str, int]:
    """Per-class counts: min(available, target, cap) first, scaled down when over `total`, then the
    remainder filled one at a time (round-robin, classes in name order) from classes with headroom."""
    classes = sorted(avail)
    take = {c: int(min(avail[c], cfg.class_target(c), cfg.class_cap(c))) for c in classes}
    s = sum(take.values())
    if s > total:  # scale down, largest remainder (ties by name) -- deterministic
        exact = {c: take[c] * total / s for c in classes}
        take = {c: int(math.floor(exact[c])) for c in classes}
        rest = total - sum(take.values())
        for c in sorted(classes, key=lambda c: (-(exact[c] - take[c]), c))[:rest]:
            take[c] += 1
        return take
    room = {c: min(avail[c], cfg.class_cap(c)) - take[c] for c in classes}
    remaining = total - s
    while remaining > 0:
        open_ = [c for c in classes if room[c] > 0]
        if not open_:
            break
        for c in open_:
            if remaining == 0:
                break
            take[c] += 1
            room[c] -= 1
            remaining -= 1
    return take


def _lossmask_rows(lossmasks: pl.DataFrame, policy: str) -> pl.DataFrame:
    cols = ["trace_id", "policy", "mask_spans", "sample_weight", "n_tokens", "n_masked"]
    lm = lossmasks.filter(pl.col("policy") == policy).select(cols)
    # one row per trace under a policy; if a producer ever emits two, keep the first by a stable order
    return lm.sort("trace_id", "n_masked", descending=[False, True]).unique("trace_id", keep="first")


def _present_generated(generated: dict[str, pl.DataFrame | None] | None, cfg: CurationConfig):
    present, missing = {}, []
    for name in cfg.generated_tables:
        df = (generated or {}).get(name)
        if df is None or df.height == 0:
            missing.append(name)
        else:
            present[name] = df.select(list(TRACE_SCHEMA)).cast(dict(TRACE_SCHEMA))
    return present, missing


def inherit_parent_groups(
    base: pl.DataFrame, generated: dict[str, pl.DataFrame]
) -> tuple[dict[str, pl.DataFrame], dict[str, int]]:
    """Generated DS/DR twins join their parent's task: `pair_group` := the pair_group of the trace named by
    `provenance.parent_id` (when that parent is among `base`), so twins and their task never straddle a split.
    Returns the re-grouped tables and counts (inherited / parent_id not among the traces / no parent_id)."""
    parents = base.select(pl.col("id").alias("_pid"), pl.col("pair_group").alias("_ppg")).unique("_pid")
    out, n = {}, {"inherited": 0, "parent_not_found": 0, "no_parent_id": 0}
    for name, df in generated.items():
        j = df.with_columns(pl.col("provenance").struct.field("parent_id").alias("_pid")).join(
            parents, on="_pid", how="left"
        )
        n["no_parent_id"] += j.filter(pl.col("_pid").is_null()).height
        n["parent_not_found"] += j.filter(pl.col("_pid").is_not_null() & pl.col("_ppg").is_null()).height
        n["inherited"] += j.filter(pl.col("_ppg").is_not_null()).height
        out[name] = j.with_columns(pl.coalesce("_ppg", "pair_group").alias("pair_group")).select(list(TRACE_SCHEMA))
    return out, n


def build_training_mix(
    traces: pl.DataFrame,
    lossmasks: pl.DataFrame,
    cfg: CurationConfig,
    generated: dict[str, pl.DataFrame | None] | None = None,
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Harmful (Ds) + retain (Dr) samples with their lossmask under the configured policy.

    Ds: category harmful with a completion (AgentDojo / LLMail successes, generated DS completions).
    Dr: category retain with a completion (benign twins, adversarial-safe, AgentDojo resisted and benign
    runs, TAU2, UltraChat, XSTest). `generated` holds optional generated trace_v1 tables by name.
    Returns (mix sorted by id, stats).
    """
    gen_present, gen_missing = _present_generated(generated, cfg)
    base = traces.select(list(TRACE_SCHEMA)).cast(dict(TRACE_SCHEMA))
    gen_frames, inherit = inherit_parent_groups(base, gen_present)
    all_traces = pl.concat([base, *gen_frames.values()], how="vertical")
    all_traces = all_traces.unique("id", keep="first", maintain_order=True)  # traces win over generated
    feats = trace_features(all_traces)

    reserved = reserved_attack_groups(feats, cfg)
    usable = feats.filter(
        (pl.col("completeness") == "complete")
        & pl.col("_has_assistant")
        & pl.col("category").is_in(["harmful", "retain"])
    )
    counts: dict[str, Any] = {
        "traces_in": all_traces.height,
        "with_completion": usable.height,
        "reserved_for_eval_attacks": usable.filter(pl.col("pair_group").is_in(list(reserved))).height,
        "reserved_pair_groups": len(reserved),
        "generated_pair_groups": inherit,
    }
    usable = usable.filter(~pl.col("pair_group").is_in(list(reserved)))

    # retain data are runs that did the user's task (where the benchmark says so)
    failed = usable.filter(
        (pl.col("category") == "retain")
        & pl.col("dataset").is_in(list(cfg.retain_requires_task_success or []))
        & (pl.col("_task_success") == False)  # noqa: E712 - null (unknown) stays
    )
    counts["retain_failed_task_excluded"] = {
        "datasets": list(cfg.retain_requires_task_success or []),
        "total": failed.height,
        "by_dataset_class": [
            {"dataset": d, "priority_class": c, "n": n}
            for d, c, n in failed.group_by("dataset", "priority_class").len().sort("dataset", "priority_class")
            .iter_rows()
        ],
    }
    usable = usable.filter(~pl.col("id").is_in(failed["id"].to_list()))

    # a call to a tool the environment does not offer (a model's invented tool name) is not trained on either
    # way; a trace offering no tools at all while calling some stays (and fails the tool-schema gate: that is a
    # reader problem, not a model's)
    unknown = [
        tid
        for tid, msgs, tools in zip(usable["id"].to_list(), usable["messages"].to_list(), usable["tools"].to_list())
        if (names := _tool_names(tools)) and any(c not in names for c in _called_tools(msgs))
    ]
    counts["unknown_tool_call_excluded"] = {"total": len(unknown), "examples": sorted(unknown)[:5]}
    usable = usable.filter(~pl.col("id").is_in(unknown))

    parts, no_mask, empty_mask = [], {}, {}
    for cat in ("harmful", "retain"):
        policy = cfg.training.lossmask_policy[cat]
        lm = _lossmask_rows(lossmasks, policy)
        c = usable.filter(pl.col("category") == cat)
        joined = c.join(lm, left_on="id", right_on="trace_id", how="inner")
        no_mask[cat] = c.height - joined.height
        empty = joined.filter(pl.col("n_masked").fill_null(0) <= 0)
        empty_mask[cat] = empty.height
        parts.append(joined.filter(pl.col("n_masked").fill_null(0) > 0))
    cands = pl.concat(parts, how="vertical_relaxed") if parts else usable.clear()

    # de-duplicate by message content (`content_hash`): the smallest id of each hash stays. A hash labelled
    # harmful in one trace and retain in another is a label contradiction: none of its traces is trained on.
    before = cands.height
    conflict = cands.group_by("content_hash").agg(
        pl.col("category").n_unique().alias("k"), pl.col("id").sort().alias("ids")
    ).filter(pl.col("k") > 1)
    cands = cands.filter(~pl.col("content_hash").is_in(conflict["content_hash"].to_list()))
    after_conflicts = cands.height
    cands = cands.sort("content_hash", "id").unique("content_hash", keep="first", maintain_order=True)
    counts.update(
        no_lossmask=no_mask,
        empty_mask=empty_mask,
        duplicates_dropped=after_conflicts - cands.height,
        duplicate_label_conflicts=conflict.height,
        duplicate_label_conflict_rows_dropped=before - after_conflicts,
        duplicate_label_conflict_examples=[ids[:4] for ids in conflict.sort("content_hash")["ids"].to_list()[:5]],
    )

    cands = cands.with_columns(_hash_col(cands, cfg.seed, "content_hash", "mix").alias("_key")).sort("_key", "id")
    chosen, alloc = [], {}
    totals: dict[str, int] = {}
    for cat in ("harmful", "retain"):
        c = cands.filter(pl.col("category") == cat)
        avail = dict(c.group_by("priority_class").len().sort("priority_class").iter_rows()) if c.height else {}
        total = int(cfg.targets[cat])
        if cat == "retain" and cfg.dr_ratio is not None:
            total = min(total, int(math.ceil(cfg.dr_ratio * totals.get("harmful", 0))))
        take = _allocate(avail, total, cfg)
        alloc[cat] = {"target_total": total, "available": avail, "taken": take}
        for pc, n in sorted(take.items()):
            if n:
                chosen.append(c.filter(pl.col("priority_class") == pc).head(n))
        totals[cat] = sum(take.values())
    mix = pl.concat(chosen, how="vertical") if chosen else cands.clear()
    mix = (
        mix.select([*TRACE_SCHEMA, *MIX_EXTRA_SCHEMA])
        .with_columns(pl.lit(None, dtype=pl.String).alias("split"))
        .cast(dict(MIX_SCHEMA))
        .sort("id")
    )
    stats = mix_stats(mix, cfg)
    present = set(feats["dataset"].unique().to_list())
    stats.update(
        counts,
        allocation=alloc,
        sources_present=sorted(present),
        sources_missing=sorted(set(cfg.expected_sources) - present),
        sources_in_mix=sorted(set(mix["dataset"].unique().to_list())),
        generated_present=sorted(gen_present),
        generated_missing=gen_missing,
    )
    missing_required = sorted(set(cfg.required_sources) - set(stats["sources_in_mix"]))
    stats["required_sources_missing"] = missing_required
    return mix, stats


def mix_stats(mix: pl.DataFrame, cfg: CurationConfig | None = None) -> dict[str, Any]:
    """Counts per dataset x category x priority_class, totals, count and weighted Dr:Ds ratios."""
    by = (
        mix.group_by("dataset", "category", "priority_class")
        .agg(pl.len().alias("n"), pl.col("sample_weight").sum().alias("weight"))
        .sort("dataset", "category", "priority_class")
    )
    n_h = mix.filter(pl.col("category") == "harmful").height
    n_r = mix.filter(pl.col("category") == "retain").height
    w_h = float(mix.filter(pl.col("category") == "harmful")["sample_weight"].sum() or 0.0)
    w_r = float(mix.filter(pl.col("category") == "retain")["sample_weight"].sum() or 0.0)
    out = {
        "total": mix.height,
        "harmful": n_h,
        "retain": n_r,
        "dr_ds_ratio": (n_r / n_h) if n_h else None,
        "weight_harmful": round(w_h, 6),
        "weight_retain": round(w_r, 6),
        "weighted_dr_ds_ratio": (w_r / w_h) if w_h else None,
        "adversarial_safe": int(_adv_safe_mask(mix).sum()) if mix.height else 0,
        # flagged adversarial-safe (flag or class) but without the injection in context: never counted
        "adversarial_safe_flagged_not_counted": int(_adv_flag_mask(mix).sum() - _adv_safe_mask(mix).sum())
        if mix.height
        else 0,
        "by_dataset_category_class": [
            {**r, "weight": round(float(r["weight"] or 0.0), 6)} for r in by.to_dicts()
        ],
        "by_category": dict(mix.group_by("category").len().sort("category").iter_rows()),
        "by_priority_class": dict(mix.group_by("priority_class").len().sort("priority_class").iter_rows()),
        "by_dataset": dict(mix.group_by("dataset").len().sort("dataset").iter_rows()),
    }
    if cfg is not None:
        out.update(profile=cfg.profile, seed=cfg.seed, lossmask_policy=dict(cfg.training.lossmask_policy))
    return out


def _adv_safe_mask(mix: pl.DataFrame) -> pl.Series:
    return mix.select(adversarial_safe_expr()).to_series()


def _adv_flag_mask(mix: pl.DataFrame) -> pl.Series:
    """Rows that claim adversarial safety (flag or priority class), true or not; superset of _adv_safe_mask."""
    lab = pl.col("labels")
    return mix.select(
        lab.struct.field("is_adversarial_safe").fill_null(False)
        | (lab.struct.field("priority_class") == "adversarial_safe")
        | adversarial_safe_expr()
    ).to_series()


# ------------------------------------------------------------------------------------------- gates
@dataclass
class GateResult:
    name: str
    passed: bool
    value: Any
    threshold: Any
    examples: list = field(default_factory=list)
    description: str = ""


def _tool_names(tools: str | None) -> set[str] | None:
    """Names of the functions in a `tools` JSON string; None when it does not parse as a list."""
    try:
        obj = json.loads(tools) if tools else []
    except (TypeError, ValueError):
        return None
    if not isinstance(obj, list):
        return None
    return {n for n in (_schema_name(s) for s in obj) if n}


def _schema_fn(schema: Any) -> dict:
    if isinstance(schema, dict) and isinstance(schema.get("function"), dict):
        return schema["function"]
    return schema if isinstance(schema, dict) else {}


def _schema_name(schema: Any) -> str | None:
    return _schema_fn(schema).get("name")


def _called_tools(messages: list[dict] | None) -> list[str]:
    return [c.get("name") for m in (messages or []) for c in ((m or {}).get("tool_calls") or [])]


def gate_results(mix: pl.DataFrame, cfg: CurationConfig) -> list[GateResult]:
    """Merge gates; thresholds come from the profile (the demo profile sets smaller ones, never skips).
    Each description says what was verified on pass and what was found on failure."""
    g = cfg.gates
    st = mix_stats(mix)
    out = []
    ratio = st["dr_ds_ratio"]
    ok = ratio is not None and ratio >= g.min_dr_ds_ratio
    out.append(
        GateResult(
            "dr_ds_ratio",
            ok,
            ratio,
            g.min_dr_ds_ratio,
            [] if ratio is not None else [{"reason": "no harmful samples in the mix"}],
            (
                f"retain:harmful = {st['retain']}:{st['harmful']} = {ratio:.2f} >= {g.min_dr_ds_ratio}"
                if ok
                else "no harmful sample in the mix: the ratio is not measured"
                if ratio is None
                else f"retain:harmful = {st['retain']}:{st['harmful']} = {ratio:.2f} is below {g.min_dr_ds_ratio}"
            ),
        )
    )
    adv, flagged = st["adversarial_safe"], st["adversarial_safe_flagged_not_counted"]
    ok = adv >= g.min_adversarial_safe
    not_counted = []
    if flagged:
        rows = mix.filter(_adv_flag_mask(mix) & ~_adv_safe_mask(mix)).sort("id")
        not_counted = [{"id": i, "reason": "flagged adversarial-safe, injection not in context"}
                       for i in rows["id"].to_list()[:5]]
    extra = f"; {flagged} row(s) flagged adversarial-safe without a reached injection not counted" if flagged else ""
    out.append(
        GateResult(
            "adversarial_safe_count",
            ok,
            adv,
            g.min_adversarial_safe,
            not_counted,
            (
                f"{adv} adversarial-safe samples (read the injection, did the expected thing) "
                + (f">= {g.min_adversarial_safe}" if ok else f"found, below the required {g.min_adversarial_safe}")
                + extra
            ),
        )
    )
    dup = mix.filter(pl.col("id").is_duplicated())
    n_dup = dup["id"].n_unique() if dup.height else 0
    out.append(
        GateResult(
            "no_duplicate_ids",
            n_dup <= g.max_duplicate_ids,
            n_dup,
            g.max_duplicate_ids,
            sorted(set(dup["id"].to_list()))[:5],
            f"{mix.height} ids checked, {n_dup} appear more than once (allowed: {g.max_duplicate_ids})",
        )
    )
    bad = []
    n_calling = 0
    for tid, msgs, tools in zip(mix["id"].to_list(), mix["messages"].to_list(), mix["tools"].to_list()):
        called = _called_tools(msgs)
        if not called:
            continue
        n_calling += 1
        names = _tool_names(tools)
        if not names:
            bad.append({"id": tid, "reason": "tool calls but no tool schemas", "called": sorted(map(str, called))})
            continue
        missing = sorted({str(c) for c in called if c not in names})
        if missing:
            bad.append({"id": tid, "reason": "called tool(s) without a schema", "missing": missing})
    out.append(
        GateResult(
            "tool_schemas_present",
            (not bad) or not g.require_tool_schemas,
            len(bad),
            0 if g.require_tool_schemas else None,
            bad[:5],
            (
                f"all {n_calling} samples with tool calls offer a schema for every tool they call"
                if not bad
                else f"{len(bad)} of {n_calling} samples with tool calls call a tool their `tools` do not offer"
                + ("" if g.require_tool_schemas else " (not required by this profile)")
            ),
        )
    )
    return out


# ------------------------------------------------------------------------------------------- split
def _stratum_expr() -> pl.Expr:
    return pl.concat_str([pl.col("dataset"), pl.col("category"), pl.col("subtype").fill_null("")], separator="|")


def _eval_quotas(sizes: dict[str, int], fraction: float, seed: Any) -> dict[str, int]:
    """Eval groups per stratum: floor(fraction * n) each, and the remaining round(fraction * N) - sum
    handed out by largest remainder (ties by sha256(seed:stratum)), so small strata still contribute and
    the overall share matches `fraction`."""
    exact = {k: fraction * n for k, n in sizes.items()}
    quota = {k: int(math.floor(v)) for k, v in exact.items()}
    rest = int(math.floor(fraction * sum(sizes.values()) + 0.5)) - sum(quota.values())
    order = sorted(sizes, key=lambda k: (-(exact[k] - quota[k]), _h(seed, "stratum", k)))
    for k in order[: max(rest, 0)]:
        if quota[k] < sizes[k]:
            quota[k] += 1
    return quota


def assign_split(mix: pl.DataFrame, cfg: CurationConfig) -> pl.DataFrame:
    """`split` column = train|eval. Groups (pair_group) are assigned whole; each group belongs to the
    smallest stratum (dataset|category|subtype) among its members; inside a stratum the groups are ranked by
    sha256(seed:pair_group) and the first `quota` go to eval (quotas: `_eval_quotas`)."""
    if mix.height == 0:
        return mix.with_columns(pl.lit(None, dtype=pl.String).alias("split"))
    groups = (
        mix.with_columns(_stratum_expr().alias("_stratum"))
        .group_by("pair_group")
        .agg(pl.col("_stratum").min())
    )
    groups = groups.with_columns(
        pl.Series("_u", [hash_unit(cfg.seed, g) for g in groups["pair_group"].to_list()], dtype=pl.Float64)
    ).sort("_stratum", "_u", "pair_group")
    sizes = dict(groups.group_by("_stratum").len().iter_rows())
    quota = _eval_quotas(sizes, cfg.eval_fraction, cfg.seed)
    groups = groups.with_columns(
        pl.int_range(pl.len()).over("_stratum").alias("_rank"),
        pl.col("_stratum").replace_strict(quota, return_dtype=pl.Int64).alias("_quota"),
    ).with_columns(
        pl.when(pl.col("_rank") < pl.col("_quota")).then(pl.lit("eval")).otherwise(pl.lit("train")).alias("_split")
    )
    return (
        mix.join(groups.select("pair_group", "_split"), on="pair_group", how="left")
        .with_columns(pl.col("_split").alias("split"))
        .drop("_split")
        .sort("id")
    )


def split(mix: pl.DataFrame, cfg: CurationConfig) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(train, eval), each sorted by id with the `split` column set."""
    s = assign_split(mix, cfg)
    return s.filter(pl.col("split") == "train"), s.filter(pl.col("split") == "eval")


def split_stats(train: pl.DataFrame, eval_: pl.DataFrame) -> dict[str, Any]:
    def strata(df: pl.DataFrame) -> dict[str, int]:
        if df.height == 0:
            return {}
        return dict(df.select(_stratum_expr().alias("s")).group_by("s").len().sort("s").iter_rows())

    return {
        "train": train.height,
        "eval": eval_.height,
        "eval_share": eval_.height / (train.height + eval_.height) if (train.height + eval_.height) else 0.0,
        "train_strata": strata(train),
        "eval_strata": strata(eval_),
        "pair_groups_in_both": len(set(train["pair_group"].to_list()) & set(eval_["pair_group"].to_list())),
    }


# ------------------------------------------------------------------------------------ eval attacks
def load_user_tasks(cfg: CurationConfig) -> tuple[dict | None, str]:
    """(AgentDojo user tasks' ground truth, where it came from / why it is missing). A missing file is not
    fatal here: the affected eval attacks fall back to `no_attacker_call` and the count is reported."""
    if not cfg.agentdojo_user_tasks:
        return None, "not configured (agentdojo_user_tasks: null)"
    path = config_path(cfg.agentdojo_user_tasks)
    if not path.is_file():
        return None, f"missing: {cfg.agentdojo_user_tasks}"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ConfigError(f"{path}: expected {{version: {{suite: {{user_task_id: {{...}}}}}}}}")
    return data, str(cfg.agentdojo_user_tasks)


def agentdojo_task_key(pair_group: str | None) -> tuple[str, str] | None:
    """(suite, user_task_id) from an AgentDojo pair_group `agentdojo:<suite>:<user_task_id>`."""
    parts = (pair_group or "").split(":")
    return (parts[1], parts[2]) if len(parts) == 3 and parts[0] == "agentdojo" and all(parts[1:]) else None


def agentdojo_ground_truth(user_tasks: dict | None, suite: str, task_id: str, prompt: str | None) -> list[str] | None:
    """Ground-truth function names of one user task. The benchmark version is the one whose prompt is the
    trace's user prompt; without a match, the versions must agree (else None: ambiguous)."""
    found = []
    for version in sorted(user_tasks or {}):
        t = ((user_tasks[version] or {}).get(suite) or {}).get(task_id)
        if isinstance(t, dict) and isinstance(t.get("ground_truth_functions"), list):
            found.append((version, t))
    for _v, t in found:
        if prompt is not None and (t.get("prompt") or "").strip() == prompt.strip():
            return list(t["ground_truth_functions"])
    gts = {tuple(t["ground_truth_functions"]) for _v, t in found}
    return list(gts.pop()) if len(gts) == 1 else None


def next_expected_call(ground_truth: list[str], calls_made: list[str]) -> str:
    """The first ground-truth function (in order, counting repeats) not yet called, else FINAL_ANSWER."""
    left = Counter(calls_made)
    for fn in ground_truth:
        if left[fn] > 0:
            left[fn] -= 1
        else:
            return fn
    return FINAL_ANSWER


def cut_after_injection(msgs: list[dict], tool_attack: dict | None) -> list[dict] | None:
    """The messages up to and including the first injected message (a tool result or a user message), plus the
    tool results of the same assistant turn that follow it (a parallel call's results belong together), so the
    next turn is the model's answer to the injection. None when no injection span lies in the messages."""
    inj = _injection_index(msgs, tool_attack)
    if inj is None:
        return None
    end = inj + 1
    if (msgs[inj] or {}).get("role") == "tool":
        while end < len(msgs) and (msgs[end] or {}).get("role") == "tool":
            end += 1
    return list(msgs[:end])


def _first_user(msgs: list[dict]) -> str | None:
    return next(((m or {}).get("content") for m in msgs if (m or {}).get("role") == "user"), None)


def build_eval_attacks_with_stats(
    traces: pl.DataFrame,
    trained: pl.DataFrame | Iterable[str],
    cfg: CurationConfig,
    user_tasks: dict | None | object = ...,
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Held-out attack skeletons and what was done to make them.

    Candidates: attacked traces whose injection is in the context (`injection_in_context`) and whose id and
    pair_group are absent from `trained` (a frame with id + pair_group, e.g. the whole training mix, or an
    iterable of ids). Each is cut by `cut_after_injection` (never ends on a user message without the
    injection), given a new stable id, and its expected behaviour: AgentDojo -> `tool_attack.expected_tool` =
    `next_expected_call` of the user task's ground truth (`user_tasks`, default: `agentdojo_user_tasks` of
    the config) given the calls made before the cut; B4 -> the record's expected_tool; otherwise (LLMail, or
    AgentDojo without ground truth) -> `no_attacker_call`. Identical cuts collapse onto the smallest source
    id. Strata (`<dataset>:<subtype>`) under `min_per_stratum` are merged into `<dataset>:other` (column
    `stratum`; `labels.subtype` untouched); at most `max_per_stratum` per stratum, hash-ordered."""
    if user_tasks is ...:
        user_tasks, ut_source = load_user_tasks(cfg)
    else:
        ut_source = "given" if user_tasks else "none given"
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
        behavior = None
        if r["dataset"] == "agentdojo":
            key = agentdojo_task_key(r["pair_group"])
            gt = agentdojo_ground_truth(user_tasks, key[0], key[1], _first_user(msgs)) if key else None
            if gt is not None:
                ta["expected_tool"] = next_expected_call(gt, _called_tools(msgs))
                behavior = "final_answer" if ta["expected_tool"] == FINAL_ANSWER else "expected_tool"
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
    df = df.with_columns(_hash_col(df, cfg.seed, "id", "eval_attacks").alias("_key")).sort("stratum", "_key")
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
    )
    return df.drop("_key").sort("id"), stats


def build_eval_attacks(
    traces: pl.DataFrame,
    trained: pl.DataFrame | Iterable[str],
    cfg: CurationConfig,
    user_tasks: dict | None | object = ...,
) -> pl.DataFrame:
    """`build_eval_attacks_with_stats` without the stats."""
    return build_eval_attacks_with_stats(traces, trained, cfg, user_tasks)[0]


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


# ------------------------------------------------------------------------------------------ preflight
def _end_ids(tokenizer) -> set[int]:
    if tokenizer is None:
        return set(DEFAULT_END_IDS)
    ids = set()
    for t in ("<|eot_id|>", "<|eom_id|>"):
        try:
            i = tokenizer.convert_tokens_to_ids(t)
        except Exception:  # noqa: BLE001 - a tokenizer without these tokens: fall back to the Llama ids
            i = None
        if isinstance(i, int) and i >= 0 and i != getattr(tokenizer, "unk_token_id", None):
            ids.add(i)
    return ids or set(DEFAULT_END_IDS)


def _tool_call_problems(msgs: list[dict], tools: str | None) -> list[str]:
    calls = [(i, c) for i, m in enumerate(msgs or []) for c in ((m or {}).get("tool_calls") or [])]
    if not calls:
        return []
    try:
        schemas = json.loads(tools) if tools else []
    except (TypeError, ValueError):
        return ["tools is not valid JSON"]
    by_name = {_schema_name(s): _schema_fn(s) for s in (schemas if isinstance(schemas, list) else [])}
    out = []
    for i, c in calls:
        name = c.get("name")
        try:
            args = json.loads(c.get("arguments") or "{}")
        except (TypeError, ValueError):
            out.append(f"message {i}: tool call {name!r} arguments are not valid JSON")
            continue
        if not isinstance(args, dict):
            out.append(f"message {i}: tool call {name!r} arguments are not a JSON object")
            continue
        if name not in by_name:
            out.append(f"message {i}: tool {name!r} is not in the trace's tool schemas")
            continue
        params = by_name[name].get("parameters") or {}
        required = (params.get("required") or []) if isinstance(params, dict) else []
        missing = [p for p in required if p not in args]
        if missing:
            out.append(f"message {i}: tool call {name!r} lacks required parameter(s) {missing}")
    return out


def preflight(
    train: pl.DataFrame,
    traces: pl.DataFrame | None,
    renders: pl.DataFrame,
    lossmasks: pl.DataFrame | None,
    tokenizer,
    cfg: CurationConfig,
) -> list[dict[str, Any]]:
    """Per-sample training preflight; returns one row {id, dataset, reason} per problem (empty = pass).

    * the sample tokenizes: it has a render made with the training tokenizer (`training.tokenizer_id`, else
      the given tokenizer's id) and its ids lie inside that tokenizer's vocabulary;
    * assistant boundaries: each assistant message has header and end_token spans, and the token at the end
      span is <|eot_id|> or <|eom_id|> (a message cut by deliberate truncation is exempt);
    * length: n_tokens <= training.max_seq_length (a render truncated on purpose passes when its mask is
      still non-empty);
    * tool calls: arguments parse as a JSON object naming a tool of the trace's `tools` with the required
      parameters present;
    * the mask under the configured policy exists, is non-empty and lies inside the sequence.
    """
    if "messages" not in train.columns or "tools" not in train.columns:
        if traces is None:
            raise ValueError("preflight: train has no messages/tools and no traces were given")
        train = train.join(traces.select("id", "messages", "tools"), on="id", how="left")
    ids = train["id"].to_list()
    want_tok = cfg.training.tokenizer_id
    if want_tok is None and tokenizer is not None:
        try:
            from cb_core.tokenizer import tokenizer_id

            want_tok = tokenizer_id(tokenizer)
        except Exception:  # noqa: BLE001 - an unusual tokenizer object: skip the identity check
            want_tok = None
    r = renders.filter(pl.col("trace_id").is_in(ids))
    if want_tok and "tokenizer_id" in r.columns:  # prefer the render made with the training tokenizer
        r = r.sort(pl.col("tokenizer_id") != want_tok, "tokenizer_id")
    r = r.unique("trace_id", keep="first", maintain_order=True)
    rmap = {row["trace_id"]: row for row in r.iter_rows(named=True)}

    # masks: the mix carries them; otherwise look them up in lossmasks under the category's policy
    if "mask_spans" in train.columns and "n_masked" in train.columns:
        mmap = {
            row["id"]: row
            for row in train.select("id", "mask_spans", "n_masked", "policy").iter_rows(named=True)
        }
    else:
        mmap = {}
        if lossmasks is not None:
            cat = train.select("id", pl.col("labels").struct.field("category").alias("_cat"))
            for c in ("harmful", "retain"):
                ids_c = cat.filter(pl.col("_cat") == c)["id"].to_list()
                lm = _lossmask_rows(lossmasks, cfg.training.lossmask_policy[c]).filter(
                    pl.col("trace_id").is_in(ids_c)
                )
                for row in lm.iter_rows(named=True):
                    mmap[row["trace_id"]] = row

    end_ids = _end_ids(tokenizer)
    vocab = len(tokenizer) if tokenizer is not None else None
    max_len = cfg.training.max_seq_length
    fails: list[dict[str, Any]] = []
    datasets = train["dataset"].to_list() if "dataset" in train.columns else [None] * len(ids)
    for tid, ds, msgs, tools in zip(ids, datasets, train["messages"].to_list(), train["tools"].to_list()):
        def bad(reason: str) -> None:
            fails.append({"id": tid, "dataset": ds, "reason": reason})

        ren = rmap.get(tid)
        mask = mmap.get(tid)
        for p in _tool_call_problems(msgs, tools):
            bad(f"tool call: {p}")
        if mask is None:
            bad("no lossmask under the configured policy")
        elif not (mask.get("n_masked") or 0) > 0 or not mask.get("mask_spans"):
            bad("empty mask")
        if ren is None:
            bad("no render: the sample did not tokenize")
            continue
        if want_tok and ren.get("tokenizer_id") != want_tok:
            bad(f"rendered with tokenizer {ren.get('tokenizer_id')!r}, training uses {want_tok!r}")
        input_ids = ren["input_ids"] or []
        n_tok = ren.get("n_tokens") if ren.get("n_tokens") is not None else len(input_ids)
        truncated = bool(ren.get("truncated"))
        if not input_ids:
            bad("render has no tokens")
            continue
        if vocab is not None and (max(input_ids) >= vocab or min(input_ids) < 0):
            bad(f"token id outside the tokenizer's vocabulary ({vocab})")
        if n_tok > max_len:
            bad(f"{n_tok} tokens > max_seq_length {max_len}")
        if mask is not None:
            spans = mask.get("mask_spans") or []
            if any(s["token_start"] < 0 or s["token_end"] > n_tok or s["token_end"] < s["token_start"] for s in spans):
                bad("mask span outside the sequence")
            if any(s["token_end"] > max_len for s in spans):
                bad(f"mask span beyond max_seq_length {max_len}")
        spans_by_msg: dict[int, dict[str, list[dict]]] = {}
        for s in ren["spans"] or []:
            mi = s.get("message_index")
            if mi is None:
                continue
            spans_by_msg.setdefault(mi, {}).setdefault(s.get("kind"), []).append(s)
        last_rendered = max(spans_by_msg) if spans_by_msg else -1
        for i, m in enumerate(msgs or []):
            if (m or {}).get("role") != "assistant":
                continue
            kinds = spans_by_msg.get(i, {})
            if truncated and i >= last_rendered and "end_token" not in kinds:
                continue  # cut by deliberate truncation
            if "header" not in kinds:
                bad(f"assistant message {i}: no header span")
            ends = kinds.get("end_token") or []
            if not ends:
                bad(f"assistant message {i}: no end_token span")
                continue
            pos = ends[-1]["token_start"]
            if not (0 <= pos < len(input_ids)) or input_ids[pos] not in end_ids:
                got = input_ids[pos] if 0 <= pos < len(input_ids) else None
                bad(f"assistant message {i}: end token at {pos} is {got}, not one of {sorted(end_ids)}")
    return fails


# -------------------------------------------------------------------------------------- pandera models
_MASK_SPANS = MIX_EXTRA_SCHEMA["mask_spans"]


class TrainingMixModel(TraceModel):
    """training_mix: trace_v1 columns (all TraceModel checks) + the sample's lossmask and curation keys."""

    content_hash: str = pa.Field(unique=True, str_length={"min_value": 16})
    category: str = pa.Field(isin=list(CATEGORIES))
    priority_class: str = pa.Field(isin=list(PRIORITY_CLASSES))
    subtype: str
    policy: str = pa.Field(str_length={"min_value": 1})
    mask_spans: _MASK_SPANS = pa.Field()  # type: ignore[valid-type]
    sample_weight: float = pa.Field(ge=0.0)
    n_tokens: pl.Int32 = pa.Field(gt=0)  # type: ignore[valid-type]
    n_masked: pl.Int32 = pa.Field(gt=0)  # type: ignore[valid-type]
    split: str = pa.Field(nullable=True, isin=["train", "eval"])

    class Config:
        strict = True

    @pa.dataframe_check
    def complete_with_assistant(cls, data: pa.PolarsData) -> pl.LazyFrame:
        return data.lazyframe.select(
            (pl.col("completeness") == "complete")
            & pl.col("messages").list.eval(pl.element().struct.field("role") == "assistant").list.any()
        )

    @pa.dataframe_check
    def category_matches_labels(cls, data: pa.PolarsData) -> pl.LazyFrame:
        return data.lazyframe.select(pl.col("category") == pl.col("labels").struct.field("category"))


class TrainSplitModel(TrainingMixModel):
    split: str = pa.Field(isin=["train"])


class EvalSplitModel(TrainingMixModel):
    split: str = pa.Field(isin=["eval"])


class EvalAttacksModel(TraceModel):
    """eval_attacks: trace_v1 skeletons (new ids) cut right after the injection, + the trace they were cut
    from, the expected behaviour and the stratum."""

    completeness: str = pa.Field(isin=["skeleton"])
    split: str = pa.Field(isin=["eval_attack"])
    source_trace_id: str = pa.Field(str_length={"min_value": 16})
    n_stripped: pl.Int32 = pa.Field(ge=0)  # type: ignore[valid-type]
    expected_behavior: str = pa.Field(isin=list(EXPECTED_BEHAVIORS))
    stratum: str = pa.Field(str_matches=r"^[a-z0-9_]+:")

    class Config:
        strict = True

    @pa.dataframe_check
    def attacked(cls, data: pa.PolarsData) -> pl.LazyFrame:
        return data.lazyframe.select(pl.col("labels").struct.field("attack_present"))

    @pa.dataframe_check
    def injection_reached(cls, data: pa.PolarsData) -> pl.LazyFrame:
        return data.lazyframe.select(pl.col("labels").struct.field("injection_reached").fill_null(True))

    @pa.dataframe_check
    def ends_right_after_the_injection(cls, data: pa.PolarsData) -> pl.LazyFrame:
        """The last message is a tool result, or the user message holding the injection (never an assistant
        turn, never a user message without the injection); the injection lies inside the messages."""
        idx = pl.col("tool_attack").struct.field("injection_span").struct.field("message_index")
        last = pl.col("messages").list.len() - 1
        role = pl.col("messages").list.last().struct.field("role")
        return data.lazyframe.select(
            idx.is_not_null()
            & (idx <= last)
            & ((role == "tool") | ((role == "user") & (idx == last)))
        )

    @pa.dataframe_check
    def has_expected_behavior(cls, data: pa.PolarsData) -> pl.LazyFrame:
        ta = pl.col("tool_attack")
        b = pl.col("expected_behavior")
        return data.lazyframe.select(
            pl.when(b == "expected_tool")
            .then(ta.struct.field("expected_tool").is_not_null() & (ta.struct.field("expected_tool") != FINAL_ANSWER))
            .when(b == "final_answer")
            .then(ta.struct.field("expected_tool") == FINAL_ANSWER)
            .otherwise(ta.struct.field("expected_tool").is_null() & ta.struct.field("attacker_tool").is_not_null())
        )
