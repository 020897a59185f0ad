"""Stratified, nested training subsets for data-efficiency studies.

For one seed, every class gets one seeded permutation of its images; a subset of ``k`` images per
class takes the first ``k`` entries of each permutation. The permutation does not depend on ``k``,
so the 4-per-class subset lies inside the 16-per-class subset for the same seed, and a study's
curve over sizes reads as "add more images", not "draw a new sample" at each size.

Two places apply it (experiment.py): the pixel path trains on ``subset_split(ds.train, ...)``,
and the cached-feature path extracts the whole training split once and picks the rows with
``select_per_class(features, labels, ...)``, so every size and seed reuses one cache entry.

Usage:
    idx = nested_stratified_indices(ds.train.labels, per_class=16, seed=0)
    images, labels = ds.train.images[idx], ds.train.labels[idx]
    train = subset_split(ds.train, per_class=16, seed=0)      # a new split; ds is not changed
    feats, labels = select_per_class(feats, labels, per_class=16, seed=0)
    rows = union_indices(ds.train.labels, per_class=16, seeds=3)   # what a study extracts
"""

from __future__ import annotations

import torch

from transferlab.errors import UserError


def class_counts(labels: torch.Tensor) -> dict[int, int]:
    """Number of images per class label present in ``labels`` (a 1-D integer tensor)."""
    classes, counts = torch.unique(labels, return_counts=True)
    return {int(c): int(n) for c, n in zip(classes.tolist(), counts.tolist(), strict=True)}


def nested_stratified_indices(labels: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
    """Sorted indices of ``per_class`` images of every class, nested across ``per_class``.

    ``labels``: 1-D integer tensor of the training split's labels. Classes are visited in
    ascending label order and each draws its permutation from one generator seeded with
    ``seed``, so the draw for a class does not depend on ``per_class``.
    """
    if labels.ndim != 1:
        raise UserError(f"labels must be a 1-D tensor; got shape {tuple(labels.shape)}")
    if per_class <= 0:
        raise UserError(f"--per-class must be positive; got {per_class}")
    counts = class_counts(labels)
    if not counts:
        raise UserError("cannot draw a per-class subset from an empty training split")
    smallest = min(counts, key=lambda c: (counts[c], c))
    if per_class > counts[smallest]:
        raise UserError(
            f"--per-class {per_class} is larger than class {smallest}, which has "
            f"{counts[smallest]} training images; use at most {counts[smallest]}"
        )
    g = torch.Generator().manual_seed(seed)
    chosen = []
    for c in sorted(counts):
        members = torch.nonzero(labels == c, as_tuple=False).flatten()
        perm = torch.randperm(len(members), generator=g)
        chosen.append(members[perm[:per_class]])
    return torch.sort(torch.cat(chosen)).values


def subset_split(split, per_class: int, seed: int):
    """A new split of ``per_class`` images per class (in-memory ``Split`` or ``FolderSplit``).

    The given split is left unchanged, so one loaded dataset can serve every cell of a study.
    """
    idx = nested_stratified_indices(split.labels, per_class, seed)
    if hasattr(split, "subset"):  # folder split: paths + labels
        return split.subset(idx)
    return type(split)(split.images[idx], split.labels[idx])


def take_rows(split, idx: torch.Tensor):
    """A new split of the rows ``idx`` (in-memory ``Split`` or ``FolderSplit``)."""
    if hasattr(split, "subset"):  # folder split: paths + labels
        return split.subset(idx)
    return type(split)(split.images[idx], split.labels[idx])


def union_indices(labels: torch.Tensor, per_class: int, seeds: int) -> torch.Tensor:
    """Sorted indices of every image in the ``per_class`` subsets of seeds ``0..seeds-1``.

    The subsets are nested across sizes, so this union holds every smaller size's subset of
    those seeds too: the rows a study without ``all`` trains on (its frozen arms extract only
    these).
    """
    parts = [nested_stratified_indices(labels, per_class, s) for s in range(seeds)]
    return torch.unique(torch.cat(parts))  # sorted


def select_rows_per_class(
    features: torch.Tensor,
    rows: torch.Tensor,
    all_labels: torch.Tensor,
    per_class: int,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-class subset's rows of features extracted for ``rows`` only (``union_indices``).

    ``all_labels``: the whole training split's labels, from which the subset is drawn as
    :func:`subset_split` draws it; ``rows``: the sorted split indices the features belong to.
    """
    idx = nested_stratified_indices(all_labels.cpu(), per_class, seed)
    pos = torch.searchsorted(rows, idx).clamp(max=len(rows) - 1)
    if not torch.equal(rows[pos], idx):
        raise UserError(
            f"the {per_class}-per-class subset of seed {seed} is not among the extracted rows"
        )
    return features[pos.to(features.device)], all_labels[idx].to(features.device)


def select_per_class(
    features: torch.Tensor, labels: torch.Tensor, per_class: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of cached training features (N, D) or (N, views, D) for the per-class subset.

    Picks the same images as :func:`subset_split` on the split the features came from, because
    both draw from the labels in their original order.
    """
    idx = nested_stratified_indices(labels.cpu(), per_class, seed).to(labels.device)
    return features[idx], labels[idx]


LT_MAX_PER_CLASS = 500  # CIFAR-100's images per class: n_0 of the long-tailed profile


def long_tail_counts(ir: float, num_classes: int = 100, n_max: int = LT_MAX_PER_CLASS) -> list[int]:
    """Images of class i in CIFAR-100-LT: floor(n_max * IR^(-i / (C - 1))) (Cao et al., LDAM,
    NeurIPS 2019, and Cui et al. 2019: the exponential profile; IR = n_0 / n_{C-1})."""
    return [int(n_max * ir ** (-i / (num_classes - 1))) for i in range(num_classes)]


def long_tail_indices(labels: torch.Tensor, ir: float) -> torch.Tensor:
    """Sorted indices of the long-tailed subset of a training split (deterministic).

    Class i keeps its first min(n_i, available) images in split order. The split order is
    already the seeded permutation of ``--split-seed``, so that is a seeded draw; and it depends
    on the labels alone, so pixels and cached features pick the same images.
    """
    num_classes = int(labels.max()) + 1
    want = long_tail_counts(ir, num_classes)
    chosen = []
    for c, n in enumerate(want):
        members = torch.nonzero(labels == c, as_tuple=False).flatten()
        chosen.append(members[:n])
    return torch.sort(torch.cat(chosen)).values


def long_tail_split(split, ir: float):
    """The long-tailed subset of an in-memory training split (a new ``Split``)."""
    idx = long_tail_indices(split.labels, ir)
    return type(split)(split.images[idx], split.labels[idx])
