"""ETL_A through Dagster for real: materialize, the CLI subprocess, stop-the-line, validation before write."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

import cb_assets.assets.raw as raw_mod
import cb_core.sources.load as source_load
from support.dagster_helpers import materialize_keys
from cb_core.schemas import make_trace, message, reject
from cb_core.sources import SourceResult

PROJECT_ROOT = Path(__file__).resolve().parents[2]
ETL_A = ["raw_fujitsu_b4", "raw_agentdojo", "raw_llmail_inject", "raw_tau2", "raw_ultrachat", "raw_xstest",
         "traces", "quarantine"]


def _materialize(keys=ETL_A, raise_on_error=True):
    return materialize_keys(keys, raise_on_error=raise_on_error)


def _fake_reader(n_good: int, n_bad: int, category: str = "retain"):
    def read(paths, cfg):
        good = [
            make_trace(dataset="xstest", source_locator=f"{paths[0].name}:{i + 1}", completeness="skeleton",
                       messages=[message("user", f"question {i}")], tools=[], category=category,
                       priority_class="borderline", subtype="t")
            for i in range(n_good)
        ]
        bad = [reject(dataset="xstest", file=paths[0].name, line=n_good + i + 1, field="prompt",
                      reason="missing prompt", raw="{}") for i in range(n_bad)]
        return SourceResult.from_rows(good, bad)
    return read


@pytest.fixture
def xstest_only(data_root, tmp_path, monkeypatch):
    src = tmp_path / "x.csv"
    src.write_text("id,prompt\n")
    monkeypatch.setenv("CB_DATASETS", "xstest")
    monkeypatch.setenv("CB_XSTEST_PATH", str(src))
    return data_root


def test_unselected_sources_are_empty_and_say_so(xstest_only, monkeypatch):
    monkeypatch.setattr(source_load, "get_reader", lambda ds: _fake_reader(5, 0))
    res = _materialize()
    assert res.success
    mats = {e.asset_key.to_user_string(): e.materialization for e in res.get_asset_materialization_events()}
    assert mats["raw_agentdojo"].metadata["selected"].value is False
    assert mats["raw_xstest"].metadata["traces"].value == 5
    assert pl.read_parquet(xstest_only / "traces.parquet").height == 5
    assert pl.read_parquet(xstest_only / "raw_agentdojo.parquet").height == 0


def test_traces_refuses_raw_tables_of_another_selection(xstest_only, monkeypatch):
    """`--select traces` after the raw tables were written under another CB_DATASETS (or by a run that failed
    after emptying the unselected ones) fails naming the sources, instead of silently building that selection."""
    monkeypatch.setattr(source_load, "get_reader", lambda ds: _fake_reader(5, 0))
    assert _materialize().success  # raw tables of CB_DATASETS=xstest: five empty, xstest 5 rows
    before = (xstest_only / "traces.parquet").read_bytes()
    monkeypatch.setenv("CB_DATASETS", "xstest,agentdojo")
    monkeypatch.setenv("CB_AGENTDOJO_PATH", str(xstest_only))
    res = _materialize(["traces"], raise_on_error=False)
    assert not res.success
    msg = str(res.get_step_failure_events()[0].event_specific_data.error)
    assert "['agentdojo'] have an empty raw table" in msg and "--select '+traces'" in msg
    assert (xstest_only / "traces.parquet").read_bytes() == before  # nothing written
    monkeypatch.setenv("CB_DATASETS", "agentdojo")
    res = _materialize(["traces"], raise_on_error=False)
    msg = str(res.get_step_failure_events()[0].event_specific_data.error)
    assert not res.success and "unselected source(s) ['xstest'] still have rows" in msg


def test_stop_the_line_fails_before_write_and_keeps_rejects(xstest_only, monkeypatch):
    monkeypatch.setattr(source_load, "get_reader", lambda ds: _fake_reader(8, 2))  # 20% malformed > 10%
    res = _materialize(raise_on_error=False)
    assert not res.success
    assert not (xstest_only / "raw_xstest.parquet").exists()
    kept = pl.read_parquet(xstest_only / "_failed" / "raw_xstest.rejected.parquet")
    assert kept["reason"].to_list() == ["missing prompt"] * 2 and kept["line"].to_list() == [9, 10]


def test_failing_pandera_validation_keeps_previous_good_tier(xstest_only, monkeypatch):
    monkeypatch.setattr(source_load, "get_reader", lambda ds: _fake_reader(3, 0))
    assert _materialize().success
    before = (xstest_only / "traces.parquet").read_bytes()
    # A "harmful" trace without an attack violates TraceModel: the asset must fail and write nothing.
    monkeypatch.setattr(source_load, "get_reader", lambda ds: _fake_reader(4, 0, category="harmful"))
    res = _materialize(raise_on_error=False)
    assert not res.success
    failures = [e for e in res.all_events if e.event_type_value == "STEP_FAILURE"]
    assert any("TraceModel" in str(e.event_specific_data.error.message) for e in failures)
    assert (xstest_only / "traces.parquet").read_bytes() == before
    assert pl.read_parquet(xstest_only / "raw_xstest.parquet").height == 3


def test_selected_source_without_path_names_env_var(data_root, monkeypatch):
    monkeypatch.setenv("CB_DATASETS", "fujitsu_b4")
    res = _materialize(raise_on_error=False)
    assert not res.success
    msgs = " ".join(str(e.event_specific_data.error.message) for e in res.all_events
                    if e.event_type_value == "STEP_FAILURE")
    assert "CB_FUJITSU_B4_PATH" in msgs


def _expected(shared_data):
    with open(shared_data / "agent_dojo" / "EXPECTED.tsv") as f:
        return {r["file"]: r for r in csv.DictReader(f, delimiter="\t")}


@pytest.mark.slow
@pytest.mark.shared_data
@pytest.mark.parametrize("name", ["agentdojo-meta-llama_Llama-3-70b-chat-hf.jsonl",
                                  "agentdojo-gpt-4o-2024-05-13-transformers_pi_detector (1).jsonl"])
def test_cli_materialize_traces_on_one_agentdojo_file(shared_data, tmp_path, name):
    """The acceptance path: `dagster asset materialize --select '+traces'` as a subprocess, read back."""
    exp = _expected(shared_data)[name]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CB_")}
    env.update(CB_DATASETS="agentdojo", CB_AGENTDOJO_PATH=str(shared_data / "agent_dojo" / name),
               CB_DATA_ROOT=str(tmp_path / "data"), DAGSTER_HOME=str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    out = subprocess.run(
        [sys.executable, "-m", "dagster", "asset", "materialize", "--select", "+traces",
         "-m", "cb_assets.definitions"],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    traces = pl.read_parquet(tmp_path / "data" / "traces.parquet")
    quarantine = pl.read_parquet(tmp_path / "data" / "quarantine.parquet")
    lab = traces["labels"].struct.unnest()
    n_err = int(exp["security_true_attacked"]) - int(exp["with_attacker_call"])
    assert traces.height + quarantine.height == int(exp["traces"])
    # attacked runs that acted on the injection through another tool (pi_detector line 176) are excluded too
    elsewhere = quarantine.filter(pl.col("reason").str.starts_with("acted on the injection through another tool"))
    assert elsewhere.height == (1 if "pi_detector" in name else 0)
    assert quarantine.height == int(exp["empty_messages"]) + n_err + elsewhere.height
    assert lab["injection_reached"].is_not_null().sum() + n_err + elsewhere.height == int(exp["attacked"])
    # harmful = an attacker call after the injection was read (whatever AgentDojo's security says)
    assert lab["attacker_call_made"].sum() == int(exp["attacker_call_after_injection"])
    assert (lab["category"] == "harmful").sum() == int(exp["attacker_call_after_injection"])
    assert set(quarantine["severity"]) <= {"excluded"}  # empty runs and provider errors are policy exclusions
    assert set(traces["dataset"]) == {"agentdojo"}
