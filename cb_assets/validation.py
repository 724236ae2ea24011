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
        return dg.AssetCheckResult(passed=True, metadata={"rows": df.height})
    except (pa_errors.SchemaErrors, pa_errors.SchemaError) as err:
        n, examples = _failure_summary(err)
        return dg.AssetCheckResult(
            passed=False,
            metadata={"rows": df.height, "failing_rows": n, "examples": dg.MetadataValue.json(examples)},
        )


def rows_check(df: pl.DataFrame, bad: pl.Series | pl.Expr, what: str, id_col: str = "id") -> dg.AssetCheckResult:
    """Fail when any row matches `bad` (a boolean expression/series); report count + example ids."""
    mask = df.select(bad).to_series() if isinstance(bad, pl.Expr) else bad
    failing = df.filter(mask)
    examples = failing.select([c for c in (id_col, "dataset", "source_locator") if c in df.columns]).head(
        N_EXAMPLES
    )
    return dg.AssetCheckResult(
        passed=failing.height == 0,
        description=what,
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
    malformed = rejected.filter(pl.col("severity") == "malformed")
    frac = malformed.height / n_in if n_in else 0.0
    if n_in and frac > limit:
        kept = keep_rejects(what, rejected)
        examples = malformed.select("dataset", "file", "line", "field", "reason").head(N_EXAMPLES).to_dicts()
        raise dg.Failure(
            f"{what}: {malformed.height}/{n_in} rows malformed ({frac:.1%} > {limit:.0%} stop-the-line); "
            f"nothing written; rejected rows kept in {kept}",
            metadata={
                **(metadata or {}),
                "examples": dg.MetadataValue.json(examples),
                "rejected_rows_file": dg.MetadataValue.path(str(kept)),
            },
        )
    return malformed.height
