"""Issue 16's safety rules, one test (or a few) per rule: run-dir locks and undoable overwrites,
owned outputs and cache entries, data roots, decoding, signals and the one-line error policy."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
import torch

from conftest import TINY
from transferlab import io, rundir
from transferlab.errors import NothingToDo, RunFailure, TrainingStopped, UserError, describe_failure

# ---------------------------------------------------------------------------------------------
# 1. Validate before you destroy: --overwrite sets the old run aside until commit()


def _old_run(run: Path) -> dict[str, bytes]:
    run.mkdir(parents=True)
    files = {"best.pt": b"best", "metrics.csv": b"epoch\n1\n", "summary.json": b"{}"}
    for name, data in files.items():
        (run / name).write_bytes(data)
    os.link(run / "best.pt", run / "last.pt")
    (run / "tb").mkdir()
    (run / "tb" / "events").write_bytes(b"e")
    rundir.RunDir(run).write_marker()  # a run of ours (--overwrite replaces only those)
    return {**files, "last.pt": b"best", "tb/events": b"e"}


def _snapshot(run: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(run)): p.read_bytes()
        for p in sorted(run.rglob("*"))
        if p.is_file() and p.name not in (rundir.LOCK_NAME, rundir.RunDir.MARKER)
    }


def test_overwrite_rollback_restores_the_old_run_intact(tmp_path):
    run = tmp_path / "precious"
    before = _old_run(run)
    h = rundir.prepare_run_dir(run, resume=False, overwrite=True)
    assert _snapshot(run) == {}  # set aside, not deleted
    assert rundir.RunDir.is_ours(run)  # the new run's marker, written first
    (run / "config.yaml").write_text("new")  # the new run starts writing, then fails
    h.rollback()
    h.release()
    assert _snapshot(run) == before and rundir.RunDir.is_ours(run)  # its own marker is back
    assert os.path.samefile(run / "best.pt", run / "last.pt")  # the hard link survived the move
    assert not list(tmp_path.glob(".precious.old-*"))


def test_overwrite_commit_deletes_the_old_run_only_then(tmp_path):
    run = tmp_path / "precious"
    _old_run(run)
    with rundir.prepare_run_dir(run, resume=False, overwrite=True) as h:
        (run / "last.pt").write_bytes(b"new")
        assert len(list(tmp_path.glob(".precious.old-*"))) == 1
        h.commit()
        assert not list(tmp_path.glob(".precious.old-*"))
    assert _snapshot(run) == {"last.pt": b"new"}


def test_context_manager_rolls_back_on_error(tmp_path):
    run = tmp_path / "precious"
    before = _old_run(run)
    with pytest.raises(UserError, match="typo"):
        with rundir.prepare_run_dir(run, resume=False, overwrite=True):
            (run / "data_manifest.json").write_text("{}")
            raise UserError("--data folder:/typo: no such folder")
    assert _snapshot(run) == before


def test_not_empty_without_overwrite_is_refused_untouched(tmp_path):
    run = tmp_path / "r"
    before = _old_run(run)
    with pytest.raises(UserError, match="not empty.*--overwrite"):
        rundir.prepare_run_dir(run, resume=False, overwrite=False)
    assert _snapshot(run) == before


def test_failed_new_run_leaves_no_empty_run_dir(tmp_path):
    run = tmp_path / "a" / "new"
    h = rundir.prepare_run_dir(run, resume=False, overwrite=False)
    (run / "config.yaml").write_text("x")
    h.rollback()
    h.release()
    assert not run.exists()


def test_user_made_empty_dir_is_kept_on_failure(tmp_path):
    run = tmp_path / "mine"
    run.mkdir()
    h = rundir.prepare_run_dir(run, resume=False, overwrite=False)
    (run / "config.yaml").write_text("x")
    h.rollback()
    h.release()
    assert run.is_dir() and _snapshot(run) == {}


def test_stale_aside_is_reported_not_deleted(tmp_path, caplog):
    run = tmp_path / "r"
    _old_run(run)
    stale = tmp_path / ".r.old-999999"
    stale.mkdir()
    (stale / "best.pt").write_bytes(b"older")
    with rundir.prepare_run_dir(run, resume=False, overwrite=True) as h:
        h.commit()
    assert (stale / "best.pt").read_bytes() == b"older"
    assert "killed" in caplog.text


# ---------------------------------------------------------------------------------------------
# 3. One writer per run dir


def test_second_writer_fails_at_once_naming_the_holder(tmp_path):
    run = tmp_path / "r"
    first = rundir.prepare_run_dir(run, resume=False, overwrite=False)
    t0 = time.perf_counter()
    with pytest.raises(UserError, match=rf"in use by process {os.getpid()}"):
        rundir.prepare_run_dir(run, resume=False, overwrite=True)
    assert time.perf_counter() - t0 < 1.0
    first.release()
    rundir.prepare_run_dir(run, resume=False, overwrite=True).release()  # free again


def test_lock_held_by_another_process(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    code = (
        "import sys, time; from pathlib import Path; from transferlab import rundir; "
        "h = rundir.prepare_run_dir(Path(sys.argv[1]), False, False); print('locked', flush=True); "
        "time.sleep(30)"
    )
    p = subprocess.Popen([sys.executable, "-c", code, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "locked"
        with pytest.raises(UserError) as e:
            rundir.prepare_run_dir(run, resume=False, overwrite=True)
        assert f"process {p.pid}" in str(e.value) and "\n" not in str(e.value)
    finally:
        p.kill()
        p.wait()
    rundir.prepare_run_dir(
        run, resume=False, overwrite=True
    ).release()  # the kernel dropped the lock


def test_resume_takes_the_lock_too(tmp_path):
    run = tmp_path / "r"
    _old_run(run)
    h = rundir.prepare_run_dir(run, resume=True, overwrite=False)
    with pytest.raises(UserError, match="in use"):
        rundir.prepare_run_dir(run, resume=True, overwrite=False)
    h.release()


def test_default_names_are_unique_in_the_same_second(tmp_path):
    now = datetime(2026, 11, 29, 12, 0, 0)
    dirs = [rundir.unique_run_dir(tmp_path, "timm:resnet/x", now) for _ in range(3)]
    assert [d.name for d in dirs] == [
        "timm-resnet-x-20261129-120000",
        "timm-resnet-x-20261129-120000-2",
        "timm-resnet-x-20261129-120000-3",
    ]
    h = rundir.prepare_run_dir(None, False, False, stem="cnn", runs_root=tmp_path / "runs")
    assert h.created and h.run_dir.parent == tmp_path / "runs"
    h.rollback()
    h.release()
    assert not h.run_dir.exists()


# ---------------------------------------------------------------------------------------------
# 7. Resume means resume


def _finished_run(run: Path, epochs: int = 2) -> None:
    run.mkdir(parents=True)
    (run / "last.pt").write_bytes(b"x")
    time.sleep(0.01)
    (run / "summary.json").write_text(
        json.dumps({"fit_state": {"epoch": epochs, "stop_reason": "epoch budget"}})
    )


def test_resuming_a_finished_run_is_nothing_to_do(tmp_path):
    run = tmp_path / "r"
    _finished_run(run)
    before = sorted(p.name for p in run.iterdir())
    with pytest.raises(NothingToDo, match=r"finished \(2 epochs.*--epochs N with N > 2"):
        rundir.prepare_run_dir(run, resume=True, overwrite=False)
    assert sorted(p.name for p in run.iterdir()) == before  # not even a lock file
    rundir.prepare_run_dir(
        run, resume=True, overwrite=False, requested_epochs=5
    ).release()  # extend


def test_resume_empty_and_missing(tmp_path):
    with pytest.raises(UserError, match="empty string"):
        rundir.check_resume_arg("")
    with pytest.raises(UserError, match="empty string"):
        rundir.prepare_run_dir("", resume=True, overwrite=False)
    with pytest.raises(UserError, match="not a folder"):
        rundir.prepare_run_dir(tmp_path / "nope", resume=True, overwrite=False)


def test_edited_config_is_detected_and_named(tmp_path):
    import yaml

    cfg = {"optim": {"lr": 0.001, "epochs": 2}, "run": {"seed": 0}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    h = rundir.config_hash(tmp_path / "config.yaml")
    rundir.check_config_unchanged(tmp_path, h, cfg)  # unchanged: fine
    rundir.check_config_unchanged(tmp_path, None, cfg)  # an old checkpoint without a hash: no check
    (tmp_path / "config.yaml").write_text(
        yaml.safe_dump({**cfg, "optim": {"lr": 0.01, "epochs": 2}})
    )
    with pytest.raises(
        UserError, match=r"edited since the run started \(optim.lr: 0.001 -> 0.01\)"
    ):
        rundir.check_config_unchanged(tmp_path, h, cfg)
    (tmp_path / "config.yaml").write_text("[broken")
    with pytest.raises(UserError, match="no longer a valid config"):
        rundir.check_config_unchanged(tmp_path, h, cfg)


# ---------------------------------------------------------------------------------------------
# 4. Data roots stay clean; 1. outputs


def test_run_or_cache_dir_inside_the_data_root_is_refused_before_writing(tmp_path):
    data = tmp_path / "flowers"
    data.mkdir()
    with pytest.raises(UserError, match="inside the data root"):
        rundir.prepare_run_dir(data / "runs" / "x", False, False, data_root=data)
    assert list(data.iterdir()) == []
    with pytest.raises(UserError, match="inside the data root"):
        rundir.refuse_inside(data, data, "cache dir")
    rundir.refuse_inside(tmp_path / "flowers2", data, "cache dir")  # a name prefix is not inside
    assert rundir.data_root("folder:" + str(data), "x") == data
    assert rundir.data_root("cifar100", "d") == Path("d/cifar-100-python")


def test_unknown_tilde_user_is_a_user_error():
    with pytest.raises(UserError, match="no such user"):
        rundir.expand_user("~no_such_user_xyz/cache", "--cache-dir")


def test_output_guard(tmp_path):
    run = tmp_path / "run"
    _old_run(run)
    for target in (run / "best.pt", run / "summary.json", run / "metrics.csv"):
        with pytest.raises(UserError, match="run's own files"):
            rundir.check_output_path(target, run, force=False)
    os.link(run / "best.pt", tmp_path / "alias.pt")  # a hard link to a run file, elsewhere
    with pytest.raises(UserError, match="run's own files"):
        rundir.check_output_path(tmp_path / "alias.pt", run, force=False)
    (tmp_path / "user.onnx").write_bytes(b"mine")
    with pytest.raises(UserError, match="not written by this command.*--force"):
        rundir.check_output_path(tmp_path / "user.onnx", run, force=False)
    rundir.check_output_path(tmp_path / "user.onnx", run, force=False, is_ours=lambda p: True)
    rundir.check_output_path(run / "best.pt", run, force=True)
    rundir.check_output_path(tmp_path / "new.onnx", run, force=False)
    with pytest.raises(UserError, match="is a folder"):
        rundir.check_output_path(tmp_path, run, force=True)


def test_temp_path_never_writes_through_a_hard_link(tmp_path):
    a, b = tmp_path / "best.pt", tmp_path / "last.pt"
    a.write_bytes(b"checkpoint")
    os.link(a, b)
    with io.temp_path(a) as tmp:
        tmp.write_bytes(b"export")
    assert a.read_bytes() == b"export" and b.read_bytes() == b"checkpoint"
    with pytest.raises(RuntimeError), io.temp_path(tmp_path / "x") as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]  # no temp left


def test_damaged_json_is_one_line(tmp_path):
    for text in ("{", "[1, 2]", "\xff", ""):
        (tmp_path / "summary.json").write_text(text, errors="surrogateescape")
        with pytest.raises(UserError) as e:
            rundir.read_json_file(tmp_path / "summary.json", "summary")
        assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# 8. One line, always: the failure policy


@pytest.mark.parametrize(
    "exc, code, text",
    [
        (
            OSError(errno.ENOSPC, "No space left on device", "runs/x/last.pt"),
            1,
            "no space left.*runs/x/last.pt",
        ),
        (
            OSError(errno.EROFS, "Read-only file system", "/ro/out.onnx"),
            1,
            "read-only.*/ro/out.onnx",
        ),
        (OSError(errno.EACCES, "Permission denied", "/root/x"), 2, "permission denied.*/root/x"),
        (MemoryError(), 1, "out of memory"),
        (
            RuntimeError(
                "[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: not enough memory: "
                "you tried "
                "to allocate 1099511627776 bytes."
            ),
            1,
            "out of memory.*batch-size",
        ),
        (
            torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
            1,
            "out of memory",
        ),
        (UserError("bad flag"), 2, "bad flag"),
        (RunFailure("disk gone"), 1, "disk gone"),
        (TrainingStopped("stopped", 143), 143, "stopped"),
    ],
)
def test_describe_failure(exc, code, text):
    import re

    got_code, line = describe_failure(exc)
    assert got_code == code and re.search(text, line) and "\n" not in line


def test_a_bug_is_not_described():
    assert describe_failure(KeyError("x")) is None
    assert describe_failure(RuntimeError("shape mismatch")) is None


# ---------------------------------------------------------------------------------------------
# 6. Stop when asked: the flag knows which signal


def test_stop_flag_records_the_signal_and_exit_code():
    from transferlab.stopflag import StopFlag

    with StopFlag() as stop:
        assert not stop() and stop.exit_code == 130
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop() and stop.signal_name == "SIGTERM" and stop.exit_code == 143
    with StopFlag() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop() and stop.exit_code == 130


# ---------------------------------------------------------------------------------------------
# Through the CLI, on one tiny trained run (the lead's wiring of rundir.py in experiment.py)

SMALL = [*TINY, "--model", "cnn", "--epochs", "1", "--batch-size", "20", "--val-size", "20"]
SMALL += ["--no-report"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(data dir, a finished run dir) from one tiny CNN run (60 train images, 4 classes)."""
    from transferlab.cli import main
    from transferlab.data.cifar import write_cifar_like

    root = tmp_path_factory.mktemp("safety")
    data = write_cifar_like(root / "data", n_train=60, n_test=20, n_classes=4)
    run = root / "run"
    assert main(["train", "--data-dir", str(data), "--run-dir", str(run), *SMALL]) == 0
    return data, run


def _state(run: Path) -> dict[str, tuple[int, int]]:
    return {
        p.name: (p.stat().st_size, p.stat().st_mtime_ns)
        for p in run.iterdir()
        if p.name != rundir.LOCK_NAME
    }


@pytest.mark.parametrize("bad", [["--data", "folder:/no/such/typo"], ["--model", "resnet181"]])
def test_overwrite_with_bad_input_keeps_the_old_run(trained, bad, capsys):
    from transferlab.cli import main

    data, run = trained
    before = _state(run)
    args = ["train", "--data-dir", str(data), "--run-dir", str(run), *SMALL, "--overwrite", *bad]
    assert main(args) == 2
    assert _state(run) == before
    assert "Traceback" not in capsys.readouterr().err


def test_second_writer_through_the_cli(trained, capsys):
    from transferlab.cli import main

    data, run = trained
    before = _state(run)
    held = rundir.RunLock.acquire(run / rundir.LOCK_NAME, "run dir")
    try:
        args = ["train", "--data-dir", str(data), "--run-dir", str(run), *SMALL, "--overwrite"]
        assert main(args) == 2
        assert f"in use by process {os.getpid()}" in capsys.readouterr().err
        assert _state(run) == before
    finally:
        held.release()


def test_resume_with_more_epochs_is_not_refused_as_a_flag(trained, capsys):
    from transferlab.cli import main

    _, run = trained
    held = rundir.RunLock.acquire(run / rundir.LOCK_NAME, "run dir")
    try:  # held, so the resume stops at the lock: what matters is that --epochs got that far
        assert main(["train", "--resume", str(run), "--epochs", "5"]) == 2
        assert "in use by process" in capsys.readouterr().err
    finally:
        held.release()


def test_resume_of_a_finished_run_exits_0_untouched(trained, capsys):
    from transferlab.cli import main

    _, run = trained
    before = _state(run)
    assert main(["train", "--resume", str(run)]) == 0
    assert "is finished" in capsys.readouterr().out
    assert _state(run) == before


def test_runs_and_report_on_damaged_files_are_one_line(trained, tmp_path, capsys):
    import shutil

    from transferlab.cli import main

    _, run = trained
    for i, text in enumerate(
        ["{", "[]", '{"model": 3, "epochs_run": "x", "test": [], "time_s": {"total": "?"}}']
    ):
        d = tmp_path / "runs" / f"r{i}"
        d.mkdir(parents=True)
        (d / "summary.json").write_text(text)
    assert main(["runs", str(tmp_path / "runs")]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    for name, text in (("summary.json", "{not json"), ("metrics.csv", "epoch,train_loss\n1,abc\n")):
        shutil.copy(run / name, tmp_path / "saved")
        (copy / name).write_text(text)
        code = main(["report", str(copy)])
        err = capsys.readouterr().err
        assert (
            code in (0, 1, 2) and "Traceback" not in err and len(err.strip().splitlines()) <= 1
        ), err
        shutil.copy(tmp_path / "saved", copy / name)


def test_compare_report_on_a_damaged_summary_is_one_line(trained, tmp_path):
    import shutil

    from transferlab.report.compare_report import write_compare_report

    _, run = trained
    shutil.copytree(run, tmp_path / "cnn")
    (tmp_path / "cnn" / "summary.json").write_text('{"model": "cnn", "test": 3}')
    with pytest.raises(UserError, match="damaged"):
        write_compare_report(tmp_path)


# ---------------------------------------------------------------------------------------------
# The rest of the one-line policy: version, models, env, warnings, progress


def test_version_models_and_torchrun_env(capsys, monkeypatch):
    from transferlab.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and "transferlab 0." in capsys.readouterr().out
    assert main(["models", "--timm", "no_such_model_zz"]) == 0
    assert "no timm model matches 'no_such_model_zz'" in capsys.readouterr().out
    for name, value in (
        ("RANK", "abc"),
        ("WORLD_SIZE", "0"),
        ("MASTER_PORT", "99999"),
        ("LOCAL_RANK", "-1"),
    ):
        monkeypatch.setenv(name, value)
        assert main(["models"]) == 2
        err = capsys.readouterr().err
        assert name in err and len(err.strip().splitlines()) == 1
        monkeypatch.delenv(name)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["models"]) == 2 and "below WORLD_SIZE" in capsys.readouterr().err


def test_debug_shows_the_traceback_and_bugs_are_one_line(monkeypatch, capsys):
    from transferlab import cli

    def boom():
        raise KeyError("oops")

    monkeypatch.setattr(cli.registry, "torchvision_names", boom)  # a bug inside `models`
    assert cli.main(["models"]) == 1
    err = capsys.readouterr().err
    assert "internal error (KeyError" in err and "Traceback" not in err
    assert cli.main(["--debug", "models"]) == 1
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.setenv("TRANSFERLAB_DEBUG", "1")
    assert cli.main(["models"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_disk_full_and_oom_map_to_exit_1(monkeypatch, capsys):
    from transferlab import cli

    for exc in (
        OSError(errno.ENOSPC, "No space left on device", "runs/x/last.pt"),
        RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 10 GB"),
    ):
        monkeypatch.setattr(
            cli.registry, "torchvision_names", lambda exc=exc: (_ for _ in ()).throw(exc)
        )
        assert cli.main(["models"]) == 1
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and ("last.pt" in err or "out of memory" in err)


def test_third_party_warnings_go_to_the_log(monkeypatch, capsys, caplog):
    import logging
    import warnings

    from transferlab import cli

    def warn():
        warnings.warn("Glyph 8722 missing from current font.", UserWarning, stacklevel=1)
        return []

    monkeypatch.setattr(cli.registry, "torchvision_names", warn)
    with caplog.at_level(logging.DEBUG, logger="py.warnings"):
        assert cli.main(["models"]) == 0
    assert "Glyph 8722" not in capsys.readouterr().err
    assert "Glyph 8722" in caplog.text


def test_progress_without_a_terminal_writes_plain_lines(monkeypatch, caplog):
    import logging

    from transferlab import progress as prog

    monkeypatch.setattr(prog, "PLAIN_EVERY_S", 0.0)

    class Batches(list):
        num_samples = 10

    batches = Batches((torch.zeros(2), torch.zeros(2)) for _ in range(5))
    with caplog.at_level(logging.INFO, logger="transferlab.progress"):
        out = list(prog.progress(batches, "epoch 1", enabled=True, tty=False))
    assert len(out) == 5
    assert (
        "\r" not in caplog.text
        and "epoch 1: 2/10 img" in caplog.text
        and "10 img in" in caplog.text
    )


# ---------------------------------------------------------------------------------------------
# 2. Delete only what you own: the feature cache


def test_cache_clear_removes_only_our_entries(tmp_path, capsys):
    import socket

    from safetensors.torch import save_file

    from transferlab.cli import main
    from transferlab.features import cache as fcache
    from transferlab.io import TMP_MARK

    host = socket.gethostname()
    ours = fcache.save_entry(tmp_path, "a" * 24, {"features": torch.ones(2, 3)}, {"split": "train"})
    save_file({"w": torch.ones(2)}, str(tmp_path / "my_model.safetensors"))  # a user's own file
    (tmp_path / "notes.txt").write_text("mine")
    user_tmp = tmp_path / ".draft.tmp"  # a user's hidden temp file: not ours either
    user_tmp.write_text("x")
    live = tmp_path / f".{'b' * 24}.safetensors{TMP_MARK}{host}-{os.getpid()}-ab12"
    live.write_text("being written")
    dead = tmp_path / f".{'c' * 24}.safetensors{TMP_MARK}{host}-999999-cd34"
    dead.write_text("left by a killed run")
    assert main(["cache", "list", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "1 entries" in out and "not ours, left alone (2): my_model.safetensors, notes.txt" in out
    assert main(["cache", "clear", "--cache-dir", str(tmp_path)]) == 0
    assert "removed 2 file(s)" in capsys.readouterr().out
    assert not ours.exists() and not dead.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [".draft.tmp", live.name, "my_model.safetensors", "notes.txt"]
    )


def test_cache_entry_tag_and_unknown_user(tmp_path, monkeypatch):
    from transferlab.features import cache as fcache

    fcache.save_entry(tmp_path, "k", {"features": torch.ones(2, 3)}, {"split": "train"})
    tensors, meta = fcache.load_entry(tmp_path, "k")
    assert meta[fcache.FORMAT_KEY] == fcache.FORMAT_TAG
    monkeypatch.setenv(fcache.ENV_VAR, "~no_such_user_xyz/c")
    with pytest.raises(UserError, match="no such user"):
        fcache.cache_root("")


def test_overwrite_refuses_a_folder_that_is_not_a_run(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("years of work")
    with pytest.raises(UserError, match="not a transferlab run"):
        rundir.prepare_run_dir(home, resume=False, overwrite=True)
    assert (home / "thesis.tex").read_text() == "years of work"
    _old_run(tmp_path / "r")
    (tmp_path / "r" / "cifar-100-python").mkdir()
    with pytest.raises(UserError, match="would move your data"):
        rundir.prepare_run_dir(
            tmp_path / "r", False, True, data_root=tmp_path / "r" / "cifar-100-python"
        )


def test_config_ranges_before_data():
    from transferlab.config import Config
    from transferlab.validate import check_batch_size, check_ranges, expected_train_images

    for section, field, value, match in (
        ("run", "seed", 2**32, "seeds are 0..4294967295"),
        ("data", "split_seed", -1, "out of range"),
        ("data", "image_size", 2048, "above 1024 px: pretrained backbones"),
        ("data", "crop_padding", 2**32, "larger than the 32 px input side"),
        ("data", "cutout", 33, "larger than the 32 px input side"),
        ("data", "num_workers", 10**6, "each worker is a process"),
        ("data", "val_size", 50_000, "leaves no CIFAR-100 training images"),
    ):
        cfg = Config()
        setattr(getattr(cfg, section), field, value)
        with pytest.raises(UserError, match=match):
            check_ranges(cfg)
    check_ranges(Config())
    cfg = Config()
    cfg.data.train_subset = 300
    assert expected_train_images(cfg) == 300
    with pytest.raises(UserError, match="larger than the 300 training images"):
        check_batch_size(500, 300)
    check_batch_size(300, 300)


def test_resuming_a_copied_run_writes_only_to_the_copy(trained, tmp_path):
    import shutil

    from transferlab.cli import main

    _, run = trained
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    (copy / "summary.json").unlink()  # not finished: the resume trains
    before = _state(run)
    assert main(["train", "--resume", str(copy), "--epochs", "2"]) == 0
    assert _state(run) == before
    assert (copy / "summary.json").is_file()


def test_torch_save_short_write_is_a_disk_failure():
    err = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 411904 vs 4118")
    code, line = describe_failure(err)
    assert code == 1 and "disk is most likely full" in line


def test_make_output_dir_names_the_flag(tmp_path):
    (tmp_path / "file").write_text("x")
    assert rundir.make_output_dir(tmp_path / "a" / "b", "--out").is_dir()
    with pytest.raises(UserError, match=r"cannot create .*; choose another --out$"):
        rundir.make_output_dir(tmp_path / "file" / "sub", "--out")
