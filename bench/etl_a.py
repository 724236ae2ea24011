"""ETL_A throughput over all of ../shared/data vs a plain json.loads / csv read of the same files.

Both are timed in this process, alternating, best of N, so the ratio is robust to a noisy machine.
Usage: python bench/etl_a.py [--shared PATH] [--repeats 3]. Target: ratio <= 3.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cb_core.config import DatasetsConfig, resolve_source_paths  # noqa: E402
from cb_core.sources import get_reader  # noqa: E402

SOURCES = {  # dataset -> path under shared/data (B4 and UltraChat have no public file here)
    "agentdojo": "agent_dojo",
    "llmail_inject": "llmail_inject",
    "tau2": "tau2",
    "xstest": "xstest",
}


def plain_read(path: Path) -> int:
    """The lower bound: parse every file of the source once with the standard library, nothing more."""
    n = 0
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if f.suffix == ".jsonl":
            with open(f, encoding="utf-8") as fh:
                for line in fh:
                    if line.strip():
                        json.loads(line)
                        n += 1
        elif f.suffix == ".json":
            with open(f, encoding="utf-8") as fh:
                try:
                    obj = json.load(fh)
                except json.JSONDecodeError:
                    continue  # the malformed LLMail tool prompt file
            n += len(obj) if isinstance(obj, list) else 1
        elif f.suffix == ".csv":
            with open(f, encoding="utf-8", newline="") as fh:
                n += sum(1 for _ in csv.DictReader(fh))
    return n


def etl_a(shared: Path, cfg: DatasetsConfig) -> int:
    n = 0
    for ds, sub in SOURCES.items():
        spec = shared / sub
        paths = resolve_source_paths(spec / "*.jsonl") if ds == "agentdojo" else resolve_source_paths(spec)
        res = get_reader(ds)(paths, getattr(cfg, ds))
        n += res.n_records
    return n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if not args.shared.is_dir():
        sys.exit(f"shared data not found at {args.shared}")
    cfg = DatasetsConfig.load()
    etl_a(args.shared, cfg)  # warm imports and caches
    best_plain = best_etl = float("inf")
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        n_plain = sum(plain_read(args.shared / sub) for sub in SOURCES.values())
        best_plain = min(best_plain, time.perf_counter() - t0)
        t0 = time.perf_counter()
        n_records = etl_a(args.shared, cfg)
        best_etl = min(best_etl, time.perf_counter() - t0)
    print(f"plain read : {n_plain:>7} records in {best_plain:.3f}s ({n_plain / best_plain:,.0f} rec/s)")
    print(f"ETL_A      : {n_records:>7} records in {best_etl:.3f}s ({n_records / best_etl:,.0f} rec/s)")
    ratio = best_etl / best_plain
    print(f"ratio ETL_A / plain = {ratio:.2f}  (target <= 3) {'OK' if ratio <= 3 else 'OVER TARGET'}")


if __name__ == "__main__":
    main()
