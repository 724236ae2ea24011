"""Run parts of one job in forked children while this process runs the first part: exactly ``n`` processes
for ``n`` cores, nothing pickled on the way in (a child inherits everything), each child's result written
to a file and the child leaving with ``os._exit`` (no interpreter teardown walking the inherited heap).
The file holds pickle protocol 5 with its buffers (numpy arrays, Arrow columns) out of band, and this
process maps it: the arrays come back without a copy (AgentDojo's 25 MB part: 1 ms to load, not 13).

Measured on 2 cores: a ``multiprocessing`` pool of ``n`` children beside a parent that gathers their chunks
was slower than one process (three processes on two cores, plus each child's teardown), this is not.

The work in a child must not use polars (its thread pool does not survive ``fork``); pyarrow, numpy and
tiktoken do.
"""
from __future__ import annotations

import contextlib
import fcntl
import gc
import mmap
import os
import pickle
import shutil
import signal
import struct
import tempfile
import threading
import time
import traceback
from typing import Any, Callable, Iterable, Iterator, Sequence


def cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """The cyclic garbage collector off for a block of bulk work (reading a source, rendering a batch):
    it allocates millions of short-lived acyclic objects, and the collector's passes over them cost 12-35 %
    of the time (measured: renders, TAU2, AgentDojo). Back on afterwards if it was on."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _off_main_arena(call: Callable[[], Any]) -> Any:
    """``call()`` in a thread of its own; its result returned, its exception raised here. Why: glibc serves
    a new thread from one of its small per-thread malloc arenas, not from the main one. After a fork the
    main arena's free memory (in a long-lived process, hundreds of MB freed by earlier work) is shared with
    the other process, and work that reuses it pays a copy-on-write fault on the first write to each page;
    a thread arena is small and grows into pages of this process alone. Measured, 1000 traces rendered on
    2 processes in a process whose main arena held 750 MB free: page faults during the steps 17 k -> 8.5 k
    in this process and 14 k -> 7.3 k in the child. A child, single-threaded after the fork, always gets
    another arena; a process whose arenas (at most 8 per core) are all held by live threads may be handed
    the main one back, which is only the old cost."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["ok"] = call()
        except BaseException as e:  # noqa: BLE001 - raised in the calling thread
            box["err"] = e

    t = threading.Thread(target=run, name="cb-fork-part", daemon=True)
    t.start()
    t.join()
    if "err" in box:
        raise box["err"]
    return box["ok"]


class StepQueue:
    """Items (rows) ``0..n_items-1`` shared out among ``workers`` processes forked after it is made, a run
    of consecutive items a take. Worker ``k`` starts on its own contiguous region, front to back
    (neighbouring rows share tool outputs and prompts, so they meet one block cache), and once that is done
    takes runs from the back of the region with the most left. The work balances whatever each item costs,
    which no estimate made beforehand did.

    Runs are guided: ``max_run`` items while there is much left, then a quarter of the items left per
    worker, down to ``min_run``. The work ends when the slowest worker's last run ends, so short last runs
    let the workers finish close together (with 32-row runs to the end a worker sat idle 5-23 ms of a
    0.5 s render, waiting for the other's last run), while the early runs stay long (each run has a fixed
    cost: slicing, an Arrow table, a record in a worker's result file).

    The counters sit in a shared map of an anonymous file, guarded by a POSIX record lock: the kernel
    releases it if its holder dies, so a killed worker never blocks the others. Closed, it hands out
    nothing more (a worker thread still running after its caller gave up stops at its next take)."""

    def __init__(self, n_items: int, workers: int, max_run: int = 1, min_run: int | None = None) -> None:
        self.workers = workers
        self.max_run = max(1, max_run)
        self.min_run = max(1, min(self.max_run, max_run if min_run is None else min_run))
        self._closed = False
        self._local = threading.Lock()  # record locks exclude processes, not threads of one process
        self._fd = os.memfd_create("cb-steps") if hasattr(os, "memfd_create") else _anon_file()
        os.ftruncate(self._fd, 16 * workers)
        self._mm = mmap.mmap(self._fd, 16 * workers)  # MAP_SHARED: every forked worker sees one state
        self._v = memoryview(self._mm).cast("q")  # [lo0, hi0, lo1, hi1, ...]: region k is items [lo_k, hi_k)
        for k in range(workers):
            self._v[2 * k] = n_items * k // workers
            self._v[2 * k + 1] = n_items * (k + 1) // workers

    def take(self, k: int) -> tuple[int, int] | None:
        """The next run ``(start, stop)`` for worker ``k``, or None when every item is taken."""
        with self._local:
            if self._closed:
                return None
            return self._take(k)

    def _run(self, left: int) -> int:
        return max(self.min_run, min(self.max_run, left // (4 * self.workers)))

    def _take(self, k: int) -> tuple[int, int] | None:
        v = self._v
        fcntl.lockf(self._fd, fcntl.LOCK_EX)
        try:
            left = [v[2 * j + 1] - v[2 * j] for j in range(self.workers)]
            run = self._run(sum(left))
            if left[k] > 0:
                a = v[2 * k]
                v[2 * k] = a + min(run, left[k])
                return a, v[2 * k]
            j = max(range(self.workers), key=left.__getitem__)
            if left[j] > 0:
                b = v[2 * j + 1]
                v[2 * j + 1] = b - min(run, left[j])
                return v[2 * j + 1], b
            return None
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        with self._local:
            if self._closed:
                return
            self._closed = True
            self._v.release()
            self._mm.close()
            os.close(self._fd)


def _anon_file() -> int:  # pragma: no cover - systems without memfd_create
    fd, path = tempfile.mkstemp(prefix="cb-steps-")
    os.unlink(path)
    return fd


def _pickled(obj: Any) -> tuple[bytes, list]:
    """``obj`` as pickle protocol 5 bytes and its buffers (numpy/Arrow data), not copied."""
    bufs: list[pickle.PickleBuffer] = []
    data = pickle.dumps(obj, protocol=5, buffer_callback=bufs.append)
    return data, [b.raw() for b in bufs]


ALIGN = 64  # each buffer's offset in a result file: Arrow's alignment, so polars takes the columns without a copy


def _pad(at: int) -> int:
    return -at % ALIGN


def _dump(records: Iterable[tuple[str, tuple[bytes, list]]], path: str) -> str | None:
    """Each of ``records`` ((kind, `_pickled` record)) to ``path`` as it comes: a header (pickle size, buffer
    sizes), the pickle, then its buffers raw, each at a multiple of ``ALIGN`` (a map of the file starts on
    a page: the buffers come back aligned; polars copied the misaligned ones, 10 MB and 6 ms for the
    child's half of 1000 renders). Returns the last record's kind. Written beside and renamed, so a child
    killed mid-write leaves no file (it is reported as died)."""
    kind = None
    with open(path + ".part", "wb") as f:
        for kind, (data, raws) in records:
            f.write(struct.pack(f"<QQ{len(raws)}Q", len(data), len(raws), *(r.nbytes for r in raws)))
            f.write(data)
            for r in raws:
                f.write(b"\0" * _pad(f.tell()))
                f.write(r)
    os.rename(path + ".part", path)
    return kind


def _records(path: str) -> list[Any]:
    """Every record of ``path``, its buffers views of a private (copy-on-write) map of the file: writable,
    and valid after the file is removed."""
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    view = memoryview(mm)
    out, at = [], 0
    while at < len(view):
        n, k = struct.unpack_from("<QQ", view, at)
        sizes = struct.unpack_from(f"<{k}Q", view, at + 16)
        at += 16 + 8 * k
        data = view[at:at + n]
        at += n
        bufs = []
        for size in sizes:
            at += _pad(at)
            bufs.append(view[at:at + size])
            at += size
        out.append(pickle.loads(data, buffers=bufs))  # our own child's file, written a moment ago
    return out


def _outcome(fn: Callable[[Any], Any], part: Any, stream: bool) -> Iterator[tuple[str, tuple[bytes, list]]]:
    """A child's records for `_dump`: ("item", x) for each item as ``fn`` yields it when streaming, then
    ("ok", result) or ("error", (traceback, the exception when it survives pickling: a SourceError keeps
    its file)). Pickled here, so a result that cannot be pickled is reported as an error too."""
    try:
        if stream:
            for item in fn(part):
                yield "item", _pickled(("item", item))
            out = ("ok", None)
        else:
            out = ("ok", fn(part))
        yield "ok", _pickled(out)
        return
    except GeneratorExit:  # writing the file failed and _dump closed this: nothing more to report
        raise
    except BaseException as e:  # noqa: BLE001 - reported by the parent
        err, text = e, traceback.format_exc()
    try:
        rec = _pickled(("error", (text, err)))
        pickle.loads(rec[0], buffers=rec[1])  # it must come back out, too
    except Exception:  # noqa: BLE001
        rec = _pickled(("error", (text, None)))
    yield "error", rec


def _run(fn: Callable[[Any], Any], part: Any, stream: bool) -> Any:
    return list(fn(part)) if stream else fn(part)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def fork_map(fn: Callable[[Any], Any], parts: Sequence[Any], what: str = "worker", stream: bool = False,
             timings: dict | None = None) -> list[Any]:
    """``[fn(p) for p in parts]``: ``parts[0]`` here, the others each in a forked child. An exception in
    a child is raised here as itself (with the child's traceback as a note) when it pickles, else as a
    RuntimeError naming ``what``, the part's index and the traceback; a child that dies (killed, out of
    memory) is reported with its wait status. A child signals through a pipe once its file is complete, so
    the call returns without waiting for the children's exits (tearing down an inherited address space
    takes milliseconds): they are reaped by background threads; on an error every child is killed and
    reaped before the call raises.

    ``stream``: ``fn`` returns an iterable and each part's result is its list; a child writes each item to
    its file as it comes, so writing its result overlaps its work instead of following it (a 10 MB result
    took 13 ms to write, the whole wait of this process at the end).

    ``timings``, if given, receives where this process's time went (seconds): ``fork_s`` forking the
    children (the kernel copies this process's page tables: ~12 ms at 460 MB of memory), ``own_part_s``
    running ``parts[0]``, ``wait_s`` waiting for the children's files after that, ``load_s`` reading them."""
    if len(parts) <= 1:
        return [_run(fn, p, stream) for p in parts]
    tmp = tempfile.mkdtemp(prefix="cb-fork-")
    children: dict[int, tuple[int, str, int]] = {}  # pid -> (part index, result file, read end of its pipe)
    gc.freeze()  # the children's collector leaves the inherited heap alone (no copy-on-write of every page)
    try:
        t0 = time.perf_counter()
        for k in range(1, len(parts)):
            path = os.path.join(tmp, f"part{k}.pkl")
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:  # child: never returns into the caller's code
                code = 1
                try:
                    os.close(r)
                    part = parts[k]
                    code = 0 if _off_main_arena(lambda: _dump(_outcome(fn, part, stream), path)) == "ok" else 1
                    os.write(w, b"1")  # the file is complete: the parent need not wait for this exit
                finally:
                    os._exit(code)
            os.close(w)
            children[pid] = (k, path, r)
        t1 = time.perf_counter()
        results: list[Any] = [None] * len(parts)
        results[0] = _off_main_arena(lambda: _run(fn, parts[0], stream))
        t2 = time.perf_counter()
        waited = 0.0
        for pid in list(children):
            k, path, r = children[pid]
            tw = time.perf_counter()
            done = os.read(r, 1)  # b"" (end of file): the child exited without writing its result
            waited += time.perf_counter() - tw
            os.close(r)
            if not done:
                _, status = os.waitpid(pid, 0)
                del children[pid]
                raise RuntimeError(f"{what} {k} (pid {pid}) died without a result "
                                   f"(wait status {status}; killed or out of memory?)")
            records = _records(path)
            kind, out = records[-1]
            if kind != "ok":
                text, exc = out
                if isinstance(exc, Exception):
                    exc.add_note(f"(raised in {what} {k}, a forked process:)\n{text}")
                    raise exc
                raise RuntimeError(f"{what} {k} failed:\n{text}")
            results[k] = [item for _, item in records[:-1]] if stream else out
        # every result is in: the children's exits (tearing down a large address space takes milliseconds)
        # are reaped in the background instead of waited for
        for pid in list(children):
            del children[pid]
            threading.Thread(target=_reap, args=(pid,), daemon=True).start()
        if timings is not None:
            timings.update(fork_s=t1 - t0, own_part_s=t2 - t1, wait_s=waited,
                           load_s=time.perf_counter() - t2 - waited)
        return results
    finally:
        gc.unfreeze()
        for pid, (_, _, r) in children.items():  # on an error here: no child is left behind
            try:
                os.close(r)
            except OSError:
                pass
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ChildProcessError, ProcessLookupError):
                pass
        shutil.rmtree(tmp, ignore_errors=True)
