"""What a page fault costs on this machine, the price a forked worker pays that one process does not: the
first write to a fresh page (the kernel zeroes it and, in a virtual machine, the host may back it), and
the first write to a page shared with a forked process (copy-on-write: the kernel copies it first). Each
against the same loop over pages already this process's own, in the same process. Also fresh pages in a
region advised for transparent huge pages (`MADV_HUGEPAGE`, 2 MB aligned, as `forking.huge_arena` does for a
worker's malloc arena): a 2 MB page is one fault. A round's first pass also pays the host backing memory
this VM has not touched before, so later rounds are the steady figure.

    python bench/page_faults.py [--mb 64] [--rounds 3]
"""
from __future__ import annotations

import argparse
import mmap
import os
import resource
import time

PAGE = mmap.PAGESIZE


def _touch(m: mmap.mmap, size: int, start: int = 0) -> tuple[float, int]:
    """(seconds, page faults) to write one byte into every page of ``m[start:start + size]``."""
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    for i in range(start, start + size, PAGE):
        m[i] = 1
    return time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0


def _huge(size: int) -> tuple[float, int]:
    """(seconds, page faults) to write every 4 KB page of a fresh ``size`` region advised for huge pages."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    huge = 2 << 20
    m = mmap.mmap(-1, size + huge, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    start = -addr % huge  # the first 2 MB boundary inside the map
    if libc.madvise(addr + start, size, 14) != 0:  # MADV_HUGEPAGE
        m.close()
        return float("nan"), 0
    out = _touch(m, size, start)
    m.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    size = args.mb << 20
    for k in range(args.rounds):
        m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # private: copied on write after a fork
        fresh, n_fresh = _touch(m, size)
        own, _ = _touch(m, size)  # the same loop, no fault: the baseline
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # keeps the pages shared until the parent has written them all
            os.close(w)
            os.read(r, 1)
            os._exit(0)
        os.close(r)
        cow, n_cow = _touch(m, size)
        os.write(w, b"x")
        os.close(w)
        os.waitpid(pid, 0)
        m.close()
        huge, n_huge = _huge(size)
        us = lambda t, n: 1e6 * (t - own) / max(n, 1)  # noqa: E731
        print(f"round {k + 1}: {size >> 20} MB, {n_fresh} pages: own pages {own * 1e3:.1f} ms; fresh "
              f"{fresh * 1e3:.1f} ms ({fresh / own:.1f}x, {us(fresh, n_fresh):.2f} us a fault); copy-on-write "
              f"{cow * 1e3:.1f} ms ({cow / own:.1f}x, {us(cow, n_cow):.2f} us a fault); fresh advised for huge "
              f"pages {huge * 1e3:.1f} ms ({n_huge} faults; {fresh / huge:.1f}x faster than small pages)")


if __name__ == "__main__":
    main()
