"""SlurmRunLauncher overhead vs a bare `sbatch --wrap` of the same worker command, and N concurrent runs.

    sudo .venv/bin/python bench/slurm_launch.py [--repeats 3] [--concurrent 20]

Starts its own private SLURM (scripts/slurm_local.sh) and a temp DAGSTER_HOME; everything is measured
in this one process. "Worker started" = the moment the asset body starts inside the SLURM job (its
proof file's timestamp), so both paths include SLURM scheduling + Python/Dagster start-up; the ratio
isolates what the launcher adds (reading asset tags from the code location, writing the script,
run tags and events).
"""
import argparse
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cb_assets.testing.slurm import LauncherEnv, start_cluster, stop_cluster  # noqa: E402

ASSET = "bench_asset"  # GPU-routed, no gres request (20 can run at once on the one-GPU node)


def worker_command(env: LauncherEnv, run) -> list[str]:
    """The exact command the launcher would put in the batch script."""
    from dagster._grpc.types import ExecuteRunArgs
    from dagster._serdes import serialize_value

    launcher = env.launcher
    args = ExecuteRunArgs(job_origin=run.job_code_origin, run_id=run.run_id,
                          instance_ref=env.instance.get_ref(), set_exit_code_on_failure=True)
    return [launcher.python_executable or sys.executable, "-m", "dagster", "api", "execute_run", serialize_value(args)]


def via_launcher(env: LauncherEnv, n: int) -> tuple[list[float], list[float], float]:
    """Submit n created runs back to back; return (submit call seconds, submit->worker started, wall to all done)."""
    created = [env.create_run(assets=[ASSET]) for _ in range(n)]  # not timed (same for both paths)
    t_all = time.time()
    items = []
    for run, ctx in created:
        t0 = time.time()
        env.instance.submit_run(run.run_id, ctx)  # -> SlurmRunLauncher.launch_run -> sbatch
        items.append((run.run_id, t0, time.time() - t0))
    starts = []
    for run_id, t0, _ in items:
        proof = env.proof(ASSET, run_id, timeout=300)
        assert proof is not None, f"run {run_id} never started"
        starts.append(proof["t"] - t0)
    for run_id, _, _ in items:
        run = env.wait(run_id, timeout=300)
        assert run.status.value == "SUCCESS", run.status
    return [s for _, _, s in items], starts, time.time() - t_all


def via_bare_sbatch(env: LauncherEnv, cluster, n: int) -> tuple[list[float], list[float], float]:
    """Same worker command, submitted with a bare `sbatch --wrap` (runs created but not launched)."""
    runs = [env.create_run(assets=[ASSET])[0] for _ in range(n)]
    cmds = [" ".join(shlex.quote(a) for a in worker_command(env, r)) for r in runs]
    t_all = time.time()
    items = []
    for run, cmd in zip(runs, cmds):
        t0 = time.time()
        proc = subprocess.run(["sbatch", "--parsable", "--chdir", str(ROOT), "-o", "/dev/null", "--wrap", cmd],
                              capture_output=True, text=True, env=cluster.env())
        assert proc.returncode == 0, proc.stderr
        items.append((run.run_id, t0, time.time() - t0))
    starts = []
    for run_id, t0, _ in items:
        proof = env.proof(ASSET, run_id, timeout=300)
        assert proof is not None, f"bare job for {run_id} never started"
        starts.append(proof["t"] - t0)
    for run_id, _, _ in items:
        env.wait(run_id, timeout=300)
    return [s for _, _, s in items], starts, time.time() - t_all


def fmt(xs: list[float]) -> str:
    return f"median {statistics.median(xs):6.3f}s  min {min(xs):6.3f}s  max {max(xs):6.3f}s"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--concurrent", type=int, default=20)
    a = ap.parse_args()

    import os

    cluster = start_cluster()
    os.environ["SLURM_CONF"] = cluster.conf
    env = LauncherEnv(Path(tempfile.mkdtemp(prefix="cb_bench_")) / "home")
    launch_times: list[float] = []
    inner = env.launcher.launch_run

    def timed_launch_run(context):  # the launcher's own share of submit_run (rest: Dagster's run/event storage)
        t = time.perf_counter()
        try:
            return inner(context)
        finally:
            launch_times.append(time.perf_counter() - t)

    env.launcher.launch_run = timed_launch_run
    try:
        # warm-up (code server, page cache)
        via_launcher(env, 1)
        launch_times.clear()
        l_sub, l_start = [], []
        b_sub, b_start = [], []
        for _ in range(a.repeats):  # interleave so drift hits both equally
            s, st, _ = via_launcher(env, 1)
            l_sub += s
            l_start += st
            s, st, _ = via_bare_sbatch(env, cluster, 1)
            b_sub += s
            b_start += st
        print(f"single run, {a.repeats} repeats (submit -> worker started inside SLURM):")
        print(f"  SlurmRunLauncher : submit call {fmt(l_sub)} | started {fmt(l_start)}")
        print(f"  bare sbatch      : submit call {fmt(b_sub)} | started {fmt(b_start)}")
        print(f"  SlurmRunLauncher.launch_run itself (tag lookup + script + sbatch + run tags): {fmt(launch_times)}")
        print(f"  ratio launcher/bare (median started): {statistics.median(l_start) / statistics.median(b_start):.2f}x"
              f"  (launcher adds {statistics.median(l_start) - statistics.median(b_start):+.3f}s)")

        n = a.concurrent
        launch_times.clear()
        ls, lst, lwall = via_launcher(env, n)
        bs, bst, bwall = via_bare_sbatch(env, cluster, n)
        print(f"\n{n} concurrent runs:")
        print(f"  SlurmRunLauncher : all submitted in {sum(ls):.2f}s | started {fmt(lst)} | all done {lwall:.2f}s")
        print(f"    of which launch_run: {sum(launch_times):.2f}s ({fmt(launch_times)})")
        print(f"  bare sbatch      : all submitted in {sum(bs):.2f}s | started {fmt(bst)} | all done {bwall:.2f}s")
        print(f"  ratio launcher/bare: submit {sum(ls) / sum(bs):.2f}x, median start {statistics.median(lst) / statistics.median(bst):.2f}x,"
              f" wall {lwall / bwall:.2f}x")
        print(f"\n(host: {os.cpu_count()} CPUs; node advertises oversubscribed CPUs so all {n} jobs run at once)")
    finally:
        env.close()
        stop_cluster(cluster)
        import shutil

        shutil.rmtree(cluster.dir, ignore_errors=True)
        shutil.rmtree(env.home.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
