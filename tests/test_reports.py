"""report (run and compare dirs), runs, --tensorboard: real CLI runs on tiny data."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import write_png_tree
from transferlab.cli import main
from transferlab.report import run_report
from transferlab.report.html import markdown_to_html
from transferlab.report.run_report import confused_pairs, per_class_accuracy

TRAIN = [
    "--model",
    "cnn",
    "--epochs",
    "2",
    "--batch-size",
    "25",
    "--no-progress",
    "--device",
    "cpu",
    "--precision",
    "fp32",
]


@pytest.fixture(scope="module")
def cifar_run(tmp_path_factory, tiny_cifar):
    run = tmp_path_factory.mktemp("rep") / "runs" / "cnn"
    assert (
        main(
            [
                "train",
                "--data-dir",
                str(tiny_cifar),
                "--val-size",
                "50",
                "--run-dir",
                str(run),
                "--tensorboard",
                *TRAIN,
            ]
        )
        == 0
    )
    return run


def _assert_self_contained(html: str):
    assert not re.search(r"https?:", html), "the report must not reference the network"
    srcs = re.findall(r'src="([^"]*)"', html)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "<script" not in html and "<link" not in html


def test_run_report_from_saved_files(cifar_run, capsys):
    for name in ("report.md", "report.html", "misclassified.png"):
        (cifar_run / name).unlink(missing_ok=True)
    assert main(["report", str(cifar_run)]) == 0
    assert "report.html" in capsys.readouterr().out
    md = (cifar_run / "report.md").read_text()
    for heading in (
        "## Results",
        "## Learning curves",
        "## Per-class results (test, worst first)",
        "## Most confused class pairs",
        "## Misclassified test images",
        "## Timing",
        "## Data and reproducibility",
    ):
        assert heading in md
    assert (
        "![misclassified test images](misclassified.png)" in md
    )  # CIFAR images read back via the source
    s = json.loads((cifar_run / "summary.json").read_text())
    assert s["data"]["md5"]["test"] in md and s["versions"]["torch"] in md
    html = (cifar_run / "report.html").read_text()
    _assert_self_contained(html)
    from transferlab import explain

    # curves, the mistakes grid, and (with the explain extra) the Grad-CAM figure
    assert html.count("<img") == (3 if explain.available() else 2) and "<table>" in html


def test_report_notes_a_changed_cifar_test_file(cifar_run, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(cifar_run, run)
    s = json.loads((run / "summary.json").read_text())
    s["data"]["md5"]["test"] = "0" * 32
    (run / "summary.json").write_text(json.dumps(s))
    assert main(["report", str(run)]) == 0
    assert "Images not shown" in (run / "report.md").read_text()


def test_a_report_reads_the_cifar_test_file_once(cifar_run, tmp_path, monkeypatch):
    """The mistakes grid and both Grad-CAM rows share one read of the test split (not three
    loads of all of CIFAR-100, 180 MB each, as before)."""
    run = tmp_path / "copy"
    shutil.copytree(cifar_run, run)
    reads = []
    load = run_report.load_cifar100_test
    monkeypatch.setattr(run_report, "load_cifar100_test", lambda d: reads.append(d) or load(d))
    assert main(["report", str(run)]) == 0
    assert len(reads) == 1 and (run / "misclassified.png").is_file()


def test_test_predictions_match_summary(cifar_run):
    p = np.load(cifar_run / "test_predictions.npz", allow_pickle=False)
    s = json.loads((cifar_run / "summary.json").read_text())
    assert len(p["true"]) == 100 and p["index"].tolist() == list(range(100))
    assert (p["true"] == p["pred"]).mean() == pytest.approx(s["test"]["acc"])
    assert p["top5"].shape == (100, 5) and (p["top5"][:, 0] == p["pred"]).all()


def test_compare_dir_report_html(cifar_run, tmp_path):
    cmp = tmp_path / "cmp"
    shutil.copytree(cifar_run, cmp / "cnn")
    assert main(["report", str(cmp)]) == 0
    assert (cmp / "report.md").is_file()
    _assert_self_contained((cmp / "report.html").read_text())


def test_runs_lists_finished_runs(cifar_run, capsys):
    assert main(["runs", str(cifar_run.parent.parent)]) == 0
    out = capsys.readouterr().out
    s = json.loads((cifar_run / "summary.json").read_text())
    assert "cnn" in out and "scratch" in out and f"{s['test']['acc']:.4f}" in out


def test_runs_on_a_missing_folder_is_a_user_error(tmp_path, capsys):
    assert main(["runs", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(tmp_path / "none") in err and "Traceback" not in err


def test_tensorboard_scalars_per_epoch(cifar_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(cifar_run / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss/train", "loss/val", "acc/train", "acc/val", "lr", "img_per_s/train"} <= tags
    assert [e.step for e in acc.Scalars("acc/val")] == [1, 2]


def test_folder_run_report_shows_misclassified_files(tmp_path):
    root = write_png_tree(tmp_path / "d", {"a": 10, "b": 10, "c": 10}, size=8)
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--data",
                f"folder:{root}",
                "--num-workers",
                "0",
                "--val-frac",
                "0.2",
                "--test-frac",
                "0.3",
                "--run-dir",
                str(run),
                "--lr",
                "1e-5",
                *TRAIN,
            ]
        )
        == 0
    )
    # make the predictions hold known mistakes (every test image predicted as the next class),
    # so the grid of misclassified files must be drawn from the folder's test paths
    with np.load(run / "test_predictions.npz") as z:
        preds = {k: z[k] for k in z.files}
    preds["pred"] = (preds["true"] + 1) % 3
    preds["top5"][:, 0] = preds["pred"]
    np.savez(run / "test_predictions.npz", **preds)
    (run / "misclassified.png").unlink(missing_ok=True)
    assert main(["report", str(run)]) == 0
    md = (run / "report.md").read_text()
    assert "Folder layout `tree`" in md
    assert (run / "misclassified.png").is_file() and "misclassified.png" in md


def test_per_class_and_confused_pairs():
    true = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    pred = np.array([0, 1, 1, 1, 2, 2, 2, 1])
    n, acc = per_class_accuracy(true, pred, 4)
    assert (
        n.tolist() == [3, 2, 3, 0]
        and acc[:3].round(3).tolist() == [0.333, 0.5, 0.667]
        and np.isnan(acc[3])
    )
    assert confused_pairs(true, pred, 4) == [(0, 1, 2), (1, 2, 1), (2, 1, 1)]


def test_markdown_subset_to_html(tmp_path):
    md = (
        "# T\n\nSome **bold** and `<code>`.\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n- x\n- y\n\n"
        "```\nraw <b>\n```\n![alt](missing.png)\n"
    )
    html = markdown_to_html(md, Path(tmp_path), "t")
    assert (
        "<h1>T</h1>" in html
        and "<strong>bold</strong>" in html
        and "<code>&lt;code&gt;</code>" in html
    )
    assert "<th>a</th>" in html and "<td>2</td>" in html and "<li>y</li>" in html
    assert "raw &lt;b&gt;" in html and "image not found: missing.png" in html
