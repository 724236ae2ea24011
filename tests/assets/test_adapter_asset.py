"""The `adapter` asset through Dagster for real: the worker runs in a subprocess under Dagster Pipes, its
logs and materialization come back, the adapter is published, the post-training checks evaluate; and
(slow) the whole chain on the embedded demo sample with the `tiny` preset on the tiny agent."""
from __future__ import annotations

import json
import warnings

import dagster as dg
import polars as pl
import pytest

from cb_assets.assets import training
from cb_assets.io_manager import ParquetIOManager
from cb_assets.resources import DatasetsResource, ModelResource
from core.test_trainer import WORKER_OVERRIDES, write_root

CHECKS = [training.adapter_kl_above_eps, training.adapter_harmful_cos_sim_dropped, training.adapter_retain_cos_sim,
          training.adapter_coherence]
UPSTREAM = [dg.AssetSpec("train_split"), dg.AssetSpec("renders"), dg.AssetSpec("lossmasks")]


def _materialize(overrides, instance=None, **cfg):
    return dg.materialize(
        [*UPSTREAM, training.adapter, *CHECKS],
        selection=dg.AssetSelection.assets("adapter"),
        resources={"io_manager": ParquetIOManager(), "datasets": DatasetsResource(), "model": ModelResource()},
        run_config={"ops": {"adapter": {"config": {"preset": "tiny", "overrides": overrides, **cfg}}}},
        raise_on_error=False,
        instance=instance or dg.DagsterInstance.ephemeral(),
    )


@pytest.mark.slow
def test_adapter_asset_trains_through_pipes_and_publishes(data_root, monkeypatch, capfd):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("CB_TORCH_THREADS", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    write_root(data_root)
    ov = [o for o in WORKER_OVERRIDES if not o.startswith("log.")] + ["train.steps=6", "train.checkpoint_every=3",
                                                                     "log.wandb=true", "log.generation_tokens=8"]
    instance = dg.DagsterInstance.ephemeral()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        res = _materialize(ov, instance)
    failures = [str(e.event_specific_data)[:800] for e in res.all_events if e.is_failure]
    assert res.success, failures[:2]
    # no noise a user cannot act on: Dagster's warning about its own Pipes preview property here, W&B's and
    # transformers' deprecations in the worker (its stderr is this process's)
    assert not [str(w.message) for w in seen if "expected_writer_count" in str(w.message)]
    worker_out, worker_err = capfd.readouterr()
    assert "step 6/6" not in worker_out, "under Pipes a line reaches the console once, through Dagster's log"
    assert "wandb" in worker_err  # the worker's stderr was captured
    assert "reinit" not in worker_err and "is_gradient_checkpointing" not in worker_err, worker_err[-2000:]
    mat = next(e for e in res.get_asset_materialization_events() if e.asset_key == dg.AssetKey("adapter"))
    meta = mat.materialization.metadata
    # headline numbers are numeric metadata (plotted across materializations); curves shown as markdown
    assert isinstance(meta["final_loss"], dg.FloatMetadataValue) and meta["steps"].value == 6
    assert meta["harmful_cos_sim_end"].value < meta["harmful_cos_sim_start"].value
    assert "data:image/png;base64," in meta["loss_curves"].value
    assert meta["preset"].value == "tiny" and meta["loss_mode"].value == "triplet_full"
    # worker logs came back through Pipes
    logs = [e.user_message for e in instance.all_logs(res.run_id)]
    assert any("step 6/6" in m and "tok/s" in m and "ETA" in m for m in logs), logs[-5:]
    published = data_root / "adapter"
    assert (published / "adapter_model.safetensors").is_file() and (published / "adapter_config.json").is_file()
    hist = pl.read_parquet(published / "history.parquet")
    assert hist.height == 6 and {"train/loss", "rr/cos_sim_mean", "lr", "cs", "cr", "train/grad_norm"} <= set(hist.columns)
    run_dir = (data_root / "train_runs" / "latest").resolve()
    assert (run_dir / "best").is_symlink() and (run_dir / "console.log").read_text().count("step 6/6") == 1
    assert list((run_dir / "wandb").glob("offline-run-*")), "W&B ran offline in the run folder"
    assert "WANDB_API_KEY" not in (run_dir / "console.log").read_text()
    checks = {e.check_name: e for e in res.get_asset_check_evaluations()}
    assert checks["adapter_kl_above_eps"].passed and checks["adapter_harmful_cos_sim_dropped"].passed
    assert checks["adapter_retain_cos_sim"].metadata["end"].value > 0
    assert "adapter_coherence" in checks  # random weights: judged, whichever way it goes
    # a second materialization resumes the finished run (same folder) and trains no further steps
    res2 = _materialize(ov)
    assert res2.success
    assert "resumed from step_000006" in (run_dir / "console.log").read_text()


def test_bad_override_fails_before_training(data_root):
    write_root(data_root)
    res = _materialize(["train.lrr=1"])
    assert not res.success
    err = next(e for e in res.all_events if e.is_failure)
    assert "unknown field 'lrr' of section 'train' (did you mean 'lr'?)" in str(err.event_specific_data)
    # a Failure naming the run config it came from (was an op error wrapping the TrainConfigError's traceback)
    assert err.event_specific_data.error.cls_name == "Failure"
    assert err.event_specific_data.error.message.startswith(
        "dagster._core.definitions.events.Failure: adapter run config (ops.adapter.config: preset 'tiny', overrides ['train.lrr=1']): override 'train.lrr'")
    assert not (data_root / "adapter").exists()


def test_a_preset_variable_naming_no_preset_is_named(monkeypatch):
    import dagster as dg

    from cb_assets.assets.training import default_preset
    from cb_assets.resources import DatasetsResource

    monkeypatch.setenv("CB_TRAIN_PRESET", "stage_one")
    with pytest.raises(dg.Failure, match=r"CB_TRAIN_PRESET: training preset 'stage_one' not found.*stage1"):
        default_preset(DatasetsResource())
    monkeypatch.setenv("CB_TRAIN_PRESET", "stage1")
    assert default_preset(DatasetsResource()) == "stage1"


@pytest.mark.slow
@pytest.mark.timeout(3600)  # the first run builds the tiny agent (cached afterwards)
def test_whole_chain_to_adapter_on_demo_sample_with_tiny_agent(data_root, monkeypatch):
    """raw -> ... -> train_split -> adapter (`tiny` preset, tiny agent, CPU) on the embedded demo sample."""
    monkeypatch.delenv("CB_CURATION_PROFILE", raising=False)
    monkeypatch.delenv("CB_MODEL", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("CB_TORCH_THREADS", "1")
    from cb_assets.definitions import defs

    res = dg.materialize(
        list(defs.assets) + list(defs.asset_checks or []),
        resources=defs.resources,
        selection=dg.AssetSelection.assets("adapter", "eval_split").upstream(),
        run_config={"ops": {"adapter": {"config": {"overrides": ["train.steps=12", "log.wandb=false"]}}}},
        raise_on_error=False,
        instance=dg.DagsterInstance.ephemeral(),
    )
    failures = [str(e.event_specific_data)[:800] for e in res.all_events if e.is_failure]
    assert res.success, failures[:2]
    final = json.loads((data_root / "adapter" / "final_metrics.json").read_text())
    assert final["steps"] == 12 and final["data"]["harmful"] > 0 and final["data"]["retain"] > 0
    assert final["harmful_cos_sim_end"] < final["harmful_cos_sim_start"]
    cfg = (data_root / "adapter" / "config.yaml").read_text()
    assert "profile: tiny_agent" in cfg


def test_nproc_follows_the_slurm_job_and_selects_torchrun(monkeypatch, tmp_path):
    from cb_core.train.worker import run_metadata, slurm_nproc

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert slurm_nproc(1) == 1
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "4")
    assert slurm_nproc(1) == 4
    monkeypatch.delenv("SLURM_GPUS_ON_NODE")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert slurm_nproc(1) == 2
    cmd = training.worker_command("stage1", ["train.lr=3e-5"], tmp_path / "r", tmp_path, 2, False)
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    assert cmd[cmd.index("--override") + 1] == "train.lr=3e-5"
    assert training.worker_command("tiny", [], tmp_path / "r", tmp_path, 1, True)[1:3] == ["-m", "cb_core.train.worker"]
    monkeypatch.setenv("WANDB_API_KEY", "secret-key-value")
    meta = run_metadata(["--preset", "tiny"], 1)
    assert meta["slurm_job_id"] == "123" and "secret-key-value" not in str(meta)
