"""Study executors: local, processes:N and ray give the same study.csv; a killed worker's cell is
retried and resumes; a killed driver resumes; a failing cell is recorded and the others go on;
the study lock; frozen arms extract once and their cells require the cache; bad --executor input.

Ray stays on loopback: the tests start it with ``ray.init`` on 127.0.0.1 with
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (which keeps Ray from swapping 127.0.0.1 for the machine's
interface address) and shut it down afterwards.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from transferlab.data.cifar import write_cifar_like
from transferlab.errors import UserError
from transferlab.rundir import LOCK_NAME
from transferlab.studies import run_study
from transferlab.studies.cells import cell_spec, run_task, train_argv
from transferlab.studies.executors import Resources, parse_executor
from transferlab.studies.grid import make_grid, plan_cells
from transferlab.studies.runner import lock_study_dir

LITE0 = "timm:tf_efficientnet_lite0"
ONE = Resources(cpus=1)  # one torch thread per cell: bit-identical results on every executor


@pytest.fixture(scope="module")
def data4(tmp_path_factory):
    """Tiny CIFAR-format data: 4 classes, 120 train (20 of them validation), 40 test images."""
    return write_cifar_like(tmp_path_factory.mktemp("cifar4"), n_train=120, n_test=40, n_classes=4)


def _grid(data4: Path, cache: Path, arms=("cnn:scratch", f"{LITE0}:frozen"), sizes="2,4", epochs=1):
    overrides = {
        "data": {"data_dir": str(data4), "val_size": 20, "image_size": 32},
        "optim": {"epochs": epochs, "batch_size": 16},
        "run": {"progress": False, "cache_dir": str(cache), "device": "cpu", "precision": "fp32"},
    }
    return make_grid(list(arms), sizes, 1, overrides, min_steps=4)


def _accs(study: Path) -> dict[tuple[str, str, str], tuple[str, str]]:
    with open(study / "study.csv") as f:
        return {
            (r["arm"], r["per_class"], r["seed"]): (r["status"], r["test_acc"])
            for r in csv.DictReader(f)
        }


@pytest.fixture(scope="module")
def ray_local():
    """A Ray instance of 2 CPUs on 127.0.0.1 for this module's tests, shut down afterwards.

    Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once, when ``ray._private.ray_constants`` is
    imported: the variable is set first, and the constant too where another test imported Ray
    before (its workers import Ray afresh and read the variable).
    """
    before = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # keep 127.0.0.1 as the node address
    ray = pytest.importorskip("ray")
    from ray._private import ray_constants

    cluster_mode = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    ray.init(
        num_cpus=2,
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TRANSFERLAB_MALLOPT": "0"}},
    )
    try:
        assert ray.util.get_node_ip_address() == "127.0.0.1"  # no traffic beyond loopback
        yield ray
    finally:
        ray.shutdown()
        ray_constants.ENABLE_RAY_CLUSTER = cluster_mode
        if before is None:
            os.environ.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
        else:
            os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = before


# --- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,match",
    [
        ("threads", "unknown executor"),
        ("processes:0", "number of worker processes"),
        ("processes:abc", "number of worker processes"),
        ("processes", "number of worker processes"),
        ("local:2", "local takes no argument"),
    ],
)
def test_bad_executor(text, match):
    with pytest.raises(UserError, match=match):
        parse_executor(text)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"gpus": -1}, "gpus-per-cell"),
        ({"gpus": float("nan")}, "gpus-per-cell"),
        ({"cpus": -1}, "cpus"),
    ],
)
def test_bad_resources(kw, match):
    with pytest.raises(UserError, match=match):
        Resources(**kw)


def test_bad_executor_exits_2_before_any_cell_runs(data4, tmp_path, capsys):
    from transferlab.cli import main

    base = ["study", "--arms", "cnn:scratch", "--per-class", "2", "--seeds", "1"]
    base += ["--data-dir", str(data4), "--val-size", "20", "--run-dir", str(tmp_path / "s")]
    for extra in (
        ["--executor", "processes:0"],
        ["--executor", "nope"],
        ["--gpus-per-cell", "-1"],
    ):
        assert main(base + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "Traceback" not in err[0]
    assert not (tmp_path / "s").exists()


def test_ray_without_the_extra_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(UserError, match=r"pip install 'transferlab\[ray\]'"):
        parse_executor("ray")


def test_unreachable_ray_address_is_one_line(tmp_path, data4):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(UserError, match="ray start --head"):
        run_study(_grid(data4, tmp_path / "c"), tmp_path / "s", executor=f"ray:127.0.0.1:{port}")
    assert not (tmp_path / "s").exists()  # refused before the study dir was touched


# --- the study lock -----------------------------------------------------------------------------


def test_a_second_study_on_the_same_dir_exits_at_once_and_names_the_holder(data4, tmp_path):
    study = tmp_path / "study"
    grid = _grid(data4, tmp_path / "c", arms=("cnn:scratch",), sizes="2")
    lock = lock_study_dir(study)  # another driver holds it
    try:
        with pytest.raises(UserError, match=f"in use by process {os.getpid()}"):
            run_study(grid, study)
        assert [p.name for p in study.iterdir()] == [LOCK_NAME]  # no cell touched, none failed
    finally:
        lock.release()
    assert run_study(grid, study).ran


# --- the same answer everywhere ------------------------------------------------------------------


def test_local_processes_and_ray_give_the_same_study_csv(data4, tmp_path, ray_local):
    """4 cells (a scratch CNN and a frozen lite0, 2 sizes): equal test accuracies, bit for bit."""
    grid = _grid(data4, tmp_path / "cache")
    results = {}
    for name in ("local", "processes:2", "ray"):
        study = tmp_path / name.replace(":", "-")
        result = run_study(grid, study, executor=name, resources=ONE, write_report=False)
        assert len(result.ran) == 4 and not result.failed, result.failed
        results[name] = _accs(study)
    assert results["local"] == results["processes:2"] == results["ray"]
    assert all(status == "ok" for status, _ in results["local"].values())
    from transferlab.features import cache as fcache

    n = {e["split"]: int(e["n"]) for e in fcache.list_entries(tmp_path / "cache") if e.get("split")}
    assert sorted(n) == ["test", "train", "val"]  # extracted once, by the first study
    assert (n["train"], n["val"], n["test"]) == (16, 20, 40)  # train: the 4-per-class rows only


# --- faults --------------------------------------------------------------------------------------


def _kill_when_training(run_dir: Path, killed: list) -> None:
    """SIGKILL the process that holds ``run_dir``'s lock once its first epoch is written."""
    deadline = time.time() + 300
    while time.time() < deadline:
        metrics, lock = run_dir / "metrics.csv", run_dir / LOCK_NAME
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2 and lock.is_file():
            pid = int(lock.read_text().split()[0])
            if pid != os.getpid():
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
        time.sleep(0.05)


@pytest.mark.parametrize("executor", ["processes:2", "ray"])
def test_a_worker_killed_mid_cell_is_retried_and_resumes_once(executor, data4, tmp_path, request):
    if executor == "ray":
        request.getfixturevalue("ray_local")
    grid = _grid(data4, tmp_path / "c", arms=("cnn:scratch",), sizes="all", epochs=20)
    study = tmp_path / "study"
    (cell,) = plan_cells(grid, {c: 25 for c in range(4)}, study)
    killed: list[int] = []
    killer = threading.Thread(target=_kill_when_training, args=(cell.run_dir, killed))
    killer.start()
    result = run_study(grid, study, executor=executor, resources=ONE, write_report=False)
    killer.join()
    assert killed, "the cell finished before it could be killed"
    assert len(result.ran) == 1 and not result.failed
    rows = (cell.run_dir / "metrics.csv").read_text().splitlines()[1:]
    epochs = [r.split(",")[0] for r in rows]
    assert len(epochs) == len(set(epochs)) == 20  # resumed: one row per epoch, none twice


def test_a_cell_that_raises_is_recorded_and_the_others_go_on(data4, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  image_size: 64\n")  # the cnn refuses 64 px inputs when its cell starts
    over = _grid(data4, tmp_path / "c").overrides
    over = {**over, "data": {"data_dir": str(data4), "val_size": 20}}  # the preset's size wins
    grid = make_grid([f"cnn:scratch:{bad}", "cnn:scratch"], "2", 1, over, min_steps=4)
    result = run_study(grid, tmp_path / "s", executor="processes:2", resources=ONE)
    assert len(result.ran) == 1 and len(result.failed) == 1
    assert "32 px" in result.failed[0][1]


def test_a_killed_driver_resumes_and_reruns_no_finished_cell(data4, tmp_path):
    study = tmp_path / "study"
    argv = [sys.executable, "-m", "transferlab", "study", "--arms", "cnn:scratch"]
    argv += ["--per-class", "2,4", "--seeds", "2", "--data-dir", str(data4), "--val-size", "20"]
    argv += ["--epochs", "1", "--batch-size", "16", "--min-steps", "4", "--device", "cpu"]
    argv += ["--cache-dir", str(tmp_path / "c"), "--no-progress", "--run-dir", str(study)]
    argv += ["--executor", "processes:2", "--cpus-per-cell", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    driver = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not list(study.glob("*/*/summary.json")) and time.time() < deadline:
        time.sleep(0.05)
    driver.kill()
    driver.wait()
    done = {p: p.stat().st_mtime_ns for p in study.glob("*/*/summary.json")}
    assert 1 <= len(done) < 4
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert {p: p.stat().st_mtime_ns for p in done} == done  # finished cells were not rerun
    assert all(s == "ok" for s, _ in _accs(study).values()) and len(_accs(study)) == 4


# --- frozen arms: the cache promised to a cell ---------------------------------------------------


def test_a_frozen_cell_without_its_cache_entry_fails_clearly(data4, tmp_path):
    grid = _grid(data4, tmp_path / "empty-cache", arms=(f"{LITE0}:frozen",), sizes="2")
    (cell,) = plan_cells(grid, {c: 25 for c in range(4)}, tmp_path / "s")
    outcome = run_task(cell_spec(cell, threads=1, require_cache=True))
    assert outcome.status == "failed"
    assert "not in the feature cache" in outcome.message and "every worker" in outcome.message
    from transferlab.features import cache as fcache

    assert not [e for e in fcache.list_entries(tmp_path / "empty-cache") if e.get("split")]


def test_plan_emits_the_cell_spec_and_its_train_command(data4, tmp_path):
    grid = _grid(data4, tmp_path / "c", arms=("cnn:scratch",), sizes="2")
    (cell,) = plan_cells(grid, {c: 25 for c in range(4)}, tmp_path / "s")
    spec = cell_spec(cell)
    argv = train_argv(spec)
    assert argv[:2] == ["transferlab", "train"]
    assert argv[argv.index("--run-dir") + 1] == str(cell.run_dir)
    assert spec.to_dict()["config"]["data"]["per_class"] == 2


def test_rows_extracted_for_a_grid_hold_every_cell_subset():
    """Features of the union rows only give each cell the rows the whole split would."""
    import torch

    from transferlab.data.subsets import select_per_class, select_rows_per_class, union_indices

    labels = torch.arange(10).repeat_interleave(30)[torch.randperm(300)]
    feats = torch.randn(300, 5)
    rows = union_indices(labels, 8, 3)
    assert len(rows) < 300 and torch.equal(rows, rows.sort().values)
    for k, seed in [(2, 0), (8, 2), (4, 1)]:
        want = select_per_class(feats, labels, k, seed)
        got = select_rows_per_class(feats[rows], rows, labels, k, seed)
        assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])
    with pytest.raises(UserError, match="not among the extracted rows"):
        select_rows_per_class(feats[rows], rows, labels, 9, 0)
