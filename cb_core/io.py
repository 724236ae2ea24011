"""Atomic Parquet tiers under $CB_DATA_ROOT: a crash mid-write leaves the previous good file in place.

- Every file is written to a hidden temp file beside its target, fsynced, given the mode the umask gives a
  normal file (0644 under umask 022, not mkstemp's 0600), then renamed over the target.
- Tables that belong together (a raw source's good and rejected rows) are published with `publish_together`:
  both temps are written first, a small journal names the renames, and an interrupted publish is rolled
  forward the next time the data root is locked, so a reader never sees a new `rejected` beside an old table.
- `lock_data_root` takes an exclusive `flock` on `$CB_DATA_ROOT/.lock`: one run at a time per data root.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import socket
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import polars as pl

LOCK_FILE = ".lock"
LOCK_TIMEOUT_ENV = "CB_LOCK_TIMEOUT"
DEFAULT_LOCK_TIMEOUT_S = 120.0
FAULT_ENV = "CB_FAULT_PAUSE"  # test hook: "<point>:<seconds>" sleeps at that point (see _fault_point)
_TEMP_RE = re.compile(r"^\..+\.tmp$")
_JOURNAL_SUFFIX = ".publish.json"


class DataRootBusy(RuntimeError):
    """Another run holds the data root's lock; the message names the root and the holder."""


def data_root() -> Path:
    return Path(os.environ.get("CB_DATA_ROOT", ".cb_data")).resolve()


# ----------------------------------------------------------------------------------------------- file modes
def current_umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask is set-and-return)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def file_mode() -> int:
    """What open(..., 'w') would give: 0o666 minus the umask."""
    return 0o666 & ~current_umask()


def _fault_point(name: str, target: Path | None = None) -> None:
    """Fault injection for crash tests (never set in production): CB_FAULT_PAUSE=<name>:<seconds>[:<file>]
    sleeps here, only while publishing <file> (e.g. raw_xstest.parquet) when one is given."""
    spec = os.environ.get(FAULT_ENV, "")
    if not spec:
        return
    point, _, rest = spec.partition(":")
    secs, _, only = rest.partition(":")
    if point == name and (not only or (target is not None and target.name == only)):
        time.sleep(float(secs or 0))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temp_path(path: Path) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def _finish_temp(tmp: Path) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.chmod(tmp, file_mode())


_DIGESTS: dict[tuple, str] = {}


def file_digest(path: Path) -> str | None:
    """The first 16 hex digits of a file's sha256 (None when it is not a file), remembered per (path, inode,
    size, mtime) in this process: a sweep checks the same input tables once per point. Streamed in 4 MiB
    reads, so a multi-GB table is never held in memory."""
    import hashlib

    path = Path(path)
    try:
        st = path.stat()
    except OSError:
        return None
    if not path.is_file():
        return None
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _DIGESTS[key] = h.hexdigest()[:16]
    return _DIGESTS[key]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    try:
        tmp.write_bytes(data)
        _finish_temp(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_temp_parquet(df: pl.DataFrame, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    try:
        df.write_parquet(tmp, compression="zstd", statistics=True)
        _finish_temp(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def write_parquet(df: pl.DataFrame, path: Path) -> Path:
    """Write via temp file + rename in the same folder (rename is atomic on POSIX)."""
    path = Path(path)
    tmp = _write_temp_parquet(df, path)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_json(obj, path: Path) -> Path:
    atomic_write_bytes(Path(path), json.dumps(obj, indent=2, sort_keys=True, default=str).encode())
    return Path(path)


# ------------------------------------------------------------------------------------ publishing together
def journal_path(first: Path) -> Path:
    return first.parent / f".{first.name}{_JOURNAL_SUFFIX}"


def publish_together(frames: dict[Path, pl.DataFrame]) -> list[Path]:
    """Publish several tables as one: every temp is complete before any rename, and the journal written in
    between lets `recover_publishes` finish the renames after a crash (roll forward, never a mixed set).
    The first path names the journal."""
    paths = [Path(p) for p in frames]
    temps: dict[Path, Path] = {}
    try:
        for p, df in zip(paths, frames.values()):
            temps[p] = _write_temp_parquet(df, p)
    except BaseException:
        for t in temps.values():
            t.unlink(missing_ok=True)
        raise
    _fault_point("publish_temps", paths[0])  # every temp complete, nothing renamed yet
    journal = journal_path(paths[0])
    write_json({"renames": [[t.name, p.name] for p, t in temps.items()], "pid": os.getpid()}, journal)
    for i, (p, t) in enumerate(temps.items()):
        if i:
            _fault_point("publish_together", paths[0])  # between the renames: where a crash test kills
        os.replace(t, p)
    _fsync_dir(paths[0].parent)
    journal.unlink(missing_ok=True)
    return paths


def recover_publishes(root: Path) -> list[str]:
    """Finish every interrupted `publish_together` under `root` (call with the data-root lock held).
    A journal exists only once all its temps were complete, so the remaining renames are safe."""
    done = []
    for journal in sorted(Path(root).rglob(f".*{_JOURNAL_SUFFIX}")):
        try:
            renames = json.loads(journal.read_text())["renames"]
        except (OSError, ValueError, KeyError, TypeError):
            journal.unlink(missing_ok=True)  # a torn journal (its own temp never renamed) cannot exist; be safe
            continue
        for tmp_name, dest_name in renames:
            tmp = journal.parent / tmp_name
            if tmp.exists():
                os.replace(tmp, journal.parent / dest_name)
        journal.unlink(missing_ok=True)
        done.append(str(journal.parent / renames[0][1]) if renames else str(journal))
    return done


def clean_stale_temps(root: Path) -> list[str]:
    """Delete `.<name>.*.tmp` files left by killed writers (call with the data-root lock held: then no
    writer is alive)."""
    removed = []
    for p in Path(root).rglob(".*.tmp"):
        if p.is_file() and _TEMP_RE.match(p.name):
            p.unlink(missing_ok=True)
            removed.append(str(p))
    return removed


# --------------------------------------------------------------------------------------------- the lock
_HELD: dict[Path, list] = {}  # root -> [fd, depth]; re-entrant within one process
_HELD_GUARD = threading.Lock()


def lock_timeout_s(default: float = DEFAULT_LOCK_TIMEOUT_S) -> float:
    raw = os.environ.get(LOCK_TIMEOUT_ENV)
    if raw is None or raw.strip() == "":
        return default
    try:
        val = float(raw)
    except ValueError:
        val = -1.0
    if not val >= 0:
        from cb_core.config import ConfigError

        raise ConfigError(f"{LOCK_TIMEOUT_ENV} must be a number of seconds >= 0, got {raw!r}")
    return val


def _holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 4096) or b"{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "holder unknown"
    return (f"pid {info.get('pid')} on {info.get('host')}, run {info.get('run_id') or '?'}, "
            f"since {info.get('since')}")


def acquire_data_root(root: Path | None = None, *, run_id: str = "", timeout_s: float | None = None,
                      shared: bool = False) -> dict:
    """Take the exclusive lock on `root` (default $CB_DATA_ROOT), waiting up to `timeout_s`
    (default $CB_LOCK_TIMEOUT, else 120 s); then finish interrupted publishes and delete stale temps.
    Re-entrant in one process. Raises DataRootBusy naming the root and the holder.

    `shared`: a reader's lock (sweep points: many at once, each reading the tiers and writing only its own
    folder); it excludes every exclusive holder, and it never recovers or cleans (other readers' temps)."""
    root = Path(root or data_root()).resolve()
    timeout = lock_timeout_s() if timeout_s is None else timeout_s
    with _HELD_GUARD:
        if root in _HELD:
            _HELD[root][1] += 1
            return {"root": str(root), "reentrant": True}
        try:
            root.mkdir(parents=True, exist_ok=True)
            fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise DataRootBusy(f"CB_DATA_ROOT {root}: cannot create the run lock {root / LOCK_FILE}: {e}") from e
        t0 = time.monotonic()
        while True:
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() - t0 >= timeout:
                    holder = _holder(fd)
                    os.close(fd)
                    raise DataRootBusy(
                        f"CB_DATA_ROOT {root} is in use by another run ({holder}); waited {timeout:g}s "
                        f"({LOCK_TIMEOUT_ENV}). One run at a time per data root: wait for it to finish, or "
                        f"point CB_DATA_ROOT elsewhere."
                    ) from None
                time.sleep(0.2)
        waited = time.monotonic() - t0
        _HELD[root] = [fd, 1, shared]
        if shared:
            return {"root": str(root), "waited_s": round(waited, 2), "recovered": [], "removed_temps": [],
                    "shared": True}
        info = {"pid": os.getpid(), "host": socket.gethostname(), "run_id": run_id,
                "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
    try:
        recovered = recover_publishes(root)
        removed = clean_stale_temps(root)
    except BaseException:
        release_data_root(root)
        raise
    return {"root": str(root), "waited_s": round(waited, 2), "recovered": recovered, "removed_temps": removed}


def release_data_root(root: Path | None = None) -> None:
    root = Path(root or data_root()).resolve()
    with _HELD_GUARD:
        held = _HELD.get(root)
        if not held:
            return
        held[1] -= 1
        if held[1] > 0:
            return
        fd = held[0]
        del _HELD[root]
        try:
            if not (len(held) > 2 and held[2]):
                os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def holds_data_root(root: Path | None = None) -> bool:
    return Path(root or data_root()).resolve() in _HELD


@contextmanager
def lock_data_root(root: Path | None = None, *, run_id: str = "", timeout_s: float | None = None):
    info = acquire_data_root(root, run_id=run_id, timeout_s=timeout_s)
    try:
        yield info
    finally:
        release_data_root(root)
