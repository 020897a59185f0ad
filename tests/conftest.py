"""Shared test fixtures: tiny datasets in the real file formats, written once per session."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from transferlab.cli import main
from transferlab.data.cifar import write_cifar_like

# MLflow 3 starts a telemetry thread that phones home; offline it only retries. No telemetry in
# tests. (The SIGSEGV once blamed on it was OpenVINO's signal stack: transferlab/sigstack.py.)
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
# Runs pick their torch threads from the cores free at each phase (transferlab/threads.py); a
# neighbour's burst could then change a thread count between a run and its resume, and with it
# the last bits of a reduction. Tests pin torch's default count (as before) unless the caller did.
os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))

# The one flag list of a tiny CPU run; a test adds (or overrides: later flags win) its own.
TINY = ["--device", "cpu", "--no-progress", "--precision", "fp32", "--val-size", "50"]
TINY += ["--batch-size", "50"]

COLOURS = [(220, 30, 30), (30, 200, 40), (40, 60, 230), (230, 220, 40)]


def write_png_tree(root: Path, counts: dict[str, int], size: int = 12, seed: int = 0) -> Path:
    """PATH/<class>/<i>.png, each class a noisy solid colour (learnable in one epoch)."""
    rng = np.random.default_rng(seed)
    for k, (cls, n) in enumerate(counts.items()):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            px = np.clip(np.array(COLOURS[k % 4]) + rng.normal(0, 20, (size, size + 2, 3)), 0, 255)
            Image.fromarray(px.astype(np.uint8)).save(root / cls / f"{i:03d}.png")
    return root


def metrics_rows(run_dir: Path) -> list[dict]:
    """The rows of a run's metrics.csv, as strings (exactly as written)."""
    with open(Path(run_dir) / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


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


def train_argv(data_dir: Path, run_dir: Path, *flags: str) -> list[str]:
    """``transferlab train`` on CIFAR-format data with :data:`TINY` and ``flags``."""
    return ["train", "--data-dir", str(data_dir), "--run-dir", str(run_dir), *TINY, *flags]


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny_cifar):
    """``trained_run(*flags)`` -> a finished tiny CNN run on ``tiny_cifar`` (TINY + flags),
    trained once per distinct flags in the session. Shared: copy it before changing it."""
    runs: dict[tuple[str, ...], Path] = {}

    def get(*flags: str) -> Path:
        if flags not in runs:
            run = tmp_path_factory.mktemp("trained") / "run"
            assert main(train_argv(tiny_cifar, run, "--model", "cnn", *flags)) == 0
            runs[flags] = run
        return runs[flags]

    return get


# --- the engine probe, once per session --------------------------------------------------------
# Every fresh cache dir makes a frozen run time each installed engine, then the winner at every
# probe batch size (~2x the images a tiny run extracts). The choice is a timing, never a claim of
# the tests outside test_engines.py (which tests the probe and its memo itself, unpatched): the
# first probe of each (engine asked for, backbone, size, precision) in this pytest process is real
# and the later ones reuse its answer, as a remembered choice in engines.json would.
_PROBED: dict[tuple, object] = {}
_PROBE_ITSELF_TESTED = {"test_engines"}


@pytest.fixture(autouse=True)
def _probe_once_per_session(request, monkeypatch):
    if request.module.__name__ in _PROBE_ITSELF_TESTED:
        return
    from transferlab.features import engines

    real = engines._probe

    def probe_once(requested, backbone, size, device, cache_root, precision, channels_last):
        shapes = tuple((k, tuple(v.shape)) for k, v in backbone.state_dict().items())
        key = (requested, type(backbone).__qualname__, shapes, size, device.type, precision)
        key += (channels_last,)
        if key not in _PROBED:
            _PROBED[key] = real(
                requested, backbone, size, device, cache_root, precision, channels_last
            )
        return _PROBED[key]

    monkeypatch.setattr(engines, "_probe", probe_once)
