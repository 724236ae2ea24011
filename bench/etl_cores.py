"""Where the time of `renders` + `lossmasks` on two cores goes (the `bench/etl_b.py` "2 processes" run, taken
apart), on the real shared AgentDojo + TAU2 traces with the real suite tool sets.

Each line is the median of --repeat interleaved passes, block cache emptied before each, all in this process
unless it says otherwise:
  whole          the render+tokenize+map of every trace in one process (what "1 thread" does)
  share k alone  each of the two shares `render_traces(num_workers=2)` makes, run here with nothing beside
                 it: their sum minus `whole` is the cost of cutting the work in two (the two block caches
                 each miss pieces the other one also encodes)
  + forked idle  share 0 here while a forked child only sleeps: the cost of the fork itself (pages written
                 after it are copied first: copy-on-write faults)
  + forked busy  share 0 here while the forked child runs share 1: the real two-process run
  independent    two processes started apart (not forked) running the whole job at the same moments, against
                 one of them alone: what the machine's two cores lose by working at once
  fixed parts    render_traces(num_workers=2) outside the two shares (cutting the frame, gathering) and
                 build_lossmasks (8 policies, polars), which no share takes
and, from those, the best two-process speedup this job can reach here.

    .venv/bin/python bench/etl_cores.py [--limit 1000] [--repeat 5]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _setup(limit: int):
    from etl_b import load_traces

    from cb_core import render as R
    from cb_core.llama3_fast import fast_encoder
    from cb_core.tokenizer import llama3_tokenizer, tokenizer_id

    traces = load_traces(limit)
    tok = llama3_tokenizer()
    fe = fast_encoder(tok)
    cfg = R.RenderConfig(max_length=32768)
    table = R._render_frame(traces).to_arrow()
    return R, traces, tok, fe, cfg, table, tokenizer_id(tok)


def _timer(R, tok, fe, cfg, tid):
    def run(table) -> tuple[float, int]:
        """Seconds and minor page faults of one render+tokenize+map of ``table`` from a cold block cache."""
        fe.cache.clear()
        fe.cache_chars = 0
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        R._process_chunk((table, tok, fe, tid, cfg))
        return time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    return run


def _with_child(run, mine, theirs, busy: bool) -> tuple[float, int]:
    """``run(mine)`` here while a forked child runs ``theirs`` (busy) or sleeps as long (idle)."""
    gc.freeze()
    pid = os.fork()
    if pid == 0:
        try:
            if busy:
                run(theirs)
            else:
                time.sleep(0.8)
        finally:
            os._exit(0)
    try:
        return run(mine)
    finally:
        os.waitpid(pid, 0)
        gc.unfreeze()


def independent(args) -> None:
    """Child mode: run the whole job ``--repeat`` times, each pass started with the partner (barrier files)."""
    R, traces, tok, fe, cfg, table, tid = _setup(args.limit)
    run = _timer(R, tok, fe, cfg, tid)
    run(table)
    run(table)
    times = []
    for k in range(args.repeat):
        open(os.path.join(args.barrier, f"{args.me}.{k}"), "w").close()
        if args.partner:
            while not os.path.exists(os.path.join(args.barrier, f"{args.partner}.{k}")):
                time.sleep(0.0005)
        times.append(run(table)[0])
    print("RESULT " + json.dumps(sorted(times)[len(times) // 2]), flush=True)


def _independent_pair(args) -> tuple[float, float]:
    """(alone, beside the other) medians of the whole job in processes started apart."""
    def launch(me: str, partner: str, bar: str):
        cmd = [sys.executable, __file__, "--independent", "--limit", str(args.limit), "--repeat", str(args.repeat),
               "--me", me, "--partner", partner, "--barrier", bar]
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)

    def result(p) -> float:
        out, _ = p.communicate(timeout=1200)
        line = next(ln for ln in out.splitlines() if ln.startswith("RESULT "))
        return json.loads(line[7:])

    with tempfile.TemporaryDirectory() as bar:
        alone = result(launch("solo", "", bar))
    with tempfile.TemporaryDirectory() as bar:
        a, b = launch("a", "b", bar), launch("b", "a", bar)
        both = max(result(a), result(b))
    return alone, both


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--independent", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--me", default="")
    ap.add_argument("--partner", default="")
    ap.add_argument("--barrier", default="")
    args = ap.parse_args()
    if args.independent:
        independent(args)
        return

    import numpy as np

    from cb_core.lossmask import POLICIES, build_lossmasks

    R, traces, tok, fe, cfg, table, tid = _setup(args.limit)
    run = _timer(R, tok, fe, cfg, tid)
    shares = R._shares(traces, 2)
    parts = [table.take(np.asarray(sh)) for sh in shares]

    def job(workers: int) -> tuple[float, float, float]:
        """render_traces wall, the time inside its share(s), build_lossmasks."""
        fe.cache.clear()
        fe.cache_chars = 0
        inside = [0.0]
        name = "_render_shares" if workers > 1 else "_process_chunk"
        real = getattr(R, name)

        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return real(*a, **k)
            finally:
                inside[0] += time.perf_counter() - t
        setattr(R, name, timed)
        try:
            t0 = time.perf_counter()
            renders, _ = R.render_traces(traces, tok, cfg, num_workers=workers)
            t1 = time.perf_counter()
        finally:
            setattr(R, name, real)
        build_lossmasks(renders, traces, list(POLICIES))
        return t1 - t0, inside[0], time.perf_counter() - t1

    probes = {
        "whole": lambda: run(table),
        "share 0 alone": lambda: run(parts[0]),
        "share 1 alone": lambda: run(parts[1]),
        "share 0 + forked idle": lambda: _with_child(run, parts[0], parts[1], busy=False),
        "share 0 + forked busy": lambda: _with_child(run, parts[0], parts[1], busy=True),
        "one worker": lambda: job(1),
        "two workers": lambda: job(2),
    }
    for fn in probes.values():  # warm every path
        fn()
    got: dict[str, list] = {k: [] for k in probes}
    for _ in range(args.repeat):
        for k, fn in probes.items():
            got[k].append(fn())
    med = {k: sorted(v)[len(v) // 2] for k, v in got.items()}
    whole, s0, s1 = med["whole"][0], med["share 0 alone"][0], med["share 1 alone"][0]
    idle, busy = med["share 0 + forked idle"][0], med["share 0 + forked busy"][0]
    wall1, inside1, masks1 = med["one worker"]
    wall2, inside2, masks = med["two workers"]
    alone_ind, both_ind = _independent_pair(args)
    fixed = wall2 - inside2 + masks
    print(f"{traces.height} traces (AgentDojo + TAU2, real suite tool sets), medians of {args.repeat} passes\n")
    print(f"  whole job, one process (render+tokenize+map)   {whole:6.3f} s   faults {med['whole'][1]:>6}")
    print(f"  share 0 alone / share 1 alone                  {s0:6.3f} / {s1:.3f} s: split costs "
          f"{(s0 + s1) / whole - 1:+.1%} (block caches missing each other's pieces)")
    print(f"  share 0 beside a forked child that sleeps      {idle:6.3f} s   faults {med['share 0 + forked idle'][1]:>6}:"
          f" the fork costs {idle / s0 - 1:+.1%} (copy-on-write)")
    print(f"  share 0 beside a forked child running share 1  {busy:6.3f} s   faults {med['share 0 + forked busy'][1]:>6}:"
          f" {busy / s0 - 1:+.1%} over alone")
    print(f"  two processes started apart, whole job each    {both_ind:6.3f} s vs {alone_ind:.3f} s alone: "
          f"the cores lose {both_ind / alone_ind - 1:+.1%} working at once")
    print(f"  render_traces(num_workers=1)                   {wall1:6.3f} s, of which the work {inside1:.3f} s; "
          f"build_lossmasks {masks1:.3f} s")
    print(f"  render_traces(num_workers=2)                   {wall2:6.3f} s, of which shares {inside2:.3f} s "
          f"({inside2 - busy:+.3f} s over share 0 beside its child: cutting the shares, the fork, the "
          f"child's result file, waiting for the slower share); build_lossmasks {masks:.3f} s")
    one_proc = wall1 + masks1
    best = one_proc / (max(s0, s1) * (both_ind / alone_ind) + fixed)
    print(f"\n  fixed parts (outside the shares, lossmasks)    {fixed:6.3f} s = {fixed / one_proc:.0%} of one process's"
          f" {one_proc:.3f} s")
    print(f"  two processes now: {one_proc / (wall2 + masks):.2f}x one process; with no fork cost (the larger "
          f"share as fast as alone, only the cores' own loss) {best:.2f}x; with no fixed parts either "
          f"{one_proc / (max(s0, s1) * both_ind / alone_ind):.2f}x")


if __name__ == "__main__":
    main()
