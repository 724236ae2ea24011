"""Sweeps: grid points as dynamic partitions, the leaderboard, the best configuration and its seed fan-out.

Design: `adapter` and `eval_scores` stay unpartitioned (the README's main job materializes them with no
partition knowledge); their partitioned twins `sweep_adapter` / `sweep_eval_scores` (partitions
`sweep_points`) and `final_adapter` / `final_eval_scores` (partitions `final_seeds`) run the very same code:
`cb_core.train.worker` through `training.worker_command` + Dagster Pipes, published by `training._publish`,
and `cb_core.evaluate.pipeline`. Each point writes only `$CB_DATA_ROOT/sweeps/<key>/` (adapter, eval_scores,
details, chart) and its training run folder `$CB_DATA_ROOT/train_runs/<key>`.

Flow: materialize `sweep_points` (config: `manifest`, shared `overrides`) → it expands the manifest, stores the
key → hyper-parameter table and registers the partitions → the `sweep_sensor` launches one run per point
through the run launcher (GPU-tagged, so SlurmRunLauncher sends each to `sbatch`; tag
`cb/data_root_lock=shared` lets the points run at once) → when every point has ended, one run of
`leaderboard` + `best_config` → one run per seed of `final_adapter` + `final_eval_scores` → `release_report`.
Every point is its own run: one failed point never loses the others (`continue_on_error: false` in the
manifest stops launching new points after the first failure).
"""

import base64
import hashlib
import json
import os
import time
from pathlib import Path

import dagster as dg
import polars as pl

from cb_assets.resources import DatasetsResource
from cb_assets.tags import gpu_tags
from cb_core.config import setting
from cb_core.sweep import POINTS_TABLE, SWEEP_DIR

SWEEP_GROUP = "sweeps"
GPU_TAGS = gpu_tags("08.00.00")
SWEEP_PARTITIONS = dg.DynamicPartitionsDefinition(name="sweep_points")
FINAL_PARTITIONS = dg.DynamicPartitionsDefinition(name="final_seeds")
def run_key_tag(key: str) -> str:
    """A ranking / release run key as a run tag: short keys as they are, long ones (a 60-point sweep's ranking
    key is ~800 characters) cut with a digest of the whole, so the sensor still recognises its own runs (a cut
    without the digest never matched the full key: the sensor asked to rank again on every tick)."""
    return key if len(key) <= 200 else f"{key[:180]}#{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def rank_run_key(sweep: str, ok_points) -> str:
    """The ranking run's key over the points that finished: the sensor's and the in-process runner's one rule."""
    return run_key_tag(f"rank:{sweep}:{','.join(sorted(ok_points))}")


def release_run_key(final_keys) -> str:
    return run_key_tag(f"release:{','.join(sorted(final_keys))}")


FINALS_TAG = "cb/final_seeds"  # "no" on a ranking run that asked for no final seeds (the in-process runner)
SHARED_LOCK = {"cb/data_root_lock": "shared"}
FINAL_DIR = "final"


def _root() -> Path:
    from cb_core.io import data_root

    return data_root()


def point_dir(key: str, root: Path | None = None) -> Path:
    return (root or _root()) / SWEEP_DIR / key


def _read(name: str, root: Path) -> pl.DataFrame:
    p = root / f"{name}.parquet"
    if not p.exists():
        raise dg.Failure(f"{p} does not exist: materialize `{name}` first")
    return pl.read_parquet(p)


def _png_md(path: Path, alt: str) -> dg.MetadataValue:
    return dg.MetadataValue.md(f"![{alt}](data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()})")


# ------------------------------------------------------------------------------------------ sweep_points
class SweepConfig(dg.Config):
    """``manifest``: configs/sweeps/<name>.yaml (default $CB_SWEEP, else `tiny` on the demo sample, else `quick`);
    ``overrides``: shared dotted overrides added to every point (``train.steps=20``)."""

    manifest: str | None = None
    overrides: list[str] = []


def default_manifest(datasets: DatasetsResource, real_data: str = "quick") -> str:
    """$CB_SWEEP (or operations.yaml), else `tiny` on the demo sample, else ``real_data`` (the sbatch CLI keeps
    the old script's `full`)."""
    return (setting("CB_SWEEP", "operations.yaml", "sweeps", "manifest", None, str)
            or ("tiny" if datasets.selection().demo else real_data))


def load_manifest_for(config: SweepConfig, datasets: DatasetsResource):
    from cb_core.sweep.manifest import load_manifest
    from cb_core.train.config import parse_overrides

    return load_manifest(config.manifest or default_manifest(datasets), parse_overrides(config.overrides))


@dg.asset(
    group_name=SWEEP_GROUP,
    kinds={"polars"},
    description="A sweep manifest (configs/sweeps/<name>.yaml) expanded into grid points: one row per point "
    "(key, preset, axes, overrides, eval settings). Registers each key as a `sweep_points` partition; the table "
    "is the key -> hyper-parameter record (dynamic partitions carry no metadata).",
)
def sweep_points(context: dg.AssetExecutionContext, config: SweepConfig, datasets: DatasetsResource) -> pl.DataFrame:
    from cb_core.sweep.manifest import SweepError

    try:
        m = load_manifest_for(config, datasets)
        points = m.expand()
    except SweepError as e:
        raise dg.Failure(str(e)) from None
    now = time.time()
    new = pl.DataFrame([{**p.row(), "continue_on_error": m.continue_on_error, "registered_at": now,
                         "manifest": str(m.source)}
                        for p in points])
    old_path = datasets.data_root() / f"{POINTS_TABLE}.parquet"
    table = new
    if old_path.exists():
        # a sweep registered again is its manifest as it is now: a grid value taken out of it is no longer
        # run, ranked or picked (its finished folders stay, and are used again if the value comes back)
        old = pl.read_parquet(old_path).filter(~pl.col("key").is_in(new["key"].to_list()) & (pl.col("sweep") != m.name))
        table = pl.concat([old, new], how="diagonal_relaxed")
    keys = new["key"].to_list()
    have = set(context.instance.get_dynamic_partitions(SWEEP_PARTITIONS.name))
    context.instance.add_dynamic_partitions(SWEEP_PARTITIONS.name, [k for k in keys if k not in have])
    context.add_output_metadata({
        "sweep": m.name, "points": len(points), "preset": m.preset,
        "points_table": dg.MetadataValue.md(
            "| key | axes |\n|---|---|\n" + "\n".join(f"| `{p.key}` | {json.dumps(p.axes)} |" for p in points)),
        "manifest": dg.MetadataValue.path(m.source),
    })
    return table.sort("sweep", "key")


def point_record(key: str, root: Path) -> dict:
    """A sweep point's row (or a final seed's, from best_config) by partition key."""
    pts = _read(POINTS_TABLE, root).filter(pl.col("key") == key)
    if pts.is_empty():
        raise dg.Failure(f"no row for partition {key!r} in {POINTS_TABLE}.parquet: materialize `sweep_points` "
                         "with the manifest that defines it")
    return pts.row(0, named=True)


# ------------------------------------------------------------------------------------------ shared bodies
def train_point(context: dg.AssetExecutionContext, key: str, preset: str, overrides: list[str], out: Path,
                root: Path) -> dict:
    """Train one configuration exactly as `adapter` does (same worker, Pipes, torchrun, publish)."""
    from cb_assets.assets.training import _publish, run_worker, worker_command
    from cb_core.cli import HISTORY, SWEEP_MARK
    from cb_core.train import RUNS_DIR
    from cb_core.train.config import load_train_config
    from cb_core.train.worker import run_fingerprint, slurm_nproc, stale_checkpoints

    cfg, _, _ = load_train_config(preset, overrides)
    nproc = slurm_nproc(cfg.train.nproc)
    run_dir = root / RUNS_DIR / key
    changed = stale_checkpoints(run_dir, run_fingerprint(cfg, root))
    if changed:  # a point trained on other inputs or settings (a new split, final.overrides): kept, retrained
        old = root / RUNS_DIR / HISTORY / f"{key}-{time.strftime('%Y%m%d-%H%M%S')}"
        old.parent.mkdir(parents=True, exist_ok=True)
        os.replace(run_dir, old)
        context.log.warning(f"point {key}: its run folder holds another run's checkpoints ({'; '.join(changed[:4])});"
                            f" moved to {old}, training afresh")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / SWEEP_MARK).write_text(json.dumps({"key": key, "preset": preset, "overrides": overrides}))
    cmd = worker_command(preset, overrides, run_dir, root, nproc, False)
    context.log.info(f"point {key}: preset {preset}, overrides {overrides}, run folder {run_dir}")
    invocation = run_worker(context, cmd, root)
    out.parent.mkdir(parents=True, exist_ok=True)
    published = _publish(run_dir, out)
    meta = dict(invocation.get_materialize_result().metadata or {})
    meta.update({"point": key, "overrides": dg.MetadataValue.json(overrides), "loss_mode": cfg.loss.mode,
                 "target_layers": dg.MetadataValue.json(cfg.loss.target_layers),
                 "published": dg.MetadataValue.path(str(published))})
    return meta


def point_eval_settings(eval_overrides: dict | None):
    """configs/evaluation.yaml with a point's `eval` settings over it (EVAL_LIMIT / CB_EVAL_LIMIT set for this
    run wins over the manifest's limit)."""
    from cb_core.evaluate.pipeline import EVAL_RULES, EvaluationSettings

    settings = EvaluationSettings.load()
    for k, v in (eval_overrides or {}).items():
        if k == "limit" and os.environ.get("CB_EVAL_LIMIT"):
            continue
        if k not in EVAL_RULES:
            raise dg.Failure(f"sweep eval setting {k!r} is not an eval key of configs/evaluation.yaml")
        setattr(settings.eval, k, EVAL_RULES[k](v, f"sweep eval setting {k}"))
    return settings


EVAL_FINGERPRINT = "eval_fingerprint.json"


def eval_fingerprint(eval_overrides: dict | None, root: Path) -> dict:
    """What a point's scores depend on besides its adapter: the bytes of the tables evaluation reads and the
    resolved evaluation settings (`point_stands` compares it with the one written beside the scores)."""
    import dataclasses

    from cb_core.evaluate.adapter_eval import EVAL_FRAMES
    from cb_core.io import file_digest as digest

    out: dict = {f"table:{n}": digest(root / f"{n}.parquet") for n in EVAL_FRAMES}
    settings = dataclasses.asdict(point_eval_settings(eval_overrides))
    settings.pop("gates")  # the leaderboard applies the gates when it ranks: the scores do not depend on them
    if not settings["live_agentdojo"]:
        settings = {k: v for k, v in settings.items() if not k.startswith("live_")}
    out["settings"] = json.loads(json.dumps(settings, default=str))
    return out


def evaluate_point(context: dg.AssetExecutionContext, adapter_path: Path, preset: str, overrides: list[str],
                   eval_overrides: dict, out: Path, root: Path) -> dict:
    """Score one adapter vs its own base with the body `eval_scores` runs (`run_scoring`); the table goes to
    ``out/eval_scores.parquet`` (details and chart beside it). ``preset``/``overrides`` only name the point in
    the logs: the base and target layers come from the adapter's published config."""
    from cb_assets.assets.evaluation import eval_metadata, run_scoring
    from cb_core.evaluate.adapter_eval import EVAL_FRAMES
    from cb_core.io import write_parquet

    settings = point_eval_settings(eval_overrides)
    context.log.info(f"point eval: preset {preset}, overrides {overrides}, adapter {adapter_path}")
    frames = {n: _read(n, root) for n in EVAL_FRAMES}
    result = run_scoring(adapter_path, frames, settings, out, log=context.log.info)
    write_parquet(result.outcome.scores, out / "eval_scores.parquet")
    meta = eval_metadata(result)
    meta["eval_scores"] = dg.MetadataValue.path(str(out / "eval_scores.parquet"))
    return meta


# ------------------------------------------------------------------------------------------ point twins
@dg.asset(
    group_name=SWEEP_GROUP, kinds={"pytorch"}, tags=GPU_TAGS, partitions_def=SWEEP_PARTITIONS,
    deps=["sweep_points", "train_split", "renders", "lossmasks"],
    description="`adapter` for one sweep point (partition = point key; hyper-parameters in sweep_points): the same "
    "worker, published to $CB_DATA_ROOT/sweeps/<key>/adapter.",
)
def sweep_adapter(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    root, key = _root(), context.partition_key
    rec = point_record(key, root)
    return dg.MaterializeResult(metadata=train_point(context, key, rec["preset"], list(rec["overrides"]),
                                                     point_dir(key, root) / "adapter", root))


@dg.asset(
    group_name=SWEEP_GROUP, kinds={"pytorch", "polars"}, tags=GPU_TAGS, partitions_def=SWEEP_PARTITIONS,
    deps=["sweep_adapter", "eval_attacks", "eval_split", "train_split", "traces", "renders"],
    description="`eval_scores` for one sweep point: base vs the point's adapter, the same evaluation pass; "
    "table at $CB_DATA_ROOT/sweeps/<key>/eval_scores.parquet.",
)
def sweep_eval_scores(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    root, key = _root(), context.partition_key
    rec = point_record(key, root)
    d = point_dir(key, root)
    eval_overrides = json.loads(rec.get("eval") or "{}")
    fingerprint = eval_fingerprint(eval_overrides, root)  # the inputs as this evaluation reads them
    meta = evaluate_point(context, d / "adapter", rec["preset"], list(rec["overrides"]), eval_overrides, d, root)
    from cb_core.io import atomic_write_bytes

    atomic_write_bytes(d / EVAL_FINGERPRINT, json.dumps(fingerprint, indent=1, sort_keys=True).encode())
    return dg.MaterializeResult(metadata=meta)


# ------------------------------------------------------------------------------------------ leaderboard
class LeaderboardConfig(dg.Config):
    """``sweep``: which sweep to rank (default: the most recently registered); ``metric``: the selection
    metric (default: the manifest's, normally tool_flip_asr, lower is better)."""

    sweep: str | None = None
    metric: str | None = None


def current_sweep(points: pl.DataFrame, name: str | None) -> str:
    if name:
        if name not in set(points["sweep"].to_list()):
            raise dg.Failure(f"sweep {name!r} has no points in {POINTS_TABLE}.parquet "
                             f"(have: {sorted(set(points['sweep'].to_list()))})")
        return name
    return points.sort("registered_at")["sweep"][-1]


def stacked_scores(keys: list[str], root: Path, sub: str = SWEEP_DIR) -> tuple[pl.DataFrame, list[str]]:
    frames, missing = [], []
    for k in keys:
        p = root / sub / k / "eval_scores.parquet"
        if p.exists():
            frames.append(pl.read_parquet(p).with_columns(pl.lit(k).alias("key")))
        else:
            missing.append(k)
    return (pl.concat(frames, how="diagonal_relaxed") if frames else
            pl.DataFrame(schema={"model": pl.String, "metric": pl.String, "n": pl.Int64, "value": pl.Float64,
                                 "ci_low": pl.Float64, "ci_high": pl.Float64, "key": pl.String})), missing


def manifest_of(points: pl.DataFrame, sweep: str):
    """The sweep's manifest: the file it was registered from (stored per point), else configs/sweeps/<sweep>."""
    from cb_core.sweep.manifest import SweepError, load_manifest

    rows = points.filter(pl.col("sweep") == sweep)
    srcs = rows["manifest"].drop_nulls().to_list() if "manifest" in rows.columns else []
    for name in [*srcs[-1:], sweep]:
        try:
            return load_manifest(name)
        except SweepError:
            continue
    return None


def _selection(points: pl.DataFrame, sweep: str, metric: str | None):
    from cb_core.sweep.manifest import Selection

    m = manifest_of(points, sweep)
    sel = m.selection if m else Selection()
    if metric:
        sel.metric = metric
    return sel


def _md_table(df: pl.DataFrame, cols: list[str], limit: int = 30) -> str:
    cols = [c for c in dict.fromkeys(cols) if c in df.columns]

    def cell(v):
        return "" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))

    return ("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
            + "\n".join("| " + " | ".join(cell(v) for v in r) + " |" for r in df.select(cols).head(limit).iter_rows()))


@dg.asset(
    group_name=SWEEP_GROUP, kinds={"polars"}, deps=["sweep_points", "sweep_eval_scores"],
    description="Finished sweep points ranked by the selection metric (default: lowest tool_flip_asr among points "
    "meeting the capability and over-refusal gates); Pareto front of ASR vs capability; leaderboard.csv (lists "
    "as JSON, quoted) and leaderboard.png (the trade-off plot, base model as a star).",
)
def leaderboard(context: dg.AssetExecutionContext, config: LeaderboardConfig) -> pl.DataFrame:
    from cb_core.config import load_yaml
    from cb_core.evaluate.scores import GateConfig
    from cb_core.io import atomic_write_bytes
    from cb_core.sweep.leaderboard import build_leaderboard, to_csv, tradeoff_plot

    root = _root()
    points = _read(POINTS_TABLE, root)
    sweep = current_sweep(points, config.sweep)
    pts = points.filter(pl.col("sweep") == sweep)
    scores, missing = stacked_scores(pts["key"].to_list(), root)
    sel = _selection(points, sweep, config.metric)
    gate_cfg = GateConfig.from_dict((load_yaml("evaluation.yaml") or {}).get("gates"))
    lb = build_leaderboard(pts, scores, selection=sel, gate_cfg=gate_cfg)
    lb = lb.with_columns(pl.lit(sweep).alias("sweep"))
    atomic_write_bytes(root / "leaderboard.csv", to_csv(lb).encode())
    png = tradeoff_plot(lb, root / "leaderboard.png", title=f"sweep {sweep}: ASR vs capability")
    meta = {"sweep": sweep, "points": pts.height, "finished": lb.height, "not_finished": dg.MetadataValue.json(missing),
            "selection": dg.MetadataValue.json({"metric": sel.metric, "gates": sel.gates,
                                                "not_measured": sel.not_measured}),
            "eligible": int(lb["eligible"].sum()) if lb.height else 0,
            "csv": dg.MetadataValue.path(str(root / "leaderboard.csv")),
            "table": dg.MetadataValue.md(_md_table(lb, ["rank", "key", sel.metric, "injection_followed_rate",
                                                        "capability_retention", "xstest_over_refusal", "eligible",
                                                        "pareto"]))}
    if lb.height and lb["rank"].min() == 1:
        best = lb.filter(pl.col("rank") == 1).sort("key").row(0, named=True)
        meta["best"] = best["key"]
        if isinstance(best.get(sel.metric), float):
            meta[f"best_{sel.metric}"] = dg.MetadataValue.float(best[sel.metric])
    if png:
        meta["tradeoff_plot"] = _png_md(png, "ASR vs capability")
        meta["tradeoff_png"] = dg.MetadataValue.path(str(png))
    context.add_output_metadata(meta)
    return lb


@dg.asset(
    group_name=SWEEP_GROUP, kinds={"polars"}, deps=["leaderboard", "sweep_points"],
    description="The leaderboard's rank-1 point (its preset and overrides), and one `final_seeds` partition per "
    "seed of the manifest's `final.seeds` (default 101, 555, 888).",
)
def best_config(context: dg.AssetExecutionContext) -> pl.DataFrame:
    from cb_core.sweep.manifest import Point, final_points, point_from_row

    root = _root()
    lb = _read("leaderboard", root)
    top = lb.filter(pl.col("rank") == 1).sort("key")
    if top.is_empty():
        raise dg.Failure("no sweep point meets the selection gates (see the leaderboard's gate_* columns); "
                         "nothing to fine-tune")
    key = top["key"][0]
    if top.height > 1:  # equal on the selection metric: the first key is taken, and the log says which tied
        context.log.warning(f"best_config: {top.height} points tie at rank 1 ({top['key'].to_list()}); taking "
                            f"{key} (the first key). Break ties with another selection.metric or more eval prompts")
    rec = point_record(key, root)
    best: Point = point_from_row(rec)
    m = manifest_of(_read(POINTS_TABLE, root), best.sweep)
    seeds = list(m.final["seeds"]) if m else [101, 555, 888]
    finals = final_points(m, best, seeds) if m else [
        Point(best.sweep, f"{best.key}-seed{s}", best.preset, {**best.axes, "seed": s},
              {**best.overrides, "train.seed": s}, best.eval) for s in seeds]
    have = set(context.instance.get_dynamic_partitions(FINAL_PARTITIONS.name))
    context.instance.add_dynamic_partitions(FINAL_PARTITIONS.name, [p.key for p in finals if p.key not in have])
    rows = [{**p.row(), "best_key": key, "seed": int(p.overrides["train.seed"])} for p in finals]
    context.add_output_metadata({"best": key, "tied_at_rank_1": dg.MetadataValue.json(top["key"].to_list()),
                                 "axes": dg.MetadataValue.json(best.axes),
                                 "seeds": dg.MetadataValue.json(seeds),
                                 "final_partitions": dg.MetadataValue.json([p.key for p in finals])})
    return pl.DataFrame(rows)


def _final_record(key: str, root: Path) -> dict:
    bc = _read("best_config", root).filter(pl.col("key") == key)
    if bc.is_empty():
        raise dg.Failure(f"no row for final partition {key!r} in best_config.parquet (re-materialize best_config)")
    return bc.row(0, named=True)


@dg.asset(
    group_name=SWEEP_GROUP, kinds={"pytorch"}, tags=GPU_TAGS, partitions_def=FINAL_PARTITIONS,
    deps=["best_config", "train_split", "renders", "lossmasks"],
    description="The best configuration trained again (manifest `final.overrides`, e.g. more steps) with one seed "
    "per partition; published to $CB_DATA_ROOT/sweeps/final/<key>/adapter.",
)
def final_adapter(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    root, key = _root(), context.partition_key
    rec = _final_record(key, root)
    return dg.MaterializeResult(metadata=train_point(context, key, rec["preset"], list(rec["overrides"]),
                                                     root / SWEEP_DIR / FINAL_DIR / key / "adapter", root))


@dg.asset(
    group_name=SWEEP_GROUP, kinds={"pytorch", "polars"}, tags=GPU_TAGS, partitions_def=FINAL_PARTITIONS,
    deps=["final_adapter", "eval_attacks", "eval_split", "train_split", "traces", "renders"],
    description="eval_scores of one final seed (base vs that seed's adapter).",
)
def final_eval_scores(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    root, key = _root(), context.partition_key
    rec = _final_record(key, root)
    d = root / SWEEP_DIR / FINAL_DIR / key
    return dg.MaterializeResult(metadata=evaluate_point(context, d / "adapter", rec["preset"], list(rec["overrides"]),
                                                        json.loads(rec.get("eval") or "{}"), d, root))


@dg.asset(
    group_name=SWEEP_GROUP, kinds={"polars"}, deps=["best_config", "final_eval_scores"],
    description="Mean ± std over the final seeds of every headline metric, adapter and base model; Markdown in "
    "the UI and $CB_DATA_ROOT/release_report.md.",
)
def release_report(context: dg.AssetExecutionContext) -> pl.DataFrame:
    from cb_core.io import atomic_write_bytes
    from cb_core.sweep.release import report_markdown, seed_stats

    root = _root()
    bc = _read("best_config", root)
    scores, missing = stacked_scores(bc["key"].to_list(), root, f"{SWEEP_DIR}/{FINAL_DIR}")
    if scores.is_empty():
        raise dg.Failure(f"no final seed has eval_scores yet (missing: {missing})")
    seed_of = dict(zip(bc["key"].to_list(), bc["seed"].to_list()))
    scores = scores.with_columns(pl.col("key").replace_strict(seed_of, return_dtype=pl.Int64).alias("seed"))
    stats = seed_stats(scores)
    first = bc.row(0, named=True)
    md = report_markdown(stats, best={"key": first["best_key"], "preset": first["preset"],
                                      "overrides": [o for o in first["overrides"] if not o.startswith("train.seed=")]},
                         seeds=sorted(set(scores["seed"].to_list())))
    if missing:
        md += f"\nSeeds without results (failed or not run): {', '.join(missing)}\n"
    atomic_write_bytes(root / "release_report.md", md.encode())
    context.add_output_metadata({"report": dg.MetadataValue.md(md),
                                 "report_path": dg.MetadataValue.path(str(root / "release_report.md")),
                                 "seeds": len(set(scores["seed"].to_list())), "missing": dg.MetadataValue.json(missing)})
    return stats.with_columns(pl.col("seed_list").cast(pl.List(pl.Int64)))


# ------------------------------------------------------------------------------------------ jobs + sensor
sweep_point_job = dg.define_asset_job(
    "sweep_point", selection=[sweep_adapter, sweep_eval_scores],
    description="One sweep point: train (sweep_adapter) then score (sweep_eval_scores); partition = point key.",
    tags=SHARED_LOCK,
)
final_seed_job = dg.define_asset_job(
    "final_seed", selection=[final_adapter, final_eval_scores],
    description="One final seed of the best configuration: train then score.", tags=SHARED_LOCK,
)
sweep_rank_job = dg.define_asset_job("sweep_rank", selection=[leaderboard, best_config],
                                     description="Rank the finished points and pick the best configuration.")
release_job = dg.define_asset_job("sweep_release", selection=[release_report],
                                  description="Mean ± std over the final seeds.")
sweep_register_job = dg.define_asset_job("sweep", selection=[sweep_points],
                                         description="Expand a sweep manifest (config: manifest, overrides) into "
                                         "partitions; the sweep_sensor launches the points.")

FINISHED = ("SUCCESS", "FAILURE", "CANCELED")


def plan(points: list[dict], point_runs: dict[str, str], rank_runs: dict[str, str], finals: list[str],
         final_runs: dict[str, str], release_runs: set[str],
         no_finals: set[str] = frozenset()) -> tuple[list[tuple[str, str]], str]:
    """Pure decision of the sweep sensor over the current sweep.

    ``points``: its rows (key, sweep, continue_on_error); ``point_runs``: key -> status of its latest run;
    ``rank_runs``: run key -> status of the ranking runs; ``release_runs``: run keys already used; ``finals``:
    registered final partitions of its best point; ``final_runs``: final key -> status; ``no_finals``: ranking run
    keys whose run asked for no final seeds (the in-process runner without ``--final``: the seeds are opt-in
    there, and a daemon started later must not launch them). Returns
    ([(job, partition or "")], reason). With `continue_on_error: false` a failed point stops the launching, and
    what did finish is still ranked, as the in-process runner (`cb_assets.cli.run_sweep_in_process`) does."""
    out: list[tuple[str, str]] = []
    failed = sorted(k for k, s in point_runs.items() if s in ("FAILURE", "CANCELED"))
    stop = failed and not all(p.get("continue_on_error", True) for p in points)
    todo = [p["key"] for p in points if p["key"] not in point_runs]
    if todo and not stop:
        return [("sweep_point", k) for k in todo], f"launching {len(todo)} point(s)"
    held = (f"; continue_on_error is false and point(s) {failed} failed: {len(todo)} point(s) not launched"
            if todo else "")
    running = [k for k, s in point_runs.items() if s not in FINISHED]
    if running:
        return [], f"{len(running)} point(s) still running{held}"
    ok = sorted(k for k, s in point_runs.items() if s == "SUCCESS")
    if not ok:
        return [], f"every point run failed ({failed}); nothing to rank{held}"
    sweep = points[0]["sweep"]
    rank_key = rank_run_key(sweep, ok)
    if rank_key not in rank_runs:
        return [("sweep_rank", rank_key)], f"points ended ({len(ok)} ok, {len(failed)} failed): ranking{held}"
    rank_status = rank_runs[rank_key]
    if rank_status in ("FAILURE", "CANCELED") and not finals:
        return [], (f"ranking {rank_status.lower()} (run key {rank_key}): see its run; register the sweep again "
                    "(or materialize leaderboard + best_config) once fixed")
    if rank_key in no_finals and not final_runs:
        return [], (f"ranked in-process without final seeds (run key {rank_key}); `python -m cb_assets.cli sweep "
                    "--final` (or FINAL=1) runs them")
    todo_f = [k for k in finals if k not in final_runs]
    if todo_f:
        return [("final_seed", k) for k in todo_f], f"launching {len(todo_f)} final seed(s)"
    if not finals or any(s not in FINISHED for s in final_runs.values()):
        return [], "waiting for best_config / final seeds"
    release_key = release_run_key(final_runs)
    if not any(s == "SUCCESS" for s in final_runs.values()):
        return [], f"every final seed failed ({sorted(final_runs)}): no release report; see their runs"
    if release_key not in release_runs:
        return [("sweep_release", release_key)], "final seeds ended: release report"
    return out, "sweep complete"


def latest_runs(instance, tags: dict) -> dict[str, dg.DagsterRun]:
    """Partition key -> its newest run carrying ``tags``."""
    out: dict[str, dg.DagsterRun] = {}
    for r in instance.get_runs(filters=dg.RunsFilter(tags=tags)):  # newest first
        k = r.tags.get("dagster/partition")
        if k and k not in out:
            out[k] = r
    return out


def _latest_status(instance, tags: dict) -> dict[str, str]:
    return {k: r.status.value for k, r in latest_runs(instance, tags).items()}


def _flat(d: dict, prefix: str = "") -> dict:
    """A nested fingerprint as dotted keys, so a change is named down to the setting (`settings.eval.limit: 16 ->
    8`, not `settings`)."""
    out: dict = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def point_stands(key: str, preset: str, overrides: list[str], run, root: Path,
                 eval_overrides: dict | None = None) -> tuple[bool, str]:
    """Whether a point's latest run ``run`` still stands, so the in-process runner need not run it again:
    (True, why) when it succeeded, its published results are still there, its training inputs and settings
    are those it trained on (`train_point`'s rule, the run folder's fingerprint) and its evaluation's inputs
    and settings those it was scored on (`eval_fingerprint`; scores without that file, from before it existed,
    are scored again: the evaluation's inputs then are unknown); else (False, why it runs again: "" for a point
    never run or whose run did not succeed)."""
    from cb_core.train import RUNS_DIR
    from cb_core.train.config import TrainConfigError, load_train_config
    from cb_core.train.worker import fingerprint_changes, run_fingerprint, stale_checkpoints

    def some(changes: list[str]) -> str:
        return "; ".join(changes[:4]) + ("; ..." if len(changes) > 4 else "")

    if run is None or run.status != dg.DagsterRunStatus.SUCCESS:
        return False, ""
    d = point_dir(key, root)
    gone = [p for p in (d / "eval_scores.parquet", d / "adapter" / "adapter_config.json") if not p.is_file()]
    if gone:
        return False, f"run {run.run_id} succeeded but its results are gone ({', '.join(map(str, gone))})"
    try:
        cfg, _, _ = load_train_config(preset, overrides)
    except (TrainConfigError, ValueError) as e:  # its run fails and says so
        return False, f"its training settings no longer resolve: {e}"
    changed = stale_checkpoints(root / RUNS_DIR / key, run_fingerprint(cfg, root))
    if changed:
        return False, f"its training inputs or settings changed since run {run.run_id} ({some(changed)})"
    fp = d / EVAL_FINGERPRINT
    if not fp.is_file():  # scored before fingerprints (or by hand): what they were scored on is unknown
        return False, (f"run {run.run_id} succeeded but its scores carry no {EVAL_FINGERPRINT} (scored before "
                       "evaluation inputs were recorded): scored again")
    moved = fingerprint_changes(_flat(json.loads(fp.read_text(encoding="utf-8"))),
                                _flat(eval_fingerprint(eval_overrides, root)))
    if moved:
        return False, f"its evaluation inputs or settings changed since run {run.run_id} ({some(moved)})"
    return True, f"run {run.run_id} succeeded and its results are in {d}"


@dg.sensor(
    name="sweep_sensor",
    jobs=[sweep_point_job, sweep_rank_job, final_seed_job, release_job],
    minimum_interval_seconds=setting("CB_SWEEP_SENSOR_INTERVAL_S", "operations.yaml", "sweep_sensor",
                                     "minimum_interval_seconds", 30, int, lo=1),
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Launches the newest sweep: one run per registered point (GPU -> SLURM), then the leaderboard + "
    "best_config, then one run per final seed, then the release report. Inert until `sweep_points` is materialized.",
)
def sweep_sensor(context: dg.SensorEvaluationContext):
    root = _root()
    path = root / f"{POINTS_TABLE}.parquet"
    if not path.exists():
        return dg.SkipReason("no sweep registered (materialize `sweep_points` / job `sweep`)")
    points = pl.read_parquet(path)
    sweep = current_sweep(points, None)
    rows = points.filter(pl.col("sweep") == sweep).to_dicts()
    registered = set(context.instance.get_dynamic_partitions(SWEEP_PARTITIONS.name))
    if rows and not any(r["key"] in registered for r in rows):  # read as "every point run failed ([])"
        return dg.SkipReason(f"sweep {sweep}: none of its {len(rows)} point(s) is registered in this Dagster "
                             f"instance ({path} was written under another DAGSTER_HOME?); materialize "
                             "`sweep_points` (job `sweep`) here to run it")
    rows = [r for r in rows if r["key"] in registered]
    inst = context.instance
    point_runs = _latest_status(inst, {"cb/sweep": sweep, "cb/sweep_stage": "point"})
    rank_runs: dict[str, str] = {}
    no_finals: set[str] = set()
    for r in inst.get_runs(filters=dg.RunsFilter(tags={"cb/sweep": sweep, "cb/sweep_stage": "rank"})):  # newest 1st
        key = r.tags.get("cb/run_key")
        if key not in rank_runs and r.tags.get(FINALS_TAG) == "no":
            no_finals.add(key)
        rank_runs.setdefault(key, r.status.value)
    release_runs = {r.tags.get("cb/run_key") for r in inst.get_runs(filters=dg.RunsFilter(tags={"cb/sweep": sweep, "cb/sweep_stage": "release"}))}
    finals: list[str] = []
    bc = root / "best_config.parquet"
    if bc.exists():
        b = pl.read_parquet(bc)
        if b.height and b["sweep"][0] == sweep:
            fin_reg = set(inst.get_dynamic_partitions(FINAL_PARTITIONS.name))
            finals = [k for k in b["key"].to_list() if k in fin_reg]
    final_runs = _latest_status(inst, {"cb/sweep": sweep, "cb/sweep_stage": "final"})
    final_runs = {k: v for k, v in final_runs.items() if k in finals}
    todo, reason = plan(rows, point_runs, rank_runs, finals, final_runs, release_runs, no_finals)
    if not todo:
        return dg.SkipReason(f"sweep {sweep}: {reason}")
    stage = {"sweep_point": "point", "sweep_rank": "rank", "final_seed": "final", "sweep_release": "release"}
    reqs = []
    for job, arg in todo:
        tags = {"cb/sweep": sweep, "cb/sweep_stage": stage[job]}
        if job in ("sweep_point", "final_seed"):
            reqs.append(dg.RunRequest(run_key=f"{job}:{arg}", job_name=job, partition_key=arg,
                                      tags={**tags, **SHARED_LOCK}))
        else:
            reqs.append(dg.RunRequest(run_key=arg, job_name=job, tags={**tags, "cb/run_key": arg}))
    context.log.info(f"sweep {sweep}: {reason}")
    return reqs
