"""A tiny code location for the SLURM launcher tests and bench: GPU-tagged and CPU-only assets.

Each asset writes a JSON proof file ``$CB_SLURM_PROOF_DIR/<asset>.<run_id>.json`` with the SLURM
environment it saw (SLURM_JOB_ID, CUDA_VISIBLE_DEVICES, SLURM_JOB_GPUS, pid) and returns the same
dict as output metadata.
"""

import json
import os
import socket
import time
from pathlib import Path

import dagster as dg

from cb_assets.tags import gpu_tags

GPU_TAGS = gpu_tags("00.10.00")


def _proof(context: dg.AssetExecutionContext, name: str) -> dict:
    info = {
        "asset": name,
        "run_id": context.run_id,
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "host": socket.gethostname(),
        "t": time.time(),
        **{k: os.environ.get(k) for k in ("SLURM_JOB_ID", "CUDA_VISIBLE_DEVICES", "SLURM_JOB_GPUS", "DAGSTER_HOME")},
    }
    proof_dir = Path(os.environ.get("CB_SLURM_PROOF_DIR", "/tmp/cb_slurm_proof"))
    proof_dir.mkdir(parents=True, exist_ok=True)
    (proof_dir / f"{name}.{context.run_id}.json").write_text(json.dumps(info))
    return info


def _meta(info: dict) -> dict:
    return {k: dg.MetadataValue.text(str(v)) for k, v in info.items()}


@dg.asset(tags=GPU_TAGS)
def gpu_asset(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    return dg.MaterializeResult(metadata=_meta(_proof(context, "gpu_asset")))


@dg.asset(tags=GPU_TAGS)
def slow_gpu_asset(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    info = _proof(context, "slow_gpu_asset")
    deadline = time.time() + float(os.environ.get("CB_SLOW_ASSET_SECONDS", "120"))
    while time.time() < deadline:
        time.sleep(0.2)
    return dg.MaterializeResult(metadata=_meta(info))


@dg.asset(tags={"cb/compute": "gpu", "slurm/gpus": "2"})
def two_gpu_asset(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    return dg.MaterializeResult(metadata=_meta(_proof(context, "two_gpu_asset")))


@dg.asset(tags={"cb/compute": "gpu", "slurm/gres": "none"})
def bench_asset(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    """GPU-routed but without a gres request (the bench runs 20 at once on a one-GPU node)."""
    return dg.MaterializeResult(metadata=_meta(_proof(context, "bench_asset")))


@dg.asset
def cpu_asset(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    return dg.MaterializeResult(metadata=_meta(_proof(context, "cpu_asset")))


defs = dg.Definitions(
    assets=[gpu_asset, slow_gpu_asset, two_gpu_asset, bench_asset, cpu_asset],
    jobs=[
        dg.define_asset_job("gpu_job", selection=["gpu_asset"]),
        dg.define_asset_job("cpu_job", selection=["cpu_asset"]),
    ],
    executor=dg.in_process_executor,
)
