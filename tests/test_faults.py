"""Reliability and security: hostile files are refused, faults stop cleanly, no work is lost.

Every test drives the real CLI (``transferlab.cli.main`` in-process, or ``python -m transferlab``
in a subprocess where a real process must be killed or signalled) on a tiny synthetic CIFAR in
the real file format, on the CPU in fp32 with a fixed seed, so resumed runs can be compared with
uninterrupted ones bit for bit (as printed in metrics.csv and summary.json).
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import metrics_rows
from transferlab.cli import main
from transferlab.features import cache as fcache
from transferlab.rundir import RunDir

# One torch thread everywhere: the killed child and the in-process reference and resume must
# reduce in the same order (float32 sums differ with the thread count on some CPUs).
COMMON = ["--no-progress", "--device", "cpu", "--precision", "fp32", "--threads", "1"]
AUG = ["--crop-padding", "4", "--flip"]  # augmentation RNG must survive an interrupt too
# Columns that must match exactly between an interrupted-and-resumed run and an uninterrupted one
# (epoch_time_s and train_img_s are wall-clock measurements).
EXACT_COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr"]
LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO|WARNING) ")


def train_argv(
    data: Path, run_dir: Path, *extra: str, epochs: int = 3, batch_size: int = 50
) -> list[str]:
    return [
        "train",
        *COMMON,
        "--data-dir",
        str(data),
        "--val-size",
        "50",
        "--epochs",
        str(epochs),
        "--batch-size",
        str(batch_size),
        "--seed",
        "7",
        "--run-dir",
        str(run_dir),
        *extra,
    ]


def resume_argv(run_dir: Path) -> list[str]:
    return ["train", "--no-progress", "--device", "cpu", "--resume", str(run_dir)]


def run_cli(capsys, argv: list[str]) -> tuple[int, str]:
    """Run the CLI in-process; returns (exit code, stderr without log lines)."""
    rc = main(argv)
    err = capsys.readouterr().err
    return rc, "\n".join(line for line in err.splitlines() if not LOG_LINE.match(line))


def assert_one_line_error(err: str, *needles: str) -> None:
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def exact_metrics(run_dir: Path) -> list[list[str]]:
    return [[r[c] for c in EXACT_COLUMNS] for r in metrics_rows(run_dir)]


def test_summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())["test"]


test_summary.__test__ = False  # a helper, not a test


def assert_same_run(run_dir: Path, reference: Path) -> None:
    """Metrics rows (minus timings) and the final test loss/acc equal the reference's exactly."""
    assert exact_metrics(run_dir) == exact_metrics(reference)
    assert test_summary(run_dir) == test_summary(reference)
    ours, theirs = (
        load_ckpt(run_dir / "last.pt")["model"],
        load_ckpt(reference / "last.pt")["model"],
    )
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def load_ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


class Payload:
    """Unpickling this creates ``marker``: proof that a loader ran code from a file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def leftover_tmp(run_dir: Path) -> list[str]:
    return [p.name for p in run_dir.glob(".*.tmp")]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread here and in subprocesses: the same float sums in both, and kind to the
    shared CPU (a resumed run is compared bit for bit with one from another process)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def reference(tiny_cifar, tmp_path_factory) -> Path:
    """An uninterrupted 3-epoch run with augmentation: what every resumed run must reproduce."""
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    assert main(train_argv(tiny_cifar, run_dir, *AUG)) == 0
    assert len(metrics_rows(run_dir)) == 3
    return run_dir


# ------------------------------------------------------------------ hostile files


def test_payload_is_live(tmp_path):
    """Sanity check of the test itself: a plain pickle.load of the payload does run code."""
    marker = tmp_path / "marker"
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()


@pytest.mark.parametrize("where", ["top", "inside-dict"])
def test_hostile_cifar_pickle_is_refused(cifar_copy, tmp_path, capsys, where):
    marker = tmp_path / "pwned"
    obj = Payload(marker) if where == "top" else {"data": Payload(marker), "fine_labels": [0]}
    target = cifar_copy / "cifar-100-python" / "train"
    target.write_bytes(pickle.dumps(obj, protocol=2))
    rc, err = run_cli(capsys, train_argv(cifar_copy, tmp_path / "run", epochs=1))
    assert rc == 2
    assert_one_line_error(err, str(target), "refus")
    assert not marker.exists()


@pytest.fixture(scope="module")
def one_epoch_run(trained_run) -> Path:
    """A finished 1-epoch cnn run (the tests copy it before damaging its checkpoints)."""
    return trained_run("--epochs", "1", "--seed", "7")


def copy_run(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_hostile_checkpoint_is_refused_on_resume(one_epoch_run, tmp_path, capsys):
    run_dir = copy_run(one_epoch_run, tmp_path / "run")
    marker = tmp_path / "pwned"
    ckpt = load_ckpt(run_dir / "last.pt")
    ckpt["extra"] = Payload(marker)  # a real checkpoint with one poisoned entry
    torch.save(ckpt, run_dir / "last.pt")
    rc, err = run_cli(capsys, resume_argv(run_dir))
    assert rc == 2
    assert_one_line_error(err, str(run_dir / "last.pt"), "refused")
    assert not marker.exists()


def test_hostile_weights_file_is_refused(tiny_cifar, tmp_path, capsys):
    marker = tmp_path / "pwned"
    weights = tmp_path / "resnet18.pth"
    torch.save({"conv1.weight": torch.zeros(1), "evil": Payload(marker)}, weights)
    argv = train_argv(
        tiny_cifar,
        tmp_path / "run",
        "--model",
        "resnet18",
        "--weights",
        str(weights),
        "--mode",
        "finetune",
        "--image-size",
        "32",
        epochs=1,
    )
    rc, err = run_cli(capsys, argv)
    assert rc == 2
    assert_one_line_error(err, str(weights), "refused")
    assert not marker.exists()


# ------------------------------------------------------------------ corrupt input


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garble(path: Path) -> None:
    data = bytearray(path.read_bytes())
    rng = torch.Generator().manual_seed(0)
    for i in torch.randint(0, len(data), (64,), generator=rng).tolist():
        data[i] ^= 0xFF
    path.write_bytes(bytes(data[:200]) + os.urandom(50) + bytes(data[200:]))


def _garbage(path: Path) -> None:
    path.write_bytes(os.urandom(4096))


DAMAGE = {
    "truncated": _truncate,
    "garbled": _garble,
    "garbage": _garbage,
    "empty": lambda p: p.write_bytes(b""),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
@pytest.mark.parametrize("name", ["train", "meta"])
def test_corrupt_cifar_file_is_a_clear_error(cifar_copy, tmp_path, capsys, damage, name):
    target = cifar_copy / "cifar-100-python" / name
    DAMAGE[damage](target)
    rc, err = run_cli(capsys, train_argv(cifar_copy, tmp_path / "run", epochs=1))
    assert rc == 2
    assert_one_line_error(err, str(target))


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_corrupt_checkpoint_is_a_clear_error(one_epoch_run, tmp_path, capsys, damage):
    run_dir = copy_run(one_epoch_run, tmp_path / "run")
    DAMAGE[damage](run_dir / "last.pt")
    rc, err = run_cli(capsys, resume_argv(run_dir))
    assert rc == 2
    assert_one_line_error(err, str(run_dir / "last.pt"))


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_weights_file_is_a_clear_error(one_epoch_run, tiny_cifar, tmp_path, capsys, damage):
    weights = tmp_path / "w.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, weights)
    DAMAGE[damage](weights)
    argv = train_argv(
        tiny_cifar,
        tmp_path / "run",
        "--model",
        "resnet18",
        "--weights",
        str(weights),
        "--mode",
        "finetune",
        "--image-size",
        "32",
        epochs=1,
    )
    rc, err = run_cli(capsys, argv)
    assert rc == 2
    assert_one_line_error(err, str(weights))


def test_bad_feature_cache_files_are_not_run_but_rebuilt(tiny_cifar, tmp_path, capsys, caplog):
    cache_dir = tmp_path / "cache"
    argv = [
        "--model",
        "resnet18",
        "--weights",
        "none",
        "--mode",
        "frozen",
        "--image-size",
        "32",
        "--cache-dir",
        str(cache_dir),
    ]
    assert run_cli(capsys, train_argv(tiny_cifar, tmp_path / "a", *argv, epochs=1))[0] == 0
    entries = sorted(cache_dir.glob("*.safetensors"))
    assert len(entries) == 3  # train, val, test
    good = {p.stem: fcache.load_entry(cache_dir, p.stem)[0] for p in entries}
    marker = tmp_path / "pwned"
    # one entry each: a pickle payload where safetensors bytes belong, truncated, random bytes
    torch.save({"features": Payload(marker)}, entries[0])
    _truncate(entries[1])
    _garbage(entries[2])
    caplog.clear()
    assert run_cli(capsys, train_argv(tiny_cifar, tmp_path / "b", *argv, epochs=1))[0] == 0
    assert not marker.exists()
    assert sum("corrupt" in r.getMessage() for r in caplog.records) == 3
    for key, tensors in good.items():  # rebuilt with the same features
        rebuilt = fcache.load_entry(cache_dir, key)[0]
        assert all(torch.equal(rebuilt[k], tensors[k]) for k in ("features", "labels"))
    assert test_summary(tmp_path / "b") == test_summary(tmp_path / "a")


# ------------------------------------------------------------------ kill, signal, resume


def start_training(argv: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "transferlab", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def wait_for_rows(proc: subprocess.Popen, run_dir: Path, rows: int, timeout: float = 120) -> None:
    """Poll until metrics.csv holds ``rows`` epochs (the process must still be running)."""
    path, deadline = run_dir / "metrics.csv", time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= rows + 1:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    proc.kill()
    pytest.fail(f"metrics.csv never reached {rows} rows")


@pytest.mark.parametrize("every", [0, 2], ids=["epoch-ckpt", "step-ckpt"])
def test_kill_9_then_resume_reproduces_the_run(tiny_cifar, reference, tmp_path, capsys, every):
    run_dir = tmp_path / "run"
    proc = start_training(train_argv(tiny_cifar, run_dir, *AUG, "--ckpt-every-steps", str(every)))
    wait_for_rows(proc, run_dir, 1)  # epoch 2 (of 3) is under way
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (run_dir / "summary.json").exists()  # it really died before the end
    rc, err = run_cli(capsys, resume_argv(run_dir))
    assert rc == 0, err
    assert_same_run(run_dir, reference)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_saves_checkpoint_and_resume_reproduces_the_run(
    tiny_cifar, reference, tmp_path, capsys, sig
):
    run_dir = tmp_path / "run"
    proc = start_training(train_argv(tiny_cifar, run_dir, *AUG))
    wait_for_rows(proc, run_dir, 1)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err  # the shell's convention: SIGINT 130, SIGTERM 143
    assert "Traceback" not in err
    assert f"transferlab train --resume {run_dir}" in err
    state = load_ckpt(run_dir / "last.pt")["fit_state"]
    assert state["epoch"] >= 1 and state["partial"]["step"] >= 1  # stopped within an epoch
    assert len(metrics_rows(run_dir)) == state["epoch"]
    assert not leftover_tmp(run_dir)
    rc, err = run_cli(capsys, resume_argv(run_dir))
    assert rc == 0, err
    assert_same_run(run_dir, reference)


def _png(path: Path) -> Path:
    from PIL import Image

    Image.new("RGB", (40, 40), (200, 30, 30)).save(path)
    return path


@pytest.mark.parametrize("damage", ["hostile", "truncated", "garbage"])
def test_predict_refuses_bad_checkpoint(one_epoch_run, tmp_path, capsys, damage):
    run_dir = copy_run(one_epoch_run, tmp_path / "run")
    image = _png(tmp_path / "x.png")
    assert (
        run_cli(capsys, ["predict", str(run_dir), str(image), "--device", "cpu"])[0] == 0
    )  # the good one works
    marker = tmp_path / "pwned"
    if damage == "hostile":
        ckpt = load_ckpt(run_dir / "best.pt")
        ckpt["classes"] = Payload(marker)
        torch.save(ckpt, run_dir / "best.pt")
    else:
        DAMAGE[damage](run_dir / "best.pt")
    rc, err = run_cli(capsys, ["predict", str(run_dir), str(image), "--device", "cpu"])
    assert rc == 2
    assert_one_line_error(err, str(run_dir / "best.pt"))
    assert not marker.exists()


def _drop(key):
    def edit(ckpt):
        del ckpt[key]

    return edit


def _other_model(ckpt):
    ckpt["model"] = {"weight": torch.zeros(3)}


def _bad_config(ckpt):
    ckpt["config"]["optim"]["lr"] = -1.0


WRONG = {
    "no-fit-state": _drop("fit_state"),
    "no-optimizer": _drop("optimizer"),
    "no-rng": _drop("rng"),
    "other-model": _other_model,
    "bad-config": _bad_config,
    "not-a-dict": None,
}


@pytest.mark.parametrize("wrong", list(WRONG))
def test_structurally_wrong_checkpoint_is_a_clear_error(one_epoch_run, tmp_path, capsys, wrong):
    """A loadable file that is not a complete transferlab checkpoint.

    One line naming it, for resume and predict.
    """
    run_dir = copy_run(one_epoch_run, tmp_path / "run")
    for name in ("last.pt", "best.pt"):
        ckpt = load_ckpt(run_dir / name)
        if WRONG[wrong] is None:
            ckpt = [1, 2, 3]
        else:
            WRONG[wrong](ckpt)
        torch.save(ckpt, run_dir / name)
    rc, err = run_cli(capsys, resume_argv(run_dir))
    assert rc == 2
    assert_one_line_error(err, str(run_dir / "last.pt"))
    if wrong in ("other-model", "bad-config", "not-a-dict"):
        rc, err = run_cli(
            capsys, ["predict", str(run_dir), str(_png(tmp_path / "x.png")), "--device", "cpu"]
        )
        assert rc == 2
        assert_one_line_error(err, str(run_dir / "best.pt"))


# ------------------------------------------------------------------ numerical faults


def nan_losses_at(monkeypatch, bad_steps: set[int]) -> None:
    """Make the training loss NaN at the given (0-based, whole-run) training steps."""
    real = torch.nn.functional.cross_entropy
    seen = {"n": 0}

    def cross_entropy(*args, **kwargs):
        loss = real(*args, **kwargs)
        if kwargs.get("reduction", "mean") != "mean":  # evaluate() sums: leave it alone
            return loss
        step, seen["n"] = seen["n"], seen["n"] + 1
        return loss * float("nan") if step in bad_steps else loss

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", cross_entropy)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_cifar, tmp_path, capsys, monkeypatch):
    run_dir = tmp_path / "run"
    nan_losses_at(monkeypatch, {7})  # 5 steps per epoch: the 3rd step of epoch 2
    rc, err = run_cli(capsys, train_argv(tiny_cifar, run_dir))
    assert rc == 1
    assert_one_line_error(err, "nan", "--nan-patience 0", "epoch 2")
    ckpt = load_ckpt(run_dir / "last.pt")
    assert ckpt["fit_state"]["epoch"] == 1 and not ckpt["fit_state"]["partial"]
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values() if t.is_floating_point())
    assert len(metrics_rows(run_dir)) == 1 and not leftover_tmp(run_dir)
    assert not (run_dir / "summary.json").exists()


def test_nan_patience_skips_that_many_steps(tiny_cifar, tmp_path, capsys, monkeypatch):
    nan_losses_at(monkeypatch, {3, 8})
    rc, err = run_cli(capsys, train_argv(tiny_cifar, tmp_path / "a", "--nan-patience", "1"))
    assert rc == 1 and "2 non-finite" in err
    nan_losses_at(monkeypatch, {3, 8})
    rc, err = run_cli(capsys, train_argv(tiny_cifar, tmp_path / "b", "--nan-patience", "2"))
    assert rc == 0, err
    assert len(metrics_rows(tmp_path / "b")) == 3


def test_huge_lr_stops_on_non_finite_loss(tiny_cifar, tmp_path, capsys):
    rc, err = run_cli(capsys, train_argv(tiny_cifar, tmp_path / "run", "--lr", "1e30", epochs=1))
    assert rc == 1
    assert_one_line_error(err, "non-finite", "--lr")


def test_non_finite_val_loss_never_becomes_the_checkpoint(
    tiny_cifar, tmp_path, capsys, monkeypatch
):
    """NaN weights after an epoch's last step must not overwrite last.pt.

    The train loss is still finite: only the weights are bad.
    """
    run_dir = tmp_path / "run"
    real = torch.nn.functional.cross_entropy
    evals = {"n": 0}

    def cross_entropy(*args, **kwargs):
        loss = real(*args, **kwargs)
        if kwargs.get("reduction") == "sum":  # validation: NaN from the 2nd epoch's val on
            evals["n"] += 1
            return loss * float("nan") if evals["n"] > 1 else loss
        return loss

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", cross_entropy)
    rc, err = run_cli(capsys, train_argv(tiny_cifar, run_dir))
    assert rc == 1
    assert_one_line_error(err, "validation loss", "epoch 2")
    assert load_ckpt(run_dir / "last.pt")["fit_state"]["epoch"] == 1
    assert len(metrics_rows(run_dir)) == 1


# ------------------------------------------------------------------ disk faults


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def fail_when(real, full):
    """A stand-in for ``real`` that raises ENOSPC once ``full(*args)`` says the disk is full."""

    def fn(*args, **kwargs):
        if full(*args):
            enospc()
        return real(*args, **kwargs)

    return fn


@pytest.mark.parametrize("target", ["torch.save", "os.replace", "os.fsync"])
def test_disk_full_during_checkpoint_keeps_previous_files(
    tiny_cifar, reference, tmp_path, capsys, monkeypatch, target
):
    run_dir = tmp_path / "run"
    argv = train_argv(tiny_cifar, run_dir, *AUG)
    assert (
        main(argv[: -len(AUG)] + AUG + ["--epochs", "1"]) == 0
    )  # a complete epoch-1 state to compare with
    good_ckpt = load_ckpt(run_dir / "last.pt")
    # the same run again, with the disk filling up after epoch 1's writes
    for p in run_dir.iterdir():
        p.unlink()
    module, name = target.split(".")
    real = getattr({"torch": torch, "os": os}[module], name)

    # The disk fills up by its effect, not by a call count: once epoch 2's metrics row is on disk,
    # the next checkpoint write fails at this step of the atomic writer (its payload, the fsync
    # of its temp file, or the rename onto last.pt), however many writes came before.
    def epoch_two_written(*args) -> bool:
        return (
            (run_dir / "metrics.csv").is_file()
            and len(metrics_rows(run_dir)) >= 2
            and (target != "os.replace" or Path(args[1]).name == "last.pt")
        )

    monkeypatch.setattr(
        {"torch": torch, "os": os}[module], name, fail_when(real, epoch_two_written)
    )
    rc, err = run_cli(capsys, argv)
    monkeypatch.undo()
    assert rc == 1
    assert_one_line_error(err, "No space left on device", "intact")
    assert not leftover_tmp(run_dir)
    ckpt = load_ckpt(run_dir / "last.pt")
    timing = ("train_s", "eval_s")
    assert {k: v for k, v in ckpt["fit_state"].items() if k not in timing} == {
        k: v for k, v in good_ckpt["fit_state"].items() if k not in timing
    }
    assert all(torch.equal(ckpt["model"][k], good_ckpt["model"][k]) for k in ckpt["model"])
    assert len(metrics_rows(run_dir)) in (1, 2)  # epoch 2's row may be in; resume redoes it
    assert exact_metrics(run_dir)[0] == exact_metrics(reference)[0]
    rc, err = run_cli(capsys, resume_argv(run_dir))  # space freed: resume finishes the run exactly
    assert rc == 0, err
    assert_same_run(run_dir, reference)


class HalfWriter:
    """A file whose writes put half the bytes on disk, then fail with ENOSPC."""

    def __init__(self, f):
        self.f = f

    def write(self, s):
        self.f.write(s[: len(s) // 2])
        self.f.flush()
        enospc()

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_disk_full_during_metrics_append_leaves_no_torn_row(
    tiny_cifar, reference, tmp_path, capsys, monkeypatch
):
    import builtins

    from transferlab import metrics

    run_dir = tmp_path / "run"
    opened = {"n": 0}

    def fake_open(path, mode="r", *args, **kwargs):
        f = builtins.open(path, mode, *args, **kwargs)
        if Path(path).name == "metrics.csv" and "a" in mode:
            opened["n"] += 1
            if opened["n"] == 2:  # epoch 2's row
                return HalfWriter(f)
        return f

    monkeypatch.setattr(metrics, "open", fake_open, raising=False)  # the metrics row writer
    rc, err = run_cli(capsys, train_argv(tiny_cifar, run_dir, *AUG))
    monkeypatch.undo()
    assert rc == 1
    assert_one_line_error(err, "metrics.csv", "No space left on device")
    assert exact_metrics(run_dir) == exact_metrics(reference)[:1]  # epoch 1's row, and no half row
    assert (run_dir / "metrics.csv").read_text().endswith("\n")
    assert load_ckpt(run_dir / "last.pt")["fit_state"]["epoch"] == 1
    rc, err = run_cli(capsys, resume_argv(run_dir))
    assert rc == 0, err
    assert_same_run(run_dir, reference)


def test_disk_full_writing_summary_is_one_line(tiny_cifar, tmp_path, capsys, monkeypatch):
    from transferlab import io

    real = io.write_atomic

    def write_atomic(path, data):  # the seam every run file goes through
        if Path(path).name == RunDir.SUMMARY:
            enospc()
        return real(path, data)

    monkeypatch.setattr(io, "write_atomic", write_atomic)
    rc, err = run_cli(capsys, train_argv(tiny_cifar, tmp_path / "run", epochs=1))
    assert rc == 1
    assert_one_line_error(err, "summary.json", "No space left on device")


# ------------------------------------------------------------------ run dir safety


def test_non_empty_run_dir_needs_overwrite(one_epoch_run, tiny_cifar, tmp_path, capsys):
    run_dir = copy_run(one_epoch_run, tmp_path / "run")
    before = (run_dir / "metrics.csv").read_bytes()
    rc, err = run_cli(capsys, train_argv(tiny_cifar, run_dir, epochs=1))
    assert rc == 2
    assert_one_line_error(err, str(run_dir), "--overwrite", "--resume")
    assert (run_dir / "metrics.csv").read_bytes() == before
    rc, err = run_cli(capsys, train_argv(tiny_cifar, run_dir, "--overwrite", epochs=2))
    assert rc == 0, err
    assert [r["epoch"] for r in metrics_rows(run_dir)] == [
        "1",
        "2",
    ]  # fresh rows, not appended to the old


def test_run_dir_that_is_a_file_is_refused(tiny_cifar, tmp_path, capsys):
    path = tmp_path / "file"
    path.write_text("x")
    rc, err = run_cli(capsys, train_argv(tiny_cifar, path, epochs=1))
    assert rc == 2
    assert_one_line_error(err, str(path))


def test_resume_without_checkpoint_is_refused(tmp_path, capsys):
    rc, err = run_cli(capsys, resume_argv(tmp_path))
    assert rc == 2
    assert_one_line_error(err, "last.pt")


def test_torn_metrics_row_is_dropped_on_resume(one_epoch_run, tiny_cifar, tmp_path, capsys):
    run_dir = copy_run(one_epoch_run, tmp_path / "run")
    (run_dir / "summary.json").unlink()  # killed before its end: a resume has work to do
    with open(run_dir / "metrics.csv", "a") as f:
        f.write("2,3.1")  # what a crash in the middle of a write could leave
    assert run_cli(capsys, resume_argv(run_dir))[0] == 0
    assert [r["epoch"] for r in metrics_rows(run_dir)] == ["1"]


def test_signal_handlers_are_restored_after_an_in_process_run(one_epoch_run, capsys):
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    run_cli(
        capsys, ["train", *COMMON, "--data-dir", "/nonexistent", "--run-dir", "/nonexistent/run"]
    )
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_checkpoints_every_n_steps(tiny_cifar, tmp_path, capsys, monkeypatch):
    from transferlab.training import fit

    saved = []
    real = fit.write_torch
    monkeypatch.setattr(
        fit,
        "write_torch",
        lambda path, obj: (
            saved.append(
                (
                    Path(path).name,
                    obj["fit_state"]["epoch"],
                    obj["fit_state"]["partial"].get("step"),
                )
            ),
            real(path, obj),
        )[1],
    )
    assert (
        run_cli(
            capsys, train_argv(tiny_cifar, tmp_path / "run", "--ckpt-every-steps", "2", epochs=2)
        )[0]
        == 0
    )
    last = [(e, s) for n, e, s in saved if n == "last.pt"]
    # 5 steps per epoch: before the first step, after steps 2 and 4, and at each epoch's end
    assert last == [(0, None), (0, 2), (0, 4), (1, None), (1, 2), (1, 4), (2, None)]


# ------------------------------------------------------------------ config and CLI validation

INVALID = {
    "negative lr": (["--lr", "-1"], "--lr"),
    "infinite lr": (["--lr", "inf"], "--lr"),
    "nan lr": (["--lr", "nan"], "--lr"),
    "unknown mode": (["--mode", "bogus"], "--mode"),
    "image size under 16": (["--image-size", "8"], "--image-size"),
    "negative patience": (["--patience", "-1"], "--patience"),
    "lbfgs without cache": (
        ["--model", "resnet18", "--head", "linear", "--solver", "lbfgs", "--no-feature-cache"],
        "--no-feature-cache",
    ),
    "frozen cnn": (["--mode", "frozen", "--model", "cnn"], "cnn"),
    "unknown model": (["--model", "nosuchnet"], "choices"),
    "zero epochs": (["--epochs", "0"], "--epochs"),
    "negative epochs": (["--epochs", "-2"], "--epochs"),
    "zero batch size": (["--batch-size", "0"], "--batch-size"),
    "non-integer epochs": (["--epochs", "two"], "--epochs"),
    "negative nan patience": (["--nan-patience", "-1"], "--nan-patience"),
    "negative ckpt steps": (["--ckpt-every-steps", "-5"], "--ckpt-every-steps"),
    "unknown precision": (["--precision", "fp8"], "--precision"),
    "unknown flag": (["--learning-rate", "1"], "--learning-rate"),
    "unknown preset": (["--preset", "nope"], "nope"),
}


@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_flag_is_one_line_exit_2(tiny_cifar, tmp_path, capsys, case):
    flags, needle = INVALID[case]
    argv = train_argv(tiny_cifar, tmp_path / "run", epochs=1) + flags
    try:
        rc, err = run_cli(capsys, argv)
    except SystemExit as e:  # argparse errors exit from parse_args
        rc, err = e.code, capsys.readouterr().err
    assert rc == 2
    assert_one_line_error(err, needle)
    assert not (tmp_path / "run" / "last.pt").exists()


def test_unwritable_run_dir(tiny_cifar, tmp_path, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    rc, err = run_cli(capsys, train_argv(tiny_cifar, blocker / "run", epochs=1))
    assert rc == 2
    assert_one_line_error(err, str(blocker / "run"), "--run-dir")


def test_missing_data_dir_mentions_download(tmp_path, capsys):
    rc, err = run_cli(capsys, train_argv(tmp_path / "nothing", tmp_path / "run", epochs=1))
    assert rc == 2
    assert_one_line_error(err, "--download", "--data-dir")


@pytest.mark.parametrize(
    "text",
    [
        b"\xff\xfe\x00 not utf-8",
        b"optim: [unclosed",
        b"- a list\n",
        b"optim: {lr: x}\n",
        b"optim: {patience: 1.0e+400}\n",
        b"optim: {grad_clip: .inf}\n",
        b"bogus: {}\n",
    ],
)
def test_bad_preset_file_is_one_line(tiny_cifar, tmp_path, capsys, text):
    preset = tmp_path / "p.yaml"
    preset.write_bytes(text)
    rc, err = run_cli(
        capsys, train_argv(tiny_cifar, tmp_path / "run", "--preset", str(preset), epochs=1)
    )
    assert rc == 2
    assert_one_line_error(err)
