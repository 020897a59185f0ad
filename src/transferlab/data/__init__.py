"""Data: CIFAR loading, in-memory batched loader, on-device augmentation, preprocessing."""
