"""Asset tags, defined once: where an asset's work runs (`cb/compute`) and what a GPU run asks SLURM for.

The SLURM run launcher sends a run to SLURM when any selected asset has ``cb/compute: gpu``; the
``slurm/*`` tags are that asset's request (the launcher adds up the times of the assets in one run)."""
from __future__ import annotations

COMPUTE_TAG = "cb/compute"
CPU, GPU = "cpu", "gpu"
GPU_GRES = "gpu.1"  # one GPU per run (tag values cannot hold ':'; the launcher reads '.' as ':')


def cpu_tags(tier: str | None = None) -> dict[str, str]:
    """Tags of an in-process CPU asset (`tier`: A, B or C where the asset is a data tier)."""
    return {**({"cb/tier": tier} if tier else {}), COMPUTE_TAG: CPU}


def gpu_tags(time: str) -> dict[str, str]:
    """Tags of a GPU asset: one GPU, and its SLURM time limit (``HH.MM.SS``, '.' for ':')."""
    return {COMPUTE_TAG: GPU, "slurm/gres": GPU_GRES, "slurm/time": time}
