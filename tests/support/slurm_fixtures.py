"""pytest plugin for the SLURM launcher tests (``pytest_plugins = ["tests.support.slurm_fixtures"]``): the session
cluster. The helpers themselves live in cb_assets.testing.slurm (bench/slurm_launch.py uses them too).

- ``slurm_cluster``: a private single-node SLURM started by scripts/slurm_local.sh (skipped with a
  reason when not root or the Debian packages cannot be installed), stopped at session end.
"""
from __future__ import annotations

import os
import shutil

import pytest

from cb_assets.testing.slurm import start_cluster, stop_cluster


@pytest.fixture(scope="session")
def slurm_cluster():
    try:
        cluster = start_cluster()
    except (PermissionError, RuntimeError) as e:
        pytest.skip(f"local SLURM unavailable: {e}")
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = cluster.conf
    try:
        yield cluster
    finally:
        stop_cluster(cluster)
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old
        shutil.rmtree(cluster.dir, ignore_errors=True)
