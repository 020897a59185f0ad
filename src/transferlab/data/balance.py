"""Imbalanced classes: class weights for the loss, sample weights for a class-balanced sampler.

``--balance weights`` trains with a class-weighted cross-entropy. Two weightings, one function:

* ``effective`` (the default): Cui et al., "Class-Balanced Loss Based on Effective Number of
  Samples", CVPR 2019: w_c = (1 - beta) / (1 - beta^n_c), beta = 0.999 (their best value on
  CIFAR-LT). It grows more slowly than 1/n_c for large classes: an image of a large class adds
  less and less new information, so large classes are not down-weighted to nothing.
* ``inverse``: w_c = 1 / n_c (scikit-learn's "balanced").

Both are normalised so that the weights sum to the number of classes (Cui et al.), so the loss
keeps the scale of plain cross-entropy on balanced data and --lr needs no change.

``--balance sampler`` draws each epoch's N training samples with replacement, sample i with
probability proportional to 1 / n_{y_i}: every class is drawn equally often on average. The
weights go to the loaders (``TensorLoader``, ``FolderLoader``), which draw the order through
``distributed.shard_order``, so the pixel pipeline and cached features sample alike.

Usage:
    w = class_weights(torch.tensor([500, 50, 5]), "effective")    # loss weights, sum 3
    s = sample_weights(train_labels, num_classes=3)              # one weight per sample
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

CUI_BETA = 0.999  # Cui et al. 2019, Table 2: the best beta for CIFAR-100-LT with softmax CE
IMBALANCE_HINT_RATIO = 10.0  # largest / smallest training class above which a run suggests it


def class_counts(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Images per class (int64, (C,)) of a label vector."""
    return torch.bincount(labels.reshape(-1).cpu(), minlength=num_classes)


def class_weights(counts: torch.Tensor, scheme: str, beta: float = CUI_BETA) -> torch.Tensor:
    """Loss weight per class (float32, (C,), summing to C); a class without images gets 0."""
    n = counts.double()
    present = n > 0
    if scheme == "effective":
        w = torch.where(present, (1 - beta) / (1 - beta ** n.clamp_min(1)), 0.0)
    elif scheme == "inverse":
        w = torch.where(present, 1 / n.clamp_min(1), 0.0)
    else:
        raise ValueError(f"unknown class-weight scheme {scheme!r}; use effective or inverse")
    return (w * present.sum() / w.sum()).float()


def sample_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-sample draw weights 1 / n_{y_i} (float64, (N,)): each class drawn equally often."""
    counts = class_counts(labels, num_classes).double()
    return (1.0 / counts.clamp_min(1))[labels.reshape(-1).cpu()]


def imbalance_ratio(counts: torch.Tensor) -> float:
    """Largest / smallest class count, over the classes that have images."""
    present = counts[counts > 0]
    return float(present.max() / present.min()) if len(present) else 1.0


def suggest_balance(counts: torch.Tensor, classes: list[str], balance: str) -> None:
    """One log line when the training classes differ by more than 10x and --balance is none."""
    ratio = imbalance_ratio(counts)
    if balance != "none" or ratio <= IMBALANCE_HINT_RATIO:
        return
    big, small = (
        int(counts.argmax()),
        int(torch.where(counts > 0, counts, counts.max() + 1).argmin()),
    )
    log.warning(
        "class imbalance %.0fx in the training split (%r: %d images, %r: %d): consider "
        "--balance weights or --balance sampler, and --select-by val_balanced_acc",
        ratio,
        classes[big],
        int(counts[big]),
        classes[small],
        int(counts[small]),
    )
