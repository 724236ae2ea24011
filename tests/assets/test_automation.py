"""Operations: the source sensor (change / no change / burst / vanished / demo) and the re-validation
schedule + job (a planted bad row in stored `traces` is reported by the checks, nothing is re-materialized)."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from cb_assets import automation as ops
from cb_assets.definitions import defs

RAW_KEYS = {dg.AssetKey(f"raw_{ds}") for ds in ("fujitsu_b4", "agentdojo", "llmail_inject", "tau2",
                                                "ultrachat", "xstest")}


# ------------------------------------------------------------------------------------------- helpers
@pytest.fixture
def instance():
    with dg.instance_for_test() as inst:
        yield inst


@pytest.fixture
def sources(data_root, tmp_path, monkeypatch) -> dict[str, Path]:
    """Two configured sources: agentdojo = one file, xstest = a folder of CSVs (watched as a whole)."""
    src = tmp_path / "sources"
    (src / "xstest").mkdir(parents=True)
    ad = src / "agentdojo.jsonl"
    ad.write_text('{"metadata": {}}\n{"index": 0}\n')
    (src / "xstest" / "xstest_prompts.csv").write_text("id,prompt,type,label\n1,How do I kill a process?,homonyms,safe\n")
    (src / "xstest" / "extra.csv").write_text("id,prompt,type,label\n2,Where can I shoot a photo?,homonyms,safe\n")
    monkeypatch.setenv("CB_AGENTDOJO_PATH", str(ad))
    monkeypatch.setenv("CB_XSTEST_PATH", str(src / "xstest"))
    return {"agentdojo": ad, "xstest_dir": src / "xstest"}


class Ticker:
    """Evaluates the sensor tick after tick, carrying the cursor the way the daemon does."""

    def __init__(self, instance):
        self.instance = instance
        self.cursor: str | None = None
        self.sensor = defs.resolve_sensor_def("source_sensor")

    def tick(self):
        ctx = dg.build_sensor_context(cursor=self.cursor, definitions=defs, instance=self.instance,
                                      sensor_name="source_sensor",
                                      # what the daemon builds: only the resources the sensor requires (the IO
                                      # manager takes the data-root lock, a run's job, not a sensor tick's)
                                      resources={k: defs.resources[k] for k in self.sensor.required_resource_keys})
        data = self.sensor.evaluate_tick(ctx)
        if data.cursor is not None:
            self.cursor = data.cursor
        return data


def _bump(path: Path, text: str) -> None:
    """Change content and make sure mtime moves even on coarse-mtime filesystems."""
    path.write_text(text)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


# ------------------------------------------------------------------------------------------- sensor
def test_sensor_targets_cpu_work_only():
    graph = defs.resolve_asset_graph()
    for key in ops.cpu_downstream([dg.AssetKey("raw_agentdojo")]).resolve(graph):
        assert (graph.get(key).tags or {}).get("cb/compute") != "gpu", key


def test_sensor_first_tick_baseline_then_quiet(sources, instance):
    t = Ticker(instance)
    first = t.tick()
    assert not first.run_requests
    assert "baseline recorded" in first.skip_message
    cur = json.loads(t.cursor)
    assert set(cur["baseline"]) == {"agentdojo", "xstest"}
    assert len(cur["files"]["xstest"]) == 2
    for _ in range(3):  # unchanged sources: never a run
        data = t.tick()
        assert not data.run_requests
        assert "no change" in data.skip_message


def test_sensor_touch_without_content_change_does_not_fire(sources, instance):
    t = Ticker(instance)
    t.tick()
    _bump(sources["agentdojo"], sources["agentdojo"].read_text())  # mtime moves, content same
    for _ in range(3):
        assert not t.tick().run_requests


def test_sensor_fires_once_for_a_changed_file(sources, instance):
    t = Ticker(instance)
    t.tick()  # baseline
    _bump(sources["agentdojo"], '{"metadata": {}}\n{"index": 0}\n{"index": 1}\n')
    pending = t.tick()  # seen, waiting for it to settle
    assert not pending.run_requests and "settle" in pending.skip_message
    fired = t.tick()
    assert len(fired.run_requests) == 1
    req = fired.run_requests[0]
    sel = set(req.asset_selection)
    assert dg.AssetKey("raw_agentdojo") in sel
    assert not (sel & RAW_KEYS) - {dg.AssetKey("raw_agentdojo")}, "other raw assets must not run"
    assert dg.AssetKey("traces") in sel and dg.AssetKey("quarantine") in sel
    graph = defs.resolve_asset_graph()
    expected = ops.cpu_downstream([dg.AssetKey("raw_agentdojo")]).resolve(graph)
    assert sel == expected
    assert all((graph.get(k).tags or {}).get("cb/compute") != "gpu" for k in sel)
    assert {c.asset_key for c in req.asset_check_keys} <= sel
    assert any(c.name == "traces_unique_ids" for c in req.asset_check_keys)
    assert req.run_key and req.tags["cb/changed_sources"] == "agentdojo"
    for _ in range(3):  # fired once: quiet afterwards
        assert not t.tick().run_requests


def test_sensor_sees_a_change_in_a_subfolder(sources, instance):
    """XSTest's completions/ (TAU2's domains/<d>/tasks.json, LLMail's emails/) are read from subfolders of the
    configured folder: an edit there is a change of the source."""
    comp = sources["xstest_dir"] / "completions"
    comp.mkdir()
    (comp / "m.csv").write_text("id,type,prompt,completion,final_label\n")
    t = Ticker(instance)
    t.tick()  # baseline
    assert str(comp / "m.csv") in json.loads(t.cursor)["files"]["xstest"]
    _bump(comp / "m.csv", "id,type,prompt,completion,final_label\nv2-1,homonyms,Q?,A.,1_full_compliance\n")
    t.tick()  # seen, settling
    fired = t.tick()
    assert len(fired.run_requests) == 1 and fired.run_requests[0].tags["cb/changed_sources"] == "xstest"


def test_sensor_burst_yields_one_run(sources, instance):
    t = Ticker(instance)
    t.tick()
    fired = []
    # a burst spread over several ticks: three writes to the folder source, one to the file source
    _bump(sources["xstest_dir"] / "extra.csv", "id,prompt,type,label\n2,a,homonyms,safe\n")
    fired += t.tick().run_requests
    _bump(sources["xstest_dir"] / "extra.csv", "id,prompt,type,label\n2,ab,homonyms,safe\n")
    (sources["xstest_dir"] / "new.csv").write_text("id,prompt,type,label\n3,c,homonyms,safe\n")
    fired += t.tick().run_requests
    _bump(sources["agentdojo"], '{"metadata": {}}\n{"index": 7}\n')
    fired += t.tick().run_requests
    for _ in range(4):  # quiet now: exactly one run for the whole burst
        fired += t.tick().run_requests
    assert len(fired) == 1
    sel = set(fired[0].asset_selection)
    assert {dg.AssetKey("raw_agentdojo"), dg.AssetKey("raw_xstest"), dg.AssetKey("traces")} <= sel
    assert not (sel & RAW_KEYS) - {dg.AssetKey("raw_agentdojo"), dg.AssetKey("raw_xstest")}


def test_sensor_fires_anyway_when_never_settling(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text("1")
    specs = {"agentdojo": str(f)}
    cur, fire, _ = ops.evaluate_sources(None, specs, now=0.0)
    fires = []
    for i in range(1, 6):
        _bump(f, "x" * (i + 1))
        cur, fire, _ = ops.evaluate_sources(cur, specs, now=i * 100.0, max_wait_s=250)
        fires.append(fire)
    assert fires.count(["agentdojo"]) == 1, fires


def test_sensor_vanished_file_is_reported_not_crashed(sources, instance):
    t = Ticker(instance)
    t.tick()
    sources["agentdojo"].unlink()
    for _ in range(3):
        data = t.tick()  # must not raise
        assert not data.run_requests
        assert "agentdojo" in data.skip_message and "matches no file" in data.skip_message
    # one file of a folder source vanishing is a change of that source (reported, then one run)
    (sources["xstest_dir"] / "extra.csv").unlink()
    seen = t.tick()
    assert "vanished" in seen.skip_message
    fired = t.tick()
    assert len(fired.run_requests) == 1
    assert dg.AssetKey("raw_xstest") in fired.run_requests[0].asset_selection
    assert dg.AssetKey("raw_agentdojo") not in fired.run_requests[0].asset_selection
    # the file comes back unchanged: no run (its baseline was kept)
    sources["agentdojo"].write_text('{"metadata": {}}\n{"index": 0}\n')
    for _ in range(2):
        assert not t.tick().run_requests


def test_sensor_skips_in_demo_mode(data_root, instance):
    data = Ticker(instance).tick()
    assert not data.run_requests
    assert "demo mode" in data.skip_message


# ------------------------------------------------------------------------------------------- re-validation
def test_schedule_defaults():
    sched = defs.resolve_schedule_def("revalidate_daily")
    assert sched.default_status == dg.DefaultScheduleStatus.RUNNING
    assert sched.job_name == "revalidate"
    assert sched.cron_schedule == ops.REVALIDATE_CRON
    job = defs.resolve_job_def("revalidate")
    graph = defs.resolve_asset_graph()
    assert set(job.asset_layer.asset_graph.asset_check_keys) >= set(graph.asset_check_keys)


def test_revalidate_cron_env_override(monkeypatch):
    assert ops.revalidate_cron()[0] == ops.REVALIDATE_CRON
    monkeypatch.setenv("CB_REVALIDATE_CRON", "*/5 * * * *")
    monkeypatch.setenv("CB_REVALIDATE_TIMEZONE", "Europe/Berlin")
    assert ops.revalidate_cron() == ("*/5 * * * *", "Europe/Berlin")
    monkeypatch.setenv("CB_REVALIDATE_CRON", "bogus")  # Dagster's own error named no variable
    with pytest.raises(ops.ConfigError, match="CB_REVALIDATE_CRON: 'bogus' is not a cron schedule"):
        ops.revalidate_cron()


def test_revalidate_timezone_checked(monkeypatch, tmp_path):
    """A bad time zone names the variable (or the file and key), not Dagster's 'Invalid execution timezone'."""
    monkeypatch.setenv("CB_REVALIDATE_TIMEZONE", "Mars/Base")
    with pytest.raises(ops.ConfigError, match="CB_REVALIDATE_TIMEZONE: 'Mars/Base' is not a time zone"):
        ops.revalidate_cron()
    monkeypatch.delenv("CB_REVALIDATE_TIMEZONE")
    (tmp_path / "operations.yaml").write_text("revalidate:\n  timezone: Europe/Nowhere\n")
    monkeypatch.setenv("CB_CONFIG_DIR", str(tmp_path))  # revalidate_cron reads only operations.yaml
    with pytest.raises(ops.ConfigError, match=r"operations.yaml:2: revalidate.timezone \(or \$CB_REVALIDATE_TIMEZONE\): "
                                              r"'Europe/Nowhere' is not a time zone"):
        ops.revalidate_cron()


def _xstest_source(tmp_path: Path, n: int = 12) -> Path:
    d = tmp_path / "xstest_src"
    d.mkdir()
    rows = ["id,prompt,type,label"] + [f"{i},How do I kill a python process number {i}?,homonyms,safe"
                                       for i in range(1, n + 1)]
    (d / "xstest_prompts.csv").write_text("\n".join(rows) + "\n")
    return d


def test_revalidate_reports_planted_bad_row(data_root, tmp_path, monkeypatch, instance):
    monkeypatch.setenv("CB_DATASETS", "xstest")
    monkeypatch.setenv("CB_XSTEST_PATH", str(_xstest_source(tmp_path)))
    graph = defs.resolve_asset_graph()
    etl_a = dg.AssetSelection.assets("traces", "quarantine").upstream().resolve(graph)
    built = defs.resolve_implicit_global_asset_job_def().get_subset(asset_selection=etl_a).execute_in_process(
        instance=instance
    )
    assert built.success
    schedule = defs.resolve_schedule_def("revalidate_daily")
    # every check passes on what was just written
    ok_run = _run_schedule(schedule, instance)
    assert ok_run.success
    assert all(e.passed for e in ok_run.get_asset_check_evaluations())

    path = data_root / "traces.parquet"
    good = pl.read_parquet(path)
    assert good.height == 12
    bad = good.head(1).with_columns(
        pl.col("labels").struct.with_fields(
            pl.lit(True).alias("attack_succeeded"), pl.lit(False).alias("attack_present")
        )
    )
    pl.concat([good, bad]).write_parquet(path)  # planted: duplicate id + succeeded-but-not-attacked
    mtime_before = path.stat().st_mtime_ns

    run = _run_schedule(schedule, instance)
    assert not run.success  # blocking checks failed -> the run is red in the UI
    evals = {e.check_name: e for e in run.get_asset_check_evaluations()}
    assert {"traces_unique_ids", "traces_label_sanity", "traces_schema"} <= set(evals)
    assert evals["traces_unique_ids"].passed is False
    assert evals["traces_unique_ids"].metadata["failing_rows"].value == 2  # both copies of the id
    sanity = evals["traces_label_sanity"]
    assert sanity.passed is False and sanity.metadata["failing_rows"].value == 1
    examples = sanity.metadata["examples"].value
    assert examples and examples[0]["id"] == good["id"][0]
    assert evals["traces_schema"].passed is False
    assert evals["traces_schema"].metadata["failing_rows"].value >= 1
    # checks only: nothing was re-materialized, the stored file is untouched
    mats = [e for e in run.all_events if e.event_type_value == "ASSET_MATERIALIZATION"]
    assert not mats
    assert path.stat().st_mtime_ns == mtime_before
    # the results are in the instance, where the UI reads them
    rec = instance.event_log_storage.get_latest_asset_check_execution_by_key(
        [dg.AssetCheckKey(dg.AssetKey("traces"), "traces_unique_ids")]
    )
    assert rec[dg.AssetCheckKey(dg.AssetKey("traces"), "traces_unique_ids")].status.value == "FAILED"


def test_revalidate_skips_when_nothing_materialized(data_root, instance):
    schedule = defs.resolve_schedule_def("revalidate_daily")
    ctx = dg.build_schedule_context(instance=instance, repository_def=defs.get_repository_def())
    data = schedule.evaluate_tick(ctx)
    assert not data.run_requests and "nothing to re-validate" in data.skip_message


def _run_schedule(schedule, instance):
    """Evaluate the schedule tick and execute its run request the way the daemon would (job subset)."""
    ctx = dg.build_schedule_context(instance=instance, repository_def=defs.get_repository_def())
    data = schedule.evaluate_tick(ctx)
    assert data.run_requests, data.skip_message
    (req,) = data.run_requests
    assert not req.asset_selection and req.asset_check_keys
    job = defs.resolve_job_def(schedule.job_name).get_subset(
        asset_selection=set(), asset_check_selection=set(req.asset_check_keys)
    )
    return job.execute_in_process(instance=instance, raise_on_error=False, tags=req.tags)


# ------------------------------------------------------------------------------------------- issue 14 operations
def test_source_sensor_runs_by_default_and_its_target_reads_as_words():
    assert ops.source_sensor.default_status == dg.DefaultSensorStatus.RUNNING
    assert ops.source_sensor.job_name == "source_refresh"  # the UI shows the job's name, not a selection formula
    graph = defs.resolve_asset_graph()
    keys = ops.source_refresh_job.selection.resolve(graph)
    assert dg.AssetKey("raw_agentdojo") in keys and dg.AssetKey("train_split") in keys
    for key in keys:
        node = graph.get(key)
        assert (node.tags or {}).get("cb/compute") != "gpu" and node.group_name != "sweeps", key
    # every request the sensor can make is a subset of its job
    for ds in ("agentdojo", "xstest"):
        assert ops.cpu_downstream([ops.raw_key(ds)]).resolve(graph) <= keys


def test_default_running_source_sensor_is_inert_on_demo(data_root, instance):
    ctx = dg.build_sensor_context(instance=instance, repository_def=defs.get_repository_def(),
                                  resources={"datasets": defs.resources["datasets"]})
    out = ops.source_sensor(ctx)
    assert isinstance(out, dg.SkipReason) and "demo mode" in out.skip_message


def test_watchdog_and_sweep_sensor_inert_without_slurm_or_sweep(data_root, instance):
    from cb_assets.assets.sweeps import sweep_sensor

    assert ops.slurm_watchdog.default_status == dg.DefaultSensorStatus.RUNNING
    out = ops.slurm_watchdog(dg.build_sensor_context(instance=instance))
    assert "not SlurmRunLauncher" in out.skip_message
    out = sweep_sensor(dg.build_sensor_context(instance=instance))
    assert "no sweep registered" in out.skip_message
