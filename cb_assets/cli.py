"""Entry points of the sbatch scripts (they run inside an allocation, so everything runs in-process there):

    python -m cb_assets.cli pipeline [--dry-run]   # slurm/unified_pipeline.sbatch: the graph minus SKIP_* stages
    python -m cb_assets.cli sweep [--dry-run]      # slurm/sweep_hparams.sbatch: a sweep, points one after another

Both read the old toggles from the environment (cb_core.sweep.toggles) and print how each was mapped. `sweep`
runs again only the points whose earlier run no longer stands (`--rerun`: every point). `--dry-run` prints the
plan and the files a run would write, and writes nothing.
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


def check_training(preset: str | None, overrides: list[str], origins: dict[str, str] | None = None) -> None:
    """The training settings the toggles map to, resolved now as `adapter` will resolve them (its preset: MODE /
    CB_TRAIN_PRESET, else the demo / real-data default), so a bad one fails before hours of generation; the
    error names the toggle that set the key it is about (``origins``, as toggles.training_overrides gives)."""
    from cb_assets.assets.training import default_preset
    from cb_assets.resources import DatasetsResource
    from cb_core.sweep.manifest import message_key
    from cb_core.sweep.toggles import ToggleError
    from cb_core.train.config import TrainConfigError, load_train_config, preset_path

    if preset and (origins or {}).get("preset"):  # MODE: a preset that does not exist is named with the toggle
        try:
            preset_path(preset)
        except TrainConfigError as e:
            raise ToggleError(f"{origins['preset']}: {e}") from None
    try:
        load_train_config(preset or default_preset(DatasetsResource()), overrides)
    except (TrainConfigError, ValueError) as e:
        origin = (origins or {}).get(f"overrides.{message_key(str(e))}")
        raise ToggleError(f"{origin + ': ' if origin else ''}the training settings {overrides}: {e}") from None


def check_model(name: str, env) -> None:
    """The model profile MODEL (or TOKENIZER) names, loaded now: the error names the toggle."""
    from cb_core.config import ConfigError
    from cb_core.model import load_profile
    from cb_core.sweep.toggles import ToggleError

    toggle = "MODEL" if env.get("MODEL") else "TOKENIZER"
    try:
        load_profile(name)
    except (ConfigError, FileNotFoundError) as e:
        raise ToggleError(f"{toggle}={env.get(toggle)!r}: {e}") from None


def pipeline_command(env=None, dry_run: bool = False) -> tuple[list[str], dict[str, str], list[str], dict[str, str]]:
    """(dagster command, extra env, notes, {path: text} of the files the command reads) for the unified pipeline
    under the current toggles; those files are written unless ``dry_run`` (a dry run writes nothing)."""
    import yaml

    from cb_assets.definitions import defs
    from cb_core.config import load_yaml
    from cb_core.io import data_root
    from cb_core.sweep.toggles import pipeline_plan

    env = os.environ if env is None else env
    plan = pipeline_plan(env)
    skip = set(plan.skip_groups) | {"sweeps"}
    if plan.train_overrides or (plan.env.get("CB_TRAIN_PRESET") and "training" not in skip):  # MODE alone too
        check_training(plan.env.get("CB_TRAIN_PRESET"), plan.train_overrides, plan.origins)
    if plan.env.get("CB_MODEL"):  # MODEL / TOKENIZER: a profile that does not exist failed at renders, after ETL_A
        check_model(plan.env["CB_MODEL"], env)
    graph = defs.resolve_asset_graph()
    keys = sorted(k.to_user_string() for k in graph.get_all_asset_keys() if graph.get(k).group_name not in skip)
    if not keys:
        raise SystemExit("every stage is skipped: nothing to run")
    ops = {name: {"config": cfg} for name, cfg in plan.ops.items() if name in keys}
    files: dict[str, str] = {}
    if plan.generation_file:
        gen = {**load_yaml("generation.yaml"), **plan.generation_file}
        path = Path(env.get("CB_DATA_ROOT") or data_root()) / "_sbatch" / f"generation.{_job_tag()}.yaml"
        files[str(path)] = yaml.safe_dump(gen, sort_keys=False)
        if not dry_run:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(files[str(path)])
        for t in ("ds_completions", "dr_completions", "adversarial_safe"):
            if t in keys:
                ops.setdefault(t, {"config": {}})["config"]["config_file"] = str(path)
    cmd = [sys.executable, "-m", "dagster", "asset", "materialize", "-m", "cb_assets.definitions",
           "--select", ",".join(keys)]
    if ops:
        cmd += ["--config-json", json.dumps({"ops": ops})]
    return cmd, plan.env, plan.notes, files


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cb_assets.cli", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("pipeline", "sweep"):
        p = sub.add_parser(name)
        p.add_argument("--dry-run", action="store_true", help="print the mapping and the plan, run nothing")
        if name == "sweep":
            p.add_argument("--final", action="store_true", help="also the seed fan-out and release_report")
            p.add_argument("--rerun", action="store_true",
                           help="run every point again, also those whose earlier run still stands")
    args = ap.parse_args(argv)
    from cb_core.config import ConfigError
    from cb_core.sweep.manifest import SweepError
    from cb_core.sweep.toggles import ToggleError

    try:
        if args.cmd == "pipeline":
            cmd, extra, notes, files = pipeline_command(dry_run=args.dry_run)
            for n in notes:
                print(f"[cb toggles] {n}", flush=True)
            print(f"[cb] {' '.join(cmd[:8])} ... ({cmd[cmd.index('--select') + 1].count(',') + 1} assets)", flush=True)
            if args.dry_run:
                print(json.dumps({"command": cmd, "env": extra, "would_write": files}))
                return 0
            return subprocess.call(cmd, cwd=str(PROJECT_ROOT), env={**os.environ, **extra})
        return sweep(args)
    except ToggleError as e:
        print(f"[cb toggles] error: {e}", file=sys.stderr)
        return 2
    except (SweepError, ConfigError) as e:  # a wrong manifest name or setting: one line naming where it came from
        origin = next((f"{v}={os.environ[v]!r}" for v in ("SWEEP", "CB_SWEEP") if os.environ.get(v)), None)
        # which variable named the manifest, for a manifest that is not there (not after an unrelated error)
        where = f" (the manifest from {origin})" if origin and args.cmd == "sweep" and \
            str(e).startswith("sweep manifest ") else ""
        print(f"[cb] error: {e}{where}", file=sys.stderr)
        return 2


def sweep(args) -> int:
    import yaml

    from cb_core.io import data_root
    from cb_core.sweep.manifest import load_manifest
    from cb_core.sweep.toggles import ENV_RENAMES, sweep_ignored, sweep_manifest
    from cb_core.train.config import parse_overrides

    from cb_assets.assets.sweeps import default_manifest
    from cb_assets.resources import DatasetsResource

    # without SWEEP / QUICK_TEST: as sweep_points ($CB_SWEEP, `tiny` on the demo sample: a laptop following the
    # README must not get 60 points of an 8B model), else the old script's `full`
    manifest, overrides, notes, origins = sweep_manifest(os.environ,
                                                         default=default_manifest(DatasetsResource(), "full"))
    for old, new in ENV_RENAMES.items():
        if os.environ.get(old) and old != "MODE":
            os.environ[new] = os.environ[old]
            notes.append(f"{old} -> {new}")
    if os.environ.get("MODE"):  # was dropped without a word: a sweep trains its manifest's preset
        notes.append(f"MODE={os.environ['MODE']!r} ignored: a sweep's points train the preset its manifest names "
                     "(`preset:`)")
    notes += sweep_ignored(os.environ)
    for n in notes:
        print(f"[cb toggles] {n}", flush=True)
    built = manifest if isinstance(manifest, dict) else None  # the toggles' grid, written for the runs to read
    if built is not None:
        manifest = str(data_root() / "_sbatch" / f"sweep.{_job_tag()}.yaml")
    # checked before anything is written (a dry run writes nothing); an error about a toggle's value names the
    # toggle (origins), not a line of the built file
    points = load_manifest(manifest if built is None else built, parse_overrides(overrides), origins,
                           source=manifest).expand()
    print(f"[cb] sweep {manifest}: {len(points)} point(s); shared overrides {overrides}", flush=True)
    from cb_core.evaluate.pipeline import EvaluationSettings

    EvaluationSettings.load()  # EVAL_LIMIT / CB_EVAL_LIMIT and evaluation.yaml, checked before any point trains
    text = yaml.safe_dump(built, sort_keys=False) if built is not None else None
    if args.dry_run:  # writes nothing: the built manifest is printed instead
        print(json.dumps({"manifest": manifest, "overrides": overrides, "points": [p.key for p in points],
                          "would_write": {manifest: text} if text else {}}))
        return 0
    if text:
        Path(manifest).parent.mkdir(parents=True, exist_ok=True)
        Path(manifest).write_text(text)
    status = run_sweep_in_process(manifest, overrides=overrides, final=args.final, rerun=args.rerun,
                                  log=lambda m: print(f"[cb] {m}", flush=True))
    print(json.dumps(status))
    return 0 if any(v == "SUCCESS" for v in status.values()) else 1


def run_sweep_in_process(manifest: str, *, overrides: list[str] | None = None, instance=None, final: bool = False,
                         rerun: bool = False, log=print) -> dict:
    """CPU / laptop path without a daemon: register the points, materialize each point in this process
    (continue_on_error: a failed point is logged and the rest go on), then leaderboard + best_config, and with
    ``final`` the seed fan-out and release_report. Returns {key: "SUCCESS"|"FAILURE", ...}.

    A point whose latest run still stands (`sweeps.point_stands`: it succeeded, its results are there, its
    training and evaluation inputs unchanged) is not run again but counted as SUCCESS, as the sensor launches
    only points without a run: re-running a sweep to add a grid value or after a failure costs only the new points.
    ``rerun`` runs every point again."""
    import dagster as dg
    import polars as pl

    from cb_assets.definitions import defs
    from cb_core.io import data_root

    if instance is None:  # as `cb run`: the project's dagster_home when DAGSTER_HOME is not set
        os.environ.setdefault("DAGSTER_HOME", str(PROJECT_ROOT / "dagster_home"))
        Path(os.environ["DAGSTER_HOME"]).mkdir(parents=True, exist_ok=True)
        instance = dg.DagsterInstance.get()
    res = defs.resolve_job_def("sweep").execute_in_process(
        instance=instance, run_config={"ops": {"sweep_points": {"config": {"manifest": manifest,
                                                                            "overrides": list(overrides or [])}}}},
        raise_on_error=True)
    table = res.output_for_node("sweep_points")
    sweep = table.sort("registered_at")["sweep"][-1]
    rows = table.filter(pl.col("sweep") == sweep).to_dicts()
    from cb_assets.assets.sweeps import latest_runs, point_stands

    earlier = {} if rerun else latest_runs(instance, {"cb/sweep": sweep, "cb/sweep_stage": "point"})
    status: dict[str, str] = {}
    for i, r in enumerate(rows, 1):
        if status and any(s == "FAILURE" for s in status.values()) and not r.get("continue_on_error", True):
            log(f"point {r['key']}: not run (continue_on_error is false and a point failed)")
            continue
        stands, why = point_stands(r["key"], r["preset"], list(r["overrides"]), earlier.get(r["key"]), data_root(),
                                   json.loads(r.get("eval") or "{}"))
        if stands:
            status[r["key"]] = "SUCCESS"
            log(f"point {r['key']}: not run again, {why} (--rerun runs it)")
            continue
        log(f"point {r['key']}: " + (f"running again: {why}" if why else "running") + f" ({i} of {len(rows)})")
        ok = defs.resolve_job_def("sweep_point").execute_in_process(
            instance=instance, partition_key=r["key"], raise_on_error=False,
            tags={"cb/sweep": sweep, "cb/sweep_stage": "point"}).success
        status[r["key"]] = "SUCCESS" if ok else "FAILURE"
        log(f"point {r['key']}: {status[r['key']]}")
    if any(s == "SUCCESS" for s in status.values()):
        # tagged as the sweep sensor tags its own runs, so a daemon started later sees this sweep ranked (and,
        # without `final`, leaves the opt-in seeds alone) instead of ranking it again and launching them
        from cb_assets.assets.sweeps import FINALS_TAG, rank_run_key, release_run_key

        rank_key = rank_run_key(sweep, [k for k, s in status.items() if s == "SUCCESS"])
        log(f"ranking {sum(s == 'SUCCESS' for s in status.values())} point(s): leaderboard, best_config")
        rank = defs.resolve_job_def("sweep_rank").execute_in_process(
            instance=instance, raise_on_error=False,
            tags={"cb/sweep": sweep, "cb/sweep_stage": "rank", "cb/run_key": rank_key,
                  FINALS_TAG: "yes" if final else "no"})
        status["rank"] = "SUCCESS" if rank.success else "FAILURE"
        log(f"ranking: {status['rank']}")
        if final and rank.success:
            finals = pl.read_parquet(data_root() / "best_config.parquet")["key"].to_list()
            for i, k in enumerate(finals, 1):  # each trains and scores a whole adapter: say which one is on
                log(f"final seed {k}: running ({i} of {len(finals)})")
                ok = defs.resolve_job_def("final_seed").execute_in_process(
                    instance=instance, partition_key=k, raise_on_error=False,
                    tags={"cb/sweep": sweep, "cb/sweep_stage": "final"}).success
                status[k] = "SUCCESS" if ok else "FAILURE"
                log(f"final seed {k}: {status[k]}")
            log("release report: running")
            status["release"] = "SUCCESS" if defs.resolve_job_def("sweep_release").execute_in_process(
                instance=instance, raise_on_error=False,
                tags={"cb/sweep": sweep, "cb/sweep_stage": "release",
                      "cb/run_key": release_run_key(finals)}).success else "FAILURE"
            log(f"release report: {status['release']}")
    return status


if __name__ == "__main__":
    sys.exit(main())
