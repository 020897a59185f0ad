"""Training: optimisers and schedules, precision, atomic checkpoints, the epoch loop, and fit()."""
