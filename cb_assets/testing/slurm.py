"""A private SLURM and a Dagster home that launches through SlurmRunLauncher: shared by the SLURM tests
(tests/slurm_fixtures.py wraps them as pytest fixtures) and bench/slurm_launch.py.

- :func:`start_cluster` / :func:`stop_cluster`: a single-node SLURM started by scripts/slurm_local.sh.
- :class:`LauncherEnv`: a temp DAGSTER_HOME whose dagster.yaml uses SlurmRunLauncher, plus a workspace
  (gRPC code server) for ``cb_assets.testing.slurm_defs``; ``submit()`` creates and submits a run the way
  the UI does.
"""
from __future__ import annotations

import os
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "slurm_local.sh"
LOCATION = "slurm_defs"


@dataclass
class SlurmCluster:
    dir: Path
    conf: str

    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": self.conf}

    def cmd(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), capture_output=True, text=True, env=self.env(), timeout=30)


def start_cluster(base: Path | None = None, **env: str) -> SlurmCluster:
    """Start a cluster (raises RuntimeError with the script's message on failure)."""
    if os.geteuid() != 0:
        raise PermissionError("the local SLURM needs root (slurmd runs jobs as root here)")
    d = Path(base or tempfile.mkdtemp(prefix="cb_slurm_"))
    proc = subprocess.run(
        ["bash", str(SCRIPT), "start", str(d)], capture_output=True, text=True, timeout=600,
        env={**os.environ, **env},
    )
    if proc.returncode != 0:
        raise RuntimeError(f"slurm_local.sh start failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("export SLURM_CONF=")][-1]
    return SlurmCluster(d, line.split("=", 1)[1].strip())


def stop_cluster(cluster: SlurmCluster) -> None:
    subprocess.run(["bash", str(SCRIPT), "stop", str(cluster.dir)], capture_output=True, text=True, timeout=120)


def launcher_block(log_dir: Path, proof_dir: Path, **extra) -> dict:
    cfg = {
        "python_executable": str(Path(os.environ.get("VIRTUAL_ENV", "")) / "bin" / "python")
        if os.environ.get("VIRTUAL_ENV") else __import__("sys").executable,
        "working_directory": str(ROOT),
        "log_dir": str(log_dir),
        "env_vars": [f"CB_SLURM_PROOF_DIR={proof_dir}", "CB_SLOW_ASSET_SECONDS"],
        "time": "00:30:00",
        "cancel_wait_seconds": 15,
    }
    cfg.update(extra)
    return {"module": "cb_assets.slurm_launcher", "class": "SlurmRunLauncher", "config": cfg}


class LauncherEnv:
    """A DAGSTER_HOME with SlurmRunLauncher and a workspace for cb_assets.testing.slurm_defs."""

    def __init__(self, home: Path, storage: Mapping | None = None, launcher_extra: Mapping | None = None):
        from dagster import DagsterInstance
        from dagster._core.workspace.context import WorkspaceProcessContext
        from dagster._core.workspace.load_target import ModuleTarget

        self.home = Path(home)
        self.home.mkdir(parents=True, exist_ok=True)
        self.proof_dir = self.home / "proof"
        self.proof_dir.mkdir(exist_ok=True)
        self.log_dir = self.home / "slurm"
        config = {
            "run_launcher": launcher_block(self.log_dir, self.proof_dir, **(launcher_extra or {})),
            "run_monitoring": {
                "enabled": True,
                "start_timeout_seconds": 3600,
                "poll_interval_seconds": 1,
                "max_resume_run_attempts": 0,
            },
            "telemetry": {"enabled": False},
            # Submit -> launch synchronously (no dagster-daemon needed). Production uses the daemon's
            # QueuedRunCoordinator, which calls the same launcher with the same workspace context.
            "run_coordinator": {"module": "dagster._core.run_coordinator", "class": "DefaultRunCoordinator"},
        }
        if storage:
            config["storage"] = dict(storage)
        (self.home / "dagster.yaml").write_text(yaml.safe_dump(config))
        self._old_env = {k: os.environ.get(k) for k in ("DAGSTER_HOME", "CB_SLURM_PROOF_DIR")}
        os.environ["DAGSTER_HOME"] = str(self.home)
        os.environ["CB_SLURM_PROOF_DIR"] = str(self.proof_dir)
        self.instance = DagsterInstance.from_config(str(self.home))
        self.workspace_ctx = WorkspaceProcessContext(
            self.instance,
            ModuleTarget(module_name="cb_assets.testing.slurm_defs", attribute="defs", working_directory=str(ROOT),
                         location_name=LOCATION),
        )
        self.workspace_ctx.__enter__()

    def close(self) -> None:
        try:
            self.workspace_ctx.__exit__(None, None, None)
        finally:
            self.instance.dispose()
            for k, v in self._old_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    @property
    def launcher(self):
        return self.instance.run_launcher

    def create_run(self, job_name: str = "__ASSET_JOB", assets: Iterable[str] | None = None,
                   tags: Mapping[str, str] | None = None):
        """Create a run the way the UI/`dagster job launch` does (from the remote job)."""
        from dagster import AssetKey
        from dagster._core.definitions.selector import JobSubsetSelector

        ctx = self.workspace_ctx.create_request_context()
        location = ctx.get_code_location(LOCATION)
        repo = next(iter(location.get_repositories().values()))
        keys = frozenset(AssetKey(a) for a in assets) if assets else None
        selector = JobSubsetSelector(location_name=LOCATION, repository_name=repo.name, job_name=job_name,
                                     op_selection=None, asset_selection=keys)
        remote_job = location.get_job(selector)
        plan = location.get_execution_plan(remote_job, {}, step_keys_to_execute=None, known_state=None,
                                           instance=self.instance).execution_plan_snapshot
        run = self.instance.create_run(
            job_name=job_name, run_id=None, run_config={}, resolved_op_selection=remote_job.resolved_op_selection,
            step_keys_to_execute=plan.step_keys_to_execute, op_selection=None, status=None, root_run_id=None,
            parent_run_id=None, tags={**remote_job.tags, **(tags or {})}, job_snapshot=remote_job.job_snapshot,
            execution_plan_snapshot=plan, parent_job_snapshot=remote_job.parent_job_snapshot,
            remote_job_origin=remote_job.get_remote_origin(), job_code_origin=remote_job.get_python_origin(),
            asset_selection=keys, asset_check_selection=None, asset_graph=repo.asset_graph,
        )
        return run, ctx

    def submit(self, job_name: str = "__ASSET_JOB", assets: Iterable[str] | None = None,
               tags: Mapping[str, str] | None = None):
        """Create and submit a run (DefaultRunCoordinator -> instance.launch_run -> our launcher)."""
        run, ctx = self.create_run(job_name, assets, tags)
        self.instance.submit_run(run.run_id, ctx)
        return self.instance.get_run_by_id(run.run_id)

    def wait(self, run_id: str, statuses=None, timeout: float = 60, monitor: bool = False):
        """Poll until the run is finished (or in one of ``statuses``); with ``monitor``, run one run
        monitoring iteration per poll, as the dagster-daemon's monitoring loop does."""
        deadline = time.monotonic() + timeout
        while True:
            run = self.instance.get_run_by_id(run_id)
            if statuses is not None and run.status in statuses:
                return run
            if statuses is None and run.is_finished:
                return run
            if time.monotonic() > deadline:
                raise TimeoutError(f"run {run_id} still {run.status} after {timeout}s")
            if monitor:
                self.monitor_once()
            time.sleep(0.3)

    def monitor_once(self) -> None:
        import logging

        from dagster._daemon.monitoring.run_monitoring import execute_run_monitoring_iteration

        for _ in execute_run_monitoring_iteration(self.workspace_ctx, logging.getLogger("run_monitoring")):
            pass

    def proof(self, asset: str, run_id: str, timeout: float = 0) -> dict | None:
        import json

        path = self.proof_dir / f"{asset}.{run_id}.json"
        deadline = time.monotonic() + timeout
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        return json.loads(path.read_text()) if path.exists() else None

    def engine_messages(self, run_id: str) -> list[str]:
        return [e.message or "" for e in self.instance.all_logs(run_id)]


@contextmanager
def launcher_env(home: Path, storage: Mapping | None = None, launcher_extra: Mapping | None = None):
    env = LauncherEnv(home, storage=storage, launcher_extra=launcher_extra)
    try:
        yield env
    finally:
        env.close()
