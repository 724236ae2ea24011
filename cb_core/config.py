"""Configuration: YAML in configs/ -> plain dataclasses here -> Dagster resources with the same names.

Environment variables override YAML (CB_DATA_ROOT, CB_DATASETS, CB_<SOURCE>_PATH, ...).
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cb_core.schemas import DATASETS

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = Path(os.environ.get("CB_CONFIG_DIR", PROJECT_ROOT / "configs"))

SOURCE_ENV = {
    "fujitsu_b4": "CB_FUJITSU_B4_PATH",
    "agentdojo": "CB_AGENTDOJO_PATH",
    "llmail_inject": "CB_LLMAIL_PATH",
    "tau2": "CB_TAU2_PATH",
    "ultrachat": "CB_ULTRACHAT_PATH",
    "xstest": "CB_XSTEST_PATH",
}


class ConfigError(ValueError):
    """A configuration problem the user must fix; the message says what to set."""


def load_yaml(name: str | Path) -> dict[str, Any]:
    path = Path(name)
    if not path.is_absolute():
        path = CONFIG_DIR / path
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f) or {}


def config_path(rel: str | Path) -> Path:
    """Resolve a path named in a config file: absolute as is, else relative to the project root."""
    p = Path(os.path.expanduser(str(rel)))
    return p if p.is_absolute() else PROJECT_ROOT / p


def resolve_source_paths(spec: str | Path) -> list[Path]:
    """A file, a folder (its files, sorted) or a glob. Names with spaces and brackets work: a path that
    exists is taken literally before any glob expansion."""
    p = Path(os.path.expanduser(str(spec)))
    if p.is_file():
        return [p]
    if p.is_dir():
        return sorted(x for x in p.iterdir() if x.is_file() and not x.name.startswith("."))
    return sorted(Path(x) for x in glob.glob(str(p), recursive=True) if Path(x).is_file())


@dataclass
class SourceSelection:
    """Which sources run and from where. `demo` means no path was configured anywhere: the embedded
    synthetic sample is used instead."""

    paths: dict[str, str | None]
    selected: list[str]
    demo: bool
    explicit: bool  # CB_DATASETS was given

    def path_for(self, dataset: str) -> str:
        path = self.paths.get(dataset)
        if not path:
            raise ConfigError(
                f"source '{dataset}' is selected but has no path: set {SOURCE_ENV[dataset]} "
                f"(or sources.{dataset}.path in configs/datasets.yaml), or drop it from CB_DATASETS"
            )
        return path


@dataclass
class DatasetsConfig:
    sources: dict[str, dict[str, Any]] = field(default_factory=dict)
    agentdojo: dict[str, Any] = field(default_factory=dict)
    llmail_inject: dict[str, Any] = field(default_factory=dict)
    fujitsu_b4: dict[str, Any] = field(default_factory=dict)
    tau2: dict[str, Any] = field(default_factory=dict)
    ultrachat: dict[str, Any] = field(default_factory=dict)
    xstest: dict[str, Any] = field(default_factory=dict)
    stop_the_line: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, name: str = "datasets.yaml") -> "DatasetsConfig":
        raw = load_yaml(name)
        known = {k: raw.get(k) or {} for k in cls.__dataclass_fields__}
        return cls(**known)

    @property
    def max_reject_fraction(self) -> float:
        return float(self.stop_the_line.get("max_reject_fraction", 0.10))

    def selection(self, env: dict[str, str] | None = None) -> SourceSelection:
        env = dict(os.environ if env is None else env)
        paths: dict[str, str | None] = {}
        for ds in DATASETS:
            val = env.get(SOURCE_ENV[ds]) or (self.sources.get(ds) or {}).get("path")
            paths[ds] = str(config_path(val)) if val else None
        raw_sel = env.get("CB_DATASETS", "").strip()
        if raw_sel:
            selected = [s.strip() for s in raw_sel.split(",") if s.strip()]
            unknown = [s for s in selected if s not in DATASETS]
            if unknown:
                raise ConfigError(
                    f"CB_DATASETS names unknown source(s) {unknown}; known: {', '.join(DATASETS)}"
                )
            return SourceSelection(paths, selected, demo=False, explicit=True)
        configured = [ds for ds in DATASETS if paths[ds]]
        if not configured:
            return SourceSelection(paths, list(DATASETS), demo=True, explicit=False)
        return SourceSelection(paths, configured, demo=False, explicit=False)
