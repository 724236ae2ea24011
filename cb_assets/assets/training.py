"""`adapter`: the circuit-breaker LoRA, trained by `cb_core.train.worker` in a subprocess through Dagster
Pipes (logs, metrics and the materialization come back to the run), under `torchrun` (PyTorch DDP) when more
than one process is asked for or the SLURM job has several GPUs. Post-training checks read the run's
`final_metrics.json`.
"""

import hashlib
import json
import os
import shutil
import sys
import warnings
from pathlib import Path

import dagster as dg

from cb_assets.resources import DatasetsResource
from cb_assets.tags import gpu_tags
from cb_core.config import setting
from cb_core.train import RUNS_DIR, adapter_dir

TRAINING_GROUP = "training"
GPU_TAGS = gpu_tags("08.00.00")
PROJECT_ROOT = Path(__file__).resolve().parents[2]
PUBLISHED = ("config.yaml", "final_metrics.json", "history.parquet", "curves.png", "run_metadata.json")


class AdapterConfig(dg.Config):
    """Same names as the worker's flags. ``overrides``: dotted keys, e.g. ``["train.lr=3e-5"]``."""

    preset: str | None = None  # default: $CB_TRAIN_PRESET, else `tiny` on the demo sample, else `stage1`
    overrides: list[str] = []
    fast_dev_run: bool = False
    nproc: int | None = None  # default: the SLURM job's GPU count, else the preset's train.nproc
    run_name: str | None = None  # default: <preset>-<hash of resolved config + train_split>: reruns resume
    fresh: bool = False  # start over instead of resuming the run folder's last checkpoint


def default_preset(datasets: DatasetsResource | None = None) -> str:
    """`cb_core.train.config.default_preset` (one rule with `cb run`), its error a Dagster failure."""
    from cb_core.train.config import TrainConfigError
    from cb_core.train.config import default_preset as rule

    try:
        return rule((datasets or DatasetsResource()).selection().demo)
    except TrainConfigError as e:
        raise dg.Failure(str(e)) from None


def _run_name(cfg, preset: str, root: Path, fast: bool) -> str:
    """<preset>-<hash of the config and the run's inputs>: changed settings, input tables (train_split,
    renders, lossmasks) or MWCS schedule file make a new folder instead of resuming another run's checkpoints."""
    from cb_core.train.worker import run_fingerprint

    inputs = {k: v for k, v in run_fingerprint(cfg, root).items() if k.startswith(("table:", "file:"))}
    h = hashlib.sha256(json.dumps([cfg.to_dict(), inputs], sort_keys=True, default=str).encode())
    return f"{Path(preset).stem}{'-fastdev' if fast else ''}-{h.hexdigest()[:10]}"


def worker_command(preset: str, overrides: list[str], run_dir: Path, root: Path, nproc: int, fast: bool) -> list[str]:
    args = ["--preset", preset, "--run-dir", str(run_dir), "--data-root", str(root)]
    for o in overrides:
        args += ["--override", o]
    if fast:
        args.append("--fast-dev-run")
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                "-m", "cb_core.train.worker", *args]
    return [sys.executable, "-m", "cb_core.train.worker", *args]


def worker_env(root: Path) -> dict[str, str]:
    """What the training worker needs beyond the inherited environment: the checkout importable, the data
    root, and W&B online only when a key is set (the key itself is never copied or logged)."""
    return {"PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")]),
            "CB_DATA_ROOT": str(root),
            "WANDB_MODE": os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")}


def run_worker(context: dg.AssetExecutionContext, cmd: list[str], root: Path) -> dg.PipesClientCompletedInvocation:
    """The training worker as a Dagster Pipes subprocess: its log lines and metadata stream into the run.
    Dagster's own Pipes session reads a preview property of its message reader and warns about it in every
    run, noise a user cannot act on: only that warning is silenced, and only around the call."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Function `PipesMessageReader.expected_writer_count`",
                                category=dg.PreviewWarning)
        return dg.PipesSubprocessClient(cwd=str(PROJECT_ROOT)).run(context=context, command=cmd, env=worker_env(root))


def _publish(run_dir: Path, out: Path) -> Path:
    """Copy the run's adapter + summary files to $CB_DATA_ROOT/adapter atomically (temp dir, rename)."""
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(run_dir / "adapter", tmp)
    for name in PUBLISHED:
        if (run_dir / name).exists():
            shutil.copy2(run_dir / name, tmp / name)
    (tmp / "run.json").write_text(json.dumps({"run_dir": str(run_dir)}))
    old = out.with_name(f".{out.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    return out


@dg.asset(
    group_name=TRAINING_GROUP,
    kinds={"pytorch"},
    tags=GPU_TAGS,
    deps=["train_split", "renders", "lossmasks"],
    description="Circuit-breaker LoRA adapter trained on train_split (configs/train/<preset>.yaml + overrides): "
    "the worker runs under Dagster Pipes (torchrun/DDP when nproc > 1), checkpoints and resumes exactly; "
    "published to $CB_DATA_ROOT/adapter with the resolved config, metric history and loss curves.",
)
def adapter(context: dg.AssetExecutionContext, config: AdapterConfig, datasets: DatasetsResource):
    from cb_core.train.config import TrainConfigError, load_train_config
    from cb_core.train.worker import slurm_nproc

    root = datasets.data_root()
    preset = config.preset or default_preset(datasets)
    try:  # a Failure naming the run config, not an op error wrapping a traceback
        cfg, _, _ = load_train_config(preset, list(config.overrides) + (["train.fast_dev_run=true"] if config.fast_dev_run else []))
    except TrainConfigError as e:
        raise dg.Failure(f"adapter run config (ops.adapter.config: preset {preset!r}, overrides "
                         f"{list(config.overrides)}): {e}") from None
    nproc = config.nproc or slurm_nproc(cfg.train.nproc)
    runs = root / RUNS_DIR
    run_dir = runs / (config.run_name or _run_name(cfg, preset, root, config.fast_dev_run))
    if config.fresh and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    latest = runs / "latest"
    if latest.is_symlink() or latest.exists():
        latest.unlink()
    latest.symlink_to(run_dir.name)
    cmd = worker_command(preset, list(config.overrides), run_dir, root, nproc, config.fast_dev_run)
    context.log.info(f"adapter: preset {preset}, {nproc} process(es), run folder {run_dir}")
    invocation = run_worker(context, cmd, root)
    out = _publish(run_dir, adapter_dir(root))
    result = invocation.get_materialize_result()
    meta = dict(result.metadata or {})
    meta.update({"preset": preset, "overrides": dg.MetadataValue.json(list(config.overrides)), "nproc": nproc,
                 "loss_mode": cfg.loss.mode, "target_layers": dg.MetadataValue.json(cfg.loss.target_layers),
                 "published": dg.MetadataValue.path(str(out))})
    return dg.MaterializeResult(metadata=meta)


# ------------------------------------------------------------------------------------- post-training checks
KL_EPS = float(setting("CB_CHECK_KL_EPS", "operations.yaml", "adapter_checks", "kl_eps", 1e-4, float, lo=0))
RETAIN_COS_MIN = float(setting("CB_CHECK_RETAIN_COS_MIN", "operations.yaml", "adapter_checks", "retain_cos_min", 0.5,
                               float, lo=-1, hi=1))


def _final(root: Path) -> dict | None:
    p = adapter_dir(root) / "final_metrics.json"
    return json.loads(p.read_text()) if p.exists() else None


def _not_measured(what: str) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(passed=False, severity=dg.AssetCheckSeverity.WARN,
                               metadata={"value": "not measured", "why": what})


@dg.asset_check(asset=adapter, description=f"mean KL(base ‖ adapter) on benign masked positions > ε ({KL_EPS}): "
                "the adapter changed something")
def adapter_kl_above_eps(datasets: DatasetsResource) -> dg.AssetCheckResult:
    f = _final(datasets.data_root())
    if not f or f.get("kl_benign_end") is None:
        return _not_measured("final_metrics.json has no kl_benign_end (log.post_checks off?)")
    return dg.AssetCheckResult(passed=f["kl_benign_end"] > KL_EPS,
                               metadata={"kl_benign": f["kl_benign_end"], "eps": KL_EPS})


@dg.asset_check(asset=adapter, description="harmful-token cos-sim (adapter vs base, target layers) below its "
                "start value")
def adapter_harmful_cos_sim_dropped(datasets: DatasetsResource) -> dg.AssetCheckResult:
    f = _final(datasets.data_root())
    if not f or f.get("harmful_cos_sim_end") is None or f.get("harmful_cos_sim_start") is None:
        return _not_measured("no harmful cos-sim start/end in final_metrics.json")
    return dg.AssetCheckResult(passed=f["harmful_cos_sim_end"] < f["harmful_cos_sim_start"],
                               metadata={"start": f["harmful_cos_sim_start"], "end": f["harmful_cos_sim_end"]})


@dg.asset_check(asset=adapter, description=f"retain-token cos-sim (adapter vs base) above {RETAIN_COS_MIN}")
def adapter_retain_cos_sim(datasets: DatasetsResource) -> dg.AssetCheckResult:
    f = _final(datasets.data_root())
    if not f or f.get("retain_cos_sim_end") is None:
        return _not_measured("no retain cos-sim in final_metrics.json")
    return dg.AssetCheckResult(passed=f["retain_cos_sim_end"] > RETAIN_COS_MIN,
                               metadata={"end": f["retain_cos_sim_end"], "threshold": RETAIN_COS_MIN})


@dg.asset_check(asset=adapter, description="coherence of a few greedy generations with the adapter: no word "
                "repeated 6+ times in a row, at least 5 distinct words")
def adapter_coherence(datasets: DatasetsResource) -> dg.AssetCheckResult:
    f = _final(datasets.data_root())
    gens = (f or {}).get("generations") or []
    if not gens:
        return _not_measured("no generations in final_metrics.json")
    bad = [g for g in gens if g["max_repeat_run"] >= 6 or g["distinct_words"] < 5]
    return dg.AssetCheckResult(
        passed=not bad, severity=dg.AssetCheckSeverity.WARN,
        metadata={"generations": len(gens), "failing": len(bad),
                  "base_failing": sum(1 for g in gens if g.get("base_max_repeat_run", 0) >= 6 or g.get("base_distinct_words", 9) < 5),
                  "examples": dg.MetadataValue.json([{k: g.get(k) for k in ("trace_id", "text", "max_repeat_run",
                                                                            "distinct_words", "base_text")} for g in gens])})
