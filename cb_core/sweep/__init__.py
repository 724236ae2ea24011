"""Sweeps: manifests expanded into keyed grid points, the leaderboard (selection metric among gated points,
Pareto front, CSV/Parquet, trade-off plot) and the seed fan-out's release statistics. No Dagster import."""

POINTS_TABLE = "sweep_points"  # $CB_DATA_ROOT/sweep_points.parquet: key -> hyper-parameters (partitions carry none)
SWEEP_DIR = "sweeps"  # $CB_DATA_ROOT/sweeps/<key>/: one point's adapter, eval_scores.parquet, details
