"""Resources: thin Dagster wrappers over cb_core configuration (same field names as the YAML)."""
from __future__ import annotations

from pathlib import Path

import dagster as dg

from cb_core.config import DatasetsConfig, SourceSelection
from cb_core.io import data_root


class DatasetsResource(dg.ConfigurableResource):
    """Tier A source configuration: configs/<config_file>, overridden by CB_* environment variables
    (read when a run starts, so `CB_DATASETS=agentdojo dagster asset materialize ...` works)."""

    config_file: str = "datasets.yaml"

    def config(self) -> DatasetsConfig:
        return DatasetsConfig.load(self.config_file)

    def selection(self) -> SourceSelection:
        return self.config().selection()

    def data_root(self) -> Path:
        return data_root()


def default_resources() -> dict:
    from cb_assets.io_manager import ParquetIOManager

    return {"io_manager": ParquetIOManager(), "datasets": DatasetsResource()}
