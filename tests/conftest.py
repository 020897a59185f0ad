"""Shared test fixtures: tiny datasets in the real file formats, written once per session."""

from __future__ import annotations

import pytest

from transferlab.data.cifar import write_cifar_like


@pytest.fixture(scope="session")
def tiny_cifar(tmp_path_factory):
    """Parent dir of a tiny synthetic ``cifar-100-python/`` (300 train, 100 test images).

    Read-only by convention: tests that corrupt files should copy it first (see ``cifar_copy``).
    """
    return write_cifar_like(tmp_path_factory.mktemp("cifar"), n_train=300, n_test=100)


@pytest.fixture
def cifar_copy(tmp_path):
    """A private tiny CIFAR copy a test may corrupt (150 train, 50 test images)."""
    return write_cifar_like(tmp_path / "data", n_train=150, n_test=50)
