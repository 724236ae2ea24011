"""Atomic Parquet tiers under $CB_DATA_ROOT: a crash mid-write leaves the previous good file in place."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import polars as pl


def data_root() -> Path:
    return Path(os.environ.get("CB_DATA_ROOT", ".cb_data")).resolve()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_parquet(df: pl.DataFrame, path: Path) -> Path:
    """Write via temp file + rename in the same folder (rename is atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        df.write_parquet(tmp, compression="zstd", statistics=True)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(obj, path: Path) -> Path:
    atomic_write_bytes(Path(path), json.dumps(obj, indent=2, sort_keys=True, default=str).encode())
    return Path(path)


def read_parquet(path: Path) -> pl.DataFrame:
    return pl.read_parquet(path)
