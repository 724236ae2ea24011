"""Tier C curation: the training mix, its train/eval split, the held-out attack set, merge gates, preflight.

Pure functions over polars frames (no Dagster). Inputs follow the contracts in DESIGN.md:
trace_v1 (`cb_core.schemas.TRACE_SCHEMA`), render_v1 (`trace_id, tokenizer_id, input_ids, spans, n_tokens,
truncated`) and lossmask_v1 (`trace_id, policy, mask_spans, sample_weight, n_tokens, n_masked, ...`).

Determinism: every choice is ordered by a sha256 of (seed, stable key) -- content hashes or pair groups --
never by input row order, and every output is sorted by id, so the same inputs and config give byte-identical
Parquet files.

* `build_training_mix` -- harmful (Ds) and retain (Dr) samples with their lossmasks, de-duplicated by content
  hash, sampled per priority class (targets, caps, `dr_ratio`), with attack pair groups reserved for the
  held-out attack set first.
* `gate_results` -- merge gates (ratio, adversarial-safe count, duplicate ids, tool schemas present).
* `split` -- train/eval, stratified by dataset x category x subtype, grouped by pair_group, hash-based.
* `build_eval_attacks` -- attacked traces never trained on, assistant turns after the injection stripped.
* `preflight` -- per-sample checks a training run would otherwise discover hours in.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import pandera.polars as pa
import polars as pl

from cb_core.config import ConfigError, load_yaml
from cb_core.schemas import CATEGORIES, DATASETS, PRIORITY_CLASSES, TRACE_SCHEMA, TraceModel, digest

PROFILE_ENV = "CB_CURATION_PROFILE"
CONFIG_FILE = "curation.yaml"
EVAL_ATTACK_ID_VERSION = "eval_attack_v1"
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
EVAL_ATTACK_SCHEMA = pl.Schema({**dict(TRACE_SCHEMA), "source_trace_id": pl.String, "n_stripped": pl.Int32})


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


def content_hash(messages: list[dict] | None, tools: str | None) -> str:
    """Hash of what the model sees (messages + tools), not of the id or source locator."""
    try:
        tools_obj = json.loads(tools) if tools else []
    except (TypeError, ValueError):
        tools_obj = tools
    return digest({"messages": messages or [], "tools": tools_obj})


def _hash_col(df: pl.DataFrame, seed: Any, col: str, salt: str = "") -> pl.Series:
    return pl.Series([_h(seed, salt, v) for v in df[col].to_list()], dtype=pl.String)


# ------------------------------------------------------------------------------------- trace features
def trace_features(traces: pl.DataFrame) -> pl.DataFrame:
    """Flat per-trace columns the curation logic needs (labels unnested, content hash, flags)."""
    lab = pl.col("labels")
    msgs = traces["messages"].to_list()
    tools = traces["tools"].to_list()
    hashes = [content_hash(m, t) for m, t in zip(msgs, tools)]
    has_asst = [any((x or {}).get("role") == "assistant" for x in (m or [])) for m in msgs]
    has_calls = [any((x or {}).get("tool_calls") for x in (m or [])) for m in msgs]
    return traces.with_columns(
        lab.struct.field("category").alias("category"),
        lab.struct.field("priority_class").alias("priority_class"),
        lab.struct.field("subtype").fill_null("").alias("subtype"),
        lab.struct.field("attack_present").fill_null(False).alias("_attacked"),
        (
            lab.struct.field("is_adversarial_safe").fill_null(False)
            | (lab.struct.field("priority_class") == "adversarial_safe")
        ).alias("_adv_safe"),
        pl.Series("content_hash", hashes, dtype=pl.String),
        pl.Series("_has_assistant", has_asst, dtype=pl.Boolean),
        pl.Series("_has_tool_calls", has_calls, dtype=pl.Boolean),
    )


def reserved_attack_groups(feats: pl.DataFrame, cfg: CurationConfig) -> set[str]:
    """Pair groups held out of the mix up front so every attack stratum (dataset x subtype) keeps at least
    `eval_attacks.min_per_stratum` groups for `eval_attacks` (never more than `max_reserve_fraction`)."""
    ea = cfg.eval_attacks
    if ea.min_per_stratum <= 0 or feats.height == 0:
        return set()
    attacked = feats.filter(pl.col("_attacked")).select("dataset", "subtype", "pair_group").unique()
    out: set[str] = set()
    for (ds, st), grp in attacked.group_by(["dataset", "subtype"]):
        groups = sorted(set(grp["pair_group"].to_list()), key=lambda g: (_h(cfg.seed, "holdout", g), g))
        n = min(ea.min_per_stratum, int(math.floor(ea.max_reserve_fraction * len(groups))))
        out.update(groups[:n])
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
    all_traces = pl.concat([base, *gen_present.values()], how="vertical")
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
    }
    usable = usable.filter(~pl.col("pair_group").is_in(list(reserved)))

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

    # de-duplicate by content: the smallest id of each content hash stays
    before = cands.height
    conflicts = (
        cands.group_by("content_hash").agg(pl.col("category").n_unique().alias("k")).filter(pl.col("k") > 1).height
    )
    cands = cands.sort("content_hash", "id").unique("content_hash", keep="first", maintain_order=True)
    counts.update(
        no_lossmask=no_mask,
        empty_mask=empty_mask,
        duplicates_dropped=before - cands.height,
        duplicate_label_conflicts=conflicts,
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
    lab = pl.col("labels")
    return mix.select(
        lab.struct.field("is_adversarial_safe").fill_null(False) | (pl.col("priority_class") == "adversarial_safe")
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
    """Merge gates; thresholds come from the profile (the demo profile sets smaller ones, never skips)."""
    g = cfg.gates
    st = mix_stats(mix)
    out = []
    ratio = st["dr_ds_ratio"]
    out.append(
        GateResult(
            "dr_ds_ratio",
            ratio is not None and ratio >= g.min_dr_ds_ratio,
            ratio,
            g.min_dr_ds_ratio,
            [] if ratio is not None else [{"reason": "no harmful samples in the mix"}],
            f"retain:harmful count ratio ({st['retain']}:{st['harmful']}) >= {g.min_dr_ds_ratio}",
        )
    )
    adv = st["adversarial_safe"]
    out.append(
        GateResult(
            "adversarial_safe_count",
            adv >= g.min_adversarial_safe,
            adv,
            g.min_adversarial_safe,
            [],
            f"adversarial-safe samples >= {g.min_adversarial_safe}",
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
            "no id appears twice in the mix",
        )
    )
    bad = []
    for tid, msgs, tools in zip(mix["id"].to_list(), mix["messages"].to_list(), mix["tools"].to_list()):
        called = _called_tools(msgs)
        if not called:
            continue
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
            "every sample whose messages contain tool calls carries the schemas of the tools it calls",
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
def _injection_index(msgs: list[dict], tool_attack: dict | None) -> int:
    span = (tool_attack or {}).get("injection_span") or {}
    idx = span.get("message_index")
    if isinstance(idx, int) and 0 <= idx < len(msgs):
        return idx
    roles = [(m or {}).get("role") for m in msgs]
    if "tool" in roles:
        return roles.index("tool")
    return roles.index("user") if "user" in roles else 0


def strip_after_injection(msgs: list[dict], tool_attack: dict | None, completeness: str) -> list[dict]:
    """Messages up to (excluding) the first assistant message after the injection; skeletons as they are."""
    if completeness == "skeleton":
        return list(msgs)
    inj = _injection_index(msgs, tool_attack)
    for i in range(inj + 1, len(msgs)):
        if (msgs[i] or {}).get("role") == "assistant":
            return list(msgs[:i])
    return list(msgs)


def build_eval_attacks(
    traces: pl.DataFrame, trained: pl.DataFrame | Iterable[str], cfg: CurationConfig
) -> pl.DataFrame:
    """Held-out attack skeletons: attacked traces whose id and pair_group are absent from `trained` (a frame
    with id + pair_group, e.g. the whole training mix, or an iterable of ids), assistant turns from the one
    answering the injection on stripped, new stable ids, at most `max_per_stratum` per (dataset, subtype)
    (hash-ordered), identical stripped prompts collapsed. Labels and tool_attack kept for scoring."""
    if isinstance(trained, pl.DataFrame):
        t_ids = set(trained["id"].to_list())
        t_groups = set(trained["pair_group"].to_list()) if "pair_group" in trained.columns else set()
    else:
        t_ids = set(trained)
        t_groups = set(traces.filter(pl.col("id").is_in(list(t_ids)))["pair_group"].to_list())
    lab = pl.col("labels")
    cand = traces.select(list(TRACE_SCHEMA)).filter(
        lab.struct.field("attack_present").fill_null(False)
        & ~pl.col("id").is_in(list(t_ids))
        & ~pl.col("pair_group").is_in(list(t_groups))
    )
    rows = []
    for r in cand.iter_rows(named=True):
        msgs = strip_after_injection(r["messages"] or [], r["tool_attack"], r["completeness"])
        if not msgs:
            continue
        new_id = digest([EVAL_ATTACK_ID_VERSION, msgs, r["tools"], r["tool_attack"]])
        if new_id in t_ids:  # never: 128-bit hash; guarded all the same
            continue
        rows.append(
            {
                **r,
                "id": new_id,
                "completeness": "skeleton",
                "messages": msgs,
                "split": "eval_attack",
                "source_trace_id": r["id"],
                "n_stripped": len(r["messages"] or []) - len(msgs),
            }
        )
    df = pl.DataFrame(rows, schema=EVAL_ATTACK_SCHEMA)
    if df.height == 0:
        return df
    # identical stripped prompts collapse onto the smallest source id
    df = df.sort("id", "source_trace_id").unique("id", keep="first", maintain_order=True)
    df = df.with_columns(
        lab.struct.field("subtype").fill_null("").alias("_subtype"),
        _hash_col(df, cfg.seed, "id", "eval_attacks").alias("_key"),
    ).sort("dataset", "_subtype", "_key")
    df = df.filter(pl.int_range(pl.len()).over("dataset", "_subtype") < cfg.eval_attacks.max_per_stratum)
    return df.drop("_subtype", "_key").sort("id")


def eval_attack_strata(eval_attacks: pl.DataFrame, cfg: CurationConfig) -> list[dict[str, Any]]:
    """Per (dataset, subtype): count and whether it reaches min_per_stratum."""
    if eval_attacks.height == 0:
        return []
    df = (
        eval_attacks.group_by("dataset", pl.col("labels").struct.field("subtype").fill_null("").alias("subtype"))
        .len()
        .sort("dataset", "subtype")
    )
    return [
        {**r, "below_min": r["len"] < cfg.eval_attacks.min_per_stratum} for r in df.to_dicts()
    ]


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
    """eval_attacks: trace_v1 skeletons (new ids) + the trace they were cut from."""

    completeness: str = pa.Field(isin=["skeleton"])
    split: str = pa.Field(isin=["eval_attack"])
    source_trace_id: str = pa.Field(str_length={"min_value": 16})
    n_stripped: pl.Int32 = pa.Field(ge=0)  # type: ignore[valid-type]

    class Config:
        strict = True

    @pa.dataframe_check
    def attacked(cls, data: pa.PolarsData) -> pl.LazyFrame:
        return data.lazyframe.select(pl.col("labels").struct.field("attack_present"))

    @pa.dataframe_check
    def no_answer_to_the_injection(cls, data: pa.PolarsData) -> pl.LazyFrame:
        return data.lazyframe.select(
            pl.col("messages").list.last().struct.field("role") != "assistant"
        )
