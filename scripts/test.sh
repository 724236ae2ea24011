#!/usr/bin/env bash
# The test suite: installs system packages (SLURM, munge, PostgreSQL, Chromium) when root, the Python
# env with test extras, then runs pytest on both cores. Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  need=""
  for pkg in slurmctld slurmd slurm-client munge postgresql chromium; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need="$need $pkg"
  done
  if [ -n "$need" ]; then
    echo "[cb] apt-get install$need"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $need >/dev/null
  fi
fi
bash scripts/setup.sh dev
[ "${CB_SKIP_VLLM:-0}" = 1 ] || bash scripts/setup.sh vllm  # .venv-vllm for the `vllm` tests (cached)
export HF_HUB_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
# Build the offline Llama-3 tokenizer once, before the workers start.
.venv/bin/python -c "from cb_core.tokenizer import llama3_tokenizer; llama3_tokenizer()"
# Build (or reuse from the cache) the tiny agent once, so no two workers train it at the same time.
.venv/bin/python -c "from cb_core.generate.tiny_agent import tiny_agent_dir; print('[cb] tiny agent:', tiny_agent_dir())"
# Import floors (.importlinter): cb_core never imports Dagster or cb_assets; each floor only the ones below.
.venv/bin/lint-imports
.venv/bin/python -m pytest -n "${CB_TEST_WORKERS:-2}" --dist loadgroup -q -rs "$@"
