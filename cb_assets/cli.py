"""Entry points of the sbatch scripts (they run inside an allocation, so everything runs in-process there):

    python -m cb_assets.cli pipeline [--dry-run]   # slurm/unified_pipeline.sbatch: the graph minus SKIP_* stages
    python -m cb_assets.cli sweep [--dry-run]      # slurm/sweep_hparams.sbatch: a sweep, points one after another

Both read the old toggles from the environment (cb_core.sweep.toggles) and print how each was mapped.
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _job_tag() -> str:
    return os.environ.get("SLURM_JOB_ID") or str(os.getpid())


def pipeline_command(env=None) -> tuple[list[str], dict[str, str], list[str]]:
    """(dagster command, extra env, notes) for the unified pipeline under the current toggles."""
    import yaml

    from cb_assets.definitions import defs
    from cb_core.config import load_yaml
    from cb_core.io import data_root
    from cb_core.sweep.toggles import pipeline_plan

    env = os.environ if env is None else env
    plan = pipeline_plan(env)
    graph = defs.resolve_asset_graph()
    skip = set(plan.skip_groups) | {"sweeps"}
    keys = sorted(k.to_user_string() for k in graph.get_all_asset_keys() if graph.get(k).group_name not in skip)
    if not keys:
        raise SystemExit("every stage is skipped: nothing to run")
    ops = {name: {"config": cfg} for name, cfg in plan.ops.items() if name in keys}
    if plan.generation_file:
        gen = {**load_yaml("generation.yaml"), **plan.generation_file}
        path = Path(env.get("CB_DATA_ROOT") or data_root()) / "_sbatch" / f"generation.{_job_tag()}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(gen, sort_keys=False))
        for t in ("ds_completions", "dr_completions", "adversarial_safe"):
            if t in keys:
                ops.setdefault(t, {"config": {}})["config"]["config_file"] = str(path)
    cmd = [sys.executable, "-m", "dagster", "asset", "materialize", "-m", "cb_assets.definitions",
           "--select", ",".join(keys)]
    if ops:
        cmd += ["--config-json", json.dumps({"ops": ops})]
    return cmd, plan.env, plan.notes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cb_assets.cli", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("pipeline", "sweep"):
        p = sub.add_parser(name)
        p.add_argument("--dry-run", action="store_true", help="print the mapping and the plan, run nothing")
        if name == "sweep":
            p.add_argument("--final", action="store_true", help="also the seed fan-out and release_report")
    args = ap.parse_args(argv)
    from cb_core.sweep.toggles import ToggleError

    try:
        if args.cmd == "pipeline":
            cmd, extra, notes = pipeline_command()
            for n in notes:
                print(f"[cb toggles] {n}", flush=True)
            print(f"[cb] {' '.join(cmd[:8])} ... ({cmd[cmd.index('--select') + 1].count(',') + 1} assets)", flush=True)
            if args.dry_run:
                print(json.dumps({"command": cmd, "env": extra}))
                return 0
            return subprocess.call(cmd, cwd=str(PROJECT_ROOT), env={**os.environ, **extra})
        return sweep(args)
    except ToggleError as e:
        print(f"[cb toggles] error: {e}", file=sys.stderr)
        return 2


def sweep(args) -> int:
    import yaml

    from cb_core.io import data_root
    from cb_core.sweep.toggles import ENV_RENAMES, sweep_manifest

    manifest, overrides, notes = sweep_manifest(os.environ)
    for old, new in ENV_RENAMES.items():
        if os.environ.get(old) and old != "MODE":
            os.environ[new] = os.environ[old]
            notes.append(f"{old} -> {new}")
    if isinstance(manifest, dict):
        path = data_root() / "_sbatch" / f"sweep.{_job_tag()}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(manifest, sort_keys=False))
        manifest = str(path)
    for n in notes:
        print(f"[cb toggles] {n}", flush=True)
    from cb_core.sweep.manifest import load_manifest
    from cb_core.train.config import parse_overrides

    points = load_manifest(manifest, parse_overrides(overrides)).expand()
    print(f"[cb] sweep {manifest}: {len(points)} point(s); shared overrides {overrides}", flush=True)
    if args.dry_run:
        print(json.dumps({"manifest": manifest, "overrides": overrides, "points": [p.key for p in points]}))
        return 0
    from cb_assets.assets.sweeps import run_sweep_in_process

    status = run_sweep_in_process(manifest, overrides=overrides, final=args.final,
                                  log=lambda m: print(f"[cb] {m}", flush=True))
    print(json.dumps(status))
    return 0 if any(v == "SUCCESS" for v in status.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
