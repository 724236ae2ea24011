"""cb_core.forking: results come back from forked children whole, arrays without a copy and writable."""
from __future__ import annotations

import os
import platform

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


def _odd_sized(k: int):
    """Buffers of sizes that are no multiple of 64, in two streamed items, so that each following buffer
    would start misaligned if written end to end."""
    yield {"b": np.arange(3 + k, dtype=np.int8), "ids": np.arange(1001, dtype=np.int32)}
    yield pa.table({"ids": pa.array([[1, 2, 3]] * 7, pa.large_list(pa.int32())), "s": ["x" * 5] * 7})


def test_child_buffers_come_back_aligned_so_polars_need_not_copy_them():
    import polars as pl

    out = forking.fork_map(_odd_sized, [0, 1], stream=True)
    first, table = out[1]
    assert list(first["b"]) == [0, 1, 2, 3] and int(first["ids"].sum()) == sum(range(1001))
    assert first["b"].ctypes.data % forking.ALIGN == 0 and first["ids"].ctypes.data % forking.ALIGN == 0
    bufs = [b for col in table.columns for chunk in col.chunks for b in chunk.buffers() if b is not None]
    bufs += [b for b in table.column("ids").chunks[0].values.buffers() if b is not None]
    assert bufs and all(b.address % forking.ALIGN == 0 for b in bufs)
    frame = pl.from_arrow(table)
    assert frame["ids"].to_list() == [[1, 2, 3]] * 7 and frame["s"].to_list() == ["xxxxx"] * 7


def _sleep(seconds: float) -> float:
    import time

    time.sleep(seconds)
    return seconds


def test_timings_say_where_this_process_waited():
    t: dict = {}
    assert forking.fork_map(_sleep, [0.05, 0.3], timings=t) == [0.05, 0.3]
    assert set(t) == {"fork_s", "own_part_s", "wait_s", "load_s", "read_during_s"} and min(t.values()) >= 0
    assert t["read_during_s"] == 0  # not streaming: nothing is read before the child is done
    assert t["own_part_s"] >= 0.05
    assert t["fork_s"] + t["own_part_s"] + t["wait_s"] >= 0.3  # the child slept 0.3 s from some moment of its fork


def test_dump_is_atomic(tmp_path, monkeypatch):
    """A write that fails midway leaves no result file (the parent then reports the child as died)."""
    path = str(tmp_path / "part1.pkl")
    assert forking._dump(forking._outcome(lambda p: {"a": np.arange(p)}, 5, False), path) == "ok"
    assert [(k, list(v["a"])) for k, v in forking._records(path)] == [("ok", [0, 1, 2, 3, 4])]
    os.remove(path)
    monkeypatch.setattr(forking.os, "rename", lambda a, b: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        forking._dump(forking._outcome(lambda p: {"a": np.arange(p)}, 5, False), path)
    assert not os.path.exists(path)


def test_a_result_that_cannot_be_pickled_is_reported_as_an_error():
    """Streamed or not, the parent gets the pickling error itself with the child's traceback, not "died"."""
    for stream in (False, True):
        with pytest.raises(AttributeError, match="Can't pickle local object") as err:
            forking.fork_map((lambda k: iter([lambda: k])) if stream else (lambda k: (lambda: k)), [0, 1],
                             stream=stream)
        assert "worker 1" in "".join(err.value.__notes__) and "_pickled" in "".join(err.value.__notes__)


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


# ------------------------------------------------------------------------------------------- StepQueue
def _drain(arg):
    """Worker k of a StepQueue: the steps it took, in order (the steps cost more the later they are). With a
    meeting folder, each worker waits there after its first step until every worker has taken one, so a
    child forked late on a busy machine still gets work (otherwise the others may rightly take it all)."""
    import time

    queue, k, *meet = arg
    got = []
    while (run := queue.take(k)) is not None:
        s = run[0]
        got.extend(range(*run))
        if meet and len(got) == 1:
            (meet[0] / str(k)).touch()
            deadline = time.monotonic() + 120
            while len(list(meet[0].iterdir())) < meet[1] and time.monotonic() < deadline:
                time.sleep(0.002)
        time.sleep(0.001 * (1 + s % 3))
    return got


def _first(run):
    return None if run is None else run[0]


def test_step_queue_regions_then_the_back_of_the_largest():
    q = forking.StepQueue(10, 2)
    try:
        assert q.take(0) == (0, 1)  # one item a run (max_run=1)
        assert [_first(q.take(0)) for _ in range(4)] == [1, 2, 3, 4]  # worker 0's region: the first half, in order
        assert [_first(q.take(0)) for _ in range(3)] == [9, 8, 7]  # then worker 1's, from its back
        assert [_first(q.take(1)) for _ in range(3)] == [5, 6, None]  # worker 1 from its front; nothing is taken twice
        assert q.take(0) is None
    finally:
        q.close()
    q = forking.StepQueue(2, 3)  # more workers than steps: a region may be empty from the start
    try:
        assert sorted(_first(x) for x in (q.take(0), q.take(1), q.take(2), q.take(2)) if x is not None) == [0, 1]
    finally:
        q.close()


def test_step_queue_runs_shrink_as_the_items_run_out():
    """Guided runs: max_run while much is left, then a quarter of what is left per worker, never below
    min_run (except where a region has fewer left); every item once, each region front to back."""
    q = forking.StepQueue(200, 2, max_run=16, min_run=4)
    try:
        runs = []
        for k in [0, 1] * 200:
            run = q.take(k)
            if run is not None:
                runs.append((k, run))
    finally:
        q.close()
    items = sorted(i for _, (a, b) in runs for i in range(a, b))
    assert items == list(range(200))
    sizes = [b - a for _, (a, b) in runs]
    assert sizes[:4] == [16, 16, 16, 16]  # 200 left: 200 // 8 = 25, capped at 16
    assert max(sizes) == 16 and min(sizes) >= 1 and sizes[-1] <= 4  # short runs at the end
    left = 200
    for (_, (a, b)) in runs:  # each run is the size the rule gives for what was left then (or its region's rest)
        assert b - a <= max(4, min(16, left // 8))
        left -= b - a
    assert [a for k, (a, _) in runs if k == 0] == sorted(a for k, (a, _) in runs if k == 0)  # front to back


@pytest.mark.parametrize("workers", [2, 3])
def test_step_queue_across_processes_hands_out_every_step_once(workers, tmp_path):
    q = forking.StepQueue(60, workers)
    try:
        out = forking.fork_map(_drain, [(q, k, tmp_path, workers) for k in range(workers)])
    finally:
        q.close()
    assert sorted(s for got in out for s in got) == list(range(60))
    assert [got[0] for got in out] == [60 * k // workers for k in range(workers)]  # each starts on its own region
    assert out[0][:5] == [0, 1, 2, 3, 4]  # front to back


def _die_holding_the_lock(arg):
    import fcntl
    import signal

    queue, k = arg
    if k == 1:
        fcntl.lockf(queue._fd, fcntl.LOCK_EX)  # as if killed inside take()
        os.kill(os.getpid(), signal.SIGKILL)
    return _drain(arg)


def test_step_queue_a_killed_worker_does_not_block_the_others():
    """The lock is a POSIX record lock: the kernel drops it with its dead holder."""
    q = forking.StepQueue(20, 2)
    try:
        with pytest.raises(RuntimeError, match="died without a result"):
            forking.fork_map(_die_holding_the_lock, [(q, 0), (q, 1)])
        assert q.take(0) is None  # this process went on and took every step
    finally:
        q.close()


# -------------------------------------------------------------------------------------------- streaming
def _stream(k):
    for i in range(3):
        if k == 2 and i == 1:
            raise KeyError(f"part {k} broke at item {i}")
        yield {"k": k, "i": i, "pid": os.getpid(), "a": np.full(1000 * (i + 1), k, np.int32)}


def test_stream_results_come_back_item_by_item_in_order():
    out = forking.fork_map(_stream, [0, 1], stream=True)
    assert [[(x["k"], x["i"]) for x in part] for part in out] == [[(0, 0), (0, 1), (0, 2)], [(1, 0), (1, 1), (1, 2)]]
    assert out[0][0]["pid"] == os.getpid() != out[1][0]["pid"]
    assert [int(x["a"].sum()) for x in out[1]] == [1000, 2000, 3000]  # part 1: 1000*(i+1) ones


def test_stream_error_midway_is_raised_as_itself():
    with pytest.raises(KeyError, match="part 2 broke at item 1") as err:
        forking.fork_map(_stream, [0, 1, 2], stream=True)
    assert "worker 2" in "".join(err.value.__notes__)


def test_a_child_error_closes_no_file_descriptor_twice(monkeypatch):
    """A child's read end is closed once. On an error the cleanup closed it again, and by then its number
    may belong to another thread's file or socket (Dagster's event loop lost its socket that way)."""
    real_close, grabbed, parent = os.close, [], os.getpid()

    def close_then_reuse(fd):  # another thread opens a file the moment a number is free
        real_close(fd)
        if os.getpid() == parent:
            grabbed.append(os.open(os.devnull, os.O_RDONLY))

    monkeypatch.setattr(forking.os, "close", close_then_reuse)
    with pytest.raises(KeyError, match="part 2 broke at item 1"):
        forking.fork_map(_stream, [0, 1, 2], stream=True)
    monkeypatch.undo()
    assert len(grabbed) >= 4  # two write ends, two read ends at least
    for fd in grabbed:
        os.fstat(fd)  # still open: EBADF here if fork_map closed another's number as its own
        os.close(fd)


# --------------------------------------------------------------------------- work off the main arena
def _heap_range() -> tuple[int, int] | None:
    """The main malloc arena's span ([heap] in /proc/self/maps), or None where there is none."""
    try:
        lines = open("/proc/self/maps").read().splitlines()
    except OSError:
        return None
    for ln in lines:
        if ln.endswith("[heap]"):
            lo, hi = ln.split()[0].split("-")
            return int(lo, 16), int(hi, 16)
    return None


def _where_it_allocates(_k):
    """(thread name, whether a fresh 4 kB malloc lands in the main arena's span)."""
    import ctypes
    import threading

    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    p = libc.malloc(4096)
    heap = _heap_range()
    libc.free(p)
    return threading.current_thread().name, heap is not None and heap[0] <= p < heap[1]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or _heap_range() is None, reason="glibc's arenas")
def test_every_part_runs_in_a_thread_that_allocates_off_the_main_arena():
    """After a fork the main arena's free pages are shared; each part's thread (here and in the child)
    allocates from a thread arena instead (mapped apart from [heap])."""
    import json
    import threading

    # in a freshly forked, single-threaded process: a test process whose glibc arenas are all held by live
    # threads may hand the calling process's thread the main arena (the docstring's "only the old cost")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            got = {"main": threading.current_thread().name, "parts": forking.fork_map(_where_it_allocates, [0, 1]),
                   "main_in_heap": _where_it_allocates(0)[1]}
            os.write(w, json.dumps(got).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r) as f:
        raw = f.read()
    _, status = os.waitpid(pid, 0)
    assert status == 0, raw
    got = json.loads(raw)
    assert [name for name, _ in got["parts"]] == ["cb-fork-part", "cb-fork-part"] and got["main"] != "cb-fork-part"
    assert [in_main for _, in_main in got["parts"]] == [False, False]
    assert got["main_in_heap"] is True  # the check can tell: the main thread allocates in [heap]


def _part0_raises(k):
    if k == 0:
        raise KeyError("part zero")
    return k


def test_an_error_in_this_process_part_is_raised_here_as_itself():
    with pytest.raises(KeyError, match="part zero"):
        forking.fork_map(_part0_raises, [0, 1])
    assert forking.fork_map(_part0_raises, [1, 2]) == [1, 2]


def test_a_closed_step_queue_hands_out_nothing():
    q = forking.StepQueue(4, 2)
    assert q.take(0) == (0, 1)
    q.close()
    assert q.take(0) is None and q.take(1) is None
    q.close()  # twice is fine


def test_result_reader_takes_in_each_record_once_it_is_whole(tmp_path):
    """A streaming child's file is read as it grows: every record the child has written is taken in at the
    next poll, arrays aligned, and none twice."""
    path = str(tmp_path / "part1.pkl")
    rd = forking._ResultReader(path)
    rd.poll()  # no file yet: nothing
    seen = []

    def records():
        for k in range(4):
            rd.poll()
            seen.append(len(rd.records))
            yield "item", forking._pickled(("item", {"k": k, "ids": np.arange(3000 * k + 7, dtype=np.int32)}))
        rd.poll()
        seen.append(len(rd.records))
        yield "ok", forking._pickled(("ok", None))

    assert forking._dump(records(), path) == "ok"
    assert seen == [0, 1, 2, 3, 4]  # each record in the file (flushed) before the next is made
    got = rd.finish()
    assert [kind for kind, _ in got] == ["item"] * 4 + ["ok"]
    for k, (_, item) in enumerate(got[:4]):
        assert item["k"] == k and int(item["ids"].sum()) == sum(range(3000 * k + 7))
        assert item["ids"].ctypes.data % forking.ALIGN == 0  # also in maps that start past the first page


def test_result_reader_leaves_a_partly_written_record_for_later(tmp_path):
    whole = str(tmp_path / "whole.pkl")
    forking._dump([("item", forking._pickled(("item", np.arange(5000)))), ("ok", forking._pickled(("ok", 1)))],
                  whole)
    raw = open(whole, "rb").read()
    path = str(tmp_path / "part1.pkl")
    rd = forking._ResultReader(path)
    first_end = None
    for cut in (10, 100, len(raw) - 5, len(raw)):
        with open(path + ".part", "wb") as f:
            f.write(raw[:cut])
        rd.poll()
        if cut < len(raw) - 5:
            assert rd.records == []  # a header or the pickle only in part: nothing taken
        elif cut < len(raw):
            assert len(rd.records) == 1 and int(rd.records[0][1].sum()) == sum(range(5000))
            first_end = rd.at
        else:
            assert len(rd.records) == 2 and rd.records[1] == ("ok", 1) and rd.at == len(raw) > first_end
    with open(path + ".part", "ab") as f:
        f.write(b"junk")
    with pytest.raises(RuntimeError, match="4 bytes after the last whole record"):
        rd.finish()


def _slow_here_fast_there(k: int):
    import time

    for j in range(3):
        if k == 0:
            time.sleep(0.15)
        yield k, j


def test_streaming_parent_takes_in_the_childs_items_while_it_works(monkeypatch):
    """The child is done long before this process's part: its items are read between this process's
    items, not all after them."""
    polls: list[int] = []
    poll = forking._ResultReader.poll

    def counting(self):
        poll(self)
        polls.append(len(self.records))

    monkeypatch.setattr(forking._ResultReader, "poll", counting)
    t: dict = {}
    out = forking.fork_map(_slow_here_fast_there, [0, 1], stream=True, timings=t)
    assert out == [[(0, 0), (0, 1), (0, 2)], [(1, 0), (1, 1), (1, 2)]]
    assert polls[:3] and max(polls[:3]) >= 3  # the child's 3 items taken in during this process's part
    assert t["read_during_s"] > 0


def test_huge_arena_advises_a_thread_heap_and_not_the_main_one():
    """A thread's glibc arena heap (a 64 MB region) is made writable and advised for huge pages; the main
    thread's [heap] is left alone. Where the kernel's THP setting is "never" nothing is advised."""
    import threading

    if not os.path.exists("/sys/kernel/mm/transparent_hugepage/enabled"):
        pytest.skip("no transparent huge pages on this system")
    assert forking.huge_arena() is False  # the main thread: [heap], not a thread heap
    got: dict = {}

    def run():
        got["ok"] = forking.huge_arena()
        a = np.ones(1000)  # allocated in this thread's arena
        got["addr"] = a.ctypes.data
        got["base"] = got["addr"] & ~(forking._HEAP_MAX - 1)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    mode = forking._thp_mode()
    assert got["ok"] is (mode in ("madvise", "always"))
    if got["ok"]:
        flags = _vm_flags(got["base"])
        assert flags and "hg" in flags and "wr" in flags  # advised, and writable from its start


def _vm_flags(addr: int) -> str | None:
    """VmFlags of the mapping starting at ``addr`` (/proc/self/smaps)."""
    cur = None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not line.startswith("VmFlags"):
                cur = int(head.split("-")[0], 16)
            elif line.startswith("VmFlags") and cur == addr:
                return line.split(":", 1)[1]
    return None
