"""Atomic writes: a crash mid-write leaves the previous good file."""
import polars as pl
import pytest

from cb_core.io import write_parquet


class Boom(Exception):
    pass


def test_failed_write_keeps_previous_version(tmp_path, monkeypatch):
    path = tmp_path / "traces.parquet"
    write_parquet(pl.DataFrame({"id": ["a", "b"]}), path)

    def crash(self, *a, **k):
        raise Boom("disk full")

    monkeypatch.setattr(pl.DataFrame, "write_parquet", crash)
    with pytest.raises(Boom):
        write_parquet(pl.DataFrame({"id": ["c"]}), path)
    monkeypatch.undo()
    assert pl.read_parquet(path)["id"].to_list() == ["a", "b"]
    assert [p.name for p in tmp_path.iterdir()] == ["traces.parquet"]  # no temp litter


# ------------------------------------------------------------------------- file modes, publish, lock
import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from cb_core import io as cio  # noqa: E402

PROJECT_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def umask():
    """Set a umask for the test and restore the previous one afterwards."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_published_files_get_the_umask_mode_not_0600(tmp_path, umask, mask, mode):
    umask(mask)
    assert cio.current_umask() == mask
    a = write_parquet(pl.DataFrame({"id": ["a"]}), tmp_path / "t.parquet")
    cio.atomic_write_bytes(tmp_path / "p.html", b"<p>")
    g, r = cio.publish_together({tmp_path / "raw.parquet": pl.DataFrame({"x": [1]}),
                                 tmp_path / "raw.rejected.parquet": pl.DataFrame({"y": [2]})})
    for p in (a, tmp_path / "p.html", g, r):
        assert oct(p.stat().st_mode & 0o777) == oct(mode), p.name


def test_publish_together_rolls_forward_after_a_crash_between_renames(tmp_path, monkeypatch):
    good, rej = tmp_path / "raw_x.parquet", tmp_path / "raw_x.rejected.parquet"
    cio.publish_together({good: pl.DataFrame({"v": ["old"]}), rej: pl.DataFrame({"v": ["old"]})})
    real_replace = os.replace
    calls = []

    def crash_on_second(src, dst):
        calls.append(dst)
        if len(calls) == 3:  # 1: the journal, 2: the good table, 3: the rejected table
            raise KeyboardInterrupt("killed between the renames")
        real_replace(src, dst)

    monkeypatch.setattr(cio.os, "replace", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        cio.publish_together({good: pl.DataFrame({"v": ["new"]}), rej: pl.DataFrame({"v": ["new"]})})
    monkeypatch.undo()
    # on disk: a mixed pair plus the journal that says how to finish it
    assert pl.read_parquet(good)["v"].to_list() == ["new"] and pl.read_parquet(rej)["v"].to_list() == ["old"]
    assert cio.journal_path(good).exists()
    assert cio.recover_publishes(tmp_path) == [str(good)]
    assert pl.read_parquet(rej)["v"].to_list() == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw_x.parquet", "raw_x.rejected.parquet"]


def test_crash_before_the_journal_keeps_the_old_pair_and_temps_are_cleaned(tmp_path):
    """A real SIGKILL while both temps are written but nothing is renamed yet."""
    good, rej = tmp_path / "raw_x.parquet", tmp_path / "raw_x.rejected.parquet"
    cio.publish_together({good: pl.DataFrame({"v": ["old"]}), rej: pl.DataFrame({"v": ["old"]})})
    code = ("import polars as pl, sys; from pathlib import Path; from cb_core.io import publish_together; "
            "d = Path(sys.argv[1]); publish_together({d / 'raw_x.parquet': pl.DataFrame({'v': ['new']}), "
            "d / 'raw_x.rejected.parquet': pl.DataFrame({'v': ['new']})})")
    env = {**os.environ, "CB_FAULT_PAUSE": "publish_temps:60"}
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=PROJECT_ROOT, env=env)
    deadline = time.time() + 60
    while len(list(tmp_path.glob(".*.tmp"))) < 2 and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(list(tmp_path.glob(".*.tmp"))) == 2
    info = cio.acquire_data_root(tmp_path, timeout_s=0)
    cio.release_data_root(tmp_path)
    assert len(info["removed_temps"]) == 2 and info["recovered"] == []
    assert pl.read_parquet(good)["v"].to_list() == ["old"] and pl.read_parquet(rej)["v"].to_list() == ["old"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "raw_x.parquet", "raw_x.rejected.parquet"]


def _hold_lock(root: Path, seconds: float) -> subprocess.Popen:
    code = ("import sys, time; from cb_core.io import acquire_data_root; "
            "acquire_data_root(sys.argv[1], run_id='holder-run-1'); print('held', flush=True); "
            "time.sleep(float(sys.argv[2]))")
    proc = subprocess.Popen([sys.executable, "-c", code, str(root), str(seconds)], cwd=PROJECT_ROOT,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_lock_is_exclusive_across_processes_and_names_the_holder(tmp_path):
    holder = _hold_lock(tmp_path, 60)
    try:
        t0 = time.monotonic()
        with pytest.raises(cio.DataRootBusy) as err:
            cio.acquire_data_root(tmp_path, timeout_s=0.5)
        assert time.monotonic() - t0 >= 0.5
        msg = str(err.value)
        assert str(tmp_path.resolve()) in msg and f"pid {holder.pid}" in msg and "holder-run-1" in msg
        assert not cio.holds_data_root(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    # the holder died (SIGKILL): the kernel released its flock, no stale lock to clear by hand
    with cio.lock_data_root(tmp_path, timeout_s=0) as info:
        assert info["root"] == str(tmp_path.resolve()) and cio.holds_data_root(tmp_path)
        with cio.lock_data_root(tmp_path, timeout_s=0):  # re-entrant within one process
            pass
        assert cio.holds_data_root(tmp_path)
    assert not cio.holds_data_root(tmp_path)


def test_waiter_gets_the_lock_when_the_holder_finishes(tmp_path):
    holder = _hold_lock(tmp_path, 1.5)
    try:
        info = cio.acquire_data_root(tmp_path, timeout_s=30)
        cio.release_data_root(tmp_path)
        assert info["waited_s"] >= 0.5
    finally:
        holder.wait()


def test_lock_timeout_env_is_validated(monkeypatch):
    from cb_core.config import ConfigError

    monkeypatch.setenv("CB_LOCK_TIMEOUT", "soon")
    with pytest.raises(ConfigError, match="CB_LOCK_TIMEOUT must be a number of seconds >= 0, got 'soon'"):
        cio.lock_timeout_s()
    monkeypatch.setenv("CB_LOCK_TIMEOUT", "2.5")
    assert cio.lock_timeout_s() == 2.5


def test_file_digest_is_remembered_until_the_file_changes(tmp_path, monkeypatch):
    """A sweep fingerprints the same tables once per point: the digest is computed once per file version
    (path, inode, size, mtime), and a rewrite (atomic: a new inode) is hashed again."""
    import hashlib

    p = tmp_path / "t.parquet"
    cio.atomic_write_bytes(p, b"x" * (5 << 20))  # over one 4 MiB read
    want = hashlib.sha256(b"x" * (5 << 20)).hexdigest()[:16]
    assert cio.file_digest(p) == want
    reads: list[int] = []
    real_sha = hashlib.sha256

    class Counting:
        def __init__(self):
            self.h = real_sha()

        def update(self, b):
            reads.append(len(b))
            self.h.update(b)

        def hexdigest(self):
            return self.h.hexdigest()

    monkeypatch.setattr(hashlib, "sha256", Counting)
    assert cio.file_digest(p) == want and reads == []  # remembered
    cio.atomic_write_bytes(p, b"y" * 10)
    assert cio.file_digest(p) == real_sha(b"y" * 10).hexdigest()[:16] and reads == [10]
    assert cio.file_digest(tmp_path / "absent.parquet") is None and cio.file_digest(tmp_path) is None
