"""cb_assets: the Dagster layer over cb_core. Definitions live in cb_assets.definitions."""
