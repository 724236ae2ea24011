"""ETL_A throughput over all of ../shared/data vs a plain json.loads / csv read of the same files.

Both are timed in this process, alternating per source, N repeats; the ratio of the medians is printed per
source and in total, so it is robust to a noisy machine. The readers keep their per-record error reports
(quarantine rows naming file, line and field); AgentDojo traces carry the suites' full real tool schemas.
The target compares with the standard library (json, csv); the readers decode with msgspec (exactly
json.loads's values), so a second line also compares with plain parsing through msgspec. Caches that
outlive a read (the tool sets' canonical JSON) are emptied before every read.
Usage: python bench/etl_a.py [--shared PATH] [--repeats 3]. Target: ratio <= 2.
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from pathlib import Path

import msgspec

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cb_core.config import DatasetsConfig, resolve_source_paths  # noqa: E402
from cb_core.schemas import _tools_part  # noqa: E402
from cb_core.sources import get_reader  # noqa: E402

SOURCES = {  # dataset -> path under shared/data (B4 and UltraChat have no public file here)
    "agentdojo": "agent_dojo",
    "llmail_inject": "llmail_inject",
    "tau2": "tau2",
    "xstest": "xstest",
}


def plain_read(path: Path, loads=json.loads) -> int:
    """The lower bound: parse every file of the source once with the standard library (or ``loads``),
    nothing more."""
    n = 0
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if f.suffix == ".jsonl":
            with open(f, encoding="utf-8") as fh:
                for line in fh:
                    if line.strip():
                        loads(line)
                        n += 1
        elif f.suffix == ".json":
            with open(f, encoding="utf-8") as fh:
                try:
                    obj = loads(fh.read())
                except ValueError:
                    continue  # the malformed LLMail tool prompt file
            n += len(obj) if isinstance(obj, list) else 1
        elif f.suffix == ".csv":
            with open(f, encoding="utf-8", newline="") as fh:
                n += sum(1 for _ in csv.DictReader(fh))
    return n


def read_source(shared: Path, cfg: DatasetsConfig, ds: str) -> int:
    _tools_part.cache_clear()
    spec = shared / SOURCES[ds]
    paths = resolve_source_paths(spec / "*.jsonl") if ds == "agentdojo" else resolve_source_paths(spec)
    return get_reader(ds)(paths, getattr(cfg, ds)).n_records


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if not args.shared.is_dir():
        sys.exit(f"shared data not found at {args.shared}")
    cfg = DatasetsConfig.load()
    for ds in SOURCES:  # warm imports and file caches
        read_source(args.shared, cfg, ds)
    plain = {ds: [] for ds in SOURCES}
    fast = {ds: [] for ds in SOURCES}
    etl = {ds: [] for ds in SOURCES}
    fast_loads = msgspec.json.Decoder().decode
    n_plain, n_records = {}, {}
    for _ in range(args.repeats):
        for ds, sub in SOURCES.items():
            t0 = time.perf_counter()
            n_plain[ds] = plain_read(args.shared / sub)
            plain[ds].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            plain_read(args.shared / sub, fast_loads)
            fast[ds].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            n_records[ds] = read_source(args.shared, cfg, ds)
            etl[ds].append(time.perf_counter() - t0)
    med = statistics.median
    for ds in SOURCES:
        p, e = med(plain[ds]), med(etl[ds])
        print(f"{ds:14s}: plain {n_plain[ds]:>6} rec {p:6.3f}s   ETL_A {n_records[ds]:>6} rec {e:6.3f}s   ratio {e / p:5.2f}")
    tp = med([sum(x) for x in zip(*plain.values())])
    te = med([sum(x) for x in zip(*etl.values())])
    print(f"plain read : {sum(n_plain.values()):>7} records in {tp:.3f}s ({sum(n_plain.values()) / tp:,.0f} rec/s)")
    print(f"ETL_A      : {sum(n_records.values()):>7} records in {te:.3f}s ({sum(n_records.values()) / te:,.0f} rec/s)")
    tf = med([sum(x) for x in zip(*fast.values())])
    ratio = te / tp
    print(f"ratio ETL_A / plain = {ratio:.2f}  (target <= 2) {'OK' if ratio <= 2 else 'OVER TARGET'}")
    print(f"ratio ETL_A / plain parsing through msgspec ({tf:.3f}s) = {te / tf:.2f}  (not the target: the "
          "same decoder the readers use)")


if __name__ == "__main__":
    main()
