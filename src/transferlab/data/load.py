"""Load the data set a config names, with its training and test subsets applied.

Usage:
    ds = load_data(cfg)          # ImageDataset: train/val/test splits, classes, md5, source
"""

from __future__ import annotations

import torch

from transferlab.config import Config
from transferlab.data.cifar import ImageDataset, load_cifar100
from transferlab.plan import uses_feature_cache


def load_data(cfg: Config) -> ImageDataset:
    """The dataset named by ``cfg.data``, with its training and test subsets applied."""
    d = cfg.data
    if d.dataset == "cifar100":
        ds = load_cifar100(d.data_dir, d.download, d.split_seed, d.val_size)
    else:
        from transferlab.data.folder import load_folder_dataset

        ds = load_folder_dataset(d)  # the decode transform is set once the plan is known
    if d.train_subset and d.train_subset < len(ds.train):
        ds.train = _take(ds.train, _seeded_subset(len(ds.train), d.train_subset, d.split_seed + 1))
    if d.per_class and not uses_feature_cache(cfg):  # cached features pick their rows later
        from transferlab.data.subsets import subset_split

        ds.train = subset_split(ds.train, d.per_class, d.subset_seed)
    if d.test_subset and d.test_subset < len(ds.test):  # the first N: CIFAR's test file is
        ds.test = _take(ds.test, torch.arange(d.test_subset))  # shuffled; indices stay valid
    return ds


def _seeded_subset(n: int, k: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k]


def _take(split, idx: torch.Tensor):
    if hasattr(split, "subset"):  # folder split: paths + labels
        return split.subset(idx)
    return type(split)(split.images[idx], split.labels[idx])
