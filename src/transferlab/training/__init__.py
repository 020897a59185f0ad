"""Training: optimisers and schedules, atomic checkpoints, the epoch loop, fit() and --tune."""
