"""Load the data set a config names, with its training and test subsets applied.

``cifar100-lt:IR`` (CIFAR-100-LT): the usual seeded, balanced val split (``--val-size``, 5,000)
is held out first; the training split then keeps n_i = min(floor(500 * IR^(-i/99)), available)
images of class i (``data.subsets.long_tail_indices``); the test split stays the balanced
10,000. The first few classes have ~450 images left after the val split, so their counts are
capped there (IR 100: classes 0-3, about 10,770 training images instead of 10,847). Cached
features are extracted for the whole split once and the rows picked afterwards (as
``--per-class``), so every IR shares one extraction with plain ``cifar100``.

Usage:
    ds = load_data(cfg)          # ImageDataset: train/val/test splits, classes, md5, source
"""

from __future__ import annotations

import torch

from transferlab.config import Config, lt_imbalance_ratio
from transferlab.data.cifar import ImageDataset, load_cifar100
from transferlab.data.folder import load_folder_dataset
from transferlab.data.subsets import long_tail_split, subset_split
from transferlab.plan import uses_feature_cache


def load_data(cfg: Config) -> ImageDataset:
    """The dataset named by ``cfg.data``, with its training and test subsets applied."""
    d = cfg.data
    if d.dataset == "cifar100" or d.dataset.startswith("cifar100-lt:"):
        ds = load_cifar100(d.data_dir, d.download, d.split_seed, d.val_size)
        if d.dataset.startswith("cifar100-lt:") and not uses_feature_cache(cfg):
            ds.train = long_tail_split(ds.train, lt_imbalance_ratio(d.dataset))
    else:
        ds = load_folder_dataset(d)  # the decode transform is set once the plan is known
    if d.train_subset and d.train_subset < len(ds.train):
        ds.train = _take(ds.train, _seeded_subset(len(ds.train), d.train_subset, d.split_seed + 1))
    if d.per_class and not uses_feature_cache(cfg):  # cached features pick their rows later
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
