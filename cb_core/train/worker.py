"""Training worker: the process ``torchrun`` starts (one per GPU / CPU rank) and the ``adapter`` asset runs
through Dagster Pipes.

    python -m cb_core.train.worker --preset tiny --override train.lr=3e-5 --run-dir RUN [--fast-dev-run]
    torchrun --nproc-per-node 2 -m cb_core.train.worker --preset tiny --run-dir RUN

Reads ``train_split``, ``renders`` and ``lossmasks`` from ``$CB_DATA_ROOT`` (or ``--data-root``), trains, and
leaves in ``RUN``: preset.yaml (the preset as written), overrides.yaml, config.yaml (resolved),
run_metadata.json, console.log, checkpoints/ (+ best / second_best / third_best links), adapter/ (safetensors),
history.parquet, curves.png, final_metrics.json, wandb/ (offline unless WANDB_API_KEY is set),
fingerprint.json. A second start on the same RUN resumes from its last checkpoint, if it is the same run:
same settings (but logging and checkpoint cadence) and the same input tables (`run_fingerprint`); else it
stops with what changed, never publishing the old run's weights under the new settings. Rank 0 alone writes
files and talks to Dagster (when started by Pipes: logs, then the materialization's metadata).
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PROJECT_ROOT = Path(__file__).resolve().parents[2]
HEADLINE = ("final_loss", "harmful_cos_sim_start", "harmful_cos_sim_end", "retain_cos_sim_end", "kl_benign_end",
            "steps", "tokens_per_s", "train_seconds")


# ------------------------------------------------------------------------------------------ helpers
def _yaml_dump(obj: Any) -> str:
    import yaml

    return yaml.safe_dump(obj, sort_keys=False)


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run_metadata(argv: list[str], world: int) -> dict[str, Any]:
    """What reproduces the run: command, commit, package versions, SLURM job, host, determinism flags."""
    import importlib.metadata as md

    import torch

    versions = {}
    for pkg in ("torch", "transformers", "peft", "polars", "dagster", "wandb", "safetensors"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    return {
        "command": shlex.join([sys.executable, "-m", "cb_core.train.worker", *argv]),
        "git_commit": git_commit(), "packages": versions, "python": platform.python_version(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "host": socket.gethostname(), "pid": os.getpid(),
        "world_size": world,
        "PYTHONHASHSEED": os.environ.get("PYTHONHASHSEED"),
        "torch_deterministic": torch.are_deterministic_algorithms_enabled(),
        "cuda": torch.cuda.is_available(), "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def slurm_nproc(default: int) -> int:
    """Under SLURM the process count follows the job's GPUs (SLURM_GPUS_ON_NODE, else CUDA_VISIBLE_DEVICES)."""
    if not os.environ.get("SLURM_JOB_ID"):
        return default
    g = os.environ.get("SLURM_GPUS_ON_NODE")
    if g and g.isdigit() and int(g) > 0:
        return int(g)
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    if cvd:
        return len([x for x in cvd.split(",") if x.strip()])
    return default


def wandb_mode() -> str:
    """offline unless a key is set (the key itself is never read into a log line)."""
    return os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")


def plot_curves(history: list[dict], path: Path) -> Path | None:
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    for k in ("train/loss", "train/loss_rr", "train/loss_ret", "train/loss_kl"):
        ax[0].plot(steps, [h[k] for h in history], label=k.split("/")[-1])
    ax[0].set_xlabel("step"); ax[0].set_title("loss terms"); ax[0].legend()  # noqa: E702
    for k in ("rr/cos_sim_mean", "ret/cos_sim_mean"):
        ax[1].plot(steps, [h[k] for h in history], label=k)
    ax[1].set_xlabel("step"); ax[1].set_title("cos-sim adapter vs base"); ax[1].legend()  # noqa: E702
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def png_markdown(path: Path) -> str:
    return f"![loss curves](data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()})"


def load_frames(root: Path):
    import polars as pl

    out = []
    for name in ("train_split", "renders", "lossmasks"):
        p = root / f"{name}.parquet"
        if not p.exists():
            if name == "lossmasks":
                out.append(None)
                continue
            raise FileNotFoundError(f"{p} does not exist: materialize `{name}` first (or set CB_DATA_ROOT)")
        out.append(pl.read_parquet(p))
    return out


def load_model_and_tokenizer(profile_name: str, dtype: str):
    import torch

    from cb_core.model import load_model, load_profile, load_profile_tokenizer

    if profile_name == "tiny_agent":
        try:
            import cb_core.generate.tiny_agent  # noqa: F401
        except ImportError as e:
            raise RuntimeError("model profile tiny_agent needs cb_core.generate.tiny_agent (the project's CPU demo "
                               f"agent), which is not importable: {e}") from e
    profile = load_profile(profile_name)
    tok = load_profile_tokenizer(profile)
    model = load_model(profile, tok)
    model = model.to(getattr(torch, dtype))
    return model, tok


# --------------------------------------------------------------------------------------- run identity
INPUT_TABLES = ("train_split", "renders", "lossmasks")
# settings that change how a run is logged or checkpointed, never its weights: resuming across them is fine
RESUME_NEUTRAL = ("name", "description", "log.", "train.checkpoint_every", "train.keep_checkpoints",
                  "train.selection_metric", "train.throttle_s")


def run_fingerprint(cfg, root: Path) -> dict[str, Any]:
    """What a run's weights depend on: every resolved setting but the RESUME_NEUTRAL ones, the bytes of the
    input tables and of the MWCS schedule file (its name alone would not see an edit)."""
    from cb_core.io import file_digest as digest
    from cb_core.mixture import schedule_path

    flat = {f"{sec}.{k}" if isinstance(body, dict) else sec: v
            for sec, body in cfg.to_dict().items() for k, v in (body.items() if isinstance(body, dict) else [(sec, body)])}
    out = {k: v for k, v in flat.items() if not k.startswith(RESUME_NEUTRAL)}
    out.update({f"table:{name}": digest(root / f"{name}.parquet") for name in INPUT_TABLES})
    if cfg.data.mwcs_schedule:
        out["file:mwcs_schedule"] = digest(schedule_path(cfg.data.mwcs_schedule))
    return out


class StaleRun(RuntimeError):
    """The run folder holds checkpoints of another run (other settings or inputs)."""


def stale_checkpoints(run_dir: Path, fingerprint: dict[str, Any]) -> list[str]:
    """What changed since the run folder's checkpoints were written (``[]``: none, or nothing to resume). A
    folder from before fingerprints (checkpoints, no fingerprint.json) resumes as it always did."""
    path = run_dir / "fingerprint.json"
    if not path.is_file() or not any((run_dir / "checkpoints").glob("step_*/trainer_state.pt")):
        return []
    return fingerprint_changes(json.loads(path.read_text(encoding="utf-8")), fingerprint)


def fingerprint_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every key whose value differs (or is only in one), sorted by key."""
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


# ----------------------------------------------------------------------------------------------- main
def train(args: argparse.Namespace, argv: list[str], pipes=None) -> dict[str, Any]:
    import polars as pl
    import torch

    from cb_core.mixture import MixtureSchedule
    from cb_core.train.config import load_preset_raw, load_train_config
    from cb_core.train.data import build_train_data
    from cb_core.train.trainer import Trainer, init_distributed

    d = init_distributed()
    if os.environ.get("CB_TORCH_THREADS"):
        from cb_core.config import env_number

        torch.set_num_threads(env_number("CB_TORCH_THREADS", None, int, 1, None))
    overrides = list(args.override or [])
    if args.fast_dev_run:
        overrides.append("train.fast_dev_run=true")
    cfg, raw, ov = load_train_config(args.preset, overrides)
    run_dir = Path(args.run_dir).resolve()
    root = Path(args.data_root).resolve() if args.data_root else Path(os.environ.get("CB_DATA_ROOT", ".cb_data")).resolve()
    pipes = pipes if d.rank == 0 else None
    log_file = None
    fingerprint = run_fingerprint(cfg, root)
    changed = stale_checkpoints(run_dir, fingerprint)
    if changed:  # every rank raises: resuming would publish the old run's weights under the new settings
        raise StaleRun(
            f"{run_dir} holds checkpoints of another run (changed since: {'; '.join(changed[:6])}"
            f"{'; ...' if len(changed) > 6 else ''}): resuming them would publish that run's weights. Start over "
            "(the adapter asset's `fresh: true`, the worker's --fresh, or delete the folder) or use another run "
            "folder")
    if d.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        _write(run_dir / "fingerprint.json", json.dumps(fingerprint, indent=1, default=str))
        _write(run_dir / "preset.yaml", _yaml_dump(raw))
        _write(run_dir / "overrides.yaml", _yaml_dump(ov))
        _write(run_dir / "config.yaml", _yaml_dump(cfg.to_dict()))
        _write(run_dir / "run_metadata.json", json.dumps({**run_metadata(argv, d.world), "preset": args.preset,
                                                          "preset_path": str(load_preset_raw(args.preset)[1])}, indent=1))
        log_file = open(run_dir / "console.log", "a", encoding="utf-8")
    d.barrier()

    def log(msg: str) -> None:
        if d.rank != 0:
            return
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        log_file.write(line + "\n")
        log_file.flush()
        if pipes is not None:  # Dagster's log shows it on the console: printing it too doubles every line
            pipes.log.info(msg)
        else:
            print(line, flush=True)

    train_split, renders, lossmasks = load_frames(root)
    schedule = MixtureSchedule.load(cfg.data.mwcs_schedule) if cfg.data.mwcs_schedule else None
    over = {p for ph in (schedule.phases if schedule else []) for p in ph.lmp_overrides.values()}
    data = build_train_data(train_split, renders, lossmasks, max_length=cfg.model.max_length,
                            override_policies=over, mask_prompt_tokens=cfg.data.mask_prompt_tokens,
                            mask_policy=cfg.data.mask_policy)
    log(f"data: {data.stats}")
    if data.stats.get("mask_policy_missing_kept_default"):
        log(f"warning: data.mask_policy={cfg.data.mask_policy!r} has no mask for "
            f"{data.stats['mask_policy_missing_kept_default']} of {data.stats['samples']} sample(s): they train on "
            "curation's mask instead (materialize `lossmasks` with that policy to train every sample on it)")
    if cfg.train.warmup_steps > cfg.total_steps:
        log(f"warning: train.warmup_steps={cfg.train.warmup_steps} > {cfg.total_steps} steps: the learning rate "
            f"never reaches train.lr={cfg.train.lr:g}")
    model, tok = load_model_and_tokenizer(cfg.model.profile, cfg.model.dtype)
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        model = model.to(f"cuda:{local}")
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0

    wb = None
    if cfg.log.wandb and d.rank == 0:
        import wandb

        wb = wandb.init(project=cfg.log.wandb_project, dir=str(run_dir), mode=wandb_mode(), config=cfg.to_dict(),
                        name=run_dir.name, id=run_dir.name.replace("/", "_"), resume="allow", reinit="finish_previous")
    trainer = Trainer(cfg, model, data, run_dir, pad_id=pad, schedule=schedule, dist_ctx=d, log=log,
                      on_metrics=(lambda m: wb.log({k: v for k, v in m.items() if k != "step"}, step=m["step"])) if wb else None)
    start_probe = run_dir / "probe_start.json"
    if d.rank == 0 and cfg.log.post_checks and not start_probe.exists() and trainer.latest_checkpoint() is None:
        _write(start_probe, json.dumps(trainer.probe()))
    t0 = time.time()
    log(f"training {cfg.name}: {cfg.total_steps} steps, {d.world} process(es), loss {cfg.loss.mode}, "
        f"layers {cfg.loss.target_layers}")
    history = trainer.fit()
    seconds = time.time() - t0
    trainer.export_adapter(run_dir / "adapter")
    result: dict[str, Any] = {}
    if d.rank == 0:
        pl.DataFrame(history).write_parquet(run_dir / "history.parquet")
        curves = plot_curves(history, run_dir / "curves.png")
        final = {"final_loss": history[-1]["train/loss"] if history else None, "steps": trainer.step,
                 # all tokens over all step time (a mean of per-step rates overweights the short steps)
                 "tokens_per_s": (sum(h["tokens_per_s"] * h["step_time_s"] for h in history)
                                  / max(sum(h["step_time_s"] for h in history), 1e-9)),
                 # a resumed run: this process's time plus the restored steps' (not 0.01 s for 40 steps)
                 "train_seconds": seconds + trainer.seconds_restored(), "world_size": d.world, "distance_scale": trainer.scale,
                 "data": data.stats}
        if cfg.log.post_checks:
            start = json.loads(start_probe.read_text()) if start_probe.exists() else {}
            end = trainer.probe()
            final.update(harmful_cos_sim_start=start.get("harmful_cos_sim"), harmful_cos_sim_end=end["harmful_cos_sim"],
                         retain_cos_sim_start=start.get("retain_cos_sim"), retain_cos_sim_end=end["retain_cos_sim"],
                         kl_benign_end=end["kl_benign"], generations=trainer.generations(tok, 3, cfg.log.generation_tokens))
        _write(run_dir / "final_metrics.json", json.dumps(final, indent=1))
        log("done: " + ", ".join(f"{k} {final[k]:.4g}" for k in HEADLINE if isinstance(final.get(k), (int, float))))
        log(f"curves: {curves}")
        if wb is not None:
            wb.summary.update({k: final[k] for k in HEADLINE if isinstance(final.get(k), (int, float))})
            wb.finish()
        result = {**final, "run_dir": str(run_dir), "curves": str(curves) if curves else None}
        if pipes is not None:
            pipes.report_asset_materialization(metadata=pipes_metadata(result))
        log_file.close()
    d.barrier()
    if d.on:
        import torch.distributed as dist

        dist.destroy_process_group()
    return result


def pipes_metadata(r: dict[str, Any]) -> dict[str, Any]:
    md: dict[str, Any] = {k: {"raw_value": r[k], "type": "int" if isinstance(r[k], int) else "float"}
                          for k in HEADLINE if isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool)}
    md["run_dir"] = {"raw_value": r["run_dir"], "type": "path"}
    md["adapter_path"] = {"raw_value": str(Path(r["run_dir"]) / "adapter"), "type": "path"}
    if r.get("curves"):
        md["curves"] = {"raw_value": r["curves"], "type": "path"}
        md["loss_curves"] = {"raw_value": png_markdown(Path(r["curves"])), "type": "md"}
    md["history"] = {"raw_value": str(Path(r["run_dir"]) / "history.parquet"), "type": "path"}
    return md


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="cb_core.train.worker", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny", help="configs/train/<preset>.yaml or a YAML path")
    ap.add_argument("--override", action="append", help="section.field=value (repeatable), e.g. train.lr=3e-5")
    ap.add_argument("--run-dir", required=True, help="run folder (resumed when it holds a checkpoint)")
    ap.add_argument("--data-root", default=None, help="folder with train_split/renders/lossmasks parquet")
    ap.add_argument("--fast-dev-run", action="store_true", help="a handful of steps (train.fast_dev_steps)")
    ap.add_argument("--fresh", action="store_true", help="delete the run folder first: start over")
    args = ap.parse_args(argv)
    if args.fresh and int(os.environ.get("RANK", "0")) == 0:
        import shutil

        shutil.rmtree(args.run_dir, ignore_errors=True)
    if os.environ.get("DAGSTER_PIPES_CONTEXT") and int(os.environ.get("RANK", "0")) == 0:
        from dagster_pipes import open_dagster_pipes  # rank 0 reports to Dagster; errors end up in the run

        with open_dagster_pipes() as pipes:
            train(args, argv, pipes)
        return 0
    from cb_core.train.config import TrainConfigError

    try:
        train(args, argv)
    except (StaleRun, TrainConfigError) as e:  # a decision or a setting for the user, not a crash: no traceback
        print(f"cb_core.train.worker: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
