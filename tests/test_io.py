"""Atomic writes: a crash mid-write leaves the previous good file."""
import polars as pl
import pytest

from cb_core.io import write_parquet


class Boom(Exception):
    pass


def test_failed_write_keeps_previous_version(tmp_path, monkeypatch):
    path = tmp_path / "traces.parquet"
    write_parquet(pl.DataFrame({"id": ["a", "b"]}), path)

    def crash(self, *a, **k):
        raise Boom("disk full")

    monkeypatch.setattr(pl.DataFrame, "write_parquet", crash)
    with pytest.raises(Boom):
        write_parquet(pl.DataFrame({"id": ["c"]}), path)
    monkeypatch.undo()
    assert pl.read_parquet(path)["id"].to_list() == ["a", "b"]
    assert [p.name for p in tmp_path.iterdir()] == ["traces.parquet"]  # no temp litter
