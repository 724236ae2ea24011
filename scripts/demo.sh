#!/usr/bin/env bash
# The main job on the embedded default: demo data, tiny model, CPU, local. Installs what it needs.
# Extra arguments go to `dagster asset materialize` (default selection: every CPU asset).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
export DAGSTER_HOME="${DAGSTER_HOME:-$root/dagster_home}"
export CB_DATA_ROOT="${CB_DATA_ROOT:-$root/.cb_data}"
export HF_HUB_OFFLINE=1 WANDB_MODE="${WANDB_MODE:-offline}"
select="${CB_SELECT:-tag:cb/compute=cpu}"
echo "[cb] materializing '$select' into $CB_DATA_ROOT (DAGSTER_HOME=$DAGSTER_HOME)"
.venv/bin/dagster asset materialize -m cb_assets.definitions --select "$select" "$@"
if [ -z "${CB_SELECT:-}" ] && [ "${CB_SKIP_TRAIN:-0}" != "1" ]; then
  # the GPU-tagged adapter, in-process on CPU here (preset $CB_TRAIN_PRESET, default `tiny` on tiny_agent)
  echo "[cb] training the circuit breaker: adapter (preset ${CB_TRAIN_PRESET:-tiny})"
  .venv/bin/dagster asset materialize -m cb_assets.definitions --select adapter
  .venv/bin/python -m cb_core.train "$CB_DATA_ROOT"
fi
.venv/bin/python -m cb_core.summary "$CB_DATA_ROOT"
