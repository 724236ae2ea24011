"""Shared fixtures. Expensive things (tokenizer, tiny model, SLURM) are session-scoped."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("CB_SHARED_DATA", PROJECT_ROOT.parent / "shared" / "data"))


# Markers that follow from what a test uses (never file-wide): a test whose fixtures reach the local SLURM
# cluster is `slurm`, one that reads ../shared/data is `shared_data`; cluster-free and synthetic tests in
# the same files are neither.
_FIXTURE_MARKERS = {"slurm_cluster": "slurm", "shared_data": "shared_data"}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        for fixture, marker in _FIXTURE_MARKERS.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(marker)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (real public records); tests that need it skip cleanly where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder not present: {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def data_root(tmp_path, monkeypatch) -> Path:
    """A fresh CB_DATA_ROOT, with every source variable cleared so tests never see the user's setup."""
    root = tmp_path / "cb_data"
    root.mkdir()
    monkeypatch.setenv("CB_DATA_ROOT", str(root))
    for var in list(os.environ):
        if var.startswith("CB_") and var.endswith("_PATH") or var == "CB_DATASETS":
            monkeypatch.delenv(var, raising=False)
    return root


@pytest.fixture(scope="session")
def llama_tokenizer():
    """The real Llama-3 tokenizer, converted offline from llama-models' tokenizer.model (cached on disk)."""
    from cb_core.tokenizer import llama3_tokenizer

    return llama3_tokenizer()


@pytest.fixture(scope="session")
def tiny_model(llama_tokenizer):
    """A tiny random-weight LlamaForCausalLM with the real tokenizer's vocabulary."""
    from cb_core.model import tiny_llama

    return tiny_llama(llama_tokenizer, seed=0)
