"""The training mix: harmful (Ds) and retain (Dr) samples with their lossmasks, sampled per priority class."""
from __future__ import annotations

import math
from typing import Any

import polars as pl

from cb_core.curate.config import CurationConfig
from cb_core.curate.features import (
    adversarial_safe_expr,
    called_tools,
    hash_col,
    reserved_attack_groups,
    tool_names,
    trace_features,
)
from cb_core.parse import tool_call_problems
from cb_core.schemas import MIX_EXTRA_SCHEMA, MIX_SCHEMA, TRACE_SCHEMA


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


def lossmask_rows(lossmasks: pl.DataFrame, policy: str) -> pl.DataFrame:
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
    # way; nor is a call the training preflight refuses (arguments that are no JSON object, a required parameter
    # missing: `tool_call_problems`; real AgentDojo runs hold such calls, e.g. send_money without its `date`),
    # left out here with its reason instead of stopping training at the blocking preflight check. A trace
    # offering no tools at all while calling some stays (and fails the tool-schema gate: that is a reader
    # problem, not a model's)
    unknown: list[str] = []
    invalid: dict[str, tuple[str, str]] = {}
    for tid, cat, msgs, tools in zip(usable["id"].to_list(), usable["category"].to_list(),
                                     usable["messages"].to_list(), usable["tools"].to_list()):
        if not (names := tool_names(tools)):
            continue
        if any(c not in names for c in called_tools(msgs)):
            unknown.append(tid)
        elif problems := tool_call_problems(msgs, tools):
            invalid[tid] = (cat, problems[0])
    counts["unknown_tool_call_excluded"] = {"total": len(unknown), "examples": sorted(unknown)[:5]}
    counts["invalid_tool_call_excluded"] = {
        "total": len(invalid),
        "by_category": {c: n for c in ("harmful", "retain") if (n := sum(v[0] == c for v in invalid.values()))},
        "examples": [{"id": t, "reason": invalid[t][1]} for t in sorted(invalid)[:5]],
    }
    usable = usable.filter(~pl.col("id").is_in(unknown + list(invalid)))

    parts, no_mask, empty_mask = [], {}, {}
    for cat in ("harmful", "retain"):
        policy = cfg.training.lossmask_policy[cat]
        lm = lossmask_rows(lossmasks, policy)
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

    cands = cands.with_columns(hash_col(cands, cfg.seed, "content_hash", "mix").alias("_key")).sort("_key", "id")
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
        "adversarial_safe": int(adv_safe_mask(mix).sum()) if mix.height else 0,
        # flagged adversarial-safe (flag or class) but without the injection in context: never counted
        "adversarial_safe_flagged_not_counted": int(adv_flag_mask(mix).sum() - adv_safe_mask(mix).sum())
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


def adv_safe_mask(mix: pl.DataFrame) -> pl.Series:
    return mix.select(adversarial_safe_expr()).to_series()


def adv_flag_mask(mix: pl.DataFrame) -> pl.Series:
    """Rows that claim adversarial safety (flag or priority class), true or not; superset of adv_safe_mask."""
    lab = pl.col("labels")
    return mix.select(
        lab.struct.field("is_adversarial_safe").fill_null(False)
        | (lab.struct.field("priority_class") == "adversarial_safe")
        | adversarial_safe_expr()
    ).to_series()
