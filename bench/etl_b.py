"""ETL_B benchmark on the real shared AgentDojo + TAU2 traces.

Measures samples/s of
  ours   render (span-recording) + tokenization (the tiktoken fast path of cb_core.llama3_fast: exact ids,
         token start chars from byte lengths, repeated blocks cached; block cache emptied before every
         pass) + span->token mapping + every loss-mask policy (render_traces + build_lossmasks); target
         ours/(a) >= 2 on 1 thread, and 2 workers >= 1.7x the 1-thread figure;
  ours_hf the same through the HF path (one batch call with offsets, fast=False): where the time went;
  (a)    plain HF batch tokenization of the same rendered text (no offsets, no spans, no masks);
  (b)    the decode -> regex -> re-encode baseline, per sample as the old loader did: render, tokenize,
         decode the ids, find the assistant segments with a regex on the decoded text, re-encode the text
         before each segment and the segment to locate it in tokens; target ours/(b) >= 20. Also reported:
         (b') the same with every encode/decode batched into one call (the most generous version).
All three run in one process on the same traces. Each configuration runs in a fresh child process so the
tokenizer's thread pool size is fixed per run: 1 thread, 2 threads (RAYON_NUM_THREADS), and 2 worker
processes (render_traces num_workers=2), to report the speedup from using both cores.

    .venv/bin/python bench/etl_b.py [--limit 200] [--repeat 3] [--tools real|none] [--max-length 32768]

--tools real (default) keeps every trace's full suite tool set (AgentDojo: 4.4-5.2k tokens of identical
definitions per trace, where block caching matters most); none drops the tools. --max-length is set high
so that no trace is quarantined as too long (the real tool sets alone pass 4096).

--materialize N measures the both-cores figure in real `dagster asset materialize --select renders,lossmasks`
runs (N rounds, 1 worker on one thread and 2 workers alternating; times from the assets' metadata; --show-timing
prints each run's wall time (the whole `dagster` process) and its renders timing: fork, parts, idle, load, stacking, CPU and page faults per worker; --ceiling
adds, after each round, the machine's own two-core figure of that moment, bench/cores_ceiling.py's split sized
like the 1-thread run, and the ETL's share of it);
--fresh N from cold passes in fresh processes.

--limit picks that many traces spread evenly over the AgentDojo and TAU2 sets (0 = all; the full set is
~10M tokens and takes minutes per pass on 2 cores). Timings exclude reading the sources and loading the
tokenizer. Other processes on the machine add noise: the median of --repeat interleaved passes is reported.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from etl_cores import _median  # a sibling bench script (stdlib only at import)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def load_traces(limit: int):
    import polars as pl

    from cb_core.sources import agentdojo, tau2

    shared = Path(os.environ.get("CB_SHARED_DATA", ROOT.parent / "shared" / "data"))
    ad = agentdojo.read(sorted((shared / "agent_dojo").glob("*.jsonl")), {}).good
    parts = [ad]
    try:
        parts.append(tau2.read([shared / "tau2"], {}).good)
    except Exception as e:  # pragma: no cover - reader problems must not hide the AgentDojo numbers
        print(f"tau2 reader failed ({e}); AgentDojo only", file=sys.stderr)
    out = []
    for df in parts:
        if limit and df.height:
            share = max(1, round(limit * df.height / sum(p.height for p in parts)))
            step = max(1, df.height // share)
            df = df.gather_every(step).head(share)
        out.append(df)
    return pl.concat(out)


ASSISTANT_RE = re.compile(
    r"<\|start_header_id\|>assistant<\|end_header_id\|>\n\n(.*?(?:<\|eot_id\|>|<\|eom_id\|>))", re.S
)


def baseline_b_per_sample(traces, tok, cfg) -> int:
    """decode -> regex -> re-encode as a per-sample pipeline does it (the old system's shape): for each
    trace, render, encode, decode, regex the assistant segments, re-encode the prefix before each segment and
    the segment to find its token range (assistant_only). Returns the number of ranges."""
    from cb_core.render import render_conversation

    n = 0
    for r in traces.select("messages", "tools").iter_rows(named=True):
        text = render_conversation(r["messages"], r["tools"], cfg).text
        ids = tok.encode(text, add_special_tokens=False)
        decoded = tok.decode(ids, skip_special_tokens=False)
        for m in ASSISTANT_RE.finditer(decoded):
            start = len(tok.encode(decoded[: m.start(1)], add_special_tokens=False))
            end = start + len(tok.encode(m.group(1), add_special_tokens=False))
            n += end > start
    return n


def baseline_b(traces, tok, cfg) -> int:
    """decode -> regex -> re-encode, batched as far as it goes (every encode/decode one batch call): the
    most generous version of the baseline. Returns the number of ranges (assistant_only)."""
    from cb_core.render import render_conversation

    rows = traces.select("messages", "tools").to_dicts()
    texts = [render_conversation(r["messages"], r["tools"], cfg).text for r in rows]
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    decoded = tok.batch_decode(ids, skip_special_tokens=False)
    prefixes, segs = [], []
    for text in decoded:
        for m in ASSISTANT_RE.finditer(text):
            prefixes.append(text[: m.start(1)])
            segs.append(m.group(1))
    if not prefixes:
        return 0
    pre = tok(prefixes, add_special_tokens=False)["input_ids"]
    seg = tok(segs, add_special_tokens=False)["input_ids"]
    ranges = [(len(p), len(p) + len(s)) for p, s in zip(pre, seg)]
    return len(ranges)


def child(args) -> dict:
    import polars as pl

    from cb_core.llama3_fast import fast_encoder

    from cb_core.lossmask import POLICIES, build_lossmasks
    from cb_core.render import RenderConfig, render_conversation, render_traces
    from cb_core.tokenizer import llama3_tokenizer

    traces = load_traces(args.limit)
    if args.tools == "none":
        traces = traces.with_columns(pl.lit("[]").alias("tools"))
    tok = llama3_tokenizer()
    cfg = RenderConfig(max_length=args.max_length)
    fe = fast_encoder(tok)
    texts: list[str] = []
    if not args.ours_only:  # (a)'s input: the rendered texts
        rows = traces.select("messages", "tools").to_dicts()
        texts = [render_conversation(r["messages"], r["tools"], cfg).text for r in rows]
        tok(texts[:8], add_special_tokens=False)  # warm up
    n = traces.height
    res: dict = {"threads": os.environ.get("RAYON_NUM_THREADS", "default"), "workers": args.workers, "traces": n,
                 "policies": len(POLICIES)}

    def ours(policies, tr=traces, fast=True):
        st: dict = {}
        fe.cache.clear()  # every pass starts cold: only repeats within the pass are cached
        fe.cache_chars = 0
        renders, _ = render_traces(tr, tok, cfg, num_workers=args.workers, stats=st, fast=fast)
        masks, _ = build_lossmasks(renders, tr, policies)
        return renders, masks, st

    methods = {"ours": lambda: ours(list(POLICIES))}
    if not args.ours_only:
        methods["ours1"] = lambda: ours(["assistant_only"])
        methods["ours_hf"] = lambda: ours(list(POLICIES), fast=False)
        methods["a"] = lambda: tok(texts, add_special_tokens=False)["input_ids"]
    if not args.skip_b and not args.ours_only:
        methods["b"] = lambda: baseline_b_per_sample(traces, tok, cfg)
        methods["b_batched"] = lambda: baseline_b(traces, tok, cfg)
    # warm up every code path on a few traces, then interleave the repeats so machine noise hits all alike
    ours(list(POLICIES), traces.head(20))
    if not args.ours_only:
        baseline_b(traces.head(20), tok, cfg)
    times: dict[str, list[float]] = {k: [] for k in methods}
    outs: dict = {}
    for _ in range(args.repeat):
        for k, fn in methods.items():
            t0 = time.perf_counter()
            outs[k] = fn()
            times[k].append(time.perf_counter() - t0)
    renders, masks, st = outs["ours"]
    for k, ts in times.items():  # median of the interleaved passes (the machine is shared)
        res[f"{k}_s"] = _median(ts)
        res[f"{k}_sps"] = n / res[f"{k}_s"]
    res.update(n_rendered=renders.height, n_masks=masks.height,
               tokens=int(renders["n_tokens"].cast(pl.Int64).sum()),
               # the stages' seconds (render_traces' stats also hold per-worker lists ending in _s)
               stage_s={k: round(v, 3) for k, v in st.items() if k.endswith("_s") and isinstance(v, float)})
    if "b" in outs:
        res["b_ranges"] = outs["b"]
    return res


CONFIGS = [("1 thread", {"RAYON_NUM_THREADS": "1", "POLARS_MAX_THREADS": "1", "TOKENIZERS_PARALLELISM": "true"}, 1),
           ("2 threads", {"RAYON_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "true"}, 1),
           ("2 processes", {"RAYON_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}, 2)]


def _run_child(args, env: dict, workers: int, extra: list[str]) -> dict | None:
    cmd = [sys.executable, __file__, "--child", "--limit", str(args.limit), "--workers", str(workers),
           "--tools", args.tools, "--max-length", str(args.max_length), *extra]
    try:
        p = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, cwd=ROOT,
                           timeout=args.timeout)
    except subprocess.TimeoutExpired:
        print(f"timed out after {args.timeout}s", file=sys.stderr)
        return None
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if p.returncode or line is None:
        print(f"child failed\n{p.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(line[7:])


def _print_round(k: int, got: dict[str, list[float]]) -> None:
    one, two = got["1 thread"][-1], got["2 processes"][-1]
    print(f"round {k + 1}: 1 thread {one:.3f} s, 2 processes {two:.3f} s: {one / two:.2f}x", flush=True)


def _print_summary(what: str, got: dict[str, list[float]], ceiling: list[float] | None = None) -> None:
    """Medians of each side and of the per-round ratios (the machine drifts; a round's pair ran together);
    with ``ceiling``, the machine's own two-core figure of each round and the ETL's share of it."""
    med = {k: _median(v) for k, v in got.items()}
    ratios = [a / b for a, b in zip(got["1 thread"], got["2 processes"])]
    pair = sorted(ratios)
    print(f"{what}, medians of {len(pair)} rounds: 1 thread {med['1 thread']:.3f} s, 2 processes "
          f"{med['2 processes']:.3f} s; speedup from both cores {med['1 thread'] / med['2 processes']:.2f}x "
          f"(per round {pair[0]:.2f}-{pair[-1]:.2f}, median {_median(pair):.2f}; target >= 1.7)")
    if ceiling:
        share = sorted(r / c for r, c in zip(ratios, ceiling))
        print(f"the machine's own two-core figure in the same rounds (bench/cores_ceiling.py's split, no serial "
              f"part): median {_median(ceiling):.2f}x (per round {min(ceiling):.2f}-{max(ceiling):.2f}); the ETL's "
              f"share of it per round: median {_median(share):.2f} ({share[0]:.2f}-{share[-1]:.2f})")


def _ceiling_round(seconds: float) -> float:
    """One round of `bench/cores_ceiling.py` sized so its one-process run takes about ``seconds``: the
    two-core figure a split with no serial part gets at this moment on this machine. In a small process of
    its own (forking this one, which holds Dagster, would add its page tables to the split)."""
    from cores_ceiling import work

    t0 = time.perf_counter()
    work(1_000_000)
    n = int(1_000_000 * seconds / max(time.perf_counter() - t0, 1e-6))
    p = subprocess.run([sys.executable, str(Path(__file__).with_name("cores_ceiling.py")), "--rounds", "1",
                        "--n", str(n)], capture_output=True, text=True, check=True)
    m = re.search(r"1 process ([\d.]+) s, 2 processes ([\d.]+) s", p.stdout)
    return float(m.group(1)) / float(m.group(2))


def fresh_rounds(args) -> None:
    """The both-cores figure as a materialization sees it: each pass is the first (cold) one in a process
    of its own, 1 thread and 2 processes alternating so the machine's drift hits both alike."""
    conf = {name: (env, w) for name, env, w in CONFIGS}
    got: dict[str, list[float]] = {"1 thread": [], "2 processes": []}
    for k in range(args.fresh):
        for name in got:
            env, w = conf[name]
            r = _run_child(args, env, w, ["--repeat", "1", "--skip-b", "--ours-only"])
            if r is None:
                return
            got[name].append(r["ours_s"])
        _print_round(k, got)
    _print_summary(f"{args.limit} traces, cold pass in a fresh process", got)


def materialize_rounds(args) -> None:
    """The both-cores figure from real materializations: `dagster asset materialize --select
    renders,lossmasks` of the same traces (written as traces.parquet into a scratch data root), each run a
    fresh process (the project's in-process executor: renders and lossmasks in one run process), 1 worker
    on one thread and 2 workers alternating. Times: renders' `timing` metadata (render_traces) plus
    lossmasks' `build_s`, so reading and writing parquet and Dagster's own start are left out."""
    import tempfile

    import dagster as dg

    traces = load_traces(args.limit)
    if args.tools == "none":
        import polars as pl

        traces = traces.with_columns(pl.lit("[]").alias("tools"))
    exe = str(Path(sys.executable).with_name("dagster"))
    conf = {name: (env, w) for name, env, w in CONFIGS}
    run_config = json.dumps({"ops": {"renders": {"config": {"max_length": args.max_length}}}})
    got: dict[str, list[float]] = {"1 thread": [], "2 processes": []}
    ceiling: list[float] = []
    with tempfile.TemporaryDirectory(prefix="cb-etl-b-") as tmp:
        root, home = Path(tmp) / "data", Path(tmp) / "dagster_home"
        root.mkdir()
        home.mkdir()
        (home / "dagster.yaml").write_text("")  # a default instance in the scratch folder, without the warning
        traces.write_parquet(root / "traces.parquet")
        for k in range(args.materialize):
            for name in got:
                env, w = conf[name]
                env = {**os.environ, **env, "CB_DATA_ROOT": str(root), "DAGSTER_HOME": str(home),
                       "CB_RENDER_WORKERS": str(w)}
                t_run = time.perf_counter()
                p = subprocess.run([exe, "asset", "materialize", "--select", "renders,lossmasks", "-m",
                                    "cb_assets.definitions", "--config-json", run_config],
                                   cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
                t_run = time.perf_counter() - t_run
                if p.returncode:
                    print(f"materialize failed\n{p.stderr[-3000:]}", file=sys.stderr)
                    return
                os.environ["DAGSTER_HOME"] = str(home)
                with dg.DagsterInstance.get() as inst:
                    md = {key: inst.get_latest_materialization_event(dg.AssetKey(key)).asset_materialization.metadata
                          for key in ("renders", "lossmasks")}
                if md["renders"]["workers"].value != w:
                    print(f"renders ran on {md['renders']['workers'].value} workers, not {w}", file=sys.stderr)
                    return
                got[name].append(md["renders"]["timing"].value["wall_s"] + md["lossmasks"]["build_s"].value)
                if args.show_timing:
                    tm = md["renders"]["timing"].value
                    keep = ("wall_s", "fork_s", "own_part_s", "wait_s", "load_s", "frame_s", "worker_steps",
                            "worker_cpu_s", "worker_faults", "worker_idle_s")
                    print(f"  {name}: whole run {t_run:.2f} s; lossmasks build {md['lossmasks']['build_s'].value} s; renders "
                          + ", ".join(f"{k} {tm[k]}" for k in keep if k in tm))
            _print_round(k, got)
            if args.ceiling:
                ceiling.append(_ceiling_round(got["1 thread"][-1]))
                print(f"  the machine's two-core figure this round: {ceiling[-1]:.2f}x; the ETL's share of it: "
                      f"{got['1 thread'][-1] / got['2 processes'][-1] / ceiling[-1]:.2f}", flush=True)
    _print_summary(f"{traces.height} traces, `dagster asset materialize --select renders,lossmasks`", got, ceiling)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", type=str, default="")
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--skip-b", action="store_true")
    ap.add_argument("--tools", choices=("real", "none"), default="real")
    ap.add_argument("--max-length", type=int, default=32768)
    ap.add_argument("--only", type=str, default="", help="comma-separated subset of: 1 thread,2 threads,2 processes")
    ap.add_argument("--timeout", type=int, default=1200, help="seconds per configuration")
    ap.add_argument("--fresh", type=int, default=0, metavar="N",
                    help="only the both-cores figure: N rounds of one cold pass of ours in a fresh process, "
                         "1 thread and 2 processes alternating")
    ap.add_argument("--materialize", type=int, default=0, metavar="N",
                    help="only the both-cores figure from N rounds of real `dagster asset materialize` runs of "
                         "renders,lossmasks, 1 worker on one thread and 2 workers alternating")
    ap.add_argument("--show-timing", action="store_true",
                    help="with --materialize: each run's renders timing metadata (where the time went)")
    ap.add_argument("--ceiling", action="store_true",
                    help="with --materialize: after each round, one round of bench/cores_ceiling.py's split sized "
                         "like the 1-thread run (the machine's own two-core figure at that moment) and the "
                         "ETL's share of it")
    ap.add_argument("--ours-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args)))
        return
    if args.materialize:
        materialize_rounds(args)
        return
    if args.fresh:
        fresh_rounds(args)
        return

    # forked workers must not inherit a used rayon pool: TOKENIZERS_PARALLELISM=false there (with "true"
    # the forked tokenizer deadlocks); "1 thread" is one thread in every library: polars (lossmasks) too
    configs = [(n, e, w, w > 1) for n, e, w in CONFIGS]
    if args.only:
        configs = [c for c in configs if c[0] in args.only.split(",")]
    results = {}
    for name, env, workers, skip_b in configs:
        extra = ["--repeat", str(args.repeat)] + (["--skip-b"] if skip_b or args.skip_b else [])
        r = _run_child(args, env, workers, extra)
        if r is None:
            print(f"{name}: no result", file=sys.stderr)
            continue
        results[name] = r
        print(f"\n== {name} (tools={args.tools}): {r['traces']} traces, {r['tokens']:,} tokens, {r['n_masks']} masks")
        print(f"  ours (render+tokenize+mask, {r['policies']} policies): {r['ours_sps']:8.1f} samples/s  ({r['ours_s']:.2f}s) stages {r['stage_s']}")
        print(f"  ours (assistant_only only)           : {r['ours1_sps']:8.1f} samples/s  ({r['ours1_s']:.2f}s)")
        print(f"  ours through HF (fast=False)         : {r['ours_hf_sps']:8.1f} samples/s  ({r['ours_hf_s']:.2f}s)")
        print(f"  (a) plain batch tokenization         : {r['a_sps']:8.1f} samples/s  ({r['a_s']:.2f}s)")
        if "b_sps" in r:
            print(f"  (b) decode->regex->re-encode         : {r['b_sps']:8.1f} samples/s  ({r['b_s']:.2f}s)")
            print(f"  (b') same, batched                   : {r['b_batched_sps']:8.1f} samples/s  ({r['b_batched_s']:.2f}s)")
            print(f"  ratio ours/(a) = {r['ours_sps'] / r['a_sps']:.2f}  (target >= 2)")
            print(f"  ratio ours/(b) = {r['ours_sps'] / r['b_sps']:.2f}  (target >= 20); ours/(b') = "
                  f"{r['ours_sps'] / r['b_batched_sps']:.2f}")
        else:
            print(f"  ratio ours/(a) = {r['ours_sps'] / r['a_sps']:.2f}")
    if "1 thread" in results:
        base = results["1 thread"]["ours_sps"]
        for name in ("2 threads", "2 processes"):
            if name in results:
                print(f"speedup from both cores ({name} vs 1 thread): {results[name]['ours_sps'] / base:.2f}x"
                      + ("  (target >= 1.7)" if name == "2 processes" else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
