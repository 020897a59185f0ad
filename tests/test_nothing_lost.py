"""Issue 24 ("Nothing lost, round 3"): each class the hostile trial found, one test or more.

Validation gaps that reached an "internal error" line become one line and exit 2 (UserError in
the API); wrong help texts and advice; a dropped class folder is logged.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import pytest

import transferlab as tl
from conftest import TINY, write_png_tree
from transferlab.cli import main
from transferlab.data.cifar import write_cifar_like
from transferlab.studies.rank import parse_candidates


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a default runs/ folder would land here, not in the repo


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    return write_cifar_like(tmp_path_factory.mktemp("nl"), n_train=60, n_test=20, n_classes=5)


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err and "internal error" not in err, err
    return err


@pytest.mark.parametrize(
    "yaml_text", ["data: [1, 2]\n", "data: 3\n", "optim: text\n", "run: [a]\nmodel: {}\n"]
)
def test_a_preset_whose_sections_are_not_mappings_is_one_line(tmp_path, capsys, cifar, yaml_text):
    preset = tmp_path / "p.yaml"
    preset.write_text(yaml_text)
    args = ["train", "--data-dir", str(cifar), "--preset", str(preset), "--run-dir", "r"]
    assert main(args) == 2
    assert "must be a mapping" in _one_line(capsys)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("resnet18@0", "16 to 1024"),
        ("resnet18@-5", "16 to 1024"),
        ("resnet18@2000", "16 to 1024"),
        ("resnet18@", "give a size after @"),
        ("@", "name a model before"),
        ("@224", "name a model before"),
        ("resnet18@nan", "integer"),
    ],
)
def test_rank_candidate_sizes_are_checked_like_train(text, words):
    with pytest.raises(tl.UserError, match=words):
        parse_candidates(text)


def test_rank_cli_at_a_bad_size_is_one_line(cifar, capsys):
    args = ["rank", "--data-dir", str(cifar), "--val-size", "10", "--candidates", "resnet18@0"]
    assert main(args) == 2
    assert "16 to 1024" in _one_line(capsys)


@pytest.mark.parametrize("bad", [None, 42, 1.5, ["runs/x"]])
def test_load_run_of_a_non_path_is_a_user_error(bad):
    with pytest.raises(tl.UserError, match="needs a run dir path"):
        tl.load_run(bad)


def test_api_per_class_nan_is_a_user_error(cifar, tmp_path):
    with pytest.raises(tl.UserError, match="per_class"):
        tl.train(data_dir=str(cifar), per_class=math.nan, run_dir=str(tmp_path / "r"))
    assert not (tmp_path / "r").exists()


def test_cli_per_class_nan_is_one_line(cifar, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--data-dir", str(cifar), "--per-class", "nan"])
    assert e.value.code == 2
    assert "--per-class" in _one_line(capsys)


@pytest.mark.parametrize("tol", ["nan", "inf", "-1"])
def test_export_tolerance_nan_is_one_line(tmp_path, capsys, tol):
    assert main(["export", str(tmp_path), "--format", "onnx", "--tolerance", tol]) == 2
    assert "--tolerance must be a finite number" in _one_line(capsys)


def test_a_symlink_loop_as_run_dir_is_one_line(tmp_path, cifar, capsys):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    for run_dir in ("a", "a/sub"):
        assert main(["train", "--data-dir", str(cifar), "--run-dir", run_dir]) == 2
        assert "symlink loop" in _one_line(capsys).lower()


def test_a_symlink_loop_as_image_is_skipped(tmp_path, caplog):
    from transferlab.config import DataConfig
    from transferlab.data.folder import load_folder_dataset

    root = write_png_tree(tmp_path / "imgs", {"a": 6, "b": 6})
    os.symlink(root / "a" / "l2.png", root / "a" / "l1.png")
    os.symlink(root / "a" / "l1.png", root / "a" / "l2.png")
    ds = load_folder_dataset(DataConfig(dataset=f"folder:{root}", num_workers=0))
    assert ds.info["bad_images"] == 2
    assert all("l1.png" not in p and "l2.png" not in p for p in ds.train.paths)
    with pytest.raises(tl.UserError, match="l1.png"):
        load_folder_dataset(
            DataConfig(dataset=f"folder:{root}", num_workers=0, on_bad_image="error")
        )


def test_a_dropped_class_folder_is_logged(tmp_path, caplog):
    from transferlab.config import DataConfig
    from transferlab.data.folder import load_folder_dataset

    root = write_png_tree(tmp_path / "imgs", {"a": 6, "b": 6, "...": 6})
    (root / ".git").mkdir()
    with caplog.at_level(logging.INFO, logger="transferlab.data.folder"):
        ds = load_folder_dataset(DataConfig(dataset=f"folder:{root}", num_workers=0))
    assert ds.classes == ["a", "b"]
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("'...'" in r.getMessage() and "rename" in r.getMessage() for r in warned)
    assert not any("'.git'" in r.getMessage() for r in warned)  # logged, at info level
    assert "'.git'" in caplog.text


def test_the_empty_split_advice_names_real_flags(tmp_path):
    from transferlab.config import DataConfig
    from transferlab.data.folder import load_folder_dataset

    root = write_png_tree(tmp_path / "imgs", {"a": 1, "b": 1})
    with pytest.raises(tl.UserError) as e:
        load_folder_dataset(DataConfig(dataset=f"folder:{root}", num_workers=0))
    assert "--train-frac" not in str(e.value)
    assert "--val-frac" in str(e.value) or "--test-frac" in str(e.value)


@pytest.mark.parametrize(
    "flag", ["--no-channels-last", "--no-feature-cache", "--no-report", "--no-progress"]
)
def test_no_flag_help_says_it_turns_the_thing_off(capsys, flag):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert f"{flag} turn off:" in out


# ---------------------------------------------------------------- item 1: the old run comes back

SMALL = [*TINY, "--model", "cnn", "--epochs", "1", "--batch-size", "20", "--val-size", "20"]
SMALL += ["--no-report"]


@pytest.fixture
def old_run(tmp_path, cifar):
    """A finished tiny run, and a snapshot of its files (name -> bytes)."""
    run = tmp_path / "run"
    assert main(["train", "--data-dir", str(cifar), "--run-dir", str(run), *SMALL]) == 0
    return run, _files(run)


def _files(run) -> dict[str, bytes]:
    return {
        p.name: p.read_bytes()
        for p in sorted(run.rglob("*"))
        if p.is_file() and p.suffix != ".lock"
    }


def _kill_in_first_epoch(monkeypatch, how: str) -> None:
    """The new run's first epoch starts, then ``how`` happens (a real signal where it can)."""
    import signal

    from transferlab.training import fit

    real = fit.train_one_epoch

    def first_epoch(*args, **kwargs):
        if how == "keyboard":
            raise KeyboardInterrupt
        os.kill(os.getpid(), signal.SIGINT if how == "sigint" else signal.SIGTERM)
        return real(*args, **kwargs)  # sees the stop flag at its first step

    monkeypatch.setattr(fit, "train_one_epoch", first_epoch)


@pytest.mark.parametrize("how", ["sigint", "sigterm"])
def test_a_signal_in_the_first_epoch_of_an_overwrite_puts_the_old_run_back(
    old_run, cifar, monkeypatch, capsys, how
):
    run, before = old_run
    _kill_in_first_epoch(monkeypatch, how)
    args = ["train", "--data-dir", str(cifar), "--run-dir", str(run), *SMALL, "--overwrite"]
    assert main(args) == (130 if how == "sigint" else 143)
    err = _one_line(capsys)
    assert "previous run" in err and "back as it was" in err and "--resume" not in err
    assert _files(run) == before


def test_a_keyboard_interrupt_in_tl_train_overwrite_puts_the_old_run_back(
    old_run, cifar, monkeypatch
):
    run, before = old_run
    _kill_in_first_epoch(monkeypatch, "keyboard")
    with pytest.raises(KeyboardInterrupt):
        tl.train(
            data_dir=str(cifar),
            run_dir=str(run),
            model="cnn",
            epochs=1,
            batch_size=20,
            val_size=20,
            device="cpu",
            progress=False,
            overwrite=True,
        )
    assert _files(run) == before


def test_divergence_in_the_first_epoch_of_an_overwrite_puts_the_old_run_back(
    old_run, cifar, capsys
):
    run, before = old_run
    args = ["train", "--data-dir", str(cifar), "--run-dir", str(run), *SMALL, "--overwrite"]
    assert main([*args, "--lr", "1e30", "--nan-patience", "1"]) == 1
    err = _one_line(capsys)
    assert "diverged" in err and "back as it was" in err
    assert _files(run) == before


def test_tensorboard_missing_is_refused_before_the_run_dir_is_touched(
    old_run, cifar, monkeypatch, capsys
):
    import sys

    run, before = old_run
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    args = ["train", "--data-dir", str(cifar), "--run-dir", str(run), *SMALL, "--overwrite"]
    assert main([*args, "--tensorboard"]) == 2
    assert "pip install 'transferlab[tensorboard]'" in _one_line(capsys)
    assert _files(run) == before


def test_an_overwrite_commits_after_its_first_epoch(old_run, cifar):
    run, before = old_run
    args = ["train", "--data-dir", str(cifar), "--run-dir", str(run), *SMALL, "--overwrite"]
    assert main([*args, "--seed", "1"]) == 0
    assert _files(run)["config.yaml"] != before["config.yaml"]
    assert not [p for p in run.parent.iterdir() if ".old-" in p.name]  # nothing left aside


@pytest.mark.parametrize(
    "names", [["config.yaml"], ["metrics.csv", "notes.txt"], [".git/HEAD", "config.yaml"]]
)
def test_overwrite_refuses_a_folder_without_our_marker(tmp_path, cifar, capsys, names):
    """A config.yaml (or a .git) does not make a run: the marker file does."""
    home = tmp_path / "project"
    for name in names:
        (home / name).parent.mkdir(parents=True, exist_ok=True)
        (home / name).write_text("mine")
    before = _files(home)
    args = ["train", "--data-dir", str(cifar), "--run-dir", str(home), *TINY, "--overwrite"]
    assert main(args) == 2
    err = _one_line(capsys)
    assert "not a transferlab run" in err and names[0].split("/")[0] in err
    assert _files(home) == before and sorted(p.name for p in home.iterdir()) == sorted(
        {n.split("/")[0] for n in names}
    )


# ---------------------------------------------------------------- item 2: studies


def _grid(cifar, tmp_path, arms=("cnn:scratch",), **kw):
    from transferlab.studies.grid import make_grid

    over = {
        "data": {"data_dir": str(cifar), "val_size": 10, "image_size": 32, **kw},
        "optim": {"epochs": 1, "batch_size": 16},
        "run": {"progress": False, "cache_dir": str(tmp_path / "cache"), "device": "cpu"},
    }
    return make_grid(list(arms), "2", seeds=1, overrides=over, min_steps=2)


def test_equal_arms_are_one_arm_and_arm_folders_never_collide(tmp_path):
    from transferlab.studies.grid import make_grid, parse_arm

    assert parse_arm(" cnn:scratch: ").spec == parse_arm("cnn:scratch").spec == "cnn:scratch"
    assert parse_arm("cnn:scratch").key == "cnn-scratch"  # stable: existing studies keep theirs
    with pytest.raises(tl.UserError, match="twice"):
        make_grid(["cnn:scratch", "cnn:scratch:"], "2", seeds=1)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "b.yaml").write_text("optim:\n  lr: 0.01\n")
    (tmp_path / "a-b.yaml").write_text("optim:\n  lr: 0.02\n")
    one, two = (
        parse_arm(f"cnn:scratch:{tmp_path}/a/b.yaml"),
        parse_arm(f"cnn:scratch:{tmp_path}/a-b.yaml"),
    )
    assert one.key != two.key and "/" not in one.key + two.key
    assert one.key == parse_arm(f"cnn:scratch:{tmp_path}/a/b.yaml").key  # stable


def test_a_study_dir_inside_a_folder_data_root_is_refused_before_writing(tmp_path):
    from transferlab.studies.grid import make_grid
    from transferlab.studies.runner import run_study

    root = write_png_tree(tmp_path / "imgs", {"a": 6, "b": 6})
    grid = make_grid(
        ["cnn:scratch"], "2", seeds=1, overrides={"data": {"dataset": f"folder:{root}"}}
    )
    with pytest.raises(tl.UserError, match="inside the data root"):
        run_study(grid, root / "study")
    assert not (root / "study").exists()


@pytest.mark.parametrize("damage", ["", "{", "[]", '{"grid": 3}', "\x00\xff"])
def test_a_damaged_study_json_is_one_line_never_trusted(cifar, tmp_path, damage):
    from transferlab.rundir import StudyDir
    from transferlab.studies.report import write_study_report
    from transferlab.studies.runner import prepare_study_dir

    study = tmp_path / "study"
    study.mkdir()
    StudyDir(study).write_marker()  # a study of ours whose study.json got damaged
    StudyDir(study).study.write_text(damage)
    grid = _grid(cifar, tmp_path)
    with pytest.raises(tl.UserError, match="study.json is damaged.*--overwrite"):
        prepare_study_dir(study, grid, overwrite=False)
    with pytest.raises(tl.UserError, match="study.json is damaged"):
        write_study_report(study)
    prepare_study_dir(study, grid, overwrite=True)  # rewritten, not trusted
    assert StudyDir.is_ours(study)


def test_study_overwrite_of_a_foreign_folder_is_refused(cifar, tmp_path):
    from transferlab.studies.runner import prepare_study_dir

    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("mine")
    with pytest.raises(tl.UserError, match="not a transferlab study"):
        prepare_study_dir(home, _grid(cifar, tmp_path), overwrite=True)
    assert [p.name for p in home.iterdir()] == ["notes.txt"]


def test_damaged_cells_costs_and_csv_are_rebuilt_or_named(cifar, tmp_path, caplog):
    from transferlab.rundir import StudyDir
    from transferlab.studies.report import read_rows
    from transferlab.studies.runner import run_study
    from transferlab.studies.table import read_costs

    study = tmp_path / "study"
    grid = _grid(cifar, tmp_path)
    run_study(grid, study, write_report=False)
    files = StudyDir(study)
    files.costs.write_text("[1, 2")
    assert read_costs(files.costs) == {} and "measured again" in caplog.text
    files.csv.write_bytes(b"\x00\xff\xfe")
    assert len(read_rows(study)) == 1  # rebuilt from the run dirs
    files.cells.write_text('{"class_counts": 7}')
    with pytest.raises(tl.UserError, match="cells.json is damaged"):
        read_rows(study)
    result = run_study(grid, study, write_report=False)  # a rerun writes every file again
    assert result.skipped and read_rows(study)[0]["status"] == "ok"


def test_sigint_in_a_study_says_rerun_the_study(cifar, tmp_path):
    from transferlab.errors import TrainingStopped
    from transferlab.studies.runner import run_study

    class StopInCell:
        exit_code = 130
        calls = 0

        def __call__(self):  # asked first between cells, then in the cell's first step
            self.calls += 1
            return self.calls > 1

    with pytest.raises(TrainingStopped) as e:
        run_study(_grid(cifar, tmp_path), tmp_path / "study", stop_requested=StopInCell())
    assert "rerun the same `transferlab study` command" in str(e.value)
    assert "--resume" not in str(e.value)


# ---------------------------------------------------------------- item 4: damaged run files


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("frun")
    data = write_png_tree(root / "imgs", {"a": 8, "b": 8})
    run = root / "run"
    args = ["train", "--data", f"folder:{data}", "--run-dir", str(run), "--model", "cnn"]
    assert main([*args, "--epochs", "1", "--batch-size", "4", "--num-workers", "0"]) == 0
    return run


@pytest.mark.parametrize("name", ["test_predictions.npz", "data_manifest.json", "curves.png"])
@pytest.mark.parametrize("cut", [0, 30])
def test_report_rebuilds_a_run_with_a_truncated_file(
    folder_run, tmp_path, capsys, caplog, name, cut
):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(folder_run, run)
    (run / name).write_bytes((run / name).read_bytes()[:cut])
    with caplog.at_level(logging.WARNING):
        assert main(["report", str(run)]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "internal error" not in err
    if name != "curves.png":  # a damaged input is named; curves.png is simply drawn again
        assert name in caplog.text and "damaged" in caplog.text
    else:
        from transferlab.report.plots import intact_png

        assert intact_png(run / name)
    assert (run / "report.html").is_file()


def test_predictions_reader_names_a_damaged_file(tmp_path):
    import numpy as np

    from transferlab.report.predictions import load_predictions

    path = tmp_path / "test_predictions.npz"
    for damage in (b"", b"PK\x03\x04junk", b"\x00" * 64):
        path.write_bytes(damage)
        with pytest.raises(tl.UserError, match="test_predictions.npz is damaged"):
            load_predictions(path)
    np.savez(path, index=np.arange(3), pred=np.arange(2))  # parses, but not ours
    with pytest.raises(tl.UserError, match="damaged"):
        load_predictions(path)


def test_export_on_a_full_disk_is_one_line_and_leaves_no_temp(
    folder_run, tmp_path, capsys, monkeypatch
):
    from collections import namedtuple

    from transferlab import export

    out = tmp_path / "out"
    out.mkdir()
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(export.shutil, "disk_usage", lambda p: usage(10**9, 10**9, 1000))
    for fmt in ("onnx", "torchscript"):
        argv = ["export", str(folder_run), "--format", fmt, "--output", str(out / f"m.{fmt}")]
        assert main(argv) == 1
        assert "not enough free space" in _one_line(capsys)
    assert list(out.iterdir()) == []


def test_explain_and_export_never_write_in_the_data_or_over_a_users_file(
    folder_run, tmp_path, capsys
):
    import yaml

    pytest.importorskip("pytorch_grad_cam")
    data = Path(yaml.safe_load((folder_run / "config.yaml").read_text())["data"]["dataset"][7:])
    image = str(next(data.rglob("*.png")))
    before = sorted(p.name for p in data.rglob("*"))
    assert main(["explain", str(folder_run), image, "--out", str(data / "out")]) == 2
    assert "inside the data root" in _one_line(capsys)
    argv = ["export", str(folder_run), "--format", "onnx", "--output", str(data / "a" / "m.onnx")]
    assert main([*argv, "--force"]) == 2
    assert "inside the data root" in _one_line(capsys)
    assert sorted(p.name for p in data.rglob("*")) == before
    out = tmp_path / "out"
    out.mkdir()
    mine = out / (Path(image).stem + "_gradcam.png")
    mine.write_bytes(Path(image).read_bytes())  # a user's own file with explain's name
    assert main(["explain", str(folder_run), image, "--out", str(out), "--device", "cpu"]) == 2
    assert "not written by transferlab explain" in _one_line(capsys)
    assert mine.read_bytes() == Path(image).read_bytes()
    mine.unlink()
    for _ in range(2):  # its own output is replaced
        assert main(["explain", str(folder_run), image, "--out", str(out), "--device", "cpu"]) == 0
