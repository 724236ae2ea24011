"""The one place Dagster definitions are assembled: `dagster ... -m cb_assets.definitions`."""
import dagster as dg

from cb_assets import assets as asset_pkg
from cb_assets import automation
from cb_assets.resources import default_resources

defs = dg.Definitions(
    assets=dg.load_assets_from_package_module(asset_pkg),
    asset_checks=dg.load_asset_checks_from_package_module(asset_pkg),
    resources=default_resources(),
    jobs=automation.jobs,
    schedules=automation.schedules,
    sensors=automation.sensors,
    # In-process: per-step subprocesses cost seconds of imports each on small machines, and a SLURM job
    # should run its steps inside its own allocation.
    executor=dg.in_process_executor,
)
