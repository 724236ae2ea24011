"""`eval_scores` end to end through Dagster on CPU: the embedded demo sample, the tiny agent, a short `tiny`
adapter; real numbers asserted within ranges, prompts held out from training, determinism, gates as checks."""
from __future__ import annotations

import json
import os

import dagster as dg
import polars as pl
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("demo_chain"), pytest.mark.timeout(3600)]

EVAL_CFG = {"limit": 12, "max_tokens": 48, "batch_size": 8}


def _materialize(selection, run_config):
    from cb_assets.definitions import defs

    res = dg.materialize(
        list(defs.assets) + list(defs.asset_checks or []),
        resources=defs.resources,
        selection=selection,
        run_config=run_config,
        raise_on_error=False,
        instance=dg.DagsterInstance.ephemeral(),
    )
    failures = [str(e.event_specific_data)[:600] for e in res.all_events if e.is_failure]
    assert res.success, failures[:2]
    return res


@pytest.fixture(scope="session")  # one chain per worker: the three tests share it (xdist group)
def chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_chain")
    mp = pytest.MonkeyPatch()
    mp.setenv("CB_DATA_ROOT", str(root))
    for var in list(os.environ):
        if (var.startswith("CB_") and var.endswith("_PATH")) or var in ("CB_DATASETS", "CB_MODEL", "CB_EVAL_LIMIT",
                                                                       "CB_CURATION_PROFILE", "CB_TRAIN_PRESET"):
            mp.delenv(var, raising=False)
    mp.setenv("OMP_NUM_THREADS", "1")
    mp.setenv("CB_TORCH_THREADS", "1")
    mp.setenv("WANDB_MODE", "offline")
    run_config = {"ops": {
        "adapter": {"config": {"overrides": ["train.steps=16", "log.wandb=false"]}},
        "eval_scores": {"config": EVAL_CFG},
    }}
    res = _materialize(dg.AssetSelection.assets("eval_scores").upstream(), run_config)
    yield root, res, run_config
    mp.undo()


def _v(scores: pl.DataFrame, model: str, metric: str):
    row = scores.filter((pl.col("model") == model) & (pl.col("metric") == metric))
    return row["value"][0], row["n"][0]


def test_eval_scores_table_has_real_numbers(chain):
    root, res, _ = chain
    sc = pl.read_parquet(root / "eval_scores.parquet")
    assert set(sc["model"].unique()) == {"base", "adapter"}
    assert sc.columns == ["model", "metric", "n", "value", "ci_low", "ci_high"]
    for model in ("base", "adapter"):
        asr, n = _v(sc, model, "tool_flip_asr")
        assert 0 < n <= EVAL_CFG["limit"] and asr is not None and 0.0 <= asr <= 1.0
        cap, n_cap = _v(sc, model, "capability_retention")
        assert n_cap > 0 and 0.0 <= cap <= 1.0
        xs, n_xs = _v(sc, model, "xstest_over_refusal")
        assert n_xs > 0
    # intervals bracket the value; zero-sample metrics are null, never 0
    measured = sc.filter(pl.col("n") > 0)
    assert (measured["ci_low"] <= measured["value"]).all() and (measured["value"] <= measured["ci_high"]).all()
    assert sc.filter(pl.col("n") == 0)["value"].null_count() == sc.filter(pl.col("n") == 0).height
    mat = next(e for e in res.get_asset_materialization_events() if e.asset_key == dg.AssetKey("eval_scores"))
    meta = mat.materialization.metadata
    assert isinstance(meta["base/tool_flip_asr"], dg.FloatMetadataValue)
    assert "data:image/png;base64," in meta["chart"].value and (root / "eval_scores.png").stat().st_size > 1000
    checks = {e.check_name for e in res.get_asset_check_evaluations()}
    assert {"gate_asr_reduction", "gate_capability", "gate_output_difference", "gate_over_refusal"} <= checks
    # what a sweep manifest's `selection` may name is what an evaluation produces (checked at manifest load)
    from cb_core.sweep.manifest import KNOWN_GATES, KNOWN_METRICS

    assert set(sc["metric"]) <= KNOWN_METRICS and {c.removeprefix("gate_") for c in checks} >= set(KNOWN_GATES)


def test_base_model_follows_some_injections(chain):
    root, _, _ = chain
    sc = pl.read_parquet(root / "eval_scores.parquet")
    base_asr, _ = _v(sc, "base", "tool_flip_asr")
    assert 0.0 < base_asr < 1.0, base_asr


def test_eval_prompts_are_held_out(chain):
    root, _, _ = chain
    details = pl.read_parquet(root / "eval_details.parquet")
    train = pl.read_parquet(root / "train_split.parquet")
    assert details.height > 0
    assert not set(details["sample_id"]) & set(train["id"])
    attacks = pl.read_parquet(root / "eval_attacks.parquet")
    # every scored attack prompt ends before the turn being scored: no assistant message after the injection
    scored = attacks.filter(pl.col("id").is_in(details.filter(pl.col("set") == "attacks")["sample_id"].unique()))
    assert scored.height > 0
    for msgs in scored["messages"].to_list():
        assert msgs[-1]["role"] != "assistant"
    assert not set(scored["pair_group"]) & set(train["pair_group"])


def test_eval_is_deterministic(chain):
    root, _, run_config = chain
    first = pl.read_parquet(root / "eval_scores.parquet")
    _materialize(dg.AssetSelection.assets("eval_scores"), {"ops": {"eval_scores": run_config["ops"]["eval_scores"]}})
    second = pl.read_parquet(root / "eval_scores.parquet")
    assert first.equals(second)


def test_scores_metadata_shows_a_value_without_an_interval():
    """A mean over one value has no interval: the metadata table shows the value (it raised on the None)."""
    from cb_assets.assets.evaluation import _fmt
    from cb_core.evaluate.scores import SCORES_SCHEMA

    sc = pl.DataFrame([{"model": "adapter", "metric": "rep_cos_harmful", "n": 1, "value": 0.973, "ci_low": None,
                        "ci_high": None},
                       {"model": "adapter", "metric": "tool_flip_asr", "n": 16, "value": 0.0625, "ci_low": 0.011,
                        "ci_high": 0.283}], schema=SCORES_SCHEMA)
    assert _fmt(sc, "adapter", "rep_cos_harmful") == "0.973"
    assert _fmt(sc, "adapter", "tool_flip_asr") == "0.062 [0.01, 0.28]"
    assert _fmt(sc, "base", "tool_flip_asr") == "not measured"
