#!/usr/bin/env bash
# Create (or reuse) .venv and install the platform. Usage: scripts/setup.sh [dev]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv
fi
extras=""
[ "${1:-}" = "dev" ] && extras="[dev]"
stamp=".venv/.cb_installed${extras:+_dev}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -c scripts/constraints-cpu.txt torch==2.13.0
  .venv/bin/python -m pip install -q -c scripts/constraints-cpu.txt -e ".${extras}"
  touch "$stamp"
fi
