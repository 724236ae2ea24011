"""Tier C curation: `training_mix` -> `train_split` / `eval_split`, and the held-out `eval_attacks`.

Stop-the-line: the merge gates are blocking checks on `training_mix` (a failing gate stops `train_split`);
preflight, split disjointness and eval-attack disjointness are blocking checks on the splits. The curation
profile is `$CB_CURATION_PROFILE`, else `demo` on the embedded demo sample, else `default`
(configs/curation.yaml); every check uses the same profile as the assets.
"""

import dagster as dg
import polars as pl

from cb_assets.resources import DatasetsResource, ModelResource
from cb_assets.tags import cpu_tags
from cb_assets.validation import N_EXAMPLES, pandera_check, validate_or_fail
from cb_core import curate
from cb_core.io import write_json
from cb_core.schemas import EvalAttacksModel, EvalSplitModel, TrainingMixModel, TrainSplitModel

CURATION_GROUP = "curation"
TAGS = cpu_tags("C")
GATE_NAMES = curate.GATE_NAMES


class CurationRunConfig(dg.Config):
    """Which profile of configs/curation.yaml a run uses; unset: $CB_CURATION_PROFILE, else `demo` on the embedded
    demo sample, else `default`. The checks use the profile the checked asset was built with (its metadata)."""

    profile: str | None = None


def curation_config(datasets: DatasetsResource, profile: str | None = None) -> curate.CurationConfig:
    return curate.load_curation_config(profile, demo=datasets.selection().demo)


def built_with(context, asset: str, datasets: DatasetsResource) -> curate.CurationConfig:
    """The profile the latest materialization of ``asset`` recorded (its `profile` metadata), so a check never
    judges a table by another profile's thresholds; the run's default when there is none."""
    ev = context.instance.get_latest_materialization_event(dg.AssetKey(asset))
    md = ev.asset_materialization.metadata if ev is not None and ev.asset_materialization else {}
    prof = md["profile"].value if "profile" in md else None
    return curation_config(datasets, prof)


def _generated(cfg: curate.CurationConfig, tables: dict[str, pl.DataFrame]) -> dict[str, pl.DataFrame | None]:
    """The generated trace tables the profile draws on (`generated_tables`), from the asset inputs; a table
    never materialized arrives empty and is reported as missing, never fatal."""
    unknown = [n for n in cfg.generated_tables if n not in tables]
    if unknown:
        raise dg.Failure(f"configs/curation.yaml profile {cfg.profile}: generated_tables {unknown} are not "
                         f"generation assets (known: {sorted(tables)})")
    return {n: tables[n] for n in cfg.generated_tables}


def _json_safe(obj):
    """Lists and dicts as JSON metadata; scalars (and None) as they are."""
    return dg.MetadataValue.json(obj) if isinstance(obj, (list, dict)) else obj


# ---------------------------------------------------------------------------------------------- assets
@dg.asset(
    group_name=CURATION_GROUP,
    kinds={"polars"},
    tags=TAGS,
    description="Training mix: harmful (Ds) + retain (Dr) samples with their lossmask under the configured "
    "policy, de-duplicated by the hash of the message content (never the tool list or labels), retain runs that "
    "failed the user's task left out, sampled per priority class (configs/curation.yaml). "
    "Generated DS/DR/adversarial-safe traces come in as asset inputs (empty until materialized). "
    "Statistics in metadata and in `training_mix.stats.json`.",
)
def training_mix(
    context: dg.AssetExecutionContext,
    config: CurationRunConfig,
    datasets: DatasetsResource,
    traces: pl.DataFrame,
    lossmasks: pl.DataFrame,
    ds_completions: pl.DataFrame,
    dr_completions: pl.DataFrame,
    adversarial_safe: pl.DataFrame,
) -> pl.DataFrame:
    cfg = curation_config(datasets, config.profile)
    generated = _generated(cfg, {"ds_completions": ds_completions, "dr_completions": dr_completions,
                                 "adversarial_safe": adversarial_safe})
    mix, stats = curate.build_training_mix(traces, lossmasks, cfg, generated)
    if mix.height == 0:
        raise dg.Failure(
            f"training_mix: no sample selected (profile {cfg.profile}; policies "
            f"{cfg.training.lossmask_policy}; no lossmask: {stats['no_lossmask']}); nothing written",
            metadata={"stats": _json_safe(stats)},
        )
    if stats["required_sources_missing"]:
        raise dg.Failure(
            f"training_mix: required source(s) {stats['required_sources_missing']} contribute no sample",
            metadata={"stats": _json_safe(stats)},
        )
    validate_or_fail(TrainingMixModel, mix, "training_mix")
    stats_path = write_json(stats, datasets.data_root() / "training_mix.stats.json")
    for name in stats["sources_missing"] + stats["generated_missing"]:
        context.log.info(f"training_mix: optional source '{name}' not present (reported, not fatal)")
    context.add_output_metadata(
        {
            "profile": cfg.profile,
            "harmful": stats["harmful"],
            "retain": stats["retain"],
            "dr_ds_ratio": stats["dr_ds_ratio"],
            "weighted_dr_ds_ratio": stats["weighted_dr_ds_ratio"],
            "adversarial_safe": stats["adversarial_safe"],
            "adversarial_safe_flagged_not_counted": stats["adversarial_safe_flagged_not_counted"],
            "duplicates_dropped": stats["duplicates_dropped"],
            "duplicate_label_conflicts": stats["duplicate_label_conflicts"],
            "retain_failed_task_excluded": stats["retain_failed_task_excluded"]["total"],
            "unknown_tool_call_excluded": stats["unknown_tool_call_excluded"]["total"],
            "invalid_tool_call_excluded": stats["invalid_tool_call_excluded"]["total"],
            "reserved_for_eval_attacks": stats["reserved_for_eval_attacks"],
            "generated_pair_groups": _json_safe(stats["generated_pair_groups"]),
            "sources_missing": _json_safe(stats["sources_missing"] + stats["generated_missing"]),
            "by_dataset_category_class": _json_safe(stats["by_dataset_category_class"]),
            "stats": _json_safe(stats),
            "stats_path": dg.MetadataValue.path(str(stats_path)),
        }
    )
    return mix


def _split_asset(which: str, model) -> dg.AssetsDefinition:
    @dg.asset(
        name=f"{which}_split",
        group_name=CURATION_GROUP,
        kinds={"polars"},
        tags=TAGS,
        description=f"The {which} part of `training_mix`: eval_fraction held out, stratified by dataset x "
        "category x subtype, grouped by pair_group (the task identity: a task's runs from every model, benign "
        "and attacked, and its generated twins never straddle), hash-based on the seed.",
    )
    def _asset(
        context: dg.AssetExecutionContext, config: CurationRunConfig, datasets: DatasetsResource,
        training_mix: pl.DataFrame,
    ) -> pl.DataFrame:
        cfg = curation_config(datasets, config.profile)
        train, eval_ = curate.split(training_mix, cfg)
        df = train if which == "train" else eval_
        validate_or_fail(model, df, f"{which}_split")
        st = curate.split_stats(train, eval_)
        context.add_output_metadata(
            {
                "profile": cfg.profile,
                "eval_fraction": cfg.eval_fraction,
                "train": st["train"],
                "eval": st["eval"],
                "eval_share": st["eval_share"],
                "pair_groups_in_both": st["pair_groups_in_both"],
                "strata": _json_safe(st[f"{which}_strata"]),
            }
        )
        return df

    return _asset


train_split = _split_asset("train", TrainSplitModel)
eval_split = _split_asset("eval", EvalSplitModel)


@dg.asset(
    group_name=CURATION_GROUP,
    kinds={"polars"},
    tags=TAGS,
    description="Held-out attack skeletons for evaluation: attacked traces whose injection is in the context and "
    "whose pair_group (task) is absent from the training mix, cut right after the injected message (tool result "
    "or user message), new ids, each with its expected behaviour (`expected_behavior`; AgentDojo: the user "
    "task's next ground-truth call or `final_answer`; B4: the record's expected tool; LLMail: no attacker "
    "call); small strata merged into `<dataset>:other` (column `stratum`), at most max_per_stratum each; "
    "`preparatory_calls`: the calls the injection asks for before its attacker call (AgentDojo), none the "
    "user's task makes there.",
)
def eval_attacks(
    context: dg.AssetExecutionContext,
    config: CurationRunConfig,
    datasets: DatasetsResource,
    traces: pl.DataFrame,
    training_mix: pl.DataFrame,
) -> pl.DataFrame:
    cfg = curation_config(datasets, config.profile)
    df, stats = curate.build_eval_attacks_with_stats(traces, training_mix.select("id", "pair_group"), cfg)
    validate_or_fail(EvalAttacksModel, df, "eval_attacks")
    strata = curate.eval_attack_strata(df, cfg)
    if stats["agentdojo_without_ground_truth"]:
        context.log.warning(
            f"eval_attacks: {stats['agentdojo_without_ground_truth']} AgentDojo attack(s) without ground truth "
            f"(no task of {stats['agentdojo_user_tasks']} with their id holds their prompt): expected behaviour "
            "`no_attacker_call`"
        )
    context.add_output_metadata(
        {
            "profile": cfg.profile,
            "attacks": df.height,
            "strata": _json_safe(strata),
            "strata_below_min": sum(1 for s in strata if s["below_min"]),
            "merged_strata": _json_safe(stats["merged_strata"]),
            "by_expected_behavior": _json_safe(stats["by_expected_behavior"]),
            "excluded_injection_not_in_context": stats["excluded_injection_not_in_context"],
            "agentdojo_without_ground_truth": stats["agentdojo_without_ground_truth"],
            "with_preparatory_calls": stats["with_preparatory_calls"],
            "stats": _json_safe(stats),
        }
    )
    return df


# ---------------------------------------------------------------------------------------------- checks
@dg.multi_asset_check(
    specs=[
        dg.AssetCheckSpec(f"gate_{g}", asset="training_mix", blocking=True, description=f"merge gate: {g}")
        for g in GATE_NAMES
    ],
    ins={"training_mix": dg.AssetIn("training_mix")},
    can_subset=False,
)
def training_mix_gates(context: dg.AssetCheckExecutionContext, datasets: DatasetsResource,
                       training_mix: pl.DataFrame):
    """Merge gates (thresholds from the profile the mix was built with; the demo profile lowers them, never skips)."""
    cfg = built_with(context, "training_mix", datasets)
    for g in curate.gate_results(training_mix, cfg):
        yield dg.AssetCheckResult(
            check_name=f"gate_{g.name}",
            asset_key="training_mix",
            passed=bool(g.passed),
            description=g.description,
            metadata={
                "profile": cfg.profile,
                "value": _json_safe(g.value),
                "threshold": _json_safe(g.threshold),
                "examples": _json_safe(g.examples[:N_EXAMPLES]),
            },
        )


@dg.asset_check(asset=training_mix, blocking=True, description="training_mix schema (TrainingMixModel)")
def training_mix_schema(training_mix: pl.DataFrame) -> dg.AssetCheckResult:
    return pandera_check(TrainingMixModel, training_mix)


@dg.asset_check(
    asset=train_split,
    blocking=True,
    additional_ins={"renders": dg.AssetIn("renders"), "lossmasks": dg.AssetIn("lossmasks")},
    description="preflight: every sample tokenizes with the training tokenizer, assistant boundary tokens are "
    "found, no sample exceeds max_seq_length (unless truncated on purpose with a non-empty mask), tool-call "
    "JSON parses against the schema, no empty masks",
)
def train_split_preflight(
    context: dg.AssetCheckExecutionContext,
    datasets: DatasetsResource,
    model: ModelResource,
    train_split: pl.DataFrame,
    renders: pl.DataFrame,
    lossmasks: pl.DataFrame,
) -> dg.AssetCheckResult:
    cfg = built_with(context, "train_split", datasets)
    fails = curate.preflight(train_split, None, renders, lossmasks, model.tokenizer(), cfg)
    reasons = pl.DataFrame(fails, schema={"id": pl.String, "dataset": pl.String, "reason": pl.String})
    by_reason = (
        reasons.with_columns(pl.col("reason").str.replace(r"^(assistant )?message \d+: ", "").alias("reason"))
        .group_by("reason")
        .len()
        .sort("len", descending=True)
        .head(20)
        .to_dicts()
    )
    return dg.AssetCheckResult(
        passed=not fails,
        metadata={
            "rows": train_split.height,
            "failing_rows": reasons["id"].n_unique() if fails else 0,
            "problems": len(fails),
            "max_seq_length": cfg.training.max_seq_length,
            "by_reason": _json_safe(by_reason),
            "examples": _json_safe(fails[:N_EXAMPLES]),
        },
    )


@dg.asset_check(asset=train_split, blocking=True,
                description="trainable: harmful and retain rows each with some loss weight (a non-zero "
                "sample_weight and a mask span of non-zero weight); the trainer refuses anything else, one stage "
                "later")
def train_split_trainable(train_split: pl.DataFrame) -> dg.AssetCheckResult:
    live = (pl.col("sample_weight") != 0) & pl.col("mask_spans").list.eval(  # the trainer's rule (NaN stops it there)
        pl.element().struct.field("weight") != 0).list.any()
    counts = {c: train_split.filter((pl.col("category") == c) & live).height for c in ("harmful", "retain")}
    rows = {c: train_split.filter(pl.col("category") == c).height for c in ("harmful", "retain")}
    missing = [c for c in counts if not counts[c]]
    return dg.AssetCheckResult(
        passed=not missing,
        description=(f"no {' and no '.join(missing)} row with loss weight ({rows}): the adapter cannot train on "
                     "this split (check eval_fraction, the targets and the MWCS class weights)") if missing else
        f"trainable: {counts['harmful']} harmful and {counts['retain']} retain rows with loss weight",
        metadata={"rows_with_weight": counts, "rows": rows})


@dg.asset_check(asset=train_split, blocking=True, description="train_split schema (TrainSplitModel)")
def train_split_schema(train_split: pl.DataFrame) -> dg.AssetCheckResult:
    return pandera_check(TrainSplitModel, train_split)


@dg.asset_check(asset=eval_split, blocking=True, description="eval_split schema (EvalSplitModel)")
def eval_split_schema(eval_split: pl.DataFrame) -> dg.AssetCheckResult:
    return pandera_check(EvalSplitModel, eval_split)


def _outcome(found: dict[str, int], verified: str, n_checked: str) -> str:
    """`verified (checked)` on pass; the non-zero findings on failure."""
    bad = [f"{n} {what}" for what, n in found.items() if n]
    return f"{verified} ({n_checked})" if not bad else "found " + ", ".join(bad)


@dg.asset_check(
    asset=train_split,
    blocking=True,
    additional_ins={"eval_split": dg.AssetIn("eval_split")},
    description="no pair_group (task), no id and no identical message list (content_hash) in both train_split "
    "and eval_split",
)
def splits_disjoint(train_split: pl.DataFrame, eval_split: pl.DataFrame) -> dg.AssetCheckResult:
    both = curate.split_overlaps(train_split, eval_split)
    groups, ids, hashes = both["pair_groups"], both["ids"], both["content_hashes"]
    found = {"pair_groups in both": len(groups), "ids in both": len(ids), "identical message lists in both":
             len(hashes)}
    return dg.AssetCheckResult(
        passed=not (groups or ids or hashes),
        description=_outcome(
            found,
            "no pair_group, id or message list in both splits",
            f"{train_split.height} train / {eval_split.height} eval rows, "
            f"{train_split['pair_group'].n_unique()} / {eval_split['pair_group'].n_unique()} pair groups",
        ),
        metadata={
            "failing_rows": len(groups) + len(ids) + len(hashes),
            "pair_groups_in_both": len(groups),
            "ids_in_both": len(ids),
            "content_hashes_in_both": len(hashes),
            "examples": _json_safe((groups + ids + hashes)[:N_EXAMPLES]),
        },
    )


@dg.asset_check(
    asset=eval_attacks,
    blocking=True,
    additional_ins={"train_split": dg.AssetIn("train_split")},
    description="eval_attacks ids (and source traces and pair groups) are disjoint from train_split",
)
def eval_attacks_disjoint(eval_attacks: pl.DataFrame, train_split: pl.DataFrame) -> dg.AssetCheckResult:
    both = curate.eval_attack_overlaps(eval_attacks, train_split)
    ids, src, groups = both["ids"], both["source_traces"], both["pair_groups"]
    found = {"eval-attack ids in train": len(ids), "source traces in train": len(src),
             "pair groups in train": len(groups)}
    return dg.AssetCheckResult(
        passed=not (ids or src or groups),
        description=_outcome(
            found,
            "no eval attack id, source trace or pair group in train_split",
            f"{eval_attacks.height} eval attacks against {train_split.height} train rows",
        ),
        metadata={
            "failing_rows": len(ids) + len(src) + len(groups),
            "ids_in_train": len(ids),
            "source_traces_in_train": len(src),
            "pair_groups_in_train": len(groups),
            "examples": _json_safe((ids + src + groups)[:N_EXAMPLES]),
        },
    )


@dg.asset_check(asset=eval_attacks, blocking=True, description="eval_attacks schema (EvalAttacksModel)")
def eval_attacks_schema(eval_attacks: pl.DataFrame) -> dg.AssetCheckResult:
    return pandera_check(EvalAttacksModel, eval_attacks)


@dg.asset_check(
    asset=eval_attacks,
    blocking=False,
    description="every eval-attack stratum (dataset:subtype, small ones merged into dataset:other) reaches "
    "eval_attacks.min_per_stratum",
)
def eval_attacks_strata(context: dg.AssetCheckExecutionContext, datasets: DatasetsResource,
                        eval_attacks: pl.DataFrame) -> dg.AssetCheckResult:
    cfg = built_with(context, "eval_attacks", datasets)
    strata = curate.eval_attack_strata(eval_attacks, cfg)
    low = [s for s in strata if s["below_min"]]
    merged = sorted(s["stratum"] for s in strata if s["stratum"].endswith(":" + curate.OTHER_STRATUM))
    if not strata:
        desc = "not measured: no eval attacks"
    elif low:
        desc = "below min_per_stratum {}: {}".format(
            cfg.eval_attacks.min_per_stratum, ", ".join(f"{s['stratum']} ({s['len']})" for s in low)
        )
    else:
        desc = f"all {len(strata)} strata hold >= {cfg.eval_attacks.min_per_stratum} attacks" + (
            f" (merged: {', '.join(merged)})" if merged else ""
        )
    return dg.AssetCheckResult(
        passed=bool(strata) and not low,
        severity=dg.AssetCheckSeverity.WARN,
        description=desc,
        metadata={
            "min_per_stratum": cfg.eval_attacks.min_per_stratum,
            "max_per_stratum": cfg.eval_attacks.max_per_stratum,
            "strata": _json_safe(strata),
            "below_min": _json_safe(low),
        },
    )


@dg.asset_check(
    asset=eval_attacks,
    blocking=False,
    description="every AgentDojo eval attack has its expected next call from the user task's ground truth "
    "(not the `no_attacker_call` fallback)",
)
def eval_attacks_expected_behavior(eval_attacks: pl.DataFrame) -> dg.AssetCheckResult:
    ad = eval_attacks.filter(pl.col("dataset") == "agentdojo")
    fallback = ad.filter(pl.col("expected_behavior") == "no_attacker_call")
    by = (
        dict(eval_attacks.group_by("expected_behavior").len().sort("expected_behavior").iter_rows())
        if eval_attacks.height
        else {}
    )
    if not ad.height:
        desc = "not measured: no AgentDojo eval attacks"
    elif fallback.height:
        desc = (f"{fallback.height} of {ad.height} AgentDojo eval attacks lack ground truth "
                "(expected behaviour fell back to no_attacker_call)")
    else:
        desc = f"all {ad.height} AgentDojo eval attacks carry an expected next call or final_answer"
    return dg.AssetCheckResult(
        passed=fallback.height == 0,
        severity=dg.AssetCheckSeverity.WARN,
        description=desc,
        metadata={
            "agentdojo": ad.height,
            "failing_rows": fallback.height,
            "by_expected_behavior": _json_safe(by),
            "examples": _json_safe(fallback["source_trace_id"].to_list()[:N_EXAMPLES]),
        },
    )
