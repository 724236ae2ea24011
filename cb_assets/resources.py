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


class ModelResource(dg.ConfigurableResource):
    """The model profile (configs/models/<profile>.yaml); ``CB_MODEL`` overrides ``profile`` at run time.
    ``tokenizer()`` is cached per process (building the offline Llama-3 tokenizer takes seconds)."""

    profile: str = "tiny"

    def profile_name(self) -> str:
        from cb_core.model import profile_name

        return profile_name(self.profile)

    def model_profile(self):
        from cb_core.model import load_profile

        return load_profile(self.profile_name())

    def tokenizer(self):
        return _cached_tokenizer(self.profile_name())


_TOKENIZERS: dict = {}


def _cached_tokenizer(profile: str):
    if profile not in _TOKENIZERS:
        from cb_core.model import load_profile_tokenizer

        _TOKENIZERS[profile] = load_profile_tokenizer(profile)
    return _TOKENIZERS[profile]


def default_resources() -> dict:
    from cb_assets.io_manager import ParquetIOManager

    return {"io_manager": ParquetIOManager(), "datasets": DatasetsResource(), "model": ModelResource()}
