#!/usr/bin/env bash
# The main job on the embedded default: demo data, the project's tiny agent, CPU, local. Installs what it needs.
# Raw data -> traces -> generation -> renders/lossmasks -> curation -> adapter -> eval_scores, then a summary.
# Extra arguments go to `dagster asset materialize`; CB_SELECT changes the selection.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
export DAGSTER_HOME="${DAGSTER_HOME:-$root/dagster_home}"
export CB_DATA_ROOT="${CB_DATA_ROOT:-$root/.cb_data}"
mkdir -p "$DAGSTER_HOME"  # a DAGSTER_HOME of the user's choosing may not exist yet (Dagster requires the folder)
export CB_MODEL="${CB_MODEL:-tiny_agent}"          # generation, training and evaluation on the tiny agent
export CB_EVAL_LIMIT="${CB_EVAL_LIMIT:-16}"        # prompts per eval set: a quick, honest demo figure
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false WANDB_MODE="${WANDB_MODE:-offline}"
export WANDB_SILENT="${WANDB_SILENT:-true}"              # no offline-run summary charts in the demo log
select="${CB_SELECT:-*eval_scores,tiny_agent_model,renders_quarantine,lossmasks_quarantine}"
echo "[cb] materializing '$select' into $CB_DATA_ROOT (model $CB_MODEL, DAGSTER_HOME=$DAGSTER_HOME)"
# INFO, not DEBUG: one line per step and the stages' own progress lines, not hundreds of engine events.
.venv/bin/dagster asset materialize -m cb_assets.definitions --select "$select" \
  --config-json '{"loggers": {"console": {"config": {"log_level": "INFO"}}}}' "$@"
.venv/bin/python -m cb_core.summary "$CB_DATA_ROOT"
