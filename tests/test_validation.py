"""The shared stop-the-line: only malformed rows count, and a failing stage keeps its rejected rows."""
import dagster as dg
import polars as pl
import pytest

from cb_assets.validation import stop_the_line
from cb_core.schemas import QUARANTINE_SCHEMA, reject


def _rejects(n_malformed: int, n_excluded: int) -> pl.DataFrame:
    rows = [reject(dataset="agentdojo", file="a.jsonl", line=i + 1, field="messages", reason="bad", raw="{}")
            for i in range(n_malformed)]
    rows += [reject(dataset="agentdojo", file="a.jsonl", line=100 + i, reason="truncated: trained span cut away",
                    raw="{}", stage="renders", severity="excluded") for i in range(n_excluded)]
    return pl.DataFrame(rows, schema=QUARANTINE_SCHEMA)


def test_excluded_rows_do_not_stop_the_line(data_root):
    assert stop_the_line("renders", 10, _rejects(1, 8), 0.10) == 1
    assert not (data_root / "_failed").exists()


def test_malformed_over_limit_fails_and_keeps_every_reject(data_root):
    with pytest.raises(dg.Failure, match=r"renders: 2/10 rows malformed .*rejected rows kept in"):
        stop_the_line("renders", 10, _rejects(2, 3), 0.10)
    kept = pl.read_parquet(data_root / "_failed" / "renders.rejected.parquet")
    assert kept.height == 5 and kept["line"].to_list() == [1, 2, 100, 101, 102]
