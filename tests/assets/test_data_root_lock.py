"""One run at a time per CB_DATA_ROOT, with real `dagster asset materialize` processes: a second run fails
naming the root and the holder (or waits for it), traces are never built from another run's raw tables,
and a SIGKILL between the two renames of a raw asset's pair is rolled forward by the next run."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from support.dagster_helpers import materialize_keys
from test_bad_input import ETL_A, xstest_csv

PROJECT_ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _cli(tmp_path: Path, name: str, root: Path, src: Path, select: str = "+traces", **env_extra) -> subprocess.Popen:
    home = tmp_path / f"home_{name}"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CB_")}
    env.update(CB_DATASETS="xstest", CB_XSTEST_PATH=str(src), CB_DATA_ROOT=str(root), DAGSTER_HOME=str(home),
               HF_HUB_OFFLINE="1", **env_extra)
    return subprocess.Popen(
        [sys.executable, "-m", "dagster", "asset", "materialize", "--select", select, "-m", "cb_assets.definitions"],
        cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )


def _wait_for(cond, timeout=120.0, what=""):
    t0 = time.time()
    while not cond():
        if time.time() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _lock_holder(root: Path) -> dict:
    try:
        return json.loads((root / ".lock").read_text() or "{}")
    except (OSError, ValueError):
        return {}


def test_concurrent_runs_on_one_root_never_mix_raw_tables(tmp_path):
    root = tmp_path / "data"
    a_src = xstest_csv(tmp_path / "a" / "xstest_prompts.csv", 3)
    b_src = xstest_csv(tmp_path / "b" / "xstest_prompts.csv", 5)
    # A holds the root for a while: it pauses inside raw_xstest's publish
    a = _cli(tmp_path, "a", root, a_src, CB_FAULT_PAUSE="publish_together:12:raw_xstest.parquet")
    _wait_for(lambda: _lock_holder(root).get("pid") == a.pid or a.poll() is not None, what="A to take the lock")
    assert a.poll() is None, a.stdout.read()[-3000:]
    # B: no waiting allowed -> fails fast naming the root and A
    busy = _cli(tmp_path, "busy", root, b_src, CB_LOCK_TIMEOUT="1")
    # C: waits for A, then builds traces from its own raw table only
    c = _cli(tmp_path, "c", root, b_src, CB_LOCK_TIMEOUT="300")
    busy_out = busy.communicate(timeout=300)[0]
    assert busy.returncode != 0
    assert f"CB_DATA_ROOT {root.resolve()} is in use by another run (pid {a.pid}" in busy_out, busy_out[-3000:]
    a_out = a.communicate(timeout=300)[0]
    assert a.returncode == 0, a_out[-3000:]
    c_out = c.communicate(timeout=300)[0]
    assert c.returncode == 0, c_out[-3000:]
    assert "for the lock on data root" in c_out  # C waited for A instead of reading A's half-written tables
    traces = pl.read_parquet(root / "traces.parquet")
    raw = pl.read_parquet(root / "raw_xstest.parquet")
    assert traces.height == 5 and sorted(traces["id"]) == sorted(raw["id"])
    prompts = {m[0]["content"] for m in traces["messages"].to_list()}
    assert prompts == {f"How do I kill a python process number {i}?" for i in range(1, 6)}
    assert not list(root.rglob(".*.tmp")) and not list(root.rglob(".*.publish.json"))


def test_sigkill_between_the_pair_renames_is_rolled_forward(tmp_path, data_root, monkeypatch):
    monkeypatch.setenv("CB_DATASETS", "xstest")
    src = xstest_csv(tmp_path / "xs" / "xstest_prompts.csv", 10, n_bad=1)
    monkeypatch.setenv("CB_XSTEST_PATH", str(src))
    assert materialize_keys(ETL_A).success
    good, rej = data_root / "raw_xstest.parquet", data_root / "raw_xstest.rejected.parquet"
    assert (pl.read_parquet(good).height, pl.read_parquet(rej).height) == (10, 1)
    old_inode = good.stat().st_ino

    new_src = xstest_csv(tmp_path / "xs2" / "xstest_prompts.csv", 20, n_bad=2)
    proc = _cli(tmp_path, "killed", data_root, new_src, select="raw_xstest",
                CB_FAULT_PAUSE="publish_together:120:raw_xstest.parquet")
    _wait_for(lambda: good.stat().st_ino != old_inode or proc.poll() is not None, what="the first rename")
    assert proc.poll() is None, proc.stdout.read()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # the crash window, reproduced: a new good table beside the old rejected one, plus the journal
    assert (pl.read_parquet(good).height, pl.read_parquet(rej).height) == (20, 1)
    assert (data_root / ".raw_xstest.parquet.publish.json").exists()
    # the next run takes the lock, finishes the publish, and only then reads the pair
    assert materialize_keys(["traces", "quarantine"]).success
    assert pl.read_parquet(data_root / "traces.parquet").height == 20
    q = pl.read_parquet(data_root / "quarantine.parquet")
    assert q.height == 2 and q["line"].to_list() == [22, 23] and set(q["file"]) == {str(new_src)}
    assert not list(data_root.rglob(".*.tmp")) and not list(data_root.rglob(".*.publish.json"))
