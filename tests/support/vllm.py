"""The vLLM venv for tests: `.venv-vllm` (built by scripts/test.sh) runs vLLM's CPU engine in a subprocess."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VLLM_PY = Path(os.environ.get("CB_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))


def vllm_python() -> Path:
    """The vLLM venv's python; fails under CI (test.sh must have built it), skips elsewhere."""
    if not VLLM_PY.is_file():
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI: {VLLM_PY} must exist (scripts/test.sh builds .venv-vllm)")
        pytest.skip(f"{VLLM_PY} absent (run scripts/test.sh to build the vLLM venv)")
    return VLLM_PY


def run_vllm_script(script: str, args: list[str], cwd: Path, timeout: float = 1200) -> subprocess.CompletedProcess:
    """Write ``script`` to ``cwd/run_vllm.py`` and run it under the vLLM venv with the checkout importable."""
    py = vllm_python()
    path = cwd / "run_vllm.py"
    path.write_text(script)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "VLLM_TARGET_DEVICE": "cpu",
           "PYTHONPATH": str(ROOT)}
    return subprocess.run([str(py), str(path), *args], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=str(cwd))
