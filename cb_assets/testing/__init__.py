"""Support for the tests and benchmarks (never imported by the definitions): a private SLURM cluster, a
Dagster home launching through SlurmRunLauncher, and the tiny code location its runs execute."""
