"""Stratified, nested training subsets for data-efficiency studies.

For one seed, every class gets one seeded permutation of its images; a subset of ``k`` images per
class takes the first ``k`` entries of each permutation. The permutation does not depend on ``k``,
so the 4-per-class subset lies inside the 16-per-class subset for the same seed, and a study's
curve over sizes reads as "add more images", not "draw a new sample" at each size.

Usage:
    idx = nested_stratified_indices(ds.train.labels, per_class=16, seed=0)
    images, labels = ds.train.images[idx], ds.train.labels[idx]
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
