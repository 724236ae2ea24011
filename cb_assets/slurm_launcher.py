"""SlurmRunLauncher: GPU-tagged runs go to ``sbatch``, everything else to Dagster's DefaultRunLauncher.

Configure it in ``dagster.yaml``::

    run_launcher:
      module: cb_assets.slurm_launcher
      class: SlurmRunLauncher
      config:
        gres: null              # launcher default; asset tags slurm/gres etc. override
        time: "04:00:00"
        log_dir: /shared/dagster/slurm_logs

Asset tags do not become run tags, so the launcher reads the selected assets' tags from the
code location in the launch context's workspace (falling back to loading the code in-process).
A run is sent to SLURM when any selected asset has ``cb/compute: gpu`` (``gpu_tag_key`` /
``gpu_tag_value``) or the run itself carries that tag. SLURM options = launcher defaults, overlaid
with the assets' ``slurm/*`` tags, overlaid with the run's own ``slurm/*`` tags; all validated by
``cb_core.slurm`` (strict allow-patterns; everything else shell-quoted).
"""
from __future__ import annotations

import os
import re
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dagster import Array, Field, Noneable, StringSource
from dagster import _check as check
from dagster._core.errors import DagsterLaunchFailedError
from dagster._core.launcher import (
    CheckRunHealthResult,
    DefaultRunLauncher,
    LaunchRunContext,
    RunLauncher,
    WorkerStatus,
)
from dagster._core.storage.dagster_run import DagsterRun, DagsterRunStatus, RunsFilter
from dagster._grpc.types import ExecuteRunArgs
from dagster._serdes import ConfigurableClass, ConfigurableClassData, serialize_value

from cb_assets.tags import COMPUTE_TAG, GPU
from cb_core import slurm

JOB_ID_TAG = "slurm/job_id"
LOG_TAG = "slurm/log"
DEFAULT_GPU_TAG_KEY = COMPUTE_TAG
DEFAULT_GPU_TAG_VALUE = GPU


class SlurmRunLauncher(RunLauncher, ConfigurableClass):
    """Sends runs containing GPU-tagged assets to SLURM; delegates the rest to ``DefaultRunLauncher``."""

    def __init__(
        self,
        inst_data: ConfigurableClassData | None = None,
        partition: str | None = None,
        time: str | None = None,
        gres: str | None = None,
        mem: str | None = None,
        cpus: str | int | None = None,
        account: str | None = None,
        qos: str | None = None,
        python_executable: str | None = None,
        working_directory: str | None = None,
        env_vars: Sequence[str] | None = None,
        extra_sbatch_args: Sequence[str] | None = None,
        gpu_tag_key: str = DEFAULT_GPU_TAG_KEY,
        gpu_tag_value: str = DEFAULT_GPU_TAG_VALUE,
        log_dir: str | None = None,
        slurm_conf: str | None = None,
        job_name_prefix: str = "dagster",
        cancel_wait_seconds: float = 20.0,
        local_without_sbatch: bool = False,
    ):
        self._inst_data = inst_data
        # Validated now, so a bad dagster.yaml fails at instance load, not at the first GPU run.
        self.defaults = slurm.SlurmOptions(
            partition=partition, time=time, gres=gres, mem=mem,
            cpus=None if cpus is None else str(cpus), account=account, qos=qos,
            extra_args=tuple(extra_sbatch_args or ()),
        )
        self.python_executable = python_executable
        self.working_directory = working_directory
        self.env_vars = list(env_vars or [])
        for item in self.env_vars:
            name = item.split("=", 1)[0]
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise slurm.SlurmOptionError(f"invalid env_vars entry {item!r}")
        self.gpu_tag_key = gpu_tag_key
        self.gpu_tag_value = gpu_tag_value
        self._log_dir = log_dir
        self.slurm_conf = slurm_conf
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", job_name_prefix):
            raise slurm.SlurmOptionError(f"invalid job_name_prefix {job_name_prefix!r}")
        self.job_name_prefix = job_name_prefix
        self.cancel_wait_seconds = float(cancel_wait_seconds)
        self.local_without_sbatch = bool(local_without_sbatch)
        self._default = DefaultRunLauncher()
        super().__init__()

    # --- ConfigurableClass -------------------------------------------------------------------------
    @property
    def inst_data(self) -> ConfigurableClassData | None:
        return self._inst_data

    @classmethod
    def config_type(cls) -> dict[str, Field]:
        opt = lambda desc: Field(Noneable(StringSource), is_required=False, default_value=None, description=desc)  # noqa: E731
        return {
            "partition": opt("Default SLURM partition (asset tag slurm/partition overrides)."),
            "time": opt("Default time limit, e.g. 04:00:00 (tag slurm/time)."),
            "gres": opt("Default generic resources, e.g. gpu:1 (tag slurm/gres). Default none."),
            "mem": opt("Default memory, e.g. 32G (tag slurm/mem)."),
            "cpus": opt("Default CPUs per task (tag slurm/cpus)."),
            "account": opt("SLURM account."),
            "qos": opt("SLURM QOS."),
            "python_executable": opt("Python that runs `-m dagster api execute_run` in the job "
                                     "(default: the code location's executable)."),
            "working_directory": opt("Working directory of the job (default: the code location's)."),
            "env_vars": Field(Array(str), is_required=False, default_value=[],
                              description="NAME (copied from the launcher's environment) or NAME=value."),
            "extra_sbatch_args": Field(Array(str), is_required=False, default_value=[],
                                       description="Extra sbatch flags, e.g. --exclusive, --export=ALL."),
            "gpu_tag_key": Field(str, is_required=False, default_value=DEFAULT_GPU_TAG_KEY),
            "gpu_tag_value": Field(str, is_required=False, default_value=DEFAULT_GPU_TAG_VALUE),
            "log_dir": opt("Where batch scripts and job logs go (default $DAGSTER_HOME/slurm). "
                           "Must be visible to the compute nodes."),
            "slurm_conf": opt("SLURM_CONF for the SLURM commands (default: the environment's)."),
            "job_name_prefix": Field(str, is_required=False, default_value="dagster"),
            "cancel_wait_seconds": Field(float, is_required=False, default_value=20.0,
                                         description="How long terminate waits for the job to leave the queue."),
            "local_without_sbatch": Field(bool, is_required=False, default_value=False,
                                          description="Where no `sbatch` is on PATH (a laptop), run GPU runs on "
                                                      "this machine instead of failing them. Off on clusters."),
        }

    @classmethod
    def from_config_value(cls, inst_data: ConfigurableClassData, config_value: Mapping[str, Any]) -> "SlurmRunLauncher":
        return cls(inst_data=inst_data, **config_value)

    def register_instance(self, instance) -> None:  # type: ignore[override]
        super().register_instance(instance)
        self._default.register_instance(instance)

    # --- helpers -----------------------------------------------------------------------------------
    @property
    def _slurm_env(self) -> dict[str, str] | None:
        return {"SLURM_CONF": self.slurm_conf} if self.slurm_conf else None

    @property
    def log_dir(self) -> Path:
        if self._log_dir:
            return Path(self._log_dir)
        root = self._instance.root_directory if self.has_instance else os.environ.get("DAGSTER_HOME", ".")
        return Path(root) / "slurm"

    def _jobcomp_path(self) -> str | None:
        """JobCompLoc from the SLURM config (used when a job has aged out of slurmctld)."""
        conf = self.slurm_conf or os.environ.get("SLURM_CONF")
        if not conf or not os.path.isfile(conf):
            return None
        try:
            for line in Path(conf).read_text().splitlines():
                m = re.match(r"\s*JobCompLoc\s*=\s*(\S+)", line, re.IGNORECASE)
                if m:
                    return m.group(1)
        except OSError:
            return None
        return None

    def _asset_tag_sets(self, run: DagsterRun, workspace) -> list[Mapping[str, str]]:
        """Tags of the assets this run materializes, read from the code location. A checks-only run (e.g.
        "Execute all" on an asset's Checks tab, the revalidate job) materializes nothing: it runs locally."""
        if not run.asset_selection and run.asset_check_selection:
            return []
        origin = run.remote_job_origin
        if workspace is not None and origin is not None:
            repo_origin = origin.repository_origin
            location = workspace.get_code_location(repo_origin.code_location_origin.location_name)
            repo = location.get_repository(repo_origin.repository_name)
            if run.asset_selection:
                snaps = [repo.get_asset_node_snap(k) for k in run.asset_selection]
            else:
                snaps = list(repo.get_asset_node_snaps(job_name=run.job_name))
            return [dict(s.tags or {}) for s in snaps if s is not None]
        # Fallback (no workspace in the context): load the definitions in-process from the code origin.
        code_origin = run.job_code_origin
        if code_origin is None:
            return []
        from dagster._core.definitions.reconstruct import initialize_repository_def_from_pointer

        repo_def = initialize_repository_def_from_pointer(code_origin.repository_origin.code_pointer)
        graph = repo_def.asset_graph
        if run.asset_selection:
            keys = list(run.asset_selection)
        else:
            job_def = repo_def.get_job(run.job_name)
            keys = list(job_def.asset_layer.asset_graph.get_all_asset_keys()) if job_def.asset_layer else []
        out = []
        for key in keys:
            if graph.has(key):
                out.append(dict(graph.get(key).tags or {}))
        return out

    def slurm_request(self, run: DagsterRun, workspace) -> slurm.SlurmOptions | None:
        """The SLURM request for ``run``, or None when it should run locally."""
        tag_sets = self._asset_tag_sets(run, workspace)
        wants_gpu = any(t.get(self.gpu_tag_key) == self.gpu_tag_value for t in tag_sets)
        wants_gpu = wants_gpu or run.tags.get(self.gpu_tag_key) == self.gpu_tag_value
        if not wants_gpu:
            return None
        asset_opts = slurm.merge_tag_options(
            [t for t in tag_sets if t.get(self.gpu_tag_key) == self.gpu_tag_value] or tag_sets
        )
        opts = self.defaults.overlay(asset_opts, source="asset tags")
        opts = opts.overlay(slurm.options_from_tags(run.tags), source="run tags")
        if opts.job_name is None:
            opts = opts.overlay({"job_name": f"{self.job_name_prefix}-{run.run_id[:8]}"})
        return opts

    def _worker_env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        home = os.environ.get("DAGSTER_HOME")
        if home:
            env["DAGSTER_HOME"] = home
        for item in self.env_vars:
            if "=" in item:
                k, v = item.split("=", 1)
                env[k] = v
            elif item in os.environ:
                env[item] = os.environ[item]
        return env

    def build_script(self, run: DagsterRun, options: slurm.SlurmOptions) -> str:
        code_origin = check.not_none(run.job_code_origin, "run has no job_code_origin")
        python = self.python_executable or code_origin.executable_path or sys.executable
        args = ExecuteRunArgs(
            job_origin=code_origin,
            run_id=run.run_id,
            instance_ref=self._instance.get_ref(),
            set_exit_code_on_failure=True,
        )
        command = [python, "-m", "dagster", "api", "execute_run", serialize_value(args)]
        workdir = self.working_directory or code_origin.repository_origin.code_pointer.working_directory or os.getcwd()
        return slurm.build_batch_script(
            command,
            options,
            working_directory=workdir,
            env=self._worker_env(),
            output=self.log_dir / f"{run.run_id}.out",
        )

    # --- RunLauncher -------------------------------------------------------------------------------
    def launch_run(self, context: LaunchRunContext) -> None:
        run = context.dagster_run
        try:
            options = self.slurm_request(run, context.workspace)
        except slurm.SlurmError as e:
            raise DagsterLaunchFailedError(f"SLURM request for run {run.run_id} is invalid: {e}") from e
        if options is None:
            self._default.launch_run(context)
            return
        if self.local_without_sbatch and shutil.which("sbatch") is None:
            # a laptop's `dagster dev`: no cluster to send the GPU run to, so this machine runs it
            self._instance.report_engine_event(
                "no `sbatch` on PATH: running this GPU-tagged run on this machine (local_without_sbatch in "
                "dagster.yaml; set it to false to fail such runs instead)", run, cls=self.__class__)
            self._default.launch_run(context)
            return

        self.log_dir.mkdir(parents=True, exist_ok=True)
        script_path = self.log_dir / f"{run.run_id}.sbatch"
        script_path.write_text(self.build_script(run, options))
        request = " ".join(options.directives())
        try:
            job_id = slurm.submit(script_path, extra_args=options.extra_args, env=self._slurm_env)
        except slurm.SlurmError as e:
            raise DagsterLaunchFailedError(
                f"sbatch rejected the job for run {run.run_id} ({request}): {e}"
            ) from e
        self._instance.add_run_tags(
            run.run_id, {JOB_ID_TAG: job_id, LOG_TAG: str(self.log_dir / f"{run.run_id}.out")}
        )
        self._instance.report_engine_event(
            f"Submitted SLURM job {job_id} ({request}); script {script_path}",
            run,
            cls=self.__class__,
        )

    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def _job_id(self, run: DagsterRun) -> str | None:
        return run.tags.get(JOB_ID_TAG)

    def check_run_worker_health(self, run: DagsterRun) -> CheckRunHealthResult:
        job_id = self._job_id(run)
        if not job_id:
            # A local run (DefaultRunLauncher has no health check): only start/cancel timeouts apply.
            return CheckRunHealthResult(WorkerStatus.RUNNING, "not a SLURM run; no worker health check")
        st = slurm.job_state(job_id, env=self._slurm_env, jobcomp_path=self._jobcomp_path())
        detail = f"SLURM job {job_id}: {st.raw or st.status} (via {st.source})"
        if st.reason and st.reason not in ("None", "(null)"):
            detail += f", reason {st.reason}"
        if st.exit_code:
            detail += f", exit code {st.exit_code}"
        if st.status in ("running", "pending"):
            return CheckRunHealthResult(WorkerStatus.RUNNING, detail, run_worker_id=job_id)
        if st.status == "success":
            return CheckRunHealthResult(WorkerStatus.SUCCESS, detail, run_worker_id=job_id)
        if st.status == "failed":
            return CheckRunHealthResult(WorkerStatus.FAILED, detail, run_worker_id=job_id)
        if st.status == "not_found":
            return CheckRunHealthResult(
                WorkerStatus.NOT_FOUND, f"SLURM job {job_id} not found in squeue, scontrol or the jobcomp record",
                run_worker_id=job_id,
            )
        if st.source == "error":
            # Controller unreachable: do not fail a run for a transient outage.
            return CheckRunHealthResult(
                WorkerStatus.RUNNING, f"{detail}; SLURM unreachable, assuming running: {st.message}",
                transient=True, run_worker_id=job_id,
            )
        return CheckRunHealthResult(WorkerStatus.UNKNOWN, detail, run_worker_id=job_id)

    def get_run_worker_debug_info(self, run: DagsterRun, include_container_logs: bool | None = True) -> str | None:
        job_id = self._job_id(run)
        if not job_id:
            return None
        st = slurm.job_state(job_id, env=self._slurm_env, jobcomp_path=self._jobcomp_path())
        info = f"SLURM job {job_id}: state {st.raw or st.status} (via {st.source}), reason {st.reason}, exit {st.exit_code}"
        log = run.tags.get(LOG_TAG)
        if include_container_logs and log and os.path.isfile(log):
            tail = Path(log).read_text(errors="replace").splitlines()[-30:]
            info += f"\nlast lines of {log}:\n" + "\n".join(tail)
        return info

    def terminate(self, run_id: str) -> bool:
        check.str_param(run_id, "run_id")
        if not self.has_instance:
            return False
        run = self._instance.get_run_by_id(run_id)
        if not run or run.is_finished:
            return False
        job_id = self._job_id(run)
        if not job_id:
            return self._default.terminate(run_id)

        self._instance.report_run_canceling(run)
        try:
            accepted = slurm.cancel(job_id, env=self._slurm_env)
        except slurm.SlurmError as e:
            self._instance.report_engine_event(f"scancel {job_id} failed: {e}", run, cls=self.__class__)
            return False
        # SIGTERM reaches the worker, which normally reports the run CANCELED itself; wait for the job to
        # leave the queue, then make sure the run is marked (a PENDING job never had a worker).
        deadline = time.monotonic() + self.cancel_wait_seconds
        while time.monotonic() < deadline:
            st = slurm.job_state(job_id, env=self._slurm_env, jobcomp_path=self._jobcomp_path())
            if st.finished or st.status == "not_found":
                break
            time.sleep(0.25)
        while time.monotonic() < deadline:
            current = self._instance.get_run_by_id(run_id)
            if current is None or current.is_finished:
                break
            if current.status != DagsterRunStatus.CANCELING:
                break
            time.sleep(0.25)
        current = self._instance.get_run_by_id(run_id)
        if current is not None and not current.is_finished:
            self._instance.report_run_canceled(current, message=f"Run canceled: SLURM job {job_id} was cancelled (scancel).")
        return accepted

    def join(self, timeout: int = 30) -> None:
        self._default.join(timeout=timeout)

    def dispose(self) -> None:
        self._default.dispose()


def fail_lost_slurm_runs(instance, *, launcher: SlurmRunLauncher | None = None) -> list[str]:
    """Mark runs failed that wait in STARTING/NOT_STARTED for a SLURM job that has already ended
    (e.g. cancelled while PENDING, or a worker that died before reporting STARTED).

    Run monitoring only health-checks STARTED runs, and a queued job must not be killed by the start
    timeout, so call this from a sensor (or cron) when start_timeout_seconds is long. Returns run ids.
    """
    launcher = launcher or instance.run_launcher
    check.inst(launcher, SlurmRunLauncher)
    failed = []
    records = instance.get_run_records(
        filters=RunsFilter(statuses=[DagsterRunStatus.STARTING, DagsterRunStatus.NOT_STARTED], tags={})
    )
    for record in records:
        run = record.dagster_run
        job_id = run.tags.get(JOB_ID_TAG)
        if not job_id:
            continue
        st = slurm.job_state(job_id, env=launcher._slurm_env, jobcomp_path=launcher._jobcomp_path())
        if st.finished or st.status == "not_found":
            current = instance.get_run_by_id(run.run_id)
            if current is not None and current.status in (DagsterRunStatus.STARTING, DagsterRunStatus.NOT_STARTED):
                instance.report_run_failed(
                    current, f"SLURM job {job_id} ended ({st.raw or st.status}) before the run worker started."
                )
                failed.append(run.run_id)
    return failed
