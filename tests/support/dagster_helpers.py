"""Run a selection of the real definitions in-process (what `dagster asset materialize` does)."""
import dagster as dg

from cb_assets.definitions import defs


def materialize_keys(keys, raise_on_error=True, instance=None):
    job = defs.resolve_implicit_global_asset_job_def()
    return job.execute_in_process(
        asset_selection=[dg.AssetKey(k) for k in keys], raise_on_error=raise_on_error, instance=instance
    )
