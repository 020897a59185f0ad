"""The run dir's layout (RunDir, StudyDir, the marker), summary.json (Summary and its one
upgrader), the one atomic writer (io.write_atomic and its temp marker), and the filelock lock."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from transferlab import io
from transferlab.errors import UserError
from transferlab.rundir import (
    RUN_FILES,
    SUMMARY_VERSION,
    RunDir,
    RunLock,
    StudyDir,
    Summary,
    prepare_run_dir,
    upgrade_summary,
)

SUMMARY = {
    "model": "cnn",
    "mode": "scratch",
    "run_dir": "runs/x",
    "weights": "n/a (scratch)",
    "params": {"total": 10, "trainable": 10},
    "train": {"loss": 1.0, "acc": 0.5},
    "val": {"loss": 1.1, "acc": 0.4},
    "test": {"loss": 1.2, "acc": 0.3},
    "best_epoch": 1,
    "epochs_run": 2,
    "stop_reason": "epochs done",
    "time_s": {"total": 1.5, "train": 1.0, "eval": 0.2, "setup": 0.1},
    "data": {"md5": {}, "split_seed": 0},
}


def test_run_dir_names_every_run_file_once(tmp_path):
    files = RunDir(tmp_path)
    assert files.summary == tmp_path / "summary.json" and files.metrics == tmp_path / "metrics.csv"
    assert files / RunDir.LAST == files.last
    assert {RunDir.SUMMARY, RunDir.METRICS, RunDir.MARKER, RunDir.LOCK} <= RUN_FILES
    assert StudyDir(tmp_path).csv == tmp_path / "study.csv"


def test_marker_says_whose_folder_it_is(tmp_path):
    assert not RunDir.is_ours(tmp_path)
    RunDir(tmp_path).write_marker()
    assert RunDir.is_ours(tmp_path) and not StudyDir.is_ours(tmp_path)
    assert json.loads(RunDir(tmp_path).marker.read_text()) == {
        "format": "transferlab-run",
        "version": 1,
    }
    (tmp_path / RunDir.MARKER).write_text("not json")
    assert not RunDir.is_ours(tmp_path)
    StudyDir(tmp_path).write_marker()
    assert StudyDir.is_ours(tmp_path)


def test_a_new_run_dir_is_marked_first_and_a_failed_one_leaves_nothing(tmp_path):
    handle = prepare_run_dir(tmp_path / "run", resume=False, overwrite=False)
    assert RunDir.is_ours(tmp_path / "run")
    handle.rollback()
    handle.release()
    assert not (tmp_path / "run").exists()


def test_summary_round_trip_has_a_version(tmp_path):
    s = Summary.from_dict(SUMMARY)
    s.write(RunDir(tmp_path).summary)
    raw = json.loads((tmp_path / "summary.json").read_text())
    assert raw["version"] == SUMMARY_VERSION and list(raw)[:3] == ["model", "mode", "run_dir"]
    assert Summary.read(tmp_path) == s and s.test["acc"] == 0.3


def test_the_one_upgrader_reads_version_0_files(tmp_path):
    old = {k: v for k, v in SUMMARY.items() if k != "weights"}
    old["feature_cache"] = {"seconds": 2.0, "splits": {"train": {"hit": True}}}
    (tmp_path / "config.yaml").write_text("model:\n  mode: frozen\n  weights: imagenet\n")
    (tmp_path / "summary.json").write_text(json.dumps(old))
    s = Summary.read(tmp_path)
    assert s.version == SUMMARY_VERSION and s.weights == "imagenet"
    assert s.feature_cache == {"seconds": 2.0, "train": {"hit": True}}
    assert upgrade_summary(SUMMARY)["version"] == SUMMARY_VERSION


@pytest.mark.parametrize(
    "text, match",
    [
        ("{", "not valid JSON"),
        ("[]", "holds a list"),
        ('{"model": "cnn", "test": 3}', "no mode"),
        (json.dumps({**SUMMARY, "tset": {}}), "unknown tset"),
        (json.dumps({**SUMMARY, "test": 3}), "test not an object"),
        (json.dumps({**SUMMARY, "version": 99}), "newer transferlab"),
    ],
)
def test_a_damaged_summary_is_one_user_error(tmp_path, text, match):
    (tmp_path / "summary.json").write_text(text)
    with pytest.raises(UserError, match=match):
        Summary.read(tmp_path)


def test_write_atomic_takes_bytes_text_writers_json_and_torch(tmp_path):
    io.write_atomic(tmp_path / "b", b"\x00\x01")
    io.write_atomic(tmp_path / "t", "héllo")
    io.write_atomic(tmp_path / "n.npz", lambda f: np.savez(f, x=np.arange(3)))
    io.write_json(tmp_path / "j.json", {"a": 1}, newline=True)
    io.write_torch(tmp_path / "m.pt", {"w": torch.ones(2)})
    assert (tmp_path / "b").read_bytes() == b"\x00\x01"
    assert (tmp_path / "t").read_text() == "héllo"
    assert np.load(tmp_path / "n.npz")["x"].tolist() == [0, 1, 2]
    assert (tmp_path / "j.json").read_text() == '{\n  "a": 1\n}\n'
    assert torch.load(tmp_path / "m.pt", weights_only=True)["w"].sum() == 2
    assert not [p for p in tmp_path.iterdir() if io.is_temp(p)]


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text("old")

    def boom(f):
        f.write(b"half")
        raise RuntimeError("disk")

    with pytest.raises(RuntimeError):
        io.write_atomic(path, boom)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_stale_temps_are_swept_and_live_ones_kept(tmp_path):
    host = socket.gethostname()
    live = tmp_path / f".a{io.TMP_MARK}{host}-{os.getpid()}-abcd1234"
    dead = tmp_path / f".b{io.TMP_MARK}{host}-999999-abcd1234"
    dead_dir = tmp_path / f".c{io.TMP_MARK}{host}-999999-abcd1234"
    other_host = tmp_path / f".d{io.TMP_MARK}elsewhere-999999-abcd1234"
    for p in (live, dead, other_host):
        p.write_text("x")
    dead_dir.mkdir()
    (dead_dir / "model.xml").write_text("xy")
    removed = io.sweep_stale_temps(tmp_path)
    assert removed == {dead: 1, dead_dir: 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other_host.name])


def test_lock_names_its_holder_and_a_killed_holder_frees_it(tmp_path):
    path = tmp_path / RunDir.LOCK
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from transferlab.rundir import RunLock; "
            f"lock = RunLock.acquire(Path({str(path)!r}), 'run dir'); print('locked', flush=True); "
            "time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=f"in use by process {holder.pid}"):
            RunLock.acquire(path, "run dir")
    finally:
        holder.kill()
        holder.wait()
    RunLock.acquire(path, "run dir").release()  # the kernel freed the killed holder's lock
