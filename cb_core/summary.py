"""Print what a pipeline run left under $CB_DATA_ROOT: one line per tier (`python -m cb_core.summary`)."""
from __future__ import annotations

import sys
from pathlib import Path

import polars as pl

from cb_core.io import data_root


def summarize(root: Path) -> list[str]:
    lines = []
    for path in sorted(root.glob("*.parquet")):
        n = pl.scan_parquet(path).select(pl.len()).collect().item()
        lines.append(f"{path.stem:<28} {n:>8} rows  {path}")
    return lines


def main(argv: list[str]) -> int:
    root = Path(argv[0]) if argv else data_root()
    lines = summarize(root)
    if not lines:
        print(f"no tiers under {root}")
        return 1
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
