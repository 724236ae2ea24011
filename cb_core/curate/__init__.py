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

One module per step (config, features, mix, gates, splits, eval_attacks, preflight_checks); this package
re-exports their public names, so callers write `curate.build_training_mix(...)`.
"""
from __future__ import annotations

from cb_core.config import ConfigError  # noqa: F401  (what a bad profile raises)
from cb_core.schemas import (  # noqa: F401  (the Tier C contracts, re-exported for curate's callers)
    EVAL_ATTACK_SCHEMA,
    EXPECTED_BEHAVIORS,
    FINAL_ANSWER,
    MIX_EXTRA_SCHEMA,
    MIX_SCHEMA,
    EvalAttacksModel,
    EvalSplitModel,
    TrainingMixModel,
    TrainSplitModel,
)
from cb_core.curate.config import (  # noqa: F401
    CONFIG_FILE,
    PROFILE_ENV,
    CurationConfig,
    EvalAttackConfig,
    GateConfig,
    TrainingConfig,
    load_curation_config,
    resolve_profile,
)
from cb_core.curate.features import (  # noqa: F401
    adversarial_safe_expr,
    content_hash,
    cut_after_injection,
    hash_unit,
    injection_in_context,
    message_content,
    reserved_attack_groups,
    trace_features,
)
from cb_core.curate.mix import (  # noqa: F401
    build_training_mix,
    inherit_parent_groups,
    mix_stats,
)
from cb_core.curate.gates import (  # noqa: F401
    GATE_NAMES,
    GateResult,
    gate_results,
)
from cb_core.curate.splits import (  # noqa: F401
    assign_split,
    eval_attack_overlaps,
    split,
    split_overlaps,
    split_stats,
)
from cb_core.curate.eval_attacks import (  # noqa: F401
    EVAL_ATTACK_ID_VERSION,
    OTHER_STRATUM,
    agentdojo_ground_truth,
    agentdojo_task_key,
    agentdojo_user_task,
    build_eval_attacks,
    build_eval_attacks_with_stats,
    calls_left,
    eval_attack_strata,
    injection_ground_truth,
    injection_task_id,
    load_injection_tasks,
    load_user_tasks,
    next_expected_call,
    preparatory_calls,
)
from cb_core.curate.preflight_checks import (  # noqa: F401
    DEFAULT_END_IDS,
    preflight,
)
