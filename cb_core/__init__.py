"""cb_core: the circuit-breaker data/training library. Plain Python; never imports Dagster."""
__version__ = "0.1.0"
INGEST_VERSION = "etl_a/1"
