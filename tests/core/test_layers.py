"""The import floors of .importlinter hold (cb_core never imports Dagster or cb_assets; each floor imports only
the ones below it), so a plain `pytest` run catches a new upward import too, not only scripts/test.sh."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_import_floors_hold():
    exe = Path(sys.executable).with_name("lint-imports")
    cmd = [str(exe)] if exe.is_file() else [shutil.which("lint-imports") or pytest.skip("import-linter not installed")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout and "3 kept" in proc.stdout, proc.stdout[-2000:]
