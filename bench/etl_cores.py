"""Where the time of `renders` + `lossmasks` on two cores goes (the `bench/etl_b.py` "2 processes" run, taken
apart), on the real shared AgentDojo + TAU2 traces with the real suite tool sets.

Each figure is the median of --repeat passes, block cache emptied before each. One-process figures come
from a process that never forks: after a fork every page this process had is write-protected, and the
next pass here, whatever its kind, pays a fault on the first write to each (so interleaving one- and
two-process passes in one process makes the one-process passes slower than they are).
  one process    render_traces(num_workers=1) + build_lossmasks, and its render+tokenize+map work (the
                 CPU time of its steps)
  halves alone   the first and the second half of the rows, each alone from a cold block cache: their sum
                 over the whole is what cutting the rows costs (pieces both halves encode)
  two workers    render_traces(num_workers=2) + build_lossmasks, taken apart: before the fork, the fork
                 itself, each worker's steps (their CPU time: over one process's, the cut, copy-on-write
                 faults and the cores' own loss), waiting for the last result, stacking the steps, lossmasks
  independent    two processes started apart (not forked) running the whole job at the same moments, against
                 one of them alone: what the machine's two cores lose by working at once

    .venv/bin/python bench/etl_cores.py [--limit 1000] [--repeat 5]
    .venv/bin/python bench/etl_cores.py --fresh-steps 5   # each step's CPU, one worker against two, fresh processes
    .venv/bin/python bench/etl_cores.py --threads         # the steps on two threads of one process against one
"""
from __future__ import annotations

import argparse
import json
import os
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
    import polars as pl
    from etl_b import load_traces

    from cb_core import render as R
    from cb_core.llama3_fast import fast_encoder
    from cb_core.tokenizer import llama3_tokenizer, tokenizer_id

    traces = load_traces(limit)
    tok = llama3_tokenizer()
    fe = fast_encoder(tok)
    cfg = R.RenderConfig(max_length=32768)
    table = R._render_frame(traces).to_arrow(compat_level=pl.CompatLevel.newest())
    return R, traces, tok, fe, cfg, table, tokenizer_id(tok)


def _cold(fe) -> None:
    fe.cache.clear()
    fe.cache_chars = 0


def _median(xs: list) -> float:
    return sorted(xs)[len(xs) // 2]


def one_process(args) -> None:
    """Child mode (never forks): the one-process job, its work, and the two halves alone."""
    from cb_core.lossmask import POLICIES, build_lossmasks

    R, traces, tok, fe, cfg, table, tid = _setup(args.limit)
    half = table.num_rows // 2
    parts = {"first half": table.slice(0, half), "second half": table.slice(half)}

    def work(t) -> float:
        _cold(fe)
        return sum(step[4]["cpu_s"] for step in R._process_chunk((t, tok, fe, tid, cfg)))

    def per_step() -> dict[int, float]:
        _cold(fe)
        return {step[0]: (step[4]["cpu_s"], step[4]["rows"]) for step in R._process_chunk((table, tok, fe, tid, cfg))}

    def job() -> tuple[float, float]:
        _cold(fe)
        st: dict = {}
        t0 = time.perf_counter()
        renders, _ = R.render_traces(traces, tok, cfg, num_workers=1, stats=st)
        build_lossmasks(renders, traces, list(POLICIES))
        return time.perf_counter() - t0, st["cpu_s"]

    job()
    got: dict[str, list] = {"job": [], "work": [], **{k: [] for k in parts}}
    steps: list[dict[int, float]] = []
    for _ in range(args.repeat):
        wall, cpu = job()
        got["job"].append(wall)
        got["work"].append(cpu)
        for k, t in parts.items():
            got[k].append(work(t))
        steps.append(per_step())
    out = {k: _median(v) for k, v in got.items()}
    out["steps"] = {s: (_median([r[s][0] for r in steps]), steps[0][s][1]) for s in steps[0]}
    print("RESULT " + json.dumps(out), flush=True)


def two_workers(args) -> dict:
    """render_traces(num_workers=2) + build_lossmasks here, taken apart with timestamps."""
    from cb_core import forking
    from cb_core.lossmask import POLICIES, build_lossmasks

    R, traces, tok, fe, cfg, _, _ = _setup(args.limit)
    marks: dict = {}
    real_chunk, real_fm, real_fork = R._chunk, forking.fork_map, os.fork

    def chunk(a):
        for step in real_chunk(a):
            step[4]["t"] = time.perf_counter()  # when this step was done (both processes share the clock)
            yield step

    def fork():
        t = time.perf_counter()
        pid = real_fork()
        if pid:
            marks["fork"] = time.perf_counter() - t
        return pid

    def fm(*a, **k):
        marks["fm_in"] = time.perf_counter()
        out = real_fm(*a, **k)
        marks["fm_out"] = time.perf_counter()
        marks["done"] = [max(s[4]["t"] for s in w) if w else marks["fm_in"] for w in out]
        marks["cpu"] = [sum(s[4]["cpu_s"] for s in w) for w in out]
        marks["steps"] = [[(s[0], s[4]["cpu_s"], s[4]["rows"]) for s in w] for w in out]
        return out

    R._chunk, forking.fork_map, forking.os.fork = chunk, fm, fork

    def job() -> dict:
        _cold(fe)
        marks.clear()
        t0 = time.perf_counter()
        renders, _ = R.render_traces(traces, tok, cfg, num_workers=2)
        t1 = time.perf_counter()
        build_lossmasks(renders, traces, list(POLICIES))
        t2 = time.perf_counter()
        return {"job": t2 - t0, "before": marks["fm_in"] - t0, "fork": marks["fork"],
                "cpu0": marks["cpu"][0], "cpu1": marks["cpu"][1],
                "imbalance": abs(marks["done"][0] - marks["done"][1]),
                "wait": marks["fm_out"] - max(marks["done"]), "after": t1 - marks["fm_out"], "lossmasks": t2 - t1,
                "steps": marks["steps"]}

    try:
        job()
        runs = [job() for _ in range(args.repeat)]
    finally:
        R._chunk, forking.fork_map, forking.os.fork = real_chunk, real_fm, real_fork
    out = {k: _median([r[k] for r in runs]) for k in runs[0] if k != "steps"}
    out["steps"] = [r["steps"] for r in runs]
    return out


def _first_and_rest(mine: list, cpu: dict, one_cpu: dict, first: int = 3) -> tuple[float, float, float, float]:
    """For one worker's steps ``mine`` (in the order it took them): (CPU of its first ``first`` steps, the same
    steps in one process, CPU of its other steps, the same in one process). Where the two-worker overhead
    sits: a worker's first steps start on a cold block cache (the pieces the other worker's rows share,
    encoded again) and a fresh malloc arena (a page fault per page it grows by)."""
    head, rest = mine[:first], mine[first:]
    return (sum(cpu[s] for s in head), sum(one_cpu[s] for s in head),
            sum(cpu[s] for s in rest), sum(one_cpu[s] for s in rest))


def _one_cost(one_steps: dict, a: int, b: int) -> float:
    """What rows [a, b) cost in one process: its steps ({first row: (cpu, rows)}) that overlap, prorated by
    rows (two workers' runs shrink at the end of the work, so their edges differ from one process's steps)."""
    tot = 0.0
    for s, (cpu, n) in one_steps.items():
        s = int(s)
        lap = min(b, s + n) - max(a, s)
        if lap > 0:
            tot += cpu * lap / n
    return tot


def _start_and_rest(one_steps: dict, runs: list) -> list[tuple[float, float, float, float]]:
    """`_first_and_rest` per worker, medians over the passes of `two_workers`."""
    got = []
    for k in range(len(runs[0])):
        rows = [_first_and_rest([s for s, _, _ in r[k]], {s: c for s, c, _ in r[k]},
                                {s: _one_cost(one_steps, s, s + n) for s, _, n in r[k]})
                for r in runs]
        got.append(tuple(_median([x[i] for x in rows]) for i in range(4)))
    return got


def steps_child(args) -> None:
    """Child mode: one cold render_traces in this fresh process on ``--workers``; each step's worker and CPU."""
    from cb_core import forking

    R, traces, tok, fe, cfg, table, tid = _setup(args.limit)
    real_fm = forking.fork_map
    got: dict = {}

    def fm(*a, **k):
        out = real_fm(*a, **k)
        got.update({s[0]: (w, s[4]["cpu_s"], s[4]["rows"]) for w, done in enumerate(out) for s in done})
        return out

    forking.fork_map = fm
    _cold(fe)
    if args.workers == 1:
        got.update({s[0]: (0, s[4]["cpu_s"], s[4]["rows"]) for s in R._process_chunk((table, tok, fe, tid, cfg))})
    else:
        R.render_traces(traces, tok, cfg, num_workers=args.workers)
    print("RESULT " + json.dumps(got), flush=True)


def fresh_steps(args) -> None:
    """Each step's CPU, cold, in fresh processes (as in a materialization), one worker against two,
    alternating: per worker, its first 3 steps and its other steps against the same steps in one process."""
    one: list[dict] = []
    two: list[dict] = []
    for _ in range(args.fresh_steps):
        one.append(_result(_child(args, ["--steps-child"], workers="1")))
        two.append(_result(_child(args, ["--steps-child"], workers="2")))
    one_steps = {s: (_median([r[s][1] for r in one]), one[0][s][2]) for s in one[0]}
    total1 = sum(c for c, _ in one_steps.values())
    total2 = _median([sum(x[1] for x in r.values()) for r in two])
    print(f"{args.limit} traces, each step's CPU, cold, in fresh processes, medians of {args.fresh_steps} rounds")
    print(f"  one process {total1:.3f} s, two workers {total2:.3f} s ({total2 / total1 - 1:+.1%})")
    runs = [[[(int(s), c, n) for s, (w, c, n) in r.items() if w == k] for k in (0, 1)] for r in two]
    for k, (f2, f1, r2, r1) in enumerate(_start_and_rest(one_steps, runs)):
        print(f"  worker {k} (~{_median([len(r[k]) for r in runs])} runs): its first 3 {f2:.3f} s vs {f1:.3f} s "
              f"in one process ({f2 - f1:+.3f} s); its other runs {r2:.3f} vs {r1:.3f} s ({r2 - r1:+.3f} s)")


def two_threads(args) -> None:
    """The steps on two threads of this process (one StepQueue, one block cache) against one thread:
    tiktoken releases the GIL while it encodes, the render, the span mapping and the work around each
    piece hold it."""
    import threading

    from cb_core import forking

    R, traces, tok, fe, cfg, table, tid = _setup(args.limit)
    n = table.num_rows

    def one() -> float:
        _cold(fe)
        t0 = time.perf_counter()
        list(R._process_chunk((table, tok, fe, tid, cfg)))
        return time.perf_counter() - t0

    def two() -> float:
        _cold(fe)
        queue = forking.StepQueue(n, 2, max_run=R.STEP_ROWS, min_run=R.STEP_ROWS // 4)
        R._WORK = (table, tok, fe, tid, cfg, queue)
        done: list = [None, None]

        def run(k: int) -> None:
            done[k] = list(R._process_chunk((k,)))

        threads = [threading.Thread(target=run, args=(k,)) for k in (0, 1)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        queue.close()
        R._WORK = None
        assert sum(d[4]["rows"] for part in done for d in part) == n
        return wall

    one()
    ones, twos = [], []
    for _ in range(args.repeat):
        ones.append(one())
        twos.append(two())
    print(f"{args.limit} traces, the steps, medians of {args.repeat}: one thread {_median(ones):.3f} s, two threads "
          f"{_median(twos):.3f} s: {_median(ones) / _median(twos):.2f}x")


def independent(args) -> None:
    """Child mode: run the whole job ``--repeat`` times, each pass started with the partner (barrier files)."""
    R, traces, tok, fe, cfg, table, tid = _setup(args.limit)

    def run() -> float:
        _cold(fe)
        t0 = time.perf_counter()
        list(R._process_chunk((table, tok, fe, tid, cfg)))
        return time.perf_counter() - t0

    run()
    times = []
    for k in range(args.repeat):
        open(os.path.join(args.barrier, f"{args.me}.{k}"), "w").close()
        if args.partner:
            while not os.path.exists(os.path.join(args.barrier, f"{args.partner}.{k}")):
                time.sleep(0.0005)
        times.append(run())
    print("RESULT " + json.dumps(_median(times)), flush=True)


def _child(args, mode: list[str], **extra):
    cmd = [sys.executable, __file__, *mode, "--limit", str(args.limit), "--repeat", str(args.repeat)]
    for k, v in extra.items():
        cmd += [f"--{k}", v]
    env = {**os.environ, "POLARS_MAX_THREADS": "1"} if mode == ["--one-process"] else None
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env)


def _result(p):
    out, _ = p.communicate(timeout=1200)
    line = next(ln for ln in out.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[7:])


def _independent_pair(args) -> tuple[float, float]:
    """(alone, beside the other) medians of the whole job in processes started apart."""
    with tempfile.TemporaryDirectory() as bar:
        alone = _result(_child(args, ["--independent"], me="solo", partner="", barrier=bar))
    with tempfile.TemporaryDirectory() as bar:
        a = _child(args, ["--independent"], me="a", partner="b", barrier=bar)
        b = _child(args, ["--independent"], me="b", partner="a", barrier=bar)
        both = max(_result(a), _result(b))
    return alone, both


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--independent", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--one-process", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--fresh-steps", type=int, default=0, metavar="N",
                    help="instead: each step's CPU in N rounds of fresh processes, one worker against two")
    ap.add_argument("--threads", action="store_true", help="instead: the steps on two threads against one")
    ap.add_argument("--steps-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--workers", type=int, default=2, help=argparse.SUPPRESS)
    ap.add_argument("--me", default="")
    ap.add_argument("--partner", default="")
    ap.add_argument("--barrier", default="")
    args = ap.parse_args()
    if args.independent:
        independent(args)
        return
    if args.one_process:
        one_process(args)
        return
    if args.steps_child:
        steps_child(args)
        return
    if args.fresh_steps:
        fresh_steps(args)
        return
    if args.threads:
        two_threads(args)
        return

    one = _result(_child(args, ["--one-process"]))  # 1 thread everywhere, polars too (etl_b's "1 thread")
    two = two_workers(args)
    alone_ind, both_ind = _independent_pair(args)
    halves = one["first half"] + one["second half"]
    print(f"{args.limit} traces (AgentDojo + TAU2, real suite tool sets), medians of {args.repeat} passes\n")
    print(f"  one process: render_traces + build_lossmasks     {one['job']:6.3f} s; the render+tokenize+map work "
          f"{one['work']:.3f} s CPU")
    print(f"  the two halves alone                             {one['first half']:.3f} + {one['second half']:.3f} s "
          f"CPU: cutting the rows costs {halves / one['work'] - 1:+.1%} (pieces both halves encode)")
    print(f"  two workers: render_traces + build_lossmasks     {two['job']:6.3f} s: {one['job'] / two['job']:.2f}x "
          f"one process (target 1.7)")
    print(f"    before the fork (frame, Arrow view, queue)     {two['before']:6.3f} s")
    print(f"    the fork itself                                {two['fork']:6.3f} s")
    work2 = two["cpu0"] + two["cpu1"]
    print(f"    the workers' steps                             {two['cpu0']:.3f} + {two['cpu1']:.3f} s CPU = "
          f"{work2 / one['work'] - 1:+.1%} over one process (the cut, copy-on-write faults, the cores' own loss)")
    for k, (a, a1, b, b1) in enumerate(_start_and_rest(one["steps"], two["steps"])):
        print(f"      worker {k}: its first 3 steps {a:.3f} s CPU vs {a1:.3f} s in one process ({a / max(a1, 1e-9) - 1:+.0%}); "
              f"its other steps {b:.3f} vs {b1:.3f} s ({b / max(b1, 1e-9) - 1:+.1%})")
    print(f"    the workers' last steps apart                  {two['imbalance']:6.3f} s")
    print(f"    last step done -> every result in              {two['wait']:6.3f} s")
    print(f"    stacking the steps into render_v1              {two['after']:6.3f} s")
    print(f"    build_lossmasks                                {two['lossmasks']:6.3f} s")
    print(f"  two processes started apart, whole job each      {both_ind:6.3f} s vs {alone_ind:.3f} s alone: "
          f"the cores lose {both_ind / alone_ind - 1:+.1%} working at once")


if __name__ == "__main__":
    main()
