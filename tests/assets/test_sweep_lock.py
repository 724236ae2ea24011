"""Sweep point runs take a shared lock on the data root: many at once, while a writing run is kept out."""
import subprocess
import sys
import time

import pytest

from cb_core.io import DataRootBusy, acquire_data_root, release_data_root

HOLD = ("import sys, time; from cb_core.io import acquire_data_root; "
        "acquire_data_root(sys.argv[1], shared=sys.argv[2] == 'shared', timeout_s=5); print('held', flush=True); "
        "time.sleep(float(sys.argv[3]))")


def _holder(root, mode: str, seconds: float) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(root), mode, str(seconds)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_shared_holders_coexist_and_exclude_writers(tmp_path):
    a = _holder(tmp_path, "shared", 30)
    b = _holder(tmp_path, "shared", 30)  # a second point run gets in at once
    try:
        with pytest.raises(DataRootBusy, match="in use by another run"):
            acquire_data_root(tmp_path, timeout_s=0.5)  # a writing run waits, then fails clearly
    finally:
        for p in (a, b):
            p.kill()
            p.wait()
    t0 = time.monotonic()
    acquire_data_root(tmp_path, timeout_s=5)  # the kernel dropped both shared locks with their processes
    try:
        assert time.monotonic() - t0 < 5
        w = subprocess.run([sys.executable, "-c", HOLD, str(tmp_path), "shared", "0"], capture_output=True,
                           text=True, timeout=60)
        assert w.returncode != 0 and "in use by another run" in w.stderr  # a point run waits for a writer
    finally:
        release_data_root(tmp_path)


def test_sweep_point_runs_carry_the_shared_lock_tag():
    from cb_assets.assets.sweeps import final_seed_job, sweep_point_job
    from cb_assets.io_manager import SHARED_LOCK_TAG

    for job in (sweep_point_job, final_seed_job):
        assert job.tags.get(SHARED_LOCK_TAG[0]) == SHARED_LOCK_TAG[1]
