"""Operations: the re-validation job + daily schedule, and the source sensor.

Nothing here names a tier: jobs and selections are built from the asset graph (`AssetSelection`, asset tags),
so every asset family that lands in `cb_assets/assets/` is covered without editing this file.

Re-validation (`revalidate` job, `revalidate_daily` schedule, RUNNING by default)
    The job selects every asset check in the definitions and nothing else: a checks-only run loads each
    checked asset from storage through its IO manager and evaluates the check; no asset is materialized
    (a blocking check that fails makes its step, and so the run, fail: it shows red in the UI, and the check's
    metadata carries `failing_rows` and `examples`). At each tick the schedule requests only the checks whose
    asset has been materialized in this instance (a never-built tier has nothing stored to validate), and skips
    with a reason when there is none.
    Cron: `CB_REVALIDATE_CRON` env var, else `revalidate.cron` in configs/operations.yaml, else daily 04:00;
    timezone `CB_REVALIDATE_TIMEZONE` / `revalidate.timezone` (default UTC). Both are read when the code
    location loads (reload it after a change).

Source sensor (`source_sensor`, RUNNING by default, inert on the demo sample; target: job `source_refresh`)
    Watches the configured Tier A source paths (file, folder or glob, resolved by cb_core.config exactly as the
    raw assets resolve them). Per file it keeps size, mtime and a SHA-256 of the content in the sensor's JSON
    cursor (stored by Dagster); the content is re-hashed only when size or mtime changed, so a tick over
    unchanged sources is a handful of `stat` calls. A dataset's fingerprint is the hash of its (path, size,
    sha256) list: a file added, removed or edited changes it; a bare `touch` does not.
    - First tick (empty cursor): records the baseline, requests nothing.
    - Debounce ("settle"): a changed fingerprint is first recorded as pending; the run is requested on the
      next tick that sees the *same* fingerprints (the sources stopped moving), so a burst of writes spread
      over several ticks yields one run. A source that never settles fires anyway after
      `CB_SOURCE_SENSOR_MAX_WAIT_S` (default 900 s). The run_key is derived from the fingerprints plus a
      fire counter, so a re-evaluated tick never launches twice.
    - The run: the changed `raw_<dataset>` assets plus everything downstream of them, minus assets tagged
      `cb/compute: gpu` (tags read from the asset graph; GPU work is left to an explicit launch), with the
      asset checks of the selected assets.
    - A source whose files vanished (matches no file) is reported in the skip reason and the log and never
      crashes the tick; it is not fired for (its raw asset would fail), and its baseline is kept, so it fires
      when it comes back changed. A dataset newly configured after the baseline counts as changed.
    - Demo mode (no source path configured anywhere): skips with a reason.
    Interval: `CB_SOURCE_SENSOR_INTERVAL_S` (default 60). `CB_SOURCE_SENSOR_DEFAULT_STATUS=RUNNING` makes it
    start in the RUNNING state in a fresh instance.
"""
from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import dagster as dg

from cb_assets.resources import DatasetsResource
from cb_assets.tags import COMPUTE_TAG, GPU
from cb_core.config import (ConfigError, ConfigFileNotFound, check_keys, config_dir, display_path, load_yaml,
                            resolve_source_paths, setting)
from cb_core.watch import MISSING, evaluate_sources, load_cursor, scan_sources  # noqa: F401  (tests use them here)

GPU_TAG = (COMPUTE_TAG, GPU)
SWEEPS_GROUP = "sweeps"
RAW_PREFIX = "raw_"


# ------------------------------------------------------------------------------------------- settings
# every key of configs/operations.yaml, by section (a misspelt one would leave its default in force)
OPERATIONS_KEYS = {
    "revalidate": ["cron", "timezone"], "source_sensor": ["minimum_interval_seconds", "max_wait_seconds",
                                                         "default_status"],
    "slurm_watchdog": ["minimum_interval_seconds"], "training": ["preset"],
    "adapter_checks": ["kl_eps", "retain_cos_min"], "renders": ["num_workers"], "sweeps": ["manifest"],
    "sweep_sensor": ["minimum_interval_seconds"],
}


def check_operations_file() -> None:
    """configs/operations.yaml holds only known sections and keys (read when the code location loads)."""
    try:
        raw = load_yaml("operations.yaml")
    except ConfigFileNotFound:
        return
    shown = display_path(config_dir() / "operations.yaml")
    check_keys(raw, OPERATIONS_KEYS, shown)
    for section, keys in OPERATIONS_KEYS.items():
        if isinstance(raw.get(section), dict):
            check_keys(raw[section], keys, f"{shown}: {section}")


def _setting(env: str, section: str, key: str, default: Any, kind: type | None = None, **rules: Any) -> Any:
    """$env, else `section.key` of configs/operations.yaml (optional), else the default; checked by kind."""
    return setting(env, "operations.yaml", section, key, default, kind, **rules)


def _cron(value: str, where: str) -> str:
    """A cron schedule Dagster accepts (its own error names no variable or file)."""
    from dagster._utils.schedules import is_valid_cron_string

    if not is_valid_cron_string(value):
        raise ConfigError(f"{where}: {value!r} is not a cron schedule (five fields, e.g. '0 4 * * *')")
    return value


def _timezone(value: str, where: str) -> str:
    """An IANA time zone name (Dagster's own error names no variable or file)."""
    import zoneinfo

    try:
        zoneinfo.ZoneInfo(value)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"{where}: {value!r} is not a time zone (an IANA name, e.g. 'UTC', "
                          "'Europe/Berlin')") from None
    return value


def revalidate_cron() -> tuple[str, str]:
    """(cron, timezone) of the re-validation schedule: env, else configs/operations.yaml, else daily 04:00 UTC."""
    return (_setting("CB_REVALIDATE_CRON", "revalidate", "cron", "0 4 * * *", str, check=_cron),
            _setting("CB_REVALIDATE_TIMEZONE", "revalidate", "timezone", "UTC", str, check=_timezone))


check_operations_file()
REVALIDATE_CRON, REVALIDATE_TIMEZONE = revalidate_cron()
SENSOR_INTERVAL_S = _setting("CB_SOURCE_SENSOR_INTERVAL_S", "source_sensor", "minimum_interval_seconds", 60, int, lo=1)
SENSOR_MAX_WAIT_S = float(_setting("CB_SOURCE_SENSOR_MAX_WAIT_S", "source_sensor", "max_wait_seconds", 900, float,
                                   lo=0))
# RUNNING by default: inert on the demo sample (skips with a reason), fires only for changed real sources.
SENSOR_DEFAULT_STATUS = (
    dg.DefaultSensorStatus.STOPPED
    if _setting("CB_SOURCE_SENSOR_DEFAULT_STATUS", "source_sensor", "default_status", "RUNNING", str,
                choices=("RUNNING", "STOPPED", "running", "stopped")).upper() == "STOPPED"
    else dg.DefaultSensorStatus.RUNNING
)
WATCHDOG_INTERVAL_S = _setting("CB_SLURM_WATCHDOG_INTERVAL_S", "slurm_watchdog", "minimum_interval_seconds", 30, int,
                               lo=1)


# ------------------------------------------------------------------------------------------- selections
def gpu_assets() -> dg.AssetSelection:
    return dg.AssetSelection.tag(*GPU_TAG)


def cpu_downstream(raw_keys: list[dg.AssetKey]) -> dg.AssetSelection:
    """The given Tier A assets and everything downstream of them that is not tagged `cb/compute: gpu`, nor in
    the `sweeps` group (a leaderboard ranks GPU runs a source change does not redo)."""
    return dg.AssetSelection.assets(*raw_keys).downstream() - gpu_assets() - dg.AssetSelection.groups(SWEEPS_GROUP)


def raw_key(dataset: str) -> dg.AssetKey:
    return dg.AssetKey(f"{RAW_PREFIX}{dataset}")


# ------------------------------------------------------------------------------------------- re-validation
revalidate_job = dg.define_asset_job(
    "revalidate",
    selection=dg.AssetSelection.all_asset_checks(),
    description="Runs every asset check against the stored tiers (no materialization). Failed checks carry "
    "`failing_rows` and `examples` in their metadata.",
    tags={"cb/purpose": "revalidate"},
)


def revalidation_request(repository_def, instance: dg.DagsterInstance) -> dg.RunRequest | dg.SkipReason:
    """A checks-only run request for every check whose asset has a stored materialization."""
    graph = repository_def.asset_graph
    check_keys = sorted(graph.asset_check_keys, key=lambda k: (k.asset_key.to_user_string(), k.name))
    asset_keys = {k.asset_key for k in check_keys}
    latest = instance.get_latest_materialization_events(asset_keys) if asset_keys else {}
    keys = [k for k in check_keys if latest.get(k.asset_key) is not None]
    never = sorted({k.asset_key.to_user_string() for k in check_keys if latest.get(k.asset_key) is None})
    if not keys:
        return dg.SkipReason(
            f"nothing to re-validate: none of the {len(asset_keys)} checked asset(s) has been materialized"
        )
    return dg.RunRequest(
        asset_selection=[],
        asset_check_keys=keys,
        tags={
            "cb/purpose": "revalidate",
            "cb/revalidate_checks": str(len(keys)),
            "cb/revalidate_not_materialized": ",".join(never)[:200] or "-",
        },
    )


@dg.schedule(
    name="revalidate_daily",
    job=revalidate_job,
    cron_schedule=REVALIDATE_CRON,
    execution_timezone=REVALIDATE_TIMEZONE,
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Re-runs the asset checks of every materialized tier against stored data "
    "(cron: CB_REVALIDATE_CRON, default daily 04:00 UTC).",
)
def revalidate_daily(context: dg.ScheduleEvaluationContext):
    return revalidation_request(context.repository_def, context.instance)


# ------------------------------------------------------------------------------------------- source sensor
def run_request_for(datasets: list[str], asset_graph, run_key: str, reason: str) -> dg.RunRequest | None:
    """One run: the changed raw assets + downstream CPU assets (+ their checks)."""
    raw_keys = [raw_key(ds) for ds in datasets if asset_graph.has(raw_key(ds))]
    if not raw_keys:
        return None
    keys = cpu_downstream(raw_keys).resolve(asset_graph)
    checks = sorted(
        (k for k in asset_graph.asset_check_keys if k.asset_key in keys),
        key=lambda k: (k.asset_key.to_user_string(), k.name),
    )
    return dg.RunRequest(
        run_key=run_key,
        asset_selection=sorted(keys, key=lambda k: k.to_user_string()),
        asset_check_keys=checks,
        tags={"cb/trigger": "source_sensor", "cb/changed_sources": ",".join(datasets), "cb/reason": reason[:200]},
    )


def watched_sources(datasets: DatasetsResource | None = None) -> tuple[dict[str, str], str | None]:
    """({dataset: configured path spec}, skip reason or None), from the same config the raw assets read."""
    try:
        sel = (datasets or DatasetsResource()).selection()
    except (ConfigError, OSError) as err:
        return {}, f"source configuration error: {err}"
    if sel.demo:
        return {}, (
            "demo mode: no source path is configured (CB_*_PATH or configs/datasets.yaml), the pipeline reads "
            "the embedded demo sample; nothing to watch"
        )
    specs = {ds: sel.paths[ds] for ds in sel.selected if sel.paths.get(ds)}
    if not specs:
        return {}, "no selected source has a configured path; nothing to watch"
    return specs, None


# The source sensor's target, as a named job so the UI reads it as words (an AssetSelection difference showed
# as `(not ) and code_location:...`); each run request selects the changed sources' subset of it.
source_refresh_job = dg.define_asset_job(
    "source_refresh",
    selection=dg.AssetSelection.groups("raw").downstream() - gpu_assets() - dg.AssetSelection.groups(SWEEPS_GROUP),
    description="Tier A sources and every CPU asset downstream of them (nothing tagged cb/compute=gpu, no "
    "sweep asset): what source_sensor re-materializes for a changed source.",
    tags={"cb/trigger": "source_sensor"},
)


@dg.sensor(
    name="source_sensor",
    job=source_refresh_job,
    minimum_interval_seconds=SENSOR_INTERVAL_S,
    default_status=SENSOR_DEFAULT_STATUS,
    description="Watches the configured Tier A source paths (size, mtime, sha256); on a settled change runs "
    "the changed raw_<dataset> assets and everything downstream that is CPU work (not cb/compute=gpu).",
)
def source_sensor(context: dg.SensorEvaluationContext, datasets: DatasetsResource):
    specs, skip = watched_sources(datasets)
    if skip:
        return dg.SkipReason(skip)
    cursor = load_cursor(context.cursor)
    new_cursor, fire, notes = evaluate_sources(cursor, specs, time.time(), max_wait_s=SENSOR_MAX_WAIT_S)
    for note in notes:
        context.log.info(note)
    context.update_cursor(json.dumps(new_cursor, sort_keys=True))
    if not fire:
        return dg.SkipReason("; ".join(notes))
    combined = hashlib.sha256(
        json.dumps({ds: new_cursor["baseline"][ds] for ds in fire}, sort_keys=True).encode()
    ).hexdigest()[:16]
    request = run_request_for(
        fire, context.repository_def.asset_graph, f"sources-{new_cursor['fired']}-{combined}", notes[0]
    )
    if request is None:
        return dg.SkipReason(f"changed sources {fire} have no raw_<dataset> asset in these definitions")
    return request


# ------------------------------------------------------------------------------------------- SLURM watchdog
CANCEL_DONE_TAG = "slurm/cancel_checked"


def cancel_jobs_of_canceled_runs(instance, launcher) -> list[str]:
    """scancel the SLURM job of every run Dagster marked CANCELED/CANCELING while its job may still be queued
    (a forced cancel of a STARTING run never reached `terminate`). Each run is handled once (tag
    `slurm/cancel_checked`). Returns the job ids cancelled."""
    from cb_assets.slurm_launcher import JOB_ID_TAG
    from cb_core import slurm

    done = []
    records = instance.get_run_records(filters=dg.RunsFilter(
        statuses=[dg.DagsterRunStatus.CANCELED, dg.DagsterRunStatus.CANCELING]))
    for rec in records:
        run = rec.dagster_run
        job_id = run.tags.get(JOB_ID_TAG)
        if not job_id or run.tags.get(CANCEL_DONE_TAG):
            continue
        st = slurm.job_state(job_id, env=launcher._slurm_env, jobcomp_path=launcher._jobcomp_path())
        if st.status in ("pending", "running"):
            try:
                slurm.cancel(job_id, env=launcher._slurm_env)
            except slurm.SlurmError as e:  # retried next tick (no tag written)
                instance.report_engine_event(f"scancel {job_id} failed: {e}", run)
                continue
            done.append(job_id)
            instance.report_engine_event(
                f"SLURM job {job_id} was still {st.raw} after the run was cancelled: scancel sent", run)
        instance.add_run_tags(run.run_id, {CANCEL_DONE_TAG: st.raw or st.status})
    return done


@dg.sensor(
    name="slurm_watchdog",
    minimum_interval_seconds=WATCHDOG_INTERVAL_S,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="With SlurmRunLauncher: scancel the jobs of runs cancelled in Dagster while still PENDING in "
    "SLURM, and fail runs stuck in STARTING whose job ended or vanished (fail_lost_slurm_runs). Launches nothing.",
)
def slurm_watchdog(context: dg.SensorEvaluationContext):
    from cb_assets.slurm_launcher import SlurmRunLauncher, fail_lost_slurm_runs

    launcher = context.instance.run_launcher
    if not isinstance(launcher, SlurmRunLauncher):
        return dg.SkipReason(f"run launcher is {type(launcher).__name__}, not SlurmRunLauncher: nothing to watch")
    cancelled = cancel_jobs_of_canceled_runs(context.instance, launcher)
    failed = fail_lost_slurm_runs(context.instance, launcher=launcher)
    msg = f"scancelled {len(cancelled)} job(s) of cancelled runs {cancelled}; failed {len(failed)} lost run(s) {failed}"
    context.log.info(msg)
    return dg.SkipReason(msg)


from cb_assets.assets import sweeps as _sweeps  # noqa: E402  (the sweep jobs and sensor live with their assets)

jobs: list = [revalidate_job, source_refresh_job, _sweeps.sweep_register_job, _sweeps.sweep_point_job,
              _sweeps.sweep_rank_job, _sweeps.final_seed_job, _sweeps.release_job]
schedules: list = [revalidate_daily]
sensors: list = [source_sensor, slurm_watchdog, _sweeps.sweep_sensor]
