"""The `cb` console script: --help on each command, leaderboard, summarise, follow, run (argument checks and the
Dagster command it starts), runs rolled into history/."""
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import polars as pl
import pytest
import yaml

from cb_core import cli
from cb_core.sweep.leaderboard import build_leaderboard

ROOT = Path(__file__).resolve().parents[2]
CB = [sys.executable, "-m", "cb_core.cli"]


def _cb(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([*CB, *args], capture_output=True, text=True, cwd=ROOT, env={**os.environ, **(env or {})},
                          timeout=120)


def test_console_script_declared_and_help_on_each():
    import tomllib

    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["cb"] == "cb_core.cli:main"
    for sub, needle in (("leaderboard", "--reverse"), ("summarise", "checkpoints ranked"), ("follow", "--interval"),
                        ("run", "--fast-dev-run")):
        out = _cb(sub, "--help")
        assert out.returncode == 0 and needle in out.stdout, (sub, out.stdout, out.stderr)


def _leaderboard(root: Path) -> None:
    pts = pl.DataFrame({"key": ["p1", "p2", "p3"], "axes": [json.dumps({"alpha": a}) for a in (5, 10, 15)]})
    rows = []
    for key, asr, cap in (("p1", 0.3, 0.9), ("p2", 0.1, 0.9), ("p3", 0.05, 0.2)):
        for model, a, c in (("base", 0.5, 0.9), ("adapter", asr, cap)):
            rows += [{"key": key, "model": model, "metric": "tool_flip_asr", "n": 10, "value": a},
                     {"key": key, "model": model, "metric": "capability_retention", "n": 10, "value": c}]
    from cb_core.sweep.manifest import Selection

    lb = build_leaderboard(pts, pl.DataFrame(rows), selection=Selection(gates=["capability"]))
    lb.write_parquet(root / "leaderboard.parquet")


def test_leaderboard_limit_and_reverse(tmp_path):
    _leaderboard(tmp_path)
    out = _cb("--data-root", str(tmp_path), "leaderboard", "--limit", "2")
    lines = out.stdout.strip().splitlines()
    assert out.returncode == 0 and len(lines) == 3 and lines[0].split()[:2] == ["rank", "key"]
    assert lines[1].split()[:2] == ["1", "p2"] and lines[2].split()[:2] == ["2", "p1"]
    rev = _cb("--data-root", str(tmp_path), "leaderboard", "--reverse", "--limit", "3").stdout.strip().splitlines()
    assert [ln.split()[1] for ln in rev[1:]] == ["p3", "p1", "p2"]  # gated-out p3, then worst ranked first
    missing = _cb("--data-root", str(tmp_path / "none"), "leaderboard")
    assert missing.returncode != 0 and "materialize `leaderboard`" in missing.stderr
    after = _cb("leaderboard", "--limit", "2", "--data-root", str(tmp_path))  # also after the subcommand
    assert after.returncode == 0 and after.stdout == out.stdout


def _run_folder(root: Path, name: str, finished: bool) -> Path:
    d = root / "train_runs" / name
    (d / "checkpoints").mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump({"train": {"steps": 40, "selection_metric": "train/loss"}}))
    (d / "run_metadata.json").write_text(json.dumps({"command": "x"}))
    index = []
    for step, metric in ((10, 0.9), (20, 0.5), (30, 0.7)):
        (d / "checkpoints" / f"step_{step:06d}").mkdir()
        index.append({"step": step, "path": f"step_{step:06d}", "metric": metric})
    (d / "checkpoints" / "index.json").write_text(json.dumps(index))
    (d / "best").symlink_to(Path("checkpoints") / "step_000020")
    if finished:
        (d / "final_metrics.json").write_text(json.dumps({"final_loss": 0.4, "steps": 40, "train_seconds": 80.0}))
    return d


def test_summarise_ranks_checkpoints_and_estimates_runtime(tmp_path):
    d = _run_folder(tmp_path, "tiny-abc", finished=False)
    past = time.time() - 60
    os.utime(d / "run_metadata.json", (past, past))
    out = _cb("--data-root", str(tmp_path), "summarise", "tiny-abc")
    s = json.loads(out.stdout)
    assert [c["step"] for c in s["checkpoints"]] == [20, 30, 10] and s["checkpoints"][0]["rank"] == 1
    assert s["links"] == {"best": "checkpoints/step_000020"}
    rt = s["runtime"]
    assert rt["state"] == "running" and rt["steps"] == 30 and rt["total_steps"] == 40
    assert rt["seconds_per_step"] == pytest.approx(2.0, rel=0.2) and rt["remaining_seconds"] == pytest.approx(20, rel=0.2)
    (d / "final_metrics.json").write_text(json.dumps({"final_loss": 0.4, "steps": 40, "train_seconds": 80.0}))
    s = cli.summarise(d)
    assert s["runtime"] == {"state": "finished", "steps": 40, "total_steps": 40, "seconds": 80.0,
                            "seconds_per_step": 2.0, "remaining_seconds": 0}
    assert _cb("--data-root", str(tmp_path), "summarise", "nope").returncode != 0


def test_output_into_a_closed_pipe_ends_quietly(tmp_path):
    """`cb summarise latest | head`: a reader that leaves before cb writes (here `true`, gone long before
    Python has started) closes the pipe; cb ends without a BrokenPipeError traceback, with the shell's 141."""
    _run_folder(tmp_path, "tiny-abc", finished=True)
    p = subprocess.run(f"{sys.executable} -m cb_core.cli --data-root '{tmp_path}' summarise tiny-abc | true; "
                       "echo \"cb exit ${PIPESTATUS[0]}\"", shell=True, executable="/bin/bash", capture_output=True,
                       text=True, cwd=ROOT, timeout=120)
    assert p.stdout == "cb exit 141\n"
    assert "Traceback" not in p.stderr and "BrokenPipe" not in p.stderr, p.stderr


def test_follow_reports_new_best_until_finished(tmp_path):
    d = _run_folder(tmp_path, "run1", finished=False)
    lines: list[str] = []

    def later():
        time.sleep(0.6)
        (d / "checkpoints" / "step_000040").mkdir()
        idx = json.loads((d / "checkpoints" / "index.json").read_text())
        (d / "checkpoints" / "index.json").write_text(json.dumps(idx + [{"step": 40, "path": "step_000040", "metric": 0.2}]))
        time.sleep(0.6)
        (d / "final_metrics.json").write_text(json.dumps({"final_loss": 0.2, "steps": 40, "train_seconds": 9.0}))

    t = threading.Thread(target=later)
    t.start()
    rc = cli.follow(d, interval=0.2, max_polls=100, out=lines.append)
    t.join()
    assert rc == 0
    bests = [json.loads(ln)["best"]["step"] for ln in lines if "best" in json.loads(ln) and "finished" not in ln]
    assert bests[0] == 20 and bests[-1] == 40
    assert json.loads(lines[-1])["finished"] is True


def test_follow_stops_when_the_worker_died_without_final_metrics(tmp_path):
    d = _run_folder(tmp_path, "dead", finished=False)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # a pid that is gone
    (d / "run_metadata.json").write_text(json.dumps({"command": "x", "pid": child.pid, "host": socket.gethostname()}))
    assert cli.summarise(d)["runtime"]["state"] == "ended"
    lines: list[str] = []
    assert cli.follow(d, interval=0.05, max_polls=20, out=lines.append) == 1
    last = json.loads(lines[-1])
    assert last["finished"] is False and "failed or was killed" in last["reason"]
    (d / "run_metadata.json").write_text(json.dumps({"command": "x", "pid": os.getpid(), "host": socket.gethostname()}))
    assert cli.summarise(d)["runtime"]["state"] == "running"  # alive: still followed


def test_run_checks_config_before_dagster_and_builds_the_command(tmp_path):
    bad = _cb("run", "--preset", "no_such_preset")
    assert bad.returncode == 2 and "no_such_preset" in bad.stderr
    bad = _cb("run", "--preset", "tiny", "--override", "train.bogus=1")
    assert bad.returncode == 2 and "bogus" in bad.stderr
    out = _cb("run", "--preset", "tiny", "--override", "train.lr=3e-5", "--fast-dev-run", "--print-command")
    cmd = json.loads(out.stdout)
    assert cmd[1:7] == ["-m", "dagster", "asset", "materialize", "-m", "cb_assets.definitions"]
    assert cmd[cmd.index("--select") + 1] == "adapter"
    run_config = json.loads(cmd[cmd.index("--config-json") + 1])
    assert run_config["ops"]["adapter"]["config"] == {"preset": "tiny", "overrides": ["train.lr=3e-5"], "fast_dev_run": True}
    assert run_config["loggers"] == {"console": {"config": {"log_level": "INFO"}}}  # not Dagster's DEBUG events


def test_roll_history_moves_finished_runs_only(tmp_path):
    runs = tmp_path / "train_runs"
    _run_folder(tmp_path, "old-finished", finished=True)
    _run_folder(tmp_path, "old-unfinished", finished=False)
    _run_folder(tmp_path, "current", finished=True)
    _run_folder(tmp_path, "tiny-bh2-fb8d0871", finished=True)  # a sweep point: stays for its sweep
    (runs / "tiny-bh2-fb8d0871" / cli.SWEEP_MARK).write_text("{}")
    (runs / "latest").symlink_to("current")
    assert cli.roll_history(runs, keep={"current"}) == ["old-finished"]
    assert (runs / "tiny-bh2-fb8d0871" / "final_metrics.json").exists()
    assert (runs / "history" / "old-finished" / "final_metrics.json").exists()
    assert (runs / "old-unfinished").is_dir() and (runs / "current").is_dir()
    assert cli.resolve_run("old-finished", tmp_path) == (runs / "history" / "old-finished").resolve()
    assert cli.resolve_run("latest", tmp_path) == (runs / "current").resolve()


@pytest.mark.parametrize("env, manifest", [
    ({}, "tiny"),  # the demo sample (no source configured): not the 60-point `full` sweep of an 8B model
    ({"CB_SWEEP": "simple"}, "simple"),
    ({"CB_SWEEP": "simple", "SWEEP": "quick"}, "quick"),  # the old script's toggle first
])
def test_sweep_cli_default_manifest(tmp_path, env, manifest):
    base = {k: v for k, v in os.environ.items() if not k.startswith("CB_") and k not in ("SWEEP", "QUICK_TEST")}
    out = subprocess.run([sys.executable, "-m", "cb_assets.cli", "sweep", "--dry-run"], capture_output=True,
                         text=True, cwd=ROOT, timeout=300,
                         env={**base, "CB_DATA_ROOT": str(tmp_path / "data"), "HF_HUB_OFFLINE": "1", **env})
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1])["manifest"] == manifest


@pytest.mark.parametrize("env, origin", [({"CB_SWEEP": "nope"}, "CB_SWEEP='nope'"), ({"SWEEP": "tiy"}, "SWEEP='tiy'")])
def test_sweep_cli_unknown_manifest_is_one_line_naming_the_variable(tmp_path, env, origin):
    base = {k: v for k, v in os.environ.items() if not k.startswith("CB_") and k not in ("SWEEP", "QUICK_TEST")}
    out = subprocess.run([sys.executable, "-m", "cb_assets.cli", "sweep", "--dry-run"], capture_output=True,
                         text=True, cwd=ROOT, timeout=300,
                         env={**base, "CB_DATA_ROOT": str(tmp_path / "data"), "HF_HUB_OFFLINE": "1", **env})
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "not found" in out.stderr and f"(the manifest from {origin})" in out.stderr and "'tiny'" in out.stderr


def _cli(args: list[str], root: Path, env: dict) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("CB_") and k not in ("SWEEP", "QUICK_TEST")}
    return subprocess.run([sys.executable, "-m", "cb_assets.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=300, env={**base, "CB_DATA_ROOT": str(root), "HF_HUB_OFFLINE": "1", **env})


def test_dry_runs_write_nothing(tmp_path):
    """`--dry-run` wrote the sweep manifest built from grid toggles and the pipeline's copy of generation.yaml
    under $CB_DATA_ROOT/_sbatch; it prints what it would write instead."""
    root = tmp_path / "data"
    root.mkdir()
    out = _cli(["sweep", "--dry-run"], root, {"SWEEP": "tiny", "POLICIES": "assistant_only cb_full_sequence"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert list(root.rglob("*")) == []
    plan = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(plan["points"]) == 4 and all(k.startswith("tiny-custom-") for k in plan["points"])
    (path, text), = plan["would_write"].items()
    assert path == plan["manifest"] and Path(path).parent == root / "_sbatch"
    assert yaml.safe_load(text)["grid"]["policy"] == ["assistant_only", "cb_full_sequence"]
    out = _cli(["pipeline", "--dry-run"], root, {"TENSOR_PARALLEL": "2"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert list(root.rglob("*")) == []
    plan = json.loads(out.stdout.strip().splitlines()[-1])
    (path, text), = plan["would_write"].items()
    assert Path(path).parent == root / "_sbatch" and yaml.safe_load(text)["tensor_parallel_size"] == 2
    assert path in plan["command"][plan["command"].index("--config-json") + 1]


@pytest.mark.parametrize("env, said", [
    ({"ALPHAS": "5"}, "error: ALPHAS='5': the loss mode 'triplet_full' ignores loss.alpha"),
    ({"POLICIES": "assistant_only bogus"}, "error: POLICIES='assistant_only bogus': point tiny-custom-"),
    ({"LAYER_CONFIGS": "2,4;0"}, "error: LAYER_CONFIGS='2,4;0': point tiny-custom-"),
    ({"TOTAL_STEPS": "-5", "POLICIES": "assistant_only"}, "error: TOTAL_STEPS='-5': point tiny-custom-"),
    ({"TOTAL_STEPS": "-5"}, "error: TOTAL_STEPS='-5': point tiny-"),
    ({"LOSS_MODE": "legacy_cb"}, "grid.beta_harmful: the loss mode 'legacy_cb' (LOSS_MODE='legacy_cb') ignores"),
    # built from toggles: the base manifest's axis is named where that file writes it
    ({"LOSS_MODE": "legacy_cb", "ALPHAS": "5"}, "sweeps/tiny.yaml:9: grid.beta_harmful: the loss mode 'legacy_cb' "
                                                "(LOSS_MODE='legacy_cb') ignores"),
    # a shared value the grid always replaces was dropped without a word
    ({"POLICY": "assistant_only", "POLICIES": "cb_full_sequence"},
     "error: POLICY='assistant_only': data.mask_policy = 'assistant_only' is also a grid axis "
     "(POLICIES='cb_full_sequence')"),
])
def test_sweep_toggle_error_names_the_variable(tmp_path, env, said):
    """A bad value from a toggle was reported at a line of the generated _sbatch/sweep.<job>.yaml (or of the
    base manifest, which does not hold it): the error names the variable and its value."""
    root = tmp_path / "data"
    out = _cli(["sweep", "--dry-run"], root, {"SWEEP": "tiny", **env})
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert said in out.stderr, out.stderr
    assert "_sbatch" not in out.stderr and not root.exists()


def test_pipeline_toggles_each_said_and_checked_before_anything_runs(tmp_path):
    """The old script's training toggles were mapped without a word, and a bad one failed only at `adapter`,
    after the ETL, curation (and hours of generation on a cluster)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("CB_")}
    env = {**base, "CB_DATA_ROOT": str(tmp_path / "data"), "HF_HUB_OFFLINE": "1", "TOTAL_STEPS": "300",
           "LOSS_MODE": "legacy_cb", "POLICY": "assistant_only", "MAX_LENGTH": "128", "MWCS_SCHEDULE": "default"}
    cmd = [sys.executable, "-m", "cb_assets.cli", "pipeline", "--dry-run"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    for note in ("TOTAL_STEPS -> train.steps=300", "LOSS_MODE -> loss.mode=legacy_cb",
                 "POLICY -> data.mask_policy=assistant_only", "MAX_LENGTH -> model.max_length=128",
                 "MAX_LENGTH -> renders max_length", "MWCS_SCHEDULE -> data.mwcs_schedule=default"):
        assert f"[cb toggles] {note}" in out.stdout, note
    bad = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300, env={**env, "LOSS_MODE": "bogus"})
    assert bad.returncode == 2 and "loss.mode must be one of" in bad.stderr and "bogus" in bad.stderr
    assert "error: LOSS_MODE='bogus': " in bad.stderr  # the variable it came from, not only the override
    bad = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300, env={**env, "TRIPLET_FOO": "3"})
    assert bad.returncode == 2 and "unknown field 'foo' of section 'loss'" in bad.stderr
    assert "error: TRIPLET_FOO='3': " in bad.stderr


@pytest.mark.parametrize("env, preset", [
    ({}, "tiny"),  # the demo sample
    ({"CB_TRAIN_PRESET": "stage2"}, "stage2"),
    ({"CB_XSTEST_PATH": str(ROOT / "tests")}, "stage1"),  # a source configured: real data, not the tiny model
])
def test_cb_run_takes_the_adapter_assets_default_preset(env, preset):
    base = {k: v for k, v in os.environ.items() if not k.startswith("CB_")}
    out = subprocess.run([*CB, "run", "--print-command"], capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env={**base, **env})
    assert out.returncode == 0, out.stderr[-2000:]
    cmd = json.loads(out.stdout)
    assert json.loads(cmd[cmd.index("--config-json") + 1])["ops"]["adapter"]["config"]["preset"] == preset
    bad = subprocess.run([*CB, "run", "--print-command"], capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env={**base, "CB_TRAIN_PRESET": "stage_one"})
    assert bad.returncode == 2 and "CB_TRAIN_PRESET: training preset 'stage_one' not found" in bad.stderr


def test_sweep_cli_rerun_flag_reaches_the_runner(tmp_path, monkeypatch):
    """`sweep --rerun` runs every point again; without it the runner skips the points whose run stands."""
    from cb_assets import cli as sweep_cli

    monkeypatch.setenv("CB_DATA_ROOT", str(tmp_path / "data"))
    monkeypatch.setenv("SWEEP", "tiny")
    for var in ("QUICK_TEST", "ALPHAS", "LAYER_CONFIGS", "POLICIES"):
        monkeypatch.delenv(var, raising=False)
    seen: list[dict] = []
    monkeypatch.setattr(sweep_cli, "run_sweep_in_process", lambda manifest, **kw: seen.append(kw) or {"p": "SUCCESS"})
    assert sweep_cli.main(["sweep", "--rerun"]) == 0 and sweep_cli.main(["sweep"]) == 0
    assert [kw["rerun"] for kw in seen] == [True, False]


@pytest.mark.parametrize("args, env, said", [
    # MODE alone was not checked: a preset that does not exist failed at `adapter`, after the ETL and generation
    (["pipeline"], {"MODE": "stage_one"}, "error: MODE='stage_one': training preset 'stage_one' not found"),
    (["pipeline"], {"MODE": "stage_one", "TOTAL_STEPS": "5"}, "error: MODE='stage_one': training preset"),
    # counts the stages refuse failed when those stages ran (EVAL_LIMIT=0 after training)
    (["pipeline"], {"EVAL_LIMIT": "0"}, "error: EVAL_LIMIT='0': expected an integer >= 1"),
    (["pipeline"], {"BATCH_SIZE": "0"}, "error: BATCH_SIZE='0': expected an integer >= 1"),
    (["sweep"], {"SWEEP": "tiny", "EVAL_LIMIT": "0"}, "error: EVAL_LIMIT='0': expected an integer >= 1"),
    # a model profile that does not exist failed at renders, after ETL_A
    (["pipeline"], {"MODEL": "bogus"}, "error: MODEL='bogus': model profile 'bogus' not found"),
    (["pipeline"], {"TOKENIZER": "meta-llama/x"}, "error: TOKENIZER='meta-llama/x': model profile 'meta-llama/x'"),
])
def test_toggles_a_later_stage_refuses_fail_at_once(tmp_path, args, env, said):
    root = tmp_path / "data"
    out = _cli([*args, "--dry-run"], root, env)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert said in out.stderr and "(the manifest from" not in out.stderr, out.stderr
    assert not root.exists()


def test_sweep_says_mode_is_not_its_preset(tmp_path):
    """MODE (the unified pipeline's preset) was dropped by the sweep without a word."""
    out = _cli(["sweep", "--dry-run"], tmp_path / "data", {"SWEEP": "tiny", "MODE": "stage2"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "[cb toggles] MODE='stage2' ignored: a sweep's points train the preset its manifest names" in out.stdout
    out = _cli(["pipeline", "--dry-run"], tmp_path / "data", {"MODE": "stage2", "SKIP_TRAIN": "1"})
    assert out.returncode == 0, out.stderr[-2000:]  # not trained: not checked


def test_sweep_says_which_toggles_it_does_not_use(tmp_path):
    """The pipeline's stage toggles and the obsolete ones (MWCS_STEP: "reported and ignored") were dropped by the
    sweep without a word; USE_VLLM=1 was the one pipeline toggle mapped without its line."""
    out = _cli(["sweep", "--dry-run"], tmp_path / "data", {"SWEEP": "tiny", "MWCS_STEP": "3", "SKIP_GENERATE": "1",
                                                           "USE_VLLM": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    for name in ("MWCS_STEP ignored: MWCS weights", "SKIP_GENERATE ignored: a sweep", "USE_VLLM ignored: a sweep"):
        assert f"[cb toggles] {name}" in out.stdout, out.stdout
    out = _cli(["pipeline", "--dry-run"], tmp_path / "data", {"USE_VLLM": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "[cb toggles] USE_VLLM=1 -> generation backend vllm" in out.stdout


@pytest.mark.parametrize("script", ["unified_pipeline.sbatch", "sweep_hparams.sbatch"])
def test_sbatch_dry_run_only_when_asked(tmp_path, script):
    """CB_DRY_RUN=0 (any non-empty value) made the job a dry run that did nothing."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text('#!/bin/sh\necho "ARGS: $*"\n')
    (venv / "bin" / "python").chmod(0o755)
    base = {k: v for k, v in os.environ.items() if not k.startswith("CB_")}
    said = {}
    for value in ("1", "0", "", "true", "no"):
        out = subprocess.run(["bash", str(ROOT / "slurm" / script)], capture_output=True, text=True, timeout=60,
                             env={**base, "CB_PROJECT_ROOT": str(ROOT), "CB_VENV": str(venv), "CB_DRY_RUN": value,
                                  "CB_DATA_ROOT": str(tmp_path / "data"), "DAGSTER_HOME": str(tmp_path / "home")})
        assert out.returncode == 0, out.stderr
        said[value] = "--dry-run" in out.stdout.split("ARGS:", 1)[1]
    assert said == {"1": True, "0": False, "": False, "true": True, "no": False}
