"""Users' own data (issue 22): per-class metrics in the run files, --select-by, --balance,
CIFAR-100-LT, --folds and check-data. Tiny PNG folders and synthetic CIFAR files, CPU, seconds.
"""

from __future__ import annotations

import json

import pytest

from conftest import metrics_rows, write_png_tree
from transferlab.cli import main

TINY = ["--no-progress", "--device", "cpu", "--num-workers", "0", "--batch-size", "16"]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a default runs/ folder would land here, not in the repo


@pytest.fixture(scope="module")
def imbalanced(tmp_path_factory):
    """A folder of 3 classes: 40, 12 and 6 PNGs (split into train/val/test by fraction)."""
    root = tmp_path_factory.mktemp("imb") / "data"
    return write_png_tree(root, {"big": 40, "mid": 12, "rare": 6})


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    return err


def _train(data: str, run, *flags: str) -> dict:
    code = main(["train", "--data", data, "--run-dir", str(run), *TINY, *flags])
    assert code == 0
    return json.loads((run / "summary.json").read_text())


def test_summary_and_metrics_hold_per_class_metrics(imbalanced, tmp_path):
    run = tmp_path / "run"
    s = _train(f"folder:{imbalanced}", run, "--epochs", "2", "--select-by", "val_balanced_acc")
    for split in ("val", "test"):
        m = s[split]
        assert {"acc", "balanced_acc", "macro_f1", "top5_acc", "per_class"} <= set(m)
        assert [r["class"] for r in m["per_class"]] == ["big", "mid", "rare"]
        recalls = [r["recall"] for r in m["per_class"] if r["support"]]
        assert m["balanced_acc"] == pytest.approx(sum(recalls) / len(recalls), abs=1e-5)
        assert m["top5_acc"] == 1.0  # 3 classes: the true one is always in the top 5
    rows = metrics_rows(run)
    assert len(rows) == 2 and all(0 <= float(r["val_balanced_acc"]) <= 1 for r in rows)
    best = max(rows, key=lambda r: float(r["val_balanced_acc"]))
    assert s["best_epoch"] == int(best["epoch"])
    report = (run / "report.md").read_text()
    assert "Per-class" in report and "rare" in report


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--select-by", "val_f1"], "--select-by must be one of"),
        (["--balance", "oversample"], "--balance must be one of"),
        (["--folds", "1"], "--folds must be at least 2"),
        (["--folds", "-3"], "--folds must be at least 2"),
    ],
)
def test_bad_choices_are_one_line_errors(capsys, imbalanced, tmp_path, flags, message):
    code = main(
        ["train", "--data", f"folder:{imbalanced}", "--run-dir", str(tmp_path / "r")] + TINY + flags
    )
    assert code == 2
    assert message in _one_line_error(capsys)


@pytest.mark.parametrize("ir", ["0", "-5", "abc", "0.5", "inf", ""])
def test_bad_lt_ratio_is_a_one_line_error(capsys, tmp_path, ir):
    code = main(["train", "--data", f"cifar100-lt:{ir}", "--run-dir", str(tmp_path / "r")] + TINY)
    assert code == 2
    assert "imbalance ratio" in _one_line_error(capsys)
