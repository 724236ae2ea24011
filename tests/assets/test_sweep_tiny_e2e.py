"""The tiny sweep end to end on CPU through real Dagster runs: the demo tiers (ETL + curation, no generation),
two grid points trained by the real worker (Pipes) and scored by the real evaluation pass with a tiny model,
then leaderboard + best_config; the best point is read back from the CSV and matches the Parquet table."""
import json
import os
import subprocess
import sys

import dagster as dg
import polars as pl
import pytest
import yaml

from cb_core.config import PROJECT_ROOT
from cb_core.sweep.leaderboard import best_from_csv

pytestmark = pytest.mark.slow

TINY = {"model.profile": "tiny", "model.max_length": 128, "loss.target_layers": [2, 4],
        "lora.layers_to_transform": [0, 1, 2, 3], "lora.r": 4, "lora.dropout": 0.0, "train.steps": 2,
        "train.batch_size": 4, "train.checkpoint_every": 2, "train.warmup_steps": 1, "log.wandb": False,
        "log.post_checks": False, "data.mwcs_schedule": None}


def test_tiny_sweep_end_to_end(data_root, tmp_path, monkeypatch):
    for k, v in {"OMP_NUM_THREADS": "1", "CB_TORCH_THREADS": "1", "WANDB_MODE": "offline", "CB_EVAL_LIMIT": "2"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("CB_MODEL", raising=False)
    from cb_assets.cli import run_sweep_in_process
    from cb_assets.definitions import defs

    inst = dg.DagsterInstance.ephemeral()
    tiers = (dg.AssetSelection.assets("train_split", "eval_split", "eval_attacks").upstream()
             - dg.AssetSelection.groups("generation", "models"))
    res = dg.materialize(list(defs.assets), resources=defs.resources, selection=tiers, instance=inst,
                         raise_on_error=False)
    assert res.success, [str(e.event_specific_data)[:400] for e in res.all_events if e.is_failure][:2]
    manifest = tmp_path / "e2e.yaml"
    manifest.write_text(yaml.safe_dump({
        "name": "e2e", "preset": "tiny", "overrides": TINY, "grid": {"beta_harmful": [0.5, 2.0]},
        "eval": {"max_tokens": 8, "batch_size": 4}, "selection": {"not_measured": "pass"}}))
    status = run_sweep_in_process(str(manifest), instance=inst, log=lambda m: None)
    points = pl.read_parquet(data_root / "sweep_points.parquet")
    assert set(points["key"].to_list()) <= set(status) and all(status[k] == "SUCCESS" for k in points["key"]), status
    assert status["rank"] == "SUCCESS"
    # run again with nothing changed: no point trains or scores again (each names the run that stands), and
    # the two are ranked as before
    logs: list[str] = []
    assert run_sweep_in_process(str(manifest), instance=inst, log=logs.append) == status, logs
    assert sum("not run again, run " in ln for ln in logs) == 2, logs
    for k in points["key"]:
        sc = pl.read_parquet(data_root / "sweeps" / k / "eval_scores.parquet")
        asr = sc.filter((pl.col("metric") == "tool_flip_asr"))
        assert set(asr["model"].to_list()) == {"base", "adapter"} and (asr["n"] > 0).all()
        assert (data_root / "sweeps" / k / "adapter" / "adapter_model.safetensors").is_file()
        assert json.loads((data_root / "train_runs" / k / "final_metrics.json").read_text())["steps"] == 2
    lb = pl.read_parquet(data_root / "leaderboard.parquet")
    assert lb.height == 2
    top = lb.filter(pl.col("rank") == 1).sort("key").row(0, named=True)
    best = best_from_csv(data_root / "leaderboard.csv")
    assert best["key"] == top["key"] and best["beta_harmful"] == top["beta_harmful"]
    assert best["tool_flip_asr"] == pytest.approx(top["tool_flip_asr"])
    assert pl.read_parquet(data_root / "best_config.parquet")["best_key"][0] == top["key"]
    # a daemon started later sees this sweep ranked in-process without --final: it neither ranks it again nor
    # launches the opt-in final seeds (on a laptop those went to sbatch and failed)
    from cb_assets.assets.sweeps import sweep_sensor

    skip = sweep_sensor(dg.build_sensor_context(instance=inst, repository_def=defs.get_repository_def()))
    assert isinstance(skip, dg.SkipReason) and "without final seeds" in skip.skip_message

    # a point whose inputs changed since it trained is trained afresh (its old run folder kept in history),
    # never resumed from the other run's checkpoints (that published the old weights)
    k = points["key"][0]
    before = json.loads((data_root / "train_runs" / k / "final_metrics.json").read_text())["data"]
    split = pl.read_parquet(data_root / "train_split.parquet")
    split.slice(1).write_parquet(data_root / "train_split.parquet")
    res = dg.materialize(list(defs.assets), resources=defs.resources, selection=["sweep_adapter"], partition_key=k,
                         instance=inst, raise_on_error=False)
    assert res.success, [str(e.event_specific_data)[:400] for e in res.all_events if e.is_failure][:2]
    after = json.loads((data_root / "train_runs" / k / "final_metrics.json").read_text())["data"]
    assert after["samples"] == before["samples"] - 1
    stale = [p for p in (data_root / "train_runs" / "history").iterdir() if p.name.startswith(f"{k}-")]
    assert len(stale) == 1 and json.loads((stale[0] / "final_metrics.json").read_text())["data"] == before
    split.write_parquet(data_root / "train_split.parquet")

    # `cb run` on the same tiers: one training run through Dagster (a subprocess `dagster asset materialize`),
    # `latest` points at it, the finished sweep-point runs roll into train_runs/history/
    home = tmp_path / "dagster_home"
    home.mkdir()
    # started from another folder with --data-root (not CB_DATA_ROOT): the Dagster child writes that root too
    cmd = [sys.executable, "-m", "cb_core.cli", "--data-root", str(data_root), "run", "--preset", "tiny",
           "--fast-dev-run"]
    for k, v in TINY.items():
        cmd += ["--override", f"{k}={'null' if v is None else json.dumps(v) if not isinstance(v, str) else v}"]
    env = {k: v for k, v in os.environ.items() if k != "CB_DATA_ROOT"}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=elsewhere,
                         env={**env, "DAGSTER_HOME": str(home), "PYTHONPATH": str(PROJECT_ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    runs = data_root / "train_runs"
    latest = (runs / "latest").resolve()
    assert "fastdev" in latest.name and (latest / "final_metrics.json").exists()
    assert not (elsewhere / ".cb_data").exists()
    # the finished sweep points stay where a re-registered sweep finds them (only adapter runs roll)
    assert all((runs / k / "final_metrics.json").exists() for k in points["key"])
    assert [p.name for p in (runs / "history").iterdir()] == [stale[0].name]
    summary = json.loads(subprocess.run([sys.executable, "-m", "cb_core.cli", "--data-root", str(data_root),
                                         "summarise", "latest"], capture_output=True, text=True, timeout=120).stdout)
    assert summary["config"]["train"]["fast_dev_run"] is True and summary["checkpoints"]
    assert summary["runtime"]["state"] == "finished" and summary["runtime"]["steps"] == 2
