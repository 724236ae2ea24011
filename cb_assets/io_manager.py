"""Parquet IO manager: every tier is `$CB_DATA_ROOT/<asset key>.parquet`, written atomically.

A `SourceResult` (Tier A, renders, lossmasks) is stored as two tables published together:
`<key>.parquet` (good rows) and `<key>.rejected.parquet` (its quarantine rows), so `traces` and
`quarantine` can both read it back and never see a new `rejected` beside an old table.

The IO manager is the one resource every run initializes, so it holds the data-root lock for the run:
taken when the run starts (before any asset reads an upstream table), released when it ends.
"""
from __future__ import annotations

from pathlib import Path

import dagster as dg
import polars as pl

from cb_core.io import (
    acquire_data_root,
    data_root,
    journal_path,
    publish_together,
    recover_publishes,
    release_data_root,
    write_parquet,
)
from cb_core.schemas import empty_quarantine, empty_traces
from cb_core.sources import SourceResult

# Generated trace tables (cb_assets/assets/generation.py): read as an empty trace table until materialized.
GENERATED_ASSETS = ("ds_completions", "dr_completions", "adversarial_safe")
SHARED_LOCK_TAG = ("cb/data_root_lock", "shared")  # run tag: a reader's (shared) lock on the data root


class ParquetIOManager(dg.ConfigurableIOManager):
    """Root defaults to $CB_DATA_ROOT (else ./.cb_data), read at run time so tests and users can move it.
    `lock_timeout_s` (overridden by $CB_LOCK_TIMEOUT) bounds how long a run waits for another run's lock."""

    root: str | None = None
    lock_timeout_s: float | None = None

    def _root(self) -> Path:
        return Path(self.root).resolve() if self.root else data_root()

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        run_id = context.run.run_id if context.run else ""
        # Sweep point runs (tag cb/data_root_lock=shared) read the tiers and write only their own folder:
        # many run at once under a shared lock, which still keeps every writing run out.
        shared = bool(context.run and context.run.tags.get(SHARED_LOCK_TAG[0]) == SHARED_LOCK_TAG[1])
        info = acquire_data_root(self._root(), run_id=run_id, timeout_s=self._timeout(), shared=shared)
        if context.log and info.get("waited_s", 0) >= 0.5:
            context.log.info(f"waited {info['waited_s']:.1f}s for the lock on data root {info['root']}")
        if context.log and (info.get("recovered") or info.get("removed_temps")):
            context.log.info(
                f"data root {info['root']}: finished {len(info['recovered'])} interrupted publish(es), "
                f"removed {len(info['removed_temps'])} stale temp file(s)"
            )

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        release_data_root(self._root())

    def _timeout(self) -> float | None:
        import os

        from cb_core.io import LOCK_TIMEOUT_ENV

        return None if os.environ.get(LOCK_TIMEOUT_ENV) or self.lock_timeout_s is None else self.lock_timeout_s

    def path_for(self, key: dg.AssetKey, suffix: str = ".parquet") -> Path:
        return self._root() / ("__".join(key.path) + suffix)

    def _clear_failed(self, key: dg.AssetKey) -> None:
        """The asset succeeded: rejected rows kept from an earlier failed attempt are no longer current."""
        failed = self._root() / "_failed"
        if failed.is_dir():
            for p in failed.glob("__".join(key.path) + ".*"):
                p.unlink(missing_ok=True)

    def handle_output(self, context: dg.OutputContext, obj) -> None:
        if obj is None:
            return
        key = context.asset_key
        if isinstance(obj, SourceResult):
            path, _ = publish_together(
                {self.path_for(key): obj.good, self.path_for(key, ".rejected.parquet"): obj.rejected}
            )
            rows = obj.good.height
        elif isinstance(obj, pl.DataFrame):
            path = write_parquet(obj, self.path_for(key))
            rows = obj.height
        else:
            raise TypeError(f"ParquetIOManager stores polars DataFrames or SourceResults, got {type(obj)}")
        self._clear_failed(key)
        context.add_output_metadata({"path": dg.MetadataValue.path(str(path)), "rows": rows})

    def load_input(self, context: dg.InputContext):
        key = context.asset_key
        path = self.path_for(key)
        if journal_path(path).exists():  # an interrupted publish: finish it before reading either table
            recover_publishes(path.parent)
        if not path.exists() and key.to_user_string() in GENERATED_ASSETS:
            # generated tiers are optional upstreams of renders/lossmasks: never materialized = no rows
            # (the downstream metadata says "not materialized"), so ETL-only data still runs end to end
            return empty_traces()
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
