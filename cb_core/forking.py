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
            huge_arena()
            box["ok"] = call()
        except BaseException as e:  # noqa: BLE001 - raised in the calling thread
            box["err"] = e

    t = threading.Thread(target=run, name="cb-fork-part", daemon=True)
    t.start()
    t.join()
    if "err" in box:
        raise box["err"]
    return box["ok"]


_HEAP_MAX = 64 << 20  # glibc's HEAP_MAX_SIZE on 64-bit: a thread arena's heap is one such region, aligned to it
_MADV_HUGEPAGE = 14
_PROT_RW = 3


def _thp_mode() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            text = f.read()
        with open("/proc/sys/vm/overcommit_memory") as f:
            strict = f.read().strip() == "2"
    except OSError:
        return "never"
    if strict:  # making the whole reserve writable would commit 64 MB
        return "never"
    return text[text.index("[") + 1:text.index("]")] if "[" in text else "never"


def huge_arena() -> bool:
    """Back the calling thread's glibc malloc arena with transparent huge pages. Why: a forked part grows
    fresh memory of its own (one page fault per 4 KB page it first writes, 5-7 k per worker on 1000 traces,
    ~3 us each here) where one process reuses memory it already has; a huge page is one fault for 2 MB
    (zeroing 64 MB took 6.4 ms as huge pages against 43 ms page by page, `bench/page_faults.py`). glibc
    reserves a thread arena's heap as one 64 MB region aligned to its size and makes it writable in small
    steps, so a 2 MB range is seldom whole inside the writable part when it is first written: the region is
    made writable at once (glibc's own later calls on it are then no-ops) and advised. Only where it is
    surely such a heap: the kernel's THP setting is ``madvise`` or ``always``, overcommit is not strict,
    and the 64 MB region holding a fresh small allocation is all unnamed anonymous memory (else, e.g. a
    thread served from the main arena's ``[heap]``, nothing is done). Returns whether it did."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux") or _thp_mode() not in ("madvise", "always"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.gnu_get_libc_version  # noqa: B018 - glibc only
        libc.malloc.restype = ctypes.c_void_p
        libc.malloc.argtypes = [ctypes.c_size_t]
        libc.free.argtypes = [ctypes.c_void_p]
        libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    except (OSError, AttributeError):
        return False
    p = libc.malloc(64)
    if not p:
        return False
    libc.free(p)
    base = p & ~(_HEAP_MAX - 1)
    if not _is_thread_heap(base):
        return False
    if libc.mprotect(base, _HEAP_MAX, _PROT_RW) != 0:
        return False
    return libc.madvise(base, _HEAP_MAX, _MADV_HUGEPAGE) == 0


def _is_thread_heap(base: int) -> bool:
    """True when [base, base + 64 MB) is wholly covered by unnamed anonymous private mappings: glibc's
    thread heap (its writable part and the reserved rest; a heap already advised may have merged with a
    neighbour of the same flags). The main arena's memory is ``[heap]``, named. The maps are sorted by
    address: a binary search finds the first one that matters (a Dagster process has ~800; parsing them
    all took 3 ms)."""
    import bisect

    end = base + _HEAP_MAX
    try:
        with open("/proc/self/maps", "rb") as f:
            lines = f.read().splitlines()
        i = max(0, bisect.bisect_right(lines, base, key=lambda ln: int(ln[:ln.index(b"-")], 16)) - 1)
        covered = base
        for line in lines[i:]:
            parts = line.split()
            lo, hi = (int(x, 16) for x in parts[0].split(b"-"))
            if lo >= end:
                break
            if hi <= base:
                continue
            if lo > covered or len(parts) > 5 or not parts[1].endswith(b"p") or parts[4] != b"0":
                return False
            covered = max(covered, hi)
    except (OSError, ValueError):
        return False
    return covered >= end


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
            f.flush()  # whole records reach the file as they come: the parent reads them while it works
    os.rename(path + ".part", path)
    return kind


def _layout(at: int, n: int, sizes: Sequence[int]) -> tuple[tuple[int, int], list[tuple[int, int]], int]:
    """Where the parts of a `_dump` record whose header starts at ``at`` lie in the file: (pickle start, its
    size ``n``), (start, size) of each buffer (``sizes``), and the record's end."""
    at += 16 + 8 * len(sizes)
    data = (at, n)
    at += n
    bufs = []
    for size in sizes:
        at += _pad(at)
        bufs.append((at, size))
        at += size
    return data, bufs, at


class _ResultReader:
    """A child's result file (`_dump`), read record by record as it grows: this process takes in what a
    streaming child has finished between its own items, so only the child's last records are left to read
    when both are done (reading them all at the end took 6-15 ms of a 2-worker render, all of it serial).
    Each record's buffers are views of a private (copy-on-write) map of the file: writable, and valid after
    the file is removed."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd: int | None = None
        self.at = 0  # end of the last whole record taken in
        self.records: list[Any] = []
        self.poll_s = 0.0  # time spent taking records in

    def _open(self) -> bool:
        if self.fd is None:
            for name in (self.path + ".part", self.path):  # being written, or already complete
                try:
                    self.fd = os.open(name, os.O_RDONLY)
                    break
                except FileNotFoundError:
                    continue
        return self.fd is not None

    def _record(self, at: int, size: int) -> tuple[tuple[int, int], list[tuple[int, int]], int] | None:
        """The record at ``at`` as `_layout` gives it, or None while it is not all in the file yet."""
        if at + 16 > size:
            return None
        n, k = struct.unpack("<QQ", os.pread(self.fd, 16, at))
        if at + 16 + 8 * k > size:
            return None
        sizes = struct.unpack(f"<{k}Q", os.pread(self.fd, 8 * k, at + 16)) if k else ()
        rec = _layout(at, n, sizes)
        return rec if rec[2] <= size else None

    def poll(self) -> None:
        """Take in every record that is whole in the file now."""
        t0 = time.perf_counter()
        try:
            self._take()
        finally:
            self.poll_s += time.perf_counter() - t0

    def _take(self) -> None:
        if not self._open():
            return
        size = os.fstat(self.fd).st_size
        whole = []
        at = self.at
        while (rec := self._record(at, size)) is not None:
            whole.append(rec)
            at = rec[2]
        if not whole:
            return
        first = self.at - self.at % mmap.ALLOCATIONGRANULARITY  # a map starts on a page: buffers stay aligned
        mm = mmap.mmap(self.fd, at - first, access=mmap.ACCESS_COPY, offset=first)
        view = memoryview(mm)
        for (data, n), bufs, _ in whole:
            self.records.append(pickle.loads(  # our own child's file, written a moment ago
                view[data - first:data - first + n], buffers=[view[b - first:b - first + k] for b, k in bufs]))
        self.at = at

    def finish(self) -> list[Any]:
        """Every record, once the child has said its file is complete; the file's length must be theirs."""
        self.poll()
        if self.fd is None:
            raise FileNotFoundError(self.path)
        size = os.fstat(self.fd).st_size
        os.close(self.fd)
        self.fd = None
        if self.at != size:
            raise RuntimeError(f"{self.path}: {size - self.at} bytes after the last whole record")
        return self.records

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _records(path: str) -> list[Any]:
    """Every record of ``path`` (see `_ResultReader`)."""
    return _ResultReader(path).finish()


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


def _run(fn: Callable[[Any], Any], part: Any, stream: bool, readers: Sequence[_ResultReader] = ()) -> Any:
    """``fn(part)``; streaming, its items as a list, and after each item every reader takes in what its
    child has finished meanwhile."""
    if not stream:
        return fn(part)
    out = []
    for item in fn(part):
        out.append(item)
        for rd in readers:
            rd.poll()
    return out


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
    running ``parts[0]`` (streaming: with ``read_during_s`` of it spent taking in the children's finished
    items, see `_ResultReader`), ``wait_s`` waiting for the children's files after that, ``load_s`` reading
    what was left of them."""
    if len(parts) <= 1:
        return [_run(fn, p, stream) for p in parts]
    tmp = tempfile.mkdtemp(prefix="cb-fork-")
    children: dict[int, tuple[int, str, int]] = {}  # pid -> (part index, result file, read end of its pipe)
    readers: dict[int, _ResultReader] = {}  # pid -> its result file, read as it grows
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
            readers[pid] = _ResultReader(path)
        t1 = time.perf_counter()
        results: list[Any] = [None] * len(parts)
        results[0] = _off_main_arena(lambda: _run(fn, parts[0], stream, list(readers.values())))
        t2 = time.perf_counter()
        waited = 0.0
        read_during = sum(rd.poll_s for rd in readers.values())
        for pid in list(children):
            k, path, r = children[pid]
            tw = time.perf_counter()
            done = os.read(r, 1)  # b"" (end of file): the child exited without writing its result
            waited += time.perf_counter() - tw
            os.close(r)
            children[pid] = (k, path, -1)  # closed: the cleanup below must not close that number again
            if not done:
                _, status = os.waitpid(pid, 0)
                del children[pid]
                raise RuntimeError(f"{what} {k} (pid {pid}) died without a result "
                                   f"(wait status {status}; killed or out of memory?)")
            records = readers.pop(pid).finish()
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
                           load_s=time.perf_counter() - t2 - waited, read_during_s=read_during)
        return results
    finally:
        gc.unfreeze()
        for rd in readers.values():
            rd.close()
        for pid, (_, _, r) in children.items():  # on an error here: no child is left behind
            if r >= 0:  # a read end already closed above is not closed again: by now its number may be
                try:    # another thread's file or socket
                    os.close(r)
                except OSError:
                    pass
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ChildProcessError, ProcessLookupError):
                pass
        shutil.rmtree(tmp, ignore_errors=True)
