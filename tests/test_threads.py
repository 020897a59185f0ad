"""Threads on a shared CPU (issue 25): the count follows the free cores, re-checked during
training, ``--threads`` and the user's OMP_NUM_THREADS win, every choice is logged, and the CLI
entry leaves OpenMP's wait policy alone. No timing: the measurement is replaced where a test
needs a value."""

from __future__ import annotations

import logging
import math
import subprocess
import sys

import pytest
import torch

from transferlab import threads
from transferlab.cli import main
from transferlab.config import RunConfig
from transferlab.errors import UserError


@pytest.fixture
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(
    ("busy", "cores", "want"), [(0.0, 2, 2), (0.3, 2, 2), (1.0, 2, 1), (1.8, 2, 1), (7.0, 4, 1)]
)
def test_free_threads_rounds_the_free_cores(busy, cores, want):
    assert threads.free_threads(busy, cores) == want


def test_busy_elsewhere_reads_this_machine():
    busy = threads.busy_elsewhere(0.05)
    assert math.isfinite(busy) and busy >= 0


def test_measured_count_is_used_and_logged(monkeypatch, caplog, keep_threads):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    monkeypatch.setattr(threads, "busy_elsewhere", lambda: 1.7)  # one other job on the 2 cores
    with caplog.at_level(logging.INFO, "transferlab.threads"):
        assert threads.use_threads(0, "train") == 1
    assert torch.get_num_threads() == 1
    (line,) = [r.getMessage() for r in caplog.records if r.name == "transferlab.threads"]
    assert line.startswith("threads for train: 1 (2 cores, 1.7 busy") and "--threads N" in line


def test_threads_flag_wins_then_omp_num_threads(monkeypatch, caplog, keep_threads):
    monkeypatch.setattr(threads, "busy_elsewhere", lambda: 0.0)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    with caplog.at_level(logging.INFO, "transferlab.threads"):
        assert threads.use_threads(2, "extract") == 2
        assert threads.use_threads(0, "extract") == 1
    lines = [r.getMessage() for r in caplog.records if r.name == "transferlab.threads"]
    assert "(--threads;" in lines[0] and "(OMP_NUM_THREADS;" in lines[1]


def test_threads_must_not_be_negative():
    with pytest.raises(UserError, match="--threads must be >= 0"):
        RunConfig(threads=-1)


def test_threads_above_the_cores_is_one_line_exit_2(tmp_path, capsys):
    n = threads.usable_cores() + 1
    args = ["train", "--model", "cnn", "--threads", str(n), "--run-dir", str(tmp_path / "r")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--threads {n} is more than" in err


def test_a_run_logs_its_threads_and_gives_the_count_back(
    tiny_cifar, tmp_path, caplog, keep_threads
):
    torch.set_num_threads(2)
    args = ["train", "--data-dir", str(tiny_cifar), "--run-dir", str(tmp_path / "run")]
    args += ["--model", "cnn", "--epochs", "1", "--no-progress", "--device", "cpu"]
    args += ["--val-size", "50", "--batch-size", "50", "--threads", "1", "--no-report"]
    with caplog.at_level(logging.INFO, "transferlab.threads"):
        assert main(args) == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "transferlab.threads"]
    assert lines and lines[0].startswith("threads for train: 1 (--threads")
    assert torch.get_num_threads() == 2  # a library caller's count is put back


def test_entry_tunes_the_heap_before_torch_and_leaves_openmp_waits_alone():
    """The entry module imports no torch (mallopt comes first) and sets no OpenMP wait policy:
    the thread count handles neighbours (see transferlab/entry.py for the measurement)."""
    code = (
        "import os, sys\n"
        "for k in ('OMP_WAIT_POLICY', 'GOMP_SPINCOUNT'):\n"
        "    os.environ.pop(k, None)\n"
        "import transferlab.entry as e\n"
        "assert 'torch' not in sys.modules\n"
        "try:\n"
        "    e.main(['--version'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "assert 'torch' in sys.modules\n"
        "print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().endswith("None None")


def test_thread_watch_follows_a_neighbour_between_epochs(monkeypatch, caplog, keep_threads):
    """After an epoch, the count follows the cores others used during it, and a change is logged;
    no change logs nothing."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    busy = iter([1.2, 1.1, 0.1])  # a neighbour starts, stays, then stops
    monkeypatch.setattr(threads, "_busy_between", lambda a, b: next(busy))
    torch.set_num_threads(2)
    watch = threads.ThreadWatch(0, "train")
    with caplog.at_level(logging.INFO, "transferlab.threads"):
        assert [watch.recheck() for _ in range(3)] == [1, None, 2]
    lines = [r.getMessage() for r in caplog.records if r.name == "transferlab.threads"]
    assert len(lines) == 2 and lines[0].startswith("threads for train: 2 -> 1 (2 cores, 1.2 busy")
    assert torch.get_num_threads() == 2


def test_thread_watch_ticks_only_after_its_interval(monkeypatch, keep_threads):
    """``tick`` re-checks once ``every_s`` seconds have passed since the last check, not before."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    monkeypatch.setattr(threads, "_busy_between", lambda a, b: 1.5)
    torch.set_num_threads(2)
    assert threads.ThreadWatch(0, "train", every_s=3600).tick() is None
    assert torch.get_num_threads() == 2
    assert threads.ThreadWatch(0, "train", every_s=0).tick() == 1
    assert torch.get_num_threads() == 1


def test_a_neighbour_is_seen_within_the_epoch(
    tiny_cifar, tmp_path, monkeypatch, caplog, keep_threads
):
    """Training ticks the watch after every batch: a neighbour that starts mid-epoch (here: from
    the first batch on) lowers the count before the epoch ends, not at the next epoch."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    monkeypatch.setattr(threads, "busy_elsewhere", lambda: 0.0)  # quiet when the phase starts
    monkeypatch.setattr(threads, "_busy_between", lambda a, b: 1.5)  # then a neighbour
    monkeypatch.setattr(threads, "RECHECK_S", 0.0)
    ticks = []
    tick = threads.ThreadWatch.tick
    monkeypatch.setattr(threads.ThreadWatch, "tick", lambda self: ticks.append(1) or tick(self))
    args = ["train", "--data-dir", str(tiny_cifar), "--run-dir", str(tmp_path / "run")]
    args += ["--model", "cnn", "--epochs", "1", "--no-progress", "--device", "cpu"]
    args += ["--val-size", "50", "--batch-size", "50", "--no-report"]
    with caplog.at_level(logging.INFO, "transferlab"):
        assert main(args) == 0
    assert len(ticks) == 5  # 250 training images in batches of 50
    lines = [r.getMessage() for r in caplog.records]
    change = next(i for i, m in enumerate(lines) if m.startswith("threads for train: 2 -> 1"))
    assert change < next(i for i, m in enumerate(lines) if m.startswith("epoch 1/1"))


def test_thread_watch_leaves_a_pinned_count(monkeypatch, keep_threads):
    monkeypatch.setattr(threads, "_busy_between", lambda a, b: 5.0)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    torch.set_num_threads(2)
    assert threads.ThreadWatch(0, "train").recheck() is None
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert threads.ThreadWatch(2, "train").recheck() is None
    assert torch.get_num_threads() == 2


def test_own_cpu_counts_a_busy_child():
    """A child process's CPU time is this process's own (DataLoader workers are not neighbours)."""
    child = subprocess.Popen(
        [sys.executable, "-c", "import time\nt=time.time()\nwhile time.time()-t<0.6: pass"]
    )
    try:
        before = threads._own_cpu_s()
        child.wait()
    finally:
        child.kill()
    # a reaped child counts through os.times; a live one through /proc: either way it counts
    assert threads._own_cpu_s() - before > 0.2
