"""Dagster layer of Tier C: materialize the curation assets on hand-built upstream Parquet files (and, marked
slow, the whole chain on the embedded demo sample), then read the invariants back from the Parquet files."""
from __future__ import annotations

import json

import dagster as dg
import polars as pl
import pytest

from cb_assets.assets import curation
from cb_assets.io_manager import ParquetIOManager
from cb_assets.resources import DatasetsResource, ModelResource
from cb_core import curate
from core.test_curate import _generated, make_renders_and_masks, make_traces

CURATION_KEYS = ["training_mix", "train_split", "eval_split", "eval_attacks"]
CHECKS = [
    curation.training_mix_gates,
    curation.training_mix_schema,
    curation.train_split_preflight,
    curation.train_split_trainable,
    curation.train_split_schema,
    curation.eval_split_schema,
    curation.splits_disjoint,
    curation.eval_attacks_disjoint,
    curation.eval_attacks_schema,
    curation.eval_attacks_strata,
    curation.eval_attacks_expected_behavior,
]
ASSETS = [curation.training_mix, curation.train_split, curation.eval_split, curation.eval_attacks]
UPSTREAM = [dg.AssetSpec(k) for k in ("traces", "renders", "lossmasks", "ds_completions", "dr_completions", "adversarial_safe")]


def _training_default() -> dict[str, str]:
    from cb_core.lossmask import LossmaskConfig

    return dict(LossmaskConfig.load().training_default)


@pytest.fixture(scope="module")
def upstream_frames():
    from cb_core.tokenizer import tokenizer_id

    traces, gen = make_traces()
    renders, lossmasks = make_renders_and_masks(pl.concat([traces, gen]), policies=tuple(
        sorted(set(_training_default().values()))))
    tok_id = tokenizer_id(ModelResource().tokenizer())
    return traces, _generated(gen), renders.with_columns(pl.lit(tok_id).alias("tokenizer_id")), lossmasks


@pytest.fixture
def upstream(data_root, upstream_frames, monkeypatch):
    monkeypatch.delenv("CB_CURATION_PROFILE", raising=False)
    monkeypatch.delenv("CB_MODEL", raising=False)
    traces, generated, renders, lossmasks = upstream_frames
    traces.write_parquet(data_root / "traces.parquet")
    renders.write_parquet(data_root / "renders.parquet")
    lossmasks.write_parquet(data_root / "lossmasks.parquet")
    for name, df in generated.items():
        df.write_parquet(data_root / f"{name}.parquet")
    return data_root


def _materialize():
    return dg.materialize(
        [*UPSTREAM, *ASSETS, *CHECKS],
        resources={"io_manager": ParquetIOManager(), "datasets": DatasetsResource(), "model": ModelResource()},
        raise_on_error=False,
        instance=dg.DagsterInstance.ephemeral(),
    )


def _checks(res) -> dict[str, bool]:
    return {e.check_name: e.passed for e in res.get_asset_check_evaluations()}


def _evaluation(res, name: str):
    return next(e for e in res.get_asset_check_evaluations() if e.check_name == name)


def _assert_invariants(root):
    mix = pl.read_parquet(root / "training_mix.parquet")
    train = pl.read_parquet(root / "train_split.parquet")
    eval_ = pl.read_parquet(root / "eval_split.parquet")
    attacks = pl.read_parquet(root / "eval_attacks.parquet")
    stats = json.loads((root / "training_mix.stats.json").read_text())
    assert train.height > 0 and eval_.height > 0 and attacks.height > 0
    assert train.height + eval_.height == mix.height == stats["total"]
    assert set(train["pair_group"]).isdisjoint(set(eval_["pair_group"]))
    assert set(attacks["id"]).isdisjoint(set(train["id"]))
    assert set(attacks["source_trace_id"]).isdisjoint(set(train["id"]))
    assert set(attacks["pair_group"]).isdisjoint(set(mix["pair_group"]))
    assert set(train["content_hash"]).isdisjoint(set(eval_["content_hash"]))
    assert set(attacks["expected_behavior"]) <= set(curate.EXPECTED_BEHAVIORS)
    assert all(m[-1]["role"] in ("tool", "user") for m in attacks["messages"].to_list())
    assert mix["id"].is_unique().all() and mix["content_hash"].is_unique().all()
    assert sum(r["n"] for r in stats["by_dataset_category_class"]) == stats["total"]
    assert stats["harmful"] + stats["retain"] == stats["total"]
    return mix, train, eval_, attacks, stats


def test_materialize_curation_on_hand_built_upstream(upstream):
    res = _materialize()
    assert res.success, [str(e.event_specific_data) for e in res.all_events if e.is_failure][:3]
    checks = _checks(res)
    assert {f"gate_{g}" for g in curation.GATE_NAMES} <= set(checks)
    assert all(checks.values()), checks
    mix, train, eval_, attacks, stats = _assert_invariants(upstream)
    assert stats["profile"] == "demo"  # no source path configured: the demo profile
    assert stats["lossmask_policy"] == _training_default()  # configs/lossmask.yaml training_default
    assert set(mix["policy"]) == set(_training_default().values())
    assert stats["sources_missing"] == ["llmail_inject"]
    meta = res.asset_materializations_for_node("training_mix")[0].metadata
    assert meta["harmful"].value == stats["harmful"] and meta["profile"].value == "demo"
    # attacked skeletons cut right after the injection, each with its expected behaviour
    assert (attacks["completeness"] == "skeleton").all()
    assert all(m[-1]["role"] != "assistant" for m in attacks["messages"].to_list())
    assert set(attacks["dataset"]) == {"agentdojo", "fujitsu_b4"}
    ad = attacks.filter(pl.col("dataset") == "agentdojo")
    # the shipped ground truth names the synthetic user tasks' next call (none falls back)
    assert ad.height and (ad["expected_behavior"] != "no_attacker_call").all()
    assert ad["tool_attack"].struct.field("expected_tool").is_not_null().all()
    ea_meta = res.asset_materializations_for_node("eval_attacks")[0].metadata
    assert ea_meta["attacks"].value == attacks.height and ea_meta["agentdojo_without_ground_truth"].value == 0
    # stats.json carries the retain filter and the twins' inherited groups
    assert stats["retain_failed_task_excluded"]["total"] > 0
    assert stats["generated_pair_groups"]["parent_not_found"] == 0
    # checks say what they verified
    assert _evaluation(res, "splits_disjoint").description.startswith("no pair_group, id or message list")
    assert "adversarial-safe samples" in _evaluation(res, "gate_adversarial_safe_count").description
    assert "carry an expected next call" in _evaluation(res, "eval_attacks_expected_behavior").description

    # same config -> byte-identical split files
    before = {k: (upstream / f"{k}.parquet").read_bytes() for k in ("train_split", "eval_split", "eval_attacks")}
    assert _materialize().success
    after = {k: (upstream / f"{k}.parquet").read_bytes() for k in before}
    assert before == after


def test_blocking_gate_failure_stops_train_split(upstream, monkeypatch):
    monkeypatch.setenv("CB_CURATION_PROFILE", "default")  # 400 adversarial-safe and Dr:Ds 4.0: not met here
    res = _materialize()
    assert not res.success
    checks = _checks(res)
    assert checks["gate_adversarial_safe_count"] is False
    ev = _evaluation(res, "gate_adversarial_safe_count")
    assert "below the required 400" in ev.description  # says what was found
    assert checks["gate_no_duplicate_ids"] is True
    assert (upstream / "training_mix.parquet").exists()  # the mix is written (gates check stored data)
    assert not (upstream / "train_split.parquet").exists()
    assert not (upstream / "eval_split.parquet").exists()
    assert "train_split" not in {e.asset_key.to_user_string() for e in res.get_asset_materialization_events()}


def test_profile_from_run_config_reaches_the_gates(upstream):
    """The curation profile set in the run config (no env var) builds the mix, and the gate checks judge it with
    that profile's thresholds (read back from the materialization), not the run's default (`demo` here)."""
    res = dg.materialize(
        [*UPSTREAM, *ASSETS, *CHECKS],
        resources={"io_manager": ParquetIOManager(), "datasets": DatasetsResource(), "model": ModelResource()},
        run_config={"ops": {"training_mix": {"config": {"profile": "default"}}}},
        raise_on_error=False, instance=dg.DagsterInstance.ephemeral(),
    )
    mat = next(e for e in res.get_asset_materialization_events() if e.asset_key.to_user_string() == "training_mix")
    assert mat.materialization.metadata["profile"].value == "default"
    checks = _checks(res)
    assert checks["gate_adversarial_safe_count"] is False  # default's 400, not demo's threshold
    assert "below the required 400" in _evaluation(res, "gate_adversarial_safe_count").description
    assert not (upstream / "train_split.parquet").exists()


def test_preflight_failure_is_blocking(upstream, upstream_frames):
    traces, generated, renders, lossmasks = upstream_frames
    # renders made with another tokenizer: preflight fails on every sample
    renders.with_columns(pl.lit("other-tokenizer").alias("tokenizer_id")).write_parquet(upstream / "renders.parquet")
    res = _materialize()
    checks = _checks(res)
    assert checks["train_split_preflight"] is False
    ev = next(e for e in res.get_asset_check_evaluations() if e.check_name == "train_split_preflight")
    assert ev.metadata["failing_rows"].value > 0
    assert "other-tokenizer" in json.dumps(ev.metadata["by_reason"].value)


def test_train_split_without_a_weighted_class_is_not_trainable():
    """An eval_fraction of 0.95 left 4 retain rows and no harmful one, and every check passed; the trainer then
    failed one stage later."""
    span = [{"token_start": 0, "token_end": 4, "weight": 1.0}]
    df = pl.DataFrame({"id": ["a", "b", "c"], "category": ["retain", "retain", "harmful"],
                       "sample_weight": [1.0, 1.0, 0.0], "mask_spans": [span, span, span]})
    res = curation.train_split_trainable(train_split=df)
    assert res.passed is False and "no harmful row with loss weight" in res.description
    assert res.metadata["rows"].value == {"harmful": 1, "retain": 2}
    ok = df.with_columns(pl.lit(1.0).alias("sample_weight"))
    assert curation.train_split_trainable(train_split=ok).passed is True


@pytest.mark.slow
def test_whole_chain_on_demo_sample(data_root, monkeypatch):
    """raw -> traces -> renders -> lossmasks -> curation on the embedded demo sample (real components)."""
    monkeypatch.delenv("CB_CURATION_PROFILE", raising=False)
    monkeypatch.delenv("CB_MODEL", raising=False)
    from cb_assets.definitions import defs

    wanted = dg.AssetSelection.assets(*CURATION_KEYS).upstream()
    res = dg.materialize(
        list(defs.assets) + list(defs.asset_checks or []),
        resources=defs.resources,
        selection=wanted,
        raise_on_error=False,
        instance=dg.DagsterInstance.ephemeral(),
    )
    failures = [str(e.event_specific_data)[:500] for e in res.all_events if e.is_failure]
    assert res.success, failures[:3]
    checks = _checks(res)
    # WARN-only checks: the demo's few attacks per stratum, and its AgentDojo runs, whose prompts are synthetic
    # and whose task ids are drawn at random: a trace is taken for a benchmark task only when it holds that
    # task's prompt, so those (and only those) have no expected call (no_attacker_call), never another task's
    warn_only = {"eval_attacks_strata", "eval_attacks_expected_behavior"}
    assert all(v for k, v in checks.items() if k not in warn_only), checks
    _, _, _, attacks, _ = _assert_invariants(data_root)
    user_tasks, _ = curate.load_user_tasks(curate.load_curation_config("demo"))
    ad = attacks.filter(pl.col("dataset") == "agentdojo")
    assert ad.height
    for g, b, msgs in zip(ad["pair_group"].to_list(), ad["expected_behavior"].to_list(), ad["messages"].to_list()):
        suite, task = g.split(":")[1:]
        prompt = next(m["content"] for m in msgs if m["role"] == "user").strip()
        is_task = any(((v.get(suite) or {}).get(task) or {}).get("prompt", "").strip() == prompt
                      for v in user_tasks.values())
        assert (b == "no_attacker_call") == (not is_task), g
