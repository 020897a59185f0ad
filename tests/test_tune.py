"""``--tune N``: an Optuna head search on cached features, scored on val, resumable, shareable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from transferlab.cli import main
from transferlab.config import load_yaml
from transferlab.data.cifar import write_cifar_like
from transferlab.training.checkpoint import load_checkpoint

optuna = pytest.importorskip("optuna")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_cifar_like(tmp_path_factory.mktemp("tune"), 120, 40, n_classes=4)


def _args(data: Path, run: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--data-dir",
        str(data),
        "--val-size",
        "40",
        "--model",
        "timm:test_efficientnet",
        "--weights",
        "none",
        "--image-size",
        "32",
        "--epochs",
        "2",
        "--batch-size",
        "20",
        "--device",
        "cpu",
        "--precision",
        "fp32",
        "--engine",
        "torch",
        "--cache-dir",
        str(run.parent / "cache"),
        "--run-dir",
        str(run),
        "--no-progress",
        "--no-report",
        *extra,
    ]


def _trials(storage: str) -> list:
    (summary,) = optuna.get_all_study_summaries(storage)
    return optuna.load_study(study_name=summary.study_name, storage=storage).get_trials()


def test_tune_writes_a_rerunnable_best_config(data, tmp_path):
    run = tmp_path / "tuned"
    assert main(_args(data, run, "--tune", "3")) == 0
    result = json.loads((run / "tune.json").read_text())
    assert result["trials"] == 3 and len(_trials(f"sqlite:///{run / 'tune.db'}")) == 3
    cfg = load_yaml(run / "config.yaml")
    best = result["best"]
    assert cfg["optim"]["tune"] == 0 and cfg["optim"]["lr"] == pytest.approx(best["lr"])
    assert cfg["optim"]["epochs"] == best["epochs"]
    assert cfg["model"]["head"] == ("linear" if best["head_hidden"] == 0 else "mlp")
    summary = json.loads((run / "summary.json").read_text())
    # the final run trains the best trial's head from the same seed: the same val accuracy
    assert summary["fit_state"]["best_score"] == pytest.approx(result["best_val_score"])
    assert load_checkpoint(run / "best.pt")["config"]["optim"]["tune"] == 0
    # --preset RUN/config.yaml reruns the best head, without a search
    rerun = tmp_path / "rerun"
    preset = ["--preset", str(run / "config.yaml"), "--run-dir", str(rerun), "--no-progress"]
    assert main(["train", *preset]) == 0
    assert not (rerun / "tune.db").exists()
    again = load_yaml(rerun / "config.yaml")
    for section in ("model", "optim", "data"):  # the same recipe (its head is a fresh draw)
        assert again[section] == cfg[section]


def test_a_killed_search_resumes(data, tmp_path, monkeypatch):
    from transferlab.training import tune

    run = tmp_path / "killed"
    real = tune._train_trial
    calls = {"n": 0}

    def dies_in_third(job, trial, optuna_):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # the process dies mid-search (no clean stop)
        return real(job, trial, optuna_)

    monkeypatch.setattr(tune, "_train_trial", dies_in_third)
    assert main(_args(data, run, "--tune", "4")) != 0
    monkeypatch.setattr(tune, "_train_trial", real)
    storage = f"sqlite:///{run / 'tune.db'}"
    states = [t.state.name for t in _trials(storage)]
    assert states.count("COMPLETE") == 2
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    finished = [t for t in _trials(storage) if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == 4  # two kept, two new: the search went on, not over
    assert json.loads((run / "tune.json").read_text())["trials"] == 4
    assert yaml.safe_load((run / "config.yaml").read_text())["optim"]["tune"] == 0


def test_two_searches_share_one_storage(data, tmp_path):
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    for name in ("a", "b"):
        flags = ("--tune", "4", "--tune-storage", storage, "--tune-study", "s")
        assert main(_args(data, tmp_path / name, *flags)) == 0
    trials = _trials(storage)
    # b joined a's study: 4 trials in all, numbered once each (no duplicates, no corruption)
    assert len(trials) == 4 and sorted(t.number for t in trials) == [0, 1, 2, 3]
    assert not (tmp_path / "b" / "tune.db").exists()


@pytest.mark.parametrize(
    "flags, text",
    [
        (("--tune", "0"), "--tune must be"),
        (("--tune", "-2"), "--tune must be"),
        (("--tune", "2", "--tune-storage", "postgresql://nobody@127.0.0.1:1/x"), "--tune-storage"),
        (("--tune", "2", "--mode", "finetune"), "--tune searches heads"),
        (("--tune-study", "x"), "add --tune N"),
    ],
)
def test_bad_tune_flags_exit_2(data, tmp_path, capsys, flags, text):
    assert main(_args(data, tmp_path / "bad", *flags)) == 2
    err = capsys.readouterr().err
    assert text in err and "Traceback" not in err
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow  # two processes start torch (about a minute on a loaded 2-core machine)
def test_two_concurrent_searches_share_trials(data, tmp_path):
    """Two processes at once on one SQLite storage: every trial is stored once, all finish."""
    import os
    import subprocess
    import sys

    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    flags = ("--tune", "4", "--tune-storage", storage, "--tune-study", "s")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "transferlab", *_args(data, tmp_path / n, *flags)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in ("a", "b")
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    trials = _trials(storage)
    numbers = sorted(t.number for t in trials)
    assert numbers == list(range(len(trials))) and 4 <= len(trials) <= 5  # one may overlap
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)


def test_study_arm_tune_suffix():
    from transferlab.errors import UserError
    from transferlab.studies.grid import cell_config, make_grid, parse_arm

    arm = parse_arm("timm:tf_efficientnet_lite0:frozen:tune20")
    assert (arm.model, arm.mode, arm.preset, arm.tune) == (
        "timm:tf_efficientnet_lite0",
        "frozen",
        "",
        20,
    )
    assert parse_arm("timm:tf_efficientnet_lite0:partial:tune5").tune == 5
    assert parse_arm("timm:tf_efficientnet_lite0:partial").tune == 0
    grid = make_grid(["timm:tf_efficientnet_lite0:frozen:tune20"], "4", seeds=1)
    cfg = cell_config(grid, grid.arms[0], 4, 0, Path("run"), 400)
    assert cfg.optim.tune == 20
    for bad in ("cnn:scratch:tune3", "timm:tf_efficientnet_lite0:frozen:tune0"):
        with pytest.raises(UserError, match="tuneN"):
            parse_arm(bad)
