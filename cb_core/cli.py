"""`cb`: the command line of the old train CLI, over the platform's tables and run folders.

    cb leaderboard --limit 10 [--reverse]        ranked sweep points ($CB_DATA_ROOT/leaderboard.parquet)
    cb summarise RUN                             JSON: config, metrics, checkpoints ranked, runtime estimate
    cb follow RUN --interval 30                  follows a running training's best checkpoint until it ends
    cb run --preset tiny --override train.lr=3e-5 --fast-dev-run     one training run through Dagster

RUN is a run folder, a run name under the runs root ($CB_DATA_ROOT/train_runs, also searched in its
`history/`), or `latest`. `cb run` materializes the `adapter` asset with `dagster asset materialize` (so the run
is recorded in the Dagster instance, $DAGSTER_HOME) and then rolls finished older runs into `history/`.
No Dagster import here: `cb run` starts the Dagster CLI as a subprocess.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HISTORY = "history"


def data_root(arg: str | None = None) -> Path:
    from cb_core import io

    return Path(arg).resolve() if arg else io.data_root()


def runs_root(root: Path) -> Path:
    from cb_core.train import RUNS_DIR

    return root / RUNS_DIR


def resolve_run(run: str, root: Path) -> Path:
    p = Path(run)
    if p.is_dir() and (p / "config.yaml").exists():
        return p.resolve()
    rr = runs_root(root)
    for cand in (rr / run, rr / HISTORY / run):
        if cand.is_dir():
            return cand.resolve()
    known = sorted(x.name for x in rr.iterdir() if x.is_dir()) if rr.is_dir() else []
    raise SystemExit(f"cb: no run {run!r} (looked in {rr} and {rr / HISTORY}; runs: {known[:20]})")


def _read_json(p: Path) -> Any:
    return json.loads(p.read_text()) if p.exists() else None


def _read_yaml(p: Path) -> Any:
    import yaml

    return yaml.safe_load(p.read_text()) if p.exists() else None


# ------------------------------------------------------------------------------------------------ summarise
def worker_gone(run_dir: Path) -> int | None:
    """The pid of the run's worker (run_metadata.json) when it ran on this host and is no longer alive, else
    None (still alive, another host, or a folder written before the pid was recorded)."""
    meta = _read_json(run_dir / "run_metadata.json") or {}
    pid = meta.get("pid")
    if not isinstance(pid, int) or pid <= 0 or meta.get("host") != socket.gethostname():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return pid
    except OSError:  # alive, another user's
        return None
    return None


def runtime_estimate(run_dir: Path, config: dict | None, metrics: dict | None,
                     index: list[dict] | None, now: float | None = None) -> dict[str, Any]:
    """Seconds per step and the remaining time, from the finished run's own timing or, while it runs, from
    the newest checkpoint's time since the run started (run_metadata.json)."""
    train = (config or {}).get("train") or {}
    total = int(train.get("fast_dev_steps", 3) if train.get("fast_dev_run") else train.get("steps", 0) or 0)
    if metrics and metrics.get("train_seconds") is not None and metrics.get("steps"):
        s = float(metrics["train_seconds"])
        return {"state": "finished", "steps": metrics["steps"], "total_steps": total, "seconds": round(s, 1),
                "seconds_per_step": round(s / max(int(metrics["steps"]), 1), 3), "remaining_seconds": 0}
    start = (run_dir / "run_metadata.json").stat().st_mtime if (run_dir / "run_metadata.json").exists() else None
    done = [e for e in (index or []) if (run_dir / "checkpoints" / e["path"]).exists()]
    gone = worker_gone(run_dir) if start is not None else None
    state = "ended" if gone else "running"  # ended: the worker is gone without final_metrics.json (failed, killed)
    if not done or start is None:
        return {"state": state if start else "unknown", "steps": 0, "total_steps": total,
                "seconds_per_step": None, "remaining_seconds": None}
    last = max(done, key=lambda e: e["step"])
    t = (run_dir / "checkpoints" / last["path"]).stat().st_mtime
    per = max(t - start, 0.0) / max(int(last["step"]), 1)
    return {"state": state, "steps": last["step"], "total_steps": total, "seconds_per_step": round(per, 3),
            "remaining_seconds": round(per * max(total - int(last["step"]), 0), 1),
            "elapsed_seconds": round((now or time.time()) - start, 1)}


def summarise(run_dir: Path) -> dict[str, Any]:
    config = _read_yaml(run_dir / "config.yaml")
    metrics = _read_json(run_dir / "final_metrics.json")
    index = _read_json(run_dir / "checkpoints" / "index.json") or []
    ranked = sorted([e for e in index if e.get("metric") is not None], key=lambda e: (e["metric"], -e["step"]))
    links = {n: os.readlink(run_dir / n) for n in ("best", "second_best", "third_best") if (run_dir / n).is_symlink()}
    return {
        "run": run_dir.name, "path": str(run_dir),
        "config": config, "preset": _read_yaml(run_dir / "preset.yaml"), "overrides": _read_yaml(run_dir / "overrides.yaml"),
        "metrics": {k: v for k, v in (metrics or {}).items() if k != "generations"} if metrics else None,
        "selection_metric": ((config or {}).get("train") or {}).get("selection_metric"),
        "checkpoints": [{"rank": i + 1, "step": e["step"], "metric": e["metric"], "path": e["path"]}
                        for i, e in enumerate(ranked)],
        "links": links,
        "runtime": runtime_estimate(run_dir, config, metrics, index),
        "run_metadata": _read_json(run_dir / "run_metadata.json"),
    }


# ------------------------------------------------------------------------------------------------ leaderboard
def leaderboard_lines(root: Path, limit: int, reverse: bool) -> list[str]:
    import polars as pl

    p = root / "leaderboard.parquet"
    if not p.exists():
        raise SystemExit(f"cb: {p} does not exist: materialize `leaderboard` (job sweep_rank) first")
    lb = pl.read_parquet(p)
    ranked = lb.filter(pl.col("rank").is_not_null()).sort("rank", descending=reverse)
    rest = lb.filter(pl.col("rank").is_null()).sort("key")
    rows = pl.concat([ranked, rest] if not reverse else [rest, ranked], how="diagonal_relaxed").head(limit)
    cols = [c for c in ("rank", "key", "tool_flip_asr", "injection_followed_rate", "capability_retention",
                        "xstest_over_refusal", "eligible", "pareto") if c in rows.columns]

    def cell(v):
        return "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))

    table = [cols] + [[cell(v) for v in r] for r in rows.select(cols).iter_rows()]
    widths = [max(len(r[i]) for r in table) for i in range(len(cols))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table]


# ------------------------------------------------------------------------------------------------ follow
def follow(run_dir: Path, interval: float, max_polls: int | None = None, out=print) -> int:
    """Print the best checkpoint whenever it changes (and the progress); return when the run has finished."""
    seen, polls = None, 0
    while True:
        s = summarise(run_dir)
        best = s["checkpoints"][0] if s["checkpoints"] else None
        state = (best and (best["step"], best["metric"]))
        if state != seen:
            rt = s["runtime"]
            out(json.dumps({"t": time.strftime("%H:%M:%S"), "best": best, "steps": rt.get("steps"),
                            "total_steps": rt.get("total_steps"), "remaining_seconds": rt.get("remaining_seconds")}))
            seen = state
        if s["metrics"] is not None:
            out(json.dumps({"finished": True, "final_loss": s["metrics"].get("final_loss"), "best": best}))
            return 0
        if s["runtime"]["state"] == "ended":
            out(json.dumps({"finished": False, "best": best, "reason": f"the worker (pid "
                            f"{s['run_metadata'].get('pid')}) ended without final_metrics.json: it failed or was "
                            f"killed; see {run_dir / 'console.log'} and the Dagster run's log"}))
            return 1
        polls += 1
        if max_polls is not None and polls >= max_polls:
            return 1
        time.sleep(interval)


# ------------------------------------------------------------------------------------------------ run
SWEEP_MARK = "sweep_point.json"  # in a sweep point's / final seed's run folder (written by its asset)


def roll_history(runs: Path, keep: set[str]) -> list[str]:
    """Move finished `adapter` run folders (final_metrics.json present) other than ``keep`` into runs/history/.
    Unfinished ones stay where the next run of the same configuration resumes them; sweep points and final
    seeds (SWEEP_MARK) stay where a re-registered sweep finds them finished."""
    moved = []
    if not runs.is_dir():
        return moved
    hist = runs / HISTORY
    for d in sorted(runs.iterdir()):
        if d.name in keep or d.name in (HISTORY, "latest") or d.is_symlink() or not d.is_dir():
            continue
        if (d / SWEEP_MARK).exists():
            continue
        if (d / "final_metrics.json").exists():
            hist.mkdir(exist_ok=True)
            dest = hist / d.name
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(d, dest)
            moved.append(d.name)
    return moved


def run_command(preset: str, overrides: list[str], fast: bool, run_name: str | None) -> list[str]:
    cfg: dict[str, Any] = {"preset": preset, "overrides": list(overrides), "fast_dev_run": bool(fast)}
    if run_name:
        cfg["run_name"] = run_name
    return [sys.executable, "-m", "dagster", "asset", "materialize", "-m", "cb_assets.definitions",
            "--select", "adapter", "--config-json",
            # INFO, not DEBUG (as scripts/demo.sh): the worker's step lines, not dozens of engine events
            json.dumps({"ops": {"adapter": {"config": cfg}}, "loggers": {"console": {"config": {"log_level": "INFO"}}}})]


def do_run(args) -> int:
    from cb_core.config import PROJECT_ROOT  # lazy: `cb` starts without pandera
    from cb_core.train.config import TrainConfigError, default_preset, load_train_config

    try:  # a bad preset or override fails here, before Dagster starts
        preset = args.preset or default_preset()  # the `adapter` asset's own default, named in its run config
        load_train_config(preset, list(args.override or []) + (["train.fast_dev_run=true"] if args.fast_dev_run else []))
    except TrainConfigError as e:
        print(f"cb run: {e}", file=sys.stderr)
        return 2
    cmd = run_command(preset, list(args.override or []), args.fast_dev_run, args.run_name)
    if args.print_command:
        print(json.dumps(cmd))
        return 0
    root = data_root(args.data_root)
    env = dict(os.environ, CB_DATA_ROOT=str(root))  # the child runs in the project root: the same data root
    env.setdefault("DAGSTER_HOME", str(PROJECT_ROOT / "dagster_home"))
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("WANDB_MODE", "offline")
    rc = subprocess.call(cmd, cwd=str(PROJECT_ROOT), env=env)
    runs = runs_root(root)
    latest = runs / "latest"
    if rc == 0 and latest.is_symlink():
        moved = roll_history(runs, keep={os.readlink(latest)})
        if moved:
            print(f"cb run: moved {len(moved)} finished older run(s) to {runs / HISTORY}")
        print(f"cb run: run folder {latest.resolve()}")
    return rc


# ------------------------------------------------------------------------------------------------ main
def _at_least(kind, lo, what):
    """An argparse type: ``kind`` (int/float) >= ``lo``, refused with a usage error otherwise."""
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what}, got {text!r}") from None
        if v != v or v < lo:  # NaN too
            raise argparse.ArgumentTypeError(f"{what}, got {text!r}")
        return v
    return parse


def main(argv: list[str] | None = None) -> int:
    """`cb`; output piped into a reader that stops early (`cb summarise latest | head`) ends quietly, as Unix
    tools do, instead of a BrokenPipeError traceback."""
    try:
        code = _main(argv)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's flush at exit must not raise again
        return 141  # 128 + SIGPIPE, the shell's code for a writer whose reader left


def _main(argv: list[str] | None) -> int:
    ap = argparse.ArgumentParser(prog="cb", description="circuit-breaker platform: sweeps, runs and training")
    ap.add_argument("--data-root", default=None, help="default $CB_DATA_ROOT, else ./.cb_data")
    # also after the subcommand (`cb leaderboard --data-root X`); SUPPRESS keeps a value given before it
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-root", default=argparse.SUPPRESS, help="default $CB_DATA_ROOT, else ./.cb_data")
    sub = ap.add_subparsers(dest="cmd", required=True)

    def command(name: str, **kw) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], **kw)

    p = command("leaderboard", help="ranked sweep points", description="Ranked sweep points from "
                       "$CB_DATA_ROOT/leaderboard.parquet (gated-out points after the ranked ones).")
    p.add_argument("--limit", type=_at_least(int, 1, "must be a whole number >= 1"), default=20,
                   help="rows to print (default 20)")
    p.add_argument("--reverse", action="store_true", help="worst first")
    p = command("summarise", aliases=["summarize"], help="JSON summary of one training run",
                       description="JSON: resolved config, final metrics, checkpoints ranked by the selection "
                       "metric, runtime estimate.")
    p.add_argument("run", help="run folder, run name under the runs root (or its history/), or `latest`")
    p = command("follow", help="follow a running training's best checkpoint",
                       description="Prints the best checkpoint whenever it changes until the run finishes.")
    p.add_argument("run")
    p.add_argument("--interval", type=_at_least(float, 0.0, "must be a number of seconds >= 0"), default=30.0,
                   help="seconds between polls (default 30)")
    p.add_argument("--max-polls", type=_at_least(int, 1, "must be a whole number >= 1"), default=None,
                   help="give up after this many polls (exit 1)")
    p = command("run", help="one training run through Dagster (the `adapter` asset)",
                       description="Materializes `adapter` with the given preset and overrides "
                       "(dagster asset materialize), then rolls finished older runs into history/.")
    p.add_argument("--preset", default=None, help="configs/train/<preset>.yaml (default: as the adapter asset: "
                   "$CB_TRAIN_PRESET, else tiny on the demo sample, else stage1)")
    p.add_argument("--override", action="append", default=[], help="section.field=value, repeatable")
    p.add_argument("--fast-dev-run", action="store_true", help="a handful of steps")
    p.add_argument("--run-name", default=None, help="run folder name (default: preset + config hash)")
    p.add_argument("--print-command", action="store_true", help="print the Dagster command and exit")
    args = ap.parse_args(argv)
    root = data_root(args.data_root)
    if args.cmd == "leaderboard":
        print("\n".join(leaderboard_lines(root, args.limit, args.reverse)))
        return 0
    if args.cmd in ("summarise", "summarize"):
        print(json.dumps(summarise(resolve_run(args.run, root)), indent=1, default=str))
        return 0
    if args.cmd == "follow":
        return follow(resolve_run(args.run, root), args.interval, args.max_polls)
    return do_run(args)


if __name__ == "__main__":
    sys.exit(main())
