"""Circuit-breaker training: losses (pure functions), config presets, the data loader, the trainer and the
torchrun / Dagster Pipes worker. See README "Training"."""
