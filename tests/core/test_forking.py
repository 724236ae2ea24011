"""cb_core.forking: results come back from forked children whole, arrays without a copy and writable."""
from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pytest

from cb_core import forking


def _part(k: int):
    if k == 0:
        return {"pid": os.getpid()}
    return {"pid": os.getpid(), "ids": np.arange(k * 1000, dtype=np.int32).reshape(-1, 10),
            "f": np.asfortranarray(np.ones((4, 3))), "table": pa.table({"t": ["é" * k, None], "n": [k, 2]}),
            "small": [np.zeros(0, np.int64), b"x" * k, "text"]}


def test_children_results_come_back_whole_and_writable():
    out = forking.fork_map(_part, [0, 1, 3])
    assert out[0]["pid"] == os.getpid() and out[1]["pid"] != os.getpid() != out[2]["pid"]
    ids = out[2]["ids"]
    assert ids.dtype == np.int32 and ids.shape == (300, 10) and int(ids.sum()) == sum(range(3000))
    ids[0, 0] = -1  # writable (a private map of the child's file)
    assert ids[0, 0] == -1 and out[2]["f"].flags.f_contiguous and out[2]["f"].sum() == 12
    assert out[2]["table"].to_pylist() == [{"t": "ééé", "n": 3}, {"t": None, "n": 2}]
    assert out[1]["small"][0].shape == (0,) and out[1]["small"][1:] == [b"x", "text"]


def test_dump_is_atomic(tmp_path, monkeypatch):
    """A write that fails midway leaves no result file (the parent then reports the child as died)."""
    path = str(tmp_path / "part1.pkl")
    forking._dump({"a": np.arange(5)}, path)
    assert list(forking._load(path)["a"]) == [0, 1, 2, 3, 4]
    os.remove(path)
    monkeypatch.setattr(forking.os, "rename", lambda a, b: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        forking._dump({"a": np.arange(5)}, path)
    assert not os.path.exists(path)


def test_children_are_reaped_after_the_call():
    """The call returns once every result file is in; the children's exits are reaped in the background,
    so none is left a zombie."""
    import time

    out = forking.fork_map(_part, [0, 1, 2])
    pids = [o["pid"] for o in out[1:]]
    deadline = time.monotonic() + 20
    while any(os.path.exists(f"/proc/{p}") for p in pids) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not [p for p in pids if os.path.exists(f"/proc/{p}")]  # a zombie keeps its /proc entry
    for p in pids:
        with pytest.raises(ChildProcessError):
            os.waitpid(p, os.WNOHANG)


def _raise_or_linger(arg):
    import time

    k, pidfile = arg
    if k == 0:  # this process: wait until part 2 is surely running
        deadline = time.monotonic() + 20
        while not os.path.exists(pidfile) and time.monotonic() < deadline:
            time.sleep(0.01)
    if k == 1:
        raise ValueError("part 1 failed")
    if k == 2:  # still working when part 1's error reaches the parent
        with open(pidfile + ".part", "w") as f:
            f.write(str(os.getpid()))
        os.rename(pidfile + ".part", pidfile)
        time.sleep(60)
    return k


def test_on_an_error_every_child_is_killed_and_reaped(tmp_path):
    pidfile = str(tmp_path / "pid2")
    with pytest.raises(ValueError, match="part 1 failed") as err:
        forking.fork_map(_raise_or_linger, [(0, pidfile), (1, pidfile), (2, pidfile)])
    assert "worker 1" in "".join(err.value.__notes__)
    pid = int(open(pidfile).read())  # part 2 was sleeping when the error came: killed and reaped by now
    assert not os.path.exists(f"/proc/{pid}")
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
