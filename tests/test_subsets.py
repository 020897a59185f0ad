"""Nested stratified subsets: per-class counts, nesting across sizes, seeding, errors."""

from __future__ import annotations

import pytest
import torch

from transferlab.data.cifar import Split
from transferlab.data.subsets import nested_stratified_indices, select_per_class, subset_split
from transferlab.errors import UserError


def _labels(n_classes: int = 5, per: int = 20, seed: int = 0) -> torch.Tensor:
    labels = torch.arange(n_classes).repeat_interleave(per)
    return labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))]


def test_counts_sorted_and_unique():
    labels = _labels()
    idx = nested_stratified_indices(labels, per_class=4, seed=1)
    assert torch.equal(idx, torch.sort(idx).values)
    assert len(set(idx.tolist())) == len(idx) == 20
    assert torch.bincount(labels[idx], minlength=5).tolist() == [4] * 5


def test_nested_across_sizes_and_differs_across_seeds():
    labels = _labels()
    small = set(nested_stratified_indices(labels, 4, seed=3).tolist())
    big = set(nested_stratified_indices(labels, 16, seed=3).tolist())
    assert small < big
    other = set(nested_stratified_indices(labels, 4, seed=4).tolist())
    assert other != small
    again = nested_stratified_indices(labels, 4, seed=3)
    assert set(again.tolist()) == small


def test_all_images_of_the_smallest_class():
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    idx = nested_stratified_indices(labels, per_class=2, seed=0)
    assert torch.bincount(labels[idx]).tolist() == [2, 2, 2]


def test_too_large_names_the_class_and_count():
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    with pytest.raises(UserError, match=r"class 1, which has 2 training images"):
        nested_stratified_indices(labels, per_class=3, seed=0)


def test_non_positive_refused():
    with pytest.raises(UserError, match="--per-class must be positive"):
        nested_stratified_indices(_labels(), per_class=0, seed=0)


def test_split_and_feature_selection_pick_the_same_images():
    labels = _labels()
    images = torch.arange(len(labels), dtype=torch.uint8).view(-1, 1, 1, 1)
    images = images.expand(-1, 3, 2, 2).contiguous()
    split = Split(images, labels)
    sub = subset_split(split, per_class=3, seed=7)
    assert len(split) == 100 and len(sub) == 15  # the original split is unchanged
    feats = images[:, 0, 0, 0].float().unsqueeze(1)  # (N, 1): the image's own index
    f, y = select_per_class(feats, labels, per_class=3, seed=7)
    assert torch.equal(f[:, 0].to(torch.uint8), sub.images[:, 0, 0, 0])
    assert torch.equal(y, sub.labels)


def test_a_per_class_run_extracts_only_its_subsets_rows(tmp_path):
    """``train --per-class K`` (frozen, cached) extracts the K-per-class rows of its subset, not
    the whole training split (--extract-per-class -1, auto), and trains on the same images and
    features as a run that extracted every row (--extract-per-class 0)."""
    import json

    import torchvision

    from transferlab.cli import main
    from transferlab.data.cifar import write_cifar_like
    from transferlab.features import cache as fcache

    data = write_cifar_like(tmp_path / "data", 120, 40, n_classes=4)
    weights = tmp_path / "r18.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    flags = ["--model", "resnet18", "--weights", str(weights), "--image-size", "32"]
    flags += ["--val-size", "20", "--epochs", "1", "--batch-size", "8", "--device", "cpu"]
    flags += ["--precision", "fp32", "--engine", "torch", "--no-progress", "--no-report"]
    flags += ["--per-class", "3", "--subset-seed", "1", "--data-dir", str(data)]

    def run(name: str, *extra: str) -> tuple[dict, list[dict]]:
        cache = tmp_path / f"cache-{name}"
        assert (
            main(
                [
                    "train",
                    *flags,
                    "--run-dir",
                    str(tmp_path / name),
                    "--cache-dir",
                    str(cache),
                    *extra,
                ]
            )
            == 0
        )
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        return summary, [e for e in fcache.list_entries(cache) if e.get("split") == "train"]

    auto, auto_train = run("auto")
    every, every_train = run("every", "--extract-per-class", "0")
    # the auto run's train entry holds the rows of seeds 0 and 1 (nested unions), at most 24
    # of the 100 training images; the other run's, all 100
    assert auto_train[0]["bytes"] < every_train[0]["bytes"] / 3
    assert auto["data"]["n"]["train"] == every["data"]["n"]["train"] == 12
    assert auto["test"]["acc"] == pytest.approx(every["test"]["acc"])
    assert auto["val"]["loss"] == pytest.approx(every["val"]["loss"], rel=1e-5)
