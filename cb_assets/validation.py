"""Pandera glue shared by every tier: validate before writing, and turn failures into check results
with the failing rows counted and a few examples shown."""
from __future__ import annotations

from pathlib import Path

import dagster as dg
import pandera.errors as pa_errors
import polars as pl

N_EXAMPLES = 5


def _failure_summary(err: pa_errors.SchemaErrors | pa_errors.SchemaError) -> tuple[int, list[dict]]:
    cases = getattr(err, "failure_cases", None)
    if isinstance(cases, pl.DataFrame) and cases.height:
        examples = cases.head(N_EXAMPLES).with_columns(pl.all().cast(pl.String)).to_dicts()
        return cases.height, examples
    return 1, [{"error": str(err)[:500]}]


def validate_or_fail(model, df: pl.DataFrame, what: str) -> pl.DataFrame:
    """Validate `df` against a pandera.polars model; raise dg.Failure (so nothing is written) otherwise."""
    try:
        return model.validate(df, lazy=True)
    except (pa_errors.SchemaErrors, pa_errors.SchemaError) as err:
        n, examples = _failure_summary(err)
        raise dg.Failure(
            description=f"{what} failed validation against {model.__name__}: {n} failure case(s); "
            f"first: {examples[:1]}",
            metadata={"failure_cases": n, "examples": dg.MetadataValue.json(examples)},
        ) from err


def pandera_check(model, df: pl.DataFrame) -> dg.AssetCheckResult:
    """A check result for stored data: pass, or fail with the failing rows counted plus examples."""
    try:
        model.validate(df, lazy=True)
        return dg.AssetCheckResult(
            passed=True,
            description=f"every row matches {model.__name__} ({df.height} rows checked)"
            if df.height
            else f"not measured: 0 rows to check against {model.__name__}",
            metadata={"rows": df.height},
        )
    except (pa_errors.SchemaErrors, pa_errors.SchemaError) as err:
        n, examples = _failure_summary(err)
        return dg.AssetCheckResult(
            passed=False,
            description=f"{n} failure case(s) against {model.__name__} in {df.height} rows; "
            f"first: {str(examples[:1])[:300]}",
            metadata={"rows": df.height, "failing_rows": n, "examples": dg.MetadataValue.json(examples)},
        )


def rows_check(
    df: pl.DataFrame,
    bad: pl.Series | pl.Expr,
    what: str,
    id_col: str = "id",
    *,
    verified: str | None = None,
) -> dg.AssetCheckResult:
    """Fail when any row matches `bad` (a boolean expression/series). `what` names what a failing row has
    ("duplicate trace ids"); `verified` is what a pass means (default "no <what>"). The description reads
    as the outcome: "no duplicate trace ids (120 rows checked)" or "3 of 120 rows: duplicate trace ids
    (e.g. id=a1, id=b2)"."""
    mask = df.select(bad).to_series() if isinstance(bad, pl.Expr) else bad
    failing = df.filter(mask.fill_null(False))
    examples = failing.select([c for c in (id_col, "dataset", "source_locator") if c in df.columns]).head(
        N_EXAMPLES
    )
    if failing.height:
        eg = ", ".join(f"{id_col}={v}" for v in examples[id_col].to_list()) if id_col in examples.columns else ""
        description = f"{failing.height} of {df.height} rows: {what}" + (f" (e.g. {eg})" if eg else "")
    elif df.height:
        description = f"{verified or 'no ' + what} ({df.height} rows checked)"
    else:
        description = f"not measured: 0 rows to check for {what}"
    return dg.AssetCheckResult(
        passed=failing.height == 0,
        description=description,
        metadata={
            "rows": df.height,
            "failing_rows": failing.height,
            "examples": dg.MetadataValue.json(examples.to_dicts()),
        },
    )


def keep_rejects(what: str, rejected: pl.DataFrame) -> Path:
    """A stage that fails still loses nothing: its rejected rows go to $CB_DATA_ROOT/_failed/<what>.rejected.parquet."""
    from cb_core.io import data_root, write_parquet

    return write_parquet(rejected, data_root() / "_failed" / f"{what}.rejected.parquet")


def stop_the_line(what: str, n_in: int, rejected: pl.DataFrame, limit: float, metadata: dict | None = None) -> int:
    """Fail before anything is written when more than `limit` of `n_in` rows were rejected as malformed
    (rows excluded by policy do not count); the rejected rows are kept. Returns the malformed count."""
    from cb_core.schemas import stop_the_line as rule

    n_malformed, frac, stop = rule(n_in, rejected, limit)
    if stop:
        kept = keep_rejects(what, rejected)
        malformed = rejected.filter(pl.col("severity") == "malformed")
        examples = malformed.select("dataset", "file", "line", "field", "reason").head(N_EXAMPLES).to_dicts()
        raise dg.Failure(
            f"{what}: {n_malformed}/{n_in} rows malformed ({frac:.1%} > {limit:.0%} stop-the-line); "
            f"nothing written; rejected rows kept in {kept}",
            metadata={
                **(metadata or {}),
                "examples": dg.MetadataValue.json(examples),
                "rejected_rows_file": dg.MetadataValue.path(str(kept)),
            },
        )
    return n_malformed


def check_stage_output(what: str, good: pl.DataFrame, rejected: pl.DataFrame, model, *, n_in: int, limit: float,
                       empty: str) -> None:
    """The end every stage shares before it returns (nothing written on failure, rejected rows kept): an empty
    output fails (``empty`` says what happened), then stop-the-line over ``n_in`` rows read, then both frames
    validated (``good`` against ``model``, ``rejected`` against the quarantine contract)."""
    from cb_core.schemas import QuarantineModel

    if good.height == 0:
        kept = keep_rejects(what, rejected)
        raise dg.Failure(f"{what}: {empty}; nothing written; rejected rows kept in {kept}")
    stop_the_line(what, n_in, rejected, limit)
    validate_or_fail(model, good, what)
    validate_or_fail(QuarantineModel, rejected, f"{what}_quarantine")

