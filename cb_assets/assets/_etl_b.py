"""Shared by the ETL_B asset modules (renders.py, lossmasks.py): their group, the generated inputs, metadata."""
import dagster as dg
import polars as pl

ETL_B_GROUP = "etl_b"
# Generated trace tables enter renders and lossmasks as asset inputs (an unmaterialized one reads as empty).
GENERATED_INS = {name: dg.AssetIn(name) for name in ("ds_completions", "dr_completions", "adversarial_safe")}


def by_reason(q: pl.DataFrame) -> dg.MetadataValue:
    return dg.MetadataValue.json(q.group_by("reason").len().sort("len", descending=True).head(20).to_dicts())
