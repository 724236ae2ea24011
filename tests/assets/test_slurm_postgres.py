"""The cluster configuration: Dagster storage on a real PostgreSQL (Debian's postgresql on loopback),
runs launched through SLURM. Mirrors dagster_home/dagster.slurm.example.yaml."""
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `tests.*` importable under plain `pytest`

# Registered as a plugin (not imported into each module) so the session-scoped `slurm_cluster`
# fixture starts one cluster for all SLURM test modules.
pytest_plugins = ["tests.support.slurm_fixtures"]

pytestmark = [pytest.mark.slurm, pytest.mark.postgres]

PG_BIN_CANDIDATES = ["/usr/lib/postgresql/17/bin", "/usr/lib/postgresql/16/bin", "/usr/lib/postgresql/15/bin"]


def _pg_bin() -> Path | None:
    for c in PG_BIN_CANDIDATES:
        if (Path(c) / "pg_ctl").exists():
            return Path(c)
    found = shutil.which("pg_ctl")
    return Path(found).resolve().parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_postgres(args: list[str], **kw) -> subprocess.CompletedProcess:
    # root cannot run the server: run as the `postgres` system user (Debian's package creates it)
    return subprocess.run(["runuser", "-u", "postgres", "--", *args], capture_output=True, text=True, **kw)


@pytest.fixture(scope="session")
def postgres_server():
    pg_bin = _pg_bin()
    if pg_bin is None:
        pytest.skip("PostgreSQL server binaries not installed (apt-get install postgresql)")
    if os.geteuid() != 0:
        pytest.skip("starting the test PostgreSQL needs root (runs it as the postgres user)")
    try:
        pw = pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("no postgres system user")
    base = Path(tempfile.mkdtemp(prefix="cb_pg_"))
    os.chmod(base, 0o755)
    data, sock = base / "data", base / "sock"
    sock.mkdir()
    os.chown(sock, pw.pw_uid, pw.pw_gid)
    os.chown(base, pw.pw_uid, pw.pw_gid)
    port = _free_port()
    init = _as_postgres([str(pg_bin / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8"],
                        timeout=120)
    if init.returncode != 0:
        shutil.rmtree(base, ignore_errors=True)
        pytest.skip(f"initdb failed: {init.stderr[-1000:]}")
    opts = f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off"
    start = _as_postgres([str(pg_bin / "pg_ctl"), "-D", str(data), "-l", str(base / "pg.log"), "-o", opts,
                          "-w", "-t", "60", "start"], timeout=180)
    if start.returncode != 0:
        log = (base / "pg.log").read_text() if (base / "pg.log").exists() else ""
        shutil.rmtree(base, ignore_errors=True)
        pytest.skip(f"pg_ctl start failed: {start.stderr[-500:]} {log[-1000:]}")
    created = _as_postgres([str(pg_bin / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "dagster"],
                           timeout=60)
    assert created.returncode == 0, created.stderr
    try:
        yield {"host": "127.0.0.1", "port": port, "user": "postgres", "db": "dagster"}
    finally:
        _as_postgres([str(pg_bin / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"], timeout=60)
        shutil.rmtree(base, ignore_errors=True)


def test_gpu_run_through_slurm_with_postgres_storage(slurm_cluster, postgres_server, tmp_path, monkeypatch):
    import dagster as dg
    import psycopg2

    from cb_assets.testing.slurm import launcher_env

    # Credentials reach dagster.yaml through environment variables, as in dagster.slurm.example.yaml.
    monkeypatch.setenv("DAGSTER_PG_HOST", postgres_server["host"])
    monkeypatch.setenv("DAGSTER_PG_PORT", str(postgres_server["port"]))
    monkeypatch.setenv("DAGSTER_PG_USER", postgres_server["user"])
    monkeypatch.setenv("DAGSTER_PG_PASSWORD", "")
    monkeypatch.setenv("DAGSTER_PG_DB", postgres_server["db"])
    storage = {"postgres": {"postgres_db": {
        "hostname": {"env": "DAGSTER_PG_HOST"}, "port": {"env": "DAGSTER_PG_PORT"},
        "username": {"env": "DAGSTER_PG_USER"}, "password": {"env": "DAGSTER_PG_PASSWORD"},
        "db_name": {"env": "DAGSTER_PG_DB"},
        # SQLAlchemy >= 2.1 maps plain "postgresql" to psycopg 3; dagster-postgres ships psycopg2.
        "scheme": "postgresql+psycopg2",
    }}}
    with launcher_env(tmp_path / "home", storage=storage,
                      launcher_extra={"env_vars": [f"CB_SLURM_PROOF_DIR={tmp_path / 'home' / 'proof'}",
                                                   "DAGSTER_PG_HOST", "DAGSTER_PG_PORT", "DAGSTER_PG_USER",
                                                   "DAGSTER_PG_PASSWORD", "DAGSTER_PG_DB"]}) as env:
        assert type(env.instance.run_storage).__name__ == "PostgresRunStorage"
        assert type(env.instance.event_log_storage).__name__ == "PostgresEventLogStorage"
        run = env.submit(assets=["gpu_asset"])
        job_id = run.tags["slurm/job_id"]
        done = env.wait(run.run_id, timeout=180)
        assert done.status == dg.DagsterRunStatus.SUCCESS, env.engine_messages(run.run_id)[-5:]
        assert env.proof("gpu_asset", run.run_id)["SLURM_JOB_ID"] == job_id
        script = (env.log_dir / f"{run.run_id}.sbatch").read_text()
        assert "export DAGSTER_PG_HOST=" in script

    conn = psycopg2.connect(host=postgres_server["host"], port=postgres_server["port"],
                            user=postgres_server["user"], dbname=postgres_server["db"])
    try:
        with conn.cursor() as cur:
            cur.execute("select status from runs where run_id = %s", (run.run_id,))
            assert cur.fetchone()[0] == "SUCCESS"
            cur.execute("select count(*) from event_logs where run_id = %s and dagster_event_type = %s",
                        (run.run_id, "ASSET_MATERIALIZATION"))
            assert cur.fetchone()[0] == 1
    finally:
        conn.close()
