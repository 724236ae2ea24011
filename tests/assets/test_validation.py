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


# ------------------------------------------------------------------- check descriptions read as outcomes
from cb_assets.validation import pandera_check, rows_check  # noqa: E402
from cb_core.schemas import QuarantineModel  # noqa: E402


def test_passed_rows_check_says_what_was_verified():
    df = pl.DataFrame({"id": ["a", "b", "c"]})
    res = rows_check(df, pl.col("id").is_duplicated(), "duplicate trace ids")
    assert res.passed and res.description == "no duplicate trace ids (3 rows checked)"
    res = rows_check(df, pl.col("id").is_duplicated(), "duplicate trace ids", verified="every trace id is unique")
    assert res.description == "every trace id is unique (3 rows checked)"
    assert res.metadata["failing_rows"].value == 0


def test_failed_rows_check_says_what_was_found_with_examples():
    df = pl.DataFrame({"trace_id": ["a", "b", "b", "c", "c"]})
    res = rows_check(df, pl.col("trace_id").is_duplicated(), "duplicate trace ids", id_col="trace_id")
    assert not res.passed
    assert res.description == "4 of 5 rows: duplicate trace ids (e.g. trace_id=b, trace_id=b, trace_id=c, trace_id=c)"
    assert res.metadata["failing_rows"].value == 4


def test_rows_check_on_zero_rows_says_not_measured():
    res = rows_check(pl.DataFrame({"id": []}, schema={"id": pl.String}), pl.col("id").is_null(), "null ids")
    assert res.passed and res.description == "not measured: 0 rows to check for null ids"


def test_pandera_check_descriptions():
    ok = pandera_check(QuarantineModel, _rejects(2, 1))
    assert ok.passed and ok.description == "every row matches QuarantineModel (3 rows checked)"
    bad = pandera_check(QuarantineModel, _rejects(2, 1).with_columns(pl.lit("").alias("reason")))
    assert not bad.passed and bad.description.startswith("3 failure case(s) against QuarantineModel in 3 rows")


# ------------------------------------------------------------------------------ traces label sanity
def _trace(i: int, **labels) -> dict:
    from cb_core.schemas import make_trace, message

    return make_trace(dataset="agentdojo", source_locator=f"a.jsonl:{i}", completeness="complete",
                      messages=[message("user", f"q{i}")], tools=[], category=labels.pop("category", "retain"),
                      priority_class=labels.pop("priority_class", "tool_capability"), **labels)


def test_label_sanity_follows_the_compromised_is_harmful_semantics():
    from cb_assets.assets.traces import traces_label_sanity
    from cb_core.schemas import TRACE_SCHEMA

    ok = [
        _trace(1),
        # compromised although AgentDojo's goal check failed: harmful, attack_succeeded False
        _trace(2, category="harmful", priority_class="harmful_flip", attack_present=True, injection_reached=True,
               attacker_call_made=True),
        _trace(3, priority_class="adversarial_safe", attack_present=True, injection_reached=True,
               is_adversarial_safe=True),
        _trace(4, injection_reached=False),  # configured, never read: no attack
        # a skeleton rebuilds the context with the injection in it, whatever the original run retrieved
        {**_trace(8, attack_present=True, injection_reached=False), "completeness": "skeleton"},
    ]
    res = traces_label_sanity(pl.DataFrame(ok, schema=TRACE_SCHEMA))
    assert res.passed and res.description == "every row's labels are consistent (5 rows checked)"
    bad = ok + [
        _trace(5, is_adversarial_safe=True, attack_present=True, injection_reached=True, attacker_call_made=True),
        _trace(6, attack_present=True, injection_reached=False),
        _trace(7, attack_succeeded=True),
    ]
    res = traces_label_sanity(pl.DataFrame(bad, schema=TRACE_SCHEMA))
    assert not res.passed and res.metadata["failing_rows"].value == 3
    assert res.description.startswith("3 of 8 rows: rows violating label sanity (e.g. id=")
