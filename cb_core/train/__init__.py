"""Circuit-breaker training: losses (pure functions), config presets, the data loader, the trainer and the
torchrun / Dagster Pipes worker. See README "Training"."""

import os
from pathlib import Path

ADAPTER_DIR = "adapter"  # $CB_DATA_ROOT/adapter: the published adapter (peft layout) + its run's summary files
RUNS_DIR = "train_runs"  # $CB_DATA_ROOT/train_runs/<run name>: every training run's folder; `latest` links


def adapter_dir(root: str | Path | None = None) -> Path:
    """Where the `adapter` asset publishes: adapter_model.safetensors, adapter_config.json, config.yaml,
    final_metrics.json, history.parquet, curves.png, run.json (the run folder it came from)."""
    base = Path(root) if root else Path(os.environ.get("CB_DATA_ROOT", ".cb_data"))
    return base.resolve() / ADAPTER_DIR
