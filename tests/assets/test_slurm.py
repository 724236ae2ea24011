"""SlurmRunLauncher against a real single-node SLURM (scripts/slurm_local.sh), runs submitted as the UI does."""
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cb_core import slurm
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `tests.*` importable under plain `pytest`

# Registered as a plugin (not imported into each module) so the session-scoped `slurm_cluster`
# fixture starts one cluster for all SLURM test modules.
pytest_plugins = ["tests.support.slurm_fixtures"]

# `slurm` marks the tests whose fixtures reach the cluster (tests/conftest.py); the rest run anywhere.

# --- pure helpers (no cluster) ---------------------------------------------------------------------


def test_tag_values_validated_and_decoded():
    assert slurm.options_from_tags({"slurm/gres": "gpu.1", "slurm/time": "04.00.00", "cb/compute": "gpu"}) == {
        "gres": "gpu:1", "time": "04:00:00"}
    assert slurm.options_from_tags({"slurm/gres": "gpu:a100:2", "slurm/mem": "32G", "slurm/cpus": "8"}) == {
        "gres": "gpu:a100:2", "mem": "32G", "cpus": "8"}
    assert slurm.options_from_tags({"slurm/gpus": "2"}) == {"gres": "gpu:2"}
    assert slurm.options_from_tags({"slurm/gpus": "2", "slurm/gres": "gpu.1"}) == {"gres": "gpu:1"}
    for bad in ({"slurm/gres": "gpu:1; touch /tmp/x"}, {"slurm/time": "1:00\n#SBATCH --uid=0"},
                {"slurm/partition": "$(touch /tmp/x)"}, {"slurm/mem": "1G --wrap=x"}, {"slurm/cpus": "0"},
                {"slurm/bogus": "1"}):
        with pytest.raises(slurm.SlurmOptionError):
            slurm.options_from_tags(bad)
    with pytest.raises(slurm.SlurmOptionError, match="different values"):
        slurm.merge_tag_options([{"slurm/gres": "gpu.1"}, {"slurm/gres": "gpu.2"}])
    # one job runs the assets in turn, so their time requests add up (generation 4 h + training 8 h)
    assert slurm.merge_tag_options([{"slurm/time": "04.00.00"}, {"slurm/time": "08.00.00"}])["time"] == "12:00:00"
    assert slurm.merge_tag_options([{"slurm/time": "20.00.00"}, {"slurm/time": "300"}])["time"] == "1-01:00:00"
    assert slurm.slurm_minutes("1-02:03:04") == 1564 and slurm.slurm_minutes("45") == 45
    defaults = slurm.SlurmOptions(partition="p", time="01:00:00", gres="gpu:1")
    assert defaults.overlay({"gres": "none", "time": "02:00:00"}).directives() == ["--partition=p", "--time=02:00:00"]


def test_dagster_rejects_colons_in_asset_tags():
    """Why asset tags spell ':' as '.': Dagster 1.13 asset tag values allow only [A-Za-z0-9_.-]."""
    import dagster as dg

    with pytest.raises(dg.DagsterInvalidDefinitionError):
        @dg.asset(tags={"slurm/gres": "gpu:1"})
        def _bad():
            return 1


def test_batch_script_is_inert(tmp_path):
    """Working dir, env values and argv with shell metacharacters are passed through literally."""
    evil_dir = tmp_path / "wd; touch PWNED_WD"
    evil_dir.mkdir()
    marker = tmp_path / "PWNED"
    script = slurm.build_batch_script(
        ["printf", "%s|", f"a; touch {marker}", f"$(touch {marker})", f"`touch {marker}`"],
        slurm.SlurmOptions(gres="gpu:1", time="00:01:00"),
        working_directory=evil_dir,
        env={"EVIL": f"$(touch {marker})", "B": "x'y\"z"},
    )
    assert "#SBATCH --gres=gpu:1" in script
    assert shlex.quote(f"a; touch {marker}") in script
    p = tmp_path / "s.sh"
    p.write_text(script)
    out = subprocess.run(["bash", str(p)], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"a; touch {marker}|$(touch {marker})|`touch {marker}`|"
    assert not marker.exists() and not (tmp_path / "PWNED_WD").exists() and not (evil_dir / "PWNED_WD").exists()


def test_job_state_falls_back_to_jobcomp_when_aged_out(monkeypatch, tmp_path):
    jobcomp = tmp_path / "jobcomp.txt"
    jobcomp.write_text("JobId=41 UserId=root(0) JobState=COMPLETED ExitCode=0:0\n"
                       "JobId=42 UserId=root(0) JobState=CANCELLED ExitCode=0:15\n")
    real_run = slurm._run

    def fake_run(args, **kw):
        if args[0] in ("squeue", "scontrol"):
            return subprocess.CompletedProcess(args, 1, "", "slurm_load_jobs error: Invalid job id specified")
        if args[0] == "sacct":
            return subprocess.CompletedProcess(args, 1, "", "sacct: error: jobcomp not readable")
        return real_run(args, **kw)

    monkeypatch.setattr(slurm, "_run", fake_run)
    st = slurm.job_state("42", jobcomp_path=jobcomp)
    assert (st.raw, st.status, st.source) == ("CANCELLED", "failed", "jobcomp")
    assert slurm.job_state("41", jobcomp_path=jobcomp).status == "success"
    assert slurm.job_state("43", jobcomp_path=jobcomp).status == "not_found"

    def down(args, **kw):
        return subprocess.CompletedProcess(args, 1, "", "Unable to contact slurm controller (connect failure)")

    monkeypatch.setattr(slurm, "_run", down)
    st = slurm.job_state("42")
    assert st.status == "unknown" and st.source == "error"


# --- real cluster ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def env(slurm_cluster, tmp_path_factory):
    from cb_assets.testing.slurm import launcher_env

    with launcher_env(tmp_path_factory.mktemp("dagster_home")) as e:
        yield e


def _squeue_active(cluster) -> set[str]:
    return set(cluster.cmd("squeue", "-h", "-o", "%i").stdout.split())


def _gone(cluster, job_id: str, timeout: float = 20) -> bool:
    """True once the job has left squeue's active list (pending/running/completing)."""
    deadline = time.monotonic() + timeout
    while job_id in _squeue_active(cluster):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def test_sacct_reads_jobcomp_on_real_cluster(slurm_cluster):
    out = slurm_cluster.cmd("sbatch", "--parsable", "--output=/dev/null", "--wrap", "true")  # no slurm-N.out in the cwd
    job_id = out.stdout.strip()
    for _ in range(100):
        st = slurm.job_state(job_id)
        if st.finished:
            break
        time.sleep(0.1)
    assert st.status == "success"
    proc = slurm_cluster.cmd("sacct", "-c", "-n", "-P", "-o", "JobID,State", "-j", job_id)
    assert f"{job_id}|COMPLETED" in proc.stdout


def test_gpu_run_runs_in_slurm_with_gres(env, slurm_cluster):
    import dagster as dg

    run = env.submit(assets=["gpu_asset"])  # __ASSET_JOB + asset selection, as the UI's "Materialize"
    job_id = run.tags.get("slurm/job_id")
    assert job_id and job_id.isdigit()
    # second form: an asset job without explicit asset selection (the job's assets' tags decide)
    run2 = env.submit(job_name="gpu_job")
    assert run2.tags.get("slurm/job_id")
    done = env.wait(run.run_id, timeout=180)
    assert done.status == dg.DagsterRunStatus.SUCCESS, env.engine_messages(run.run_id)[-5:]
    proof = env.proof("gpu_asset", run.run_id)
    assert proof["SLURM_JOB_ID"] == job_id
    assert proof["CUDA_VISIBLE_DEVICES"] == "0" and proof["SLURM_JOB_GPUS"] == "0"
    assert "gres:gpu:1" in (slurm.job_field(job_id, "TresPerNode") or "")
    script = (env.log_dir / f"{run.run_id}.sbatch").read_text()
    assert "#SBATCH --gres=gpu:1" in script and "#SBATCH --time=00:10:00" in script
    ev = env.instance.get_latest_materialization_event(dg.AssetKey("gpu_asset"))
    assert ev is not None and ev.run_id in (run.run_id, run2.run_id)
    assert env.wait(run2.run_id, timeout=180).status == dg.DagsterRunStatus.SUCCESS
    assert env.proof("gpu_asset", run2.run_id)["SLURM_JOB_ID"] == run2.tags["slurm/job_id"]
    assert env.launcher.check_run_worker_health(done).status.value == "SUCCESS"


def test_cpu_run_stays_local(env):
    import dagster as dg

    run = env.submit(job_name="cpu_job")
    assert "slurm/job_id" not in run.tags
    done = env.wait(run.run_id, timeout=180)
    assert done.status == dg.DagsterRunStatus.SUCCESS
    assert "slurm/job_id" not in done.tags
    assert env.proof("cpu_asset", run.run_id)["SLURM_JOB_ID"] is None


def test_gpu_run_without_sbatch_runs_here_when_allowed(tmp_path, monkeypatch):
    """A laptop's `dagster dev` (no SLURM at all): with local_without_sbatch (the shipped local dagster.yaml) a
    GPU-tagged run runs on this machine and says why; without it, it fails naming sbatch."""
    import dagster as dg

    from cb_assets.testing.slurm import launcher_env

    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("python", "python3"):  # a PATH with Python but no SLURM command
        (bindir / tool).symlink_to(sys.executable)
    monkeypatch.setenv("PATH", str(bindir))
    with launcher_env(tmp_path / "home", launcher_extra={"local_without_sbatch": True}) as env:
        run = env.submit(assets=["gpu_asset"])
        assert "slurm/job_id" not in run.tags
        done = env.wait(run.run_id, timeout=180)
        assert done.status == dg.DagsterRunStatus.SUCCESS, env.engine_messages(run.run_id)[-5:]
        assert env.proof("gpu_asset", run.run_id)["SLURM_JOB_ID"] is None
        assert any("no `sbatch` on PATH" in m for m in env.engine_messages(run.run_id))
    with launcher_env(tmp_path / "home2") as env:  # a cluster's setting: the run fails, naming sbatch
        with pytest.raises(Exception, match="sbatch not found"):
            env.submit(assets=["gpu_asset"])
        [run] = env.instance.get_runs(limit=1)
        assert run.status == dg.DagsterRunStatus.FAILURE


def _start_slow(env):
    import dagster as dg

    run = env.submit(assets=["slow_gpu_asset"])
    job_id = run.tags["slurm/job_id"]
    proof = env.proof("slow_gpu_asset", run.run_id, timeout=150)
    assert proof is not None, "worker never started"
    assert env.wait(run.run_id, statuses={dg.DagsterRunStatus.STARTED}, timeout=60)
    return run, job_id, proof


def test_terminate_cancels_job(env, slurm_cluster):
    import dagster as dg

    run, job_id, _ = _start_slow(env)
    assert env.launcher.check_run_worker_health(env.instance.get_run_by_id(run.run_id)).status.value == "RUNNING"
    assert env.instance.run_coordinator.cancel_run(run.run_id)  # what the UI's Terminate button calls
    done = env.wait(run.run_id, timeout=90)
    assert done.status == dg.DagsterRunStatus.CANCELED
    assert _gone(slurm_cluster, job_id)
    assert slurm.job_state(job_id).raw.startswith("CANCELLED")


def test_external_scancel_fails_run(env, slurm_cluster):
    import dagster as dg

    run, job_id, _ = _start_slow(env)
    slurm_cluster.cmd("scancel", job_id)
    done = env.wait(run.run_id, timeout=120, monitor=True)
    assert done.status == dg.DagsterRunStatus.FAILURE
    assert _gone(slurm_cluster, job_id)
    assert slurm.job_state(job_id).raw.startswith("CANCELLED")


def test_kill9_worker_marked_failed_by_run_monitoring(env, slurm_cluster):
    import dagster as dg

    run, job_id, proof = _start_slow(env)
    os.kill(proof["pid"], signal.SIGKILL)  # in-process executor: the asset runs in the run worker
    done = env.wait(run.run_id, timeout=120, monitor=True)
    assert done.status == dg.DagsterRunStatus.FAILURE
    msgs = "\n".join(env.engine_messages(run.run_id))
    assert "Detected run worker status" in msgs and f"SLURM job {job_id}" in msgs


def test_unsatisfiable_request_fails_clearly(env):
    import dagster as dg

    t0 = time.monotonic()
    with pytest.raises(Exception, match="Requested node configuration is not available"):
        env.submit(assets=["two_gpu_asset"])
    assert time.monotonic() - t0 < 30
    [run] = env.instance.get_runs(filters=dg.RunsFilter(tags={"dagster/code_location": "slurm_defs"}), limit=1)
    assert run.status == dg.DagsterRunStatus.FAILURE and "slurm/job_id" not in run.tags
    assert any("--gres=gpu:2" in m and "Requested node configuration is not available" in m
               for m in env.engine_messages(run.run_id))


def test_malicious_run_tag_is_inert(env, tmp_path):
    import dagster as dg

    marker = tmp_path / "pwned"
    for key, value in [("slurm/gres", f"gpu:1; touch {marker}"), ("slurm/partition", f"$(touch {marker})"),
                       ("slurm/time", f"1:00\n#SBATCH --wrap='touch {marker}'")]:
        with pytest.raises(Exception, match="invalid value for SLURM option"):
            env.submit(assets=["gpu_asset"], tags={key: value})
        [run] = env.instance.get_runs(limit=1)
        assert run.status == dg.DagsterRunStatus.FAILURE and "slurm/job_id" not in run.tags
        assert not (env.log_dir / f"{run.run_id}.sbatch").exists()
    time.sleep(1)
    assert not marker.exists()


def test_malicious_env_value_inert_inside_slurm(env, tmp_path):
    """A launcher env var value with shell syntax reaches the job verbatim and runs nothing."""
    import dagster as dg

    marker = tmp_path / "pwned_env"
    env.launcher.env_vars.append(f"CB_EVIL=$(touch {marker}); `touch {marker}`")
    try:
        run = env.submit(assets=["gpu_asset"])
        assert env.wait(run.run_id, timeout=180).status == dg.DagsterRunStatus.SUCCESS
    finally:
        env.launcher.env_vars.pop()
    script = (env.log_dir / f"{run.run_id}.sbatch").read_text()
    assert shlex.quote(f"$(touch {marker}); `touch {marker}`") in script
    assert not marker.exists()


def test_pending_job_not_failed_and_lost_pending_job_detected(env, slurm_cluster):
    """A PENDING job keeps its run STARTING (no start-timeout kill at the configured 3600 s); a job
    cancelled while pending is found by fail_lost_slurm_runs."""
    import dagster as dg

    from cb_assets.slurm_launcher import fail_lost_slurm_runs

    part = slurm_cluster.cmd("sinfo", "-h", "-o", "%R").stdout.split()[0]
    assert slurm_cluster.cmd("scontrol", "update", f"PartitionName={part}", "State=DOWN").returncode == 0
    try:
        run = env.submit(assets=["gpu_asset"])
        job_id = run.tags["slurm/job_id"]
        time.sleep(1.5)
        assert slurm.job_state(job_id).status == "pending"
        env.monitor_once()
        assert env.instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.STARTING
        assert fail_lost_slurm_runs(env.instance) == []
        slurm_cluster.cmd("scancel", job_id)
        time.sleep(0.5)
        assert fail_lost_slurm_runs(env.instance) == [run.run_id]
        assert env.instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.FAILURE
    finally:
        slurm_cluster.cmd("scontrol", "update", f"PartitionName={part}", "State=UP")


def _watchdog_tick(env):
    import dagster as dg

    from cb_assets.automation import slurm_watchdog

    return slurm_watchdog(dg.build_sensor_context(instance=env.instance))


def test_watchdog_cancels_pending_job_of_cancelled_run_and_fails_vanished(env, slurm_cluster):
    """The one fake GPU is filled by a running job; the next GPU run's job waits PENDING (Resources).
    A forced cancel in Dagster marks the run CANCELED without scancel: the watchdog sensor cancels the job,
    so it never takes the GPU. A pending job cancelled outside Dagster: the watchdog fails its STARTING run."""
    import dagster as dg

    env.launcher.env_vars.append("CB_SLOW_ASSET_SECONDS=60")
    try:
        filler = env.submit(assets=["slow_gpu_asset"])
    finally:
        env.launcher.env_vars.pop()
    try:
        fill_job = filler.tags["slurm/job_id"]
        deadline = time.monotonic() + 30
        while slurm.job_state(fill_job).status != "running" and time.monotonic() < deadline:
            time.sleep(0.2)
        queued = env.submit(assets=["gpu_asset"])
        q_job = queued.tags["slurm/job_id"]
        time.sleep(1.0)
        st = slurm.job_state(q_job)
        assert st.status == "pending", st
        # what the UI's forced "terminate" does for a STARTING run: mark it CANCELED, no launcher call
        env.instance.report_run_canceled(env.instance.get_run_by_id(queued.run_id), message="forced")
        assert slurm.job_state(q_job).status == "pending"  # still queued: it would take the GPU later
        _watchdog_tick(env)
        assert _gone(slurm_cluster, q_job, timeout=20)
        assert slurm.job_state(q_job).raw.startswith("CANCELLED")
        assert env.instance.get_run_by_id(queued.run_id).tags.get("slurm/cancel_checked", "").startswith("PENDING")
        assert env.proof("gpu_asset", queued.run_id) is None  # its worker never ran

        lost = env.submit(assets=["gpu_asset"])
        lost_job = lost.tags["slurm/job_id"]
        time.sleep(1.0)
        assert slurm.job_state(lost_job).status == "pending"
        skip = _watchdog_tick(env)
        assert "failed 0 lost run" in skip.skip_message
        assert env.instance.get_run_by_id(lost.run_id).status == dg.DagsterRunStatus.STARTING
        slurm_cluster.cmd("scancel", lost_job)
        assert _gone(slurm_cluster, lost_job)
        skip = _watchdog_tick(env)
        assert lost.run_id in skip.skip_message
        assert env.instance.get_run_by_id(lost.run_id).status == dg.DagsterRunStatus.FAILURE
    finally:
        slurm_cluster.cmd("scancel", filler.tags["slurm/job_id"])
        env.wait(filler.run_id, timeout=60, monitor=True)


def _sbatch_and_wait(cluster, script: str, env: dict, cwd: Path, timeout: float = 240) -> tuple[str, str, str]:
    out = subprocess.run(["sbatch", "--parsable", f"--chdir={cwd}", str(ROOT / "slurm" / script)],
                         capture_output=True, text=True, env={**cluster.env(), **env}, timeout=60)
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.strip().split(";")[0]
    assert _gone(cluster, job_id, timeout=timeout), f"job {job_id} still queued/running"
    name = script.replace(".sbatch", "")
    stdout, stderr = cwd / f"cb_{name}_{job_id}.out", cwd / f"cb_{name}_{job_id}.err"
    assert stdout.exists() and stderr.exists(), sorted(p.name for p in cwd.iterdir())
    return job_id, stdout.read_text(), stderr.read_text()


ROOT = Path(__file__).resolve().parents[2]


def test_sbatch_entry_points_honour_toggles(slurm_cluster, tmp_path):
    """Both sbatch scripts on the local SLURM (dry run: the plan each would execute) with two toggles set;
    logs land as {job_name}_{job_id}.{out,err} in the submit folder."""
    import json as _json

    base = {"CB_PROJECT_ROOT": str(ROOT), "CB_VENV": str(Path(sys.executable).parent.parent),
            "CB_DATA_ROOT": str(tmp_path / "data"), "DAGSTER_HOME": str(tmp_path / "home"), "CB_DRY_RUN": "1"}
    (tmp_path / "home").mkdir()
    job, out, err = _sbatch_and_wait(slurm_cluster, "unified_pipeline.sbatch",
                                     {**base, "SKIP_GENERATE": "1", "TOTAL_STEPS": "12"}, tmp_path)
    assert f"job {job} (cb_unified_pipeline)" in out
    assert "SKIP_GENERATE=1 -> groups ['generation'] not materialized" in out
    plan = _json.loads(out.strip().splitlines()[-1])
    select = plan["command"][plan["command"].index("--select") + 1].split(",")
    assert "ds_completions" not in select and "adapter" in select and "traces" in select
    cfg = _json.loads(plan["command"][plan["command"].index("--config-json") + 1])
    assert cfg["ops"]["adapter"]["config"]["overrides"] == ["train.steps=12"]

    job, out, err = _sbatch_and_wait(slurm_cluster, "sweep_hparams.sbatch",
                                     {**base, "QUICK_TEST": "1", "ALPHAS": "5 10 15"}, tmp_path)
    assert "manifest quick (QUICK_TEST=1)" in out
    plan = _json.loads(out.strip().splitlines()[-1])
    assert len(plan["points"]) == 3 and all(k.startswith("quick-custom-a") for k in plan["points"])


@pytest.mark.slow
def test_sbatch_unified_pipeline_runs_for_real(slurm_cluster, tmp_path):
    """unified_pipeline.sbatch executed (not a dry run) inside a local SLURM allocation, with toggles that leave
    four stages out and change two settings: ETL_A + ETL_B run on the demo sample of the two chosen datasets,
    renders honour MAX_LENGTH, and nothing of the skipped stages is written."""
    import polars as pl

    from cb_core.sources.demo import write_demo_sources

    data = tmp_path / "data"
    src = write_demo_sources(tmp_path / "sources")  # real files at configured paths (a selected source needs one)
    base = {"CB_PROJECT_ROOT": str(ROOT), "CB_VENV": str(Path(sys.executable).parent.parent),
            "CB_DATA_ROOT": str(data), "DAGSTER_HOME": str(tmp_path / "home"),
            "CB_XSTEST_PATH": str(src["xstest"]), "CB_ULTRACHAT_PATH": str(src["ultrachat"])}
    (tmp_path / "home").mkdir()
    toggles = {"DATASETS": "xstest,ultrachat", "MAX_LENGTH": "128", "SKIP_GENERATE": "1", "SKIP_SPLIT": "1",
               "SKIP_TRAIN": "1", "SKIP_EVAL": "1"}
    job, out, err = _sbatch_and_wait(slurm_cluster, "unified_pipeline.sbatch", {**base, **toggles}, tmp_path,
                                     timeout=600)
    assert f"job {job} (cb_unified_pipeline)" in out
    assert "RUN_SUCCESS" in out + err and "RUN_FAILURE" not in out + err, err[-3000:]
    traces = pl.read_parquet(data / "traces.parquet")
    assert set(traces["dataset"].unique()) == {"xstest", "ultrachat"}
    renders = pl.read_parquet(data / "renders.parquet")
    assert renders.height > 0 and renders["input_ids"].list.len().max() <= 128
    assert renders.height < traces.height  # MAX_LENGTH took effect: the longer UltraChat traces are quarantined
    assert (data / "lossmasks.parquet").exists()
    for skipped in ("ds_completions", "training_mix", "train_split", "eval_scores"):
        assert not (data / f"{skipped}.parquet").exists(), skipped


def test_stop_kills_only_own_daemons(slurm_cluster, tmp_path):
    """start/stop of a second cluster leaves the session cluster (and its PIDs) alone."""
    from cb_assets.testing.slurm import start_cluster, stop_cluster

    before = {p.name: p.read_text().strip() for p in (slurm_cluster.dir / "run").glob("*.pid")}
    assert len(before) == 3
    c2 = start_cluster(tmp_path / "c2")
    pids2 = [int((c2.dir / "run" / f"{d}.pid").read_text()) for d in ("munged", "slurmctld", "slurmd")]
    stop_cluster(c2)
    for pid in pids2:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    for name, pid in before.items():
        os.kill(int(pid), 0)  # still alive


def test_example_instance_configs_validate(tmp_path, monkeypatch):
    """dagster.slurm.example.yaml (and the local launcher block) pass Dagster's instance schema and
    build a SlurmRunLauncher."""
    import shutil as _sh

    import yaml
    from dagster._core.instance.config import dagster_instance_config
    from dagster._serdes import ConfigurableClassData

    from cb_assets.slurm_launcher import SlurmRunLauncher

    root = Path(__file__).resolve().parents[2]
    for var in ("DAGSTER_PG_HOST", "DAGSTER_PG_PORT", "DAGSTER_PG_USER", "DAGSTER_PG_PASSWORD", "DAGSTER_PG_DB"):
        monkeypatch.setenv(var, "5432" if var.endswith("PORT") else "x")
    _sh.copy(root / "dagster_home" / "dagster.slurm.example.yaml", tmp_path / "dagster.yaml")
    config, _ = dagster_instance_config(str(tmp_path))
    rl = config["run_launcher"]
    launcher = ConfigurableClassData(rl["module"], rl["class"], yaml.safe_dump(rl.get("config") or {})).rehydrate(
        as_type=SlurmRunLauncher)
    assert launcher.defaults.directives() == ["--partition=gpu", "--time=04:00:00", "--mem=64G", "--cpus-per-task=8"]
    assert config["run_monitoring"]["max_resume_run_attempts"] == 0
