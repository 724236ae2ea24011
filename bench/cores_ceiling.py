"""What two cores of this machine give for work with no serial part and no shared memory traffic.

The same pure-Python loop runs once in one process, then split in half over two forked processes; both
alternate per round so the machine's drift hits both alike. Printed per round: wall times, the speedup, and
each child's CPU seconds against what half the 1-process run took. If the children's CPU exceeds half the
one-process time, the cores run slower when both are busy (a shared physical core, or a lower clock), and
no split of the ETL work can beat that ratio.

    .venv/bin/python bench/cores_ceiling.py [--rounds 8] [--n 30000000]
"""
from __future__ import annotations

import argparse
import os
import time


def work(n: int) -> int:
    s = 0
    for i in range(n):
        s += (i * i) % 7
    return s


def one_round(n: int) -> tuple[float, float, list[float], float]:
    c0 = time.process_time()
    t0 = time.perf_counter()
    work(n)
    one = time.perf_counter() - t0
    one_cpu = time.process_time() - c0
    t0 = time.perf_counter()
    pids = []
    for _ in range(2):
        pid = os.fork()
        if pid == 0:
            work(n // 2)
            os._exit(0)
        pids.append(pid)
    cpus = []
    for pid in pids:
        _, _, ru = os.wait4(pid, 0)
        cpus.append(ru.ru_utime + ru.ru_stime)
    return one, time.perf_counter() - t0, cpus, one_cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--n", type=int, default=30_000_000, help="loop iterations of the 1-process run")
    args = ap.parse_args()
    ratios, slow = [], []
    for k in range(args.rounds):
        one, two, cpus, one_cpu = one_round(args.n)
        ratios.append(one / two)
        slow += [c / (one_cpu / 2) for c in cpus]
        print(f"round {k + 1}: 1 process {one:.3f} s, 2 processes {two:.3f} s: {one / two:.2f}x; "
              f"children's CPU {cpus[0]:.3f} / {cpus[1]:.3f} s against {one_cpu / 2:.3f} s for half alone", flush=True)
    ratios.sort()
    slow.sort()
    print(f"both-cores ceiling, median of {len(ratios)} rounds: {ratios[len(ratios) // 2]:.2f}x "
          f"(per round {ratios[0]:.2f}-{ratios[-1]:.2f}); a half's CPU with both cores busy: "
          f"{slow[len(slow) // 2]:.2f}x its time alone (median of {len(slow)})")


if __name__ == "__main__":
    main()
