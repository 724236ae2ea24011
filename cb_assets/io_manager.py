"""Parquet IO manager: every tier is `$CB_DATA_ROOT/<asset key>.parquet`, written atomically.

A `SourceResult` (Tier A) is stored as two tables: `<key>.parquet` (good rows) and
`<key>.rejected.parquet` (its quarantine rows), so `traces` and `quarantine` can both read it back.
"""
from __future__ import annotations

from pathlib import Path

import dagster as dg
import polars as pl

from cb_core.io import data_root, write_parquet
from cb_core.schemas import empty_quarantine
from cb_core.sources import SourceResult


class ParquetIOManager(dg.ConfigurableIOManager):
    """Root defaults to $CB_DATA_ROOT (else ./.cb_data), read at run time so tests and users can move it."""

    root: str | None = None

    def _root(self) -> Path:
        return Path(self.root).resolve() if self.root else data_root()

    def path_for(self, key: dg.AssetKey, suffix: str = ".parquet") -> Path:
        return self._root() / ("__".join(key.path) + suffix)

    def handle_output(self, context: dg.OutputContext, obj) -> None:
        if obj is None:
            return
        key = context.asset_key
        if isinstance(obj, SourceResult):
            write_parquet(obj.rejected, self.path_for(key, ".rejected.parquet"))
            path = write_parquet(obj.good, self.path_for(key))
            rows = obj.good.height
        elif isinstance(obj, pl.DataFrame):
            path = write_parquet(obj, self.path_for(key))
            rows = obj.height
        else:
            raise TypeError(f"ParquetIOManager stores polars DataFrames or SourceResults, got {type(obj)}")
        context.add_output_metadata({"path": dg.MetadataValue.path(str(path)), "rows": rows})

    def load_input(self, context: dg.InputContext):
        key = context.asset_key
        path = self.path_for(key)
        if not path.exists():
            raise FileNotFoundError(
                f"{path} does not exist: materialize asset '{key.to_user_string()}' first "
                f"(or point CB_DATA_ROOT at the folder that holds it)"
            )
        good = pl.read_parquet(path)
        wants_result = context.dagster_type.typing_type is SourceResult or (
            (context.definition_metadata or {}).get("cb/load") == "source_result"
        )
        if wants_result:
            rejected_path = self.path_for(key, ".rejected.parquet")
            rejected = pl.read_parquet(rejected_path) if rejected_path.exists() else empty_quarantine()
            return SourceResult(good=good, rejected=rejected)
        return good
