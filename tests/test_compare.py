"""`transferlab compare` end to end on a tiny synthetic CIFAR-100, and its report (issue 2).

One compare run (CNN 1 epoch, frozen ResNet-18 with random weights at 32 px through the feature
cache, the chase capped at 2 epochs) is shared by the tests below; it takes a few seconds.
"""

from __future__ import annotations

import csv
import json
import signal

import pytest
import torch
import yaml

from conftest import metrics_rows
from transferlab.cli import build_parser, config_from_args, main
from transferlab.comparison import experiment_configs
from transferlab.config import CompareConfig
from transferlab.data.cifar import write_cifar_like
from transferlab.report.compare_report import observations, write_compare_report
from transferlab.rundir import Summary

RUNS = ("cnn", "resnet18-frozen", "cnn-chase")
ARTEFACTS = (
    "config.yaml",
    "metrics.csv",
    "summary.json",
    "model_summary.txt",
    "curves.png",
    "best.pt",
    "last.pt",
)
FIRST_COLUMNS = [
    "epoch",
    "train_loss",
    "train_acc",
    "val_loss",
    "val_acc",
    "val_balanced_acc",
    "lr",
    "epoch_time_s",
]
FLAGS = [
    "--val-size",
    "50",
    "--batch-size",
    "50",
    "--epochs",
    "1",
    "--chase-max-epochs",
    "2",
    "--backbone",
    "resnet18",
    "--weights",
    "none",
    "--image-size",
    "32",
    "--precision",
    "fp32",
    "--no-progress",
    "--device",
    "cpu",
]


@pytest.fixture(scope="module")
def compare_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compare")
    data = write_cifar_like(tmp / "data", n_train=200, n_test=50)
    root = tmp / "cmp"
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = main(
            [
                "compare",
                "--data-dir",
                str(data),
                "--run-dir",
                str(root),
                "--cache-dir",
                str(tmp / "cache"),
                *FLAGS,
            ]
        )
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
    assert code == 0
    return root


def _summary(root, run) -> dict:
    return json.loads((root / run / "summary.json").read_text())


@pytest.mark.parametrize("run", RUNS)
def test_every_run_has_every_artefact(compare_dir, run):
    for name in ARTEFACTS:
        path = compare_dir / run / name
        assert path.is_file() and path.stat().st_size > 0, path
    assert (compare_dir / run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ckpt = torch.load(compare_dir / run / "best.pt", map_location="cpu", weights_only=True)
    assert ckpt["config"]["run"]["run_dir"] == str(compare_dir / run)


@pytest.mark.parametrize("run", RUNS)
def test_metrics_csv_columns_and_rows(compare_dir, run):
    with open(compare_dir / run / "metrics.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames[: len(FIRST_COLUMNS)] == FIRST_COLUMNS
    assert [int(r["epoch"]) for r in rows] == list(range(1, len(rows) + 1))
    assert len(rows) == _summary(compare_dir, run)["epochs_run"]
    for r in rows:
        assert (
            0 <= float(r["train_acc"]) <= 1 and 0 <= float(r["val_acc"]) <= 1 and float(r["lr"]) > 0
        )


@pytest.mark.parametrize("run", RUNS)
def test_summary_json_keys(compare_dir, run):
    s = _summary(compare_dir, run)
    assert set(s["params"]) >= {"total", "trainable"}
    for split in ("train", "val", "test"):
        assert set(s[split]) >= {"loss", "acc"}
        assert 0 <= s[split]["acc"] <= 1 and s[split]["loss"] > 0
    assert isinstance(s["epochs_run"], int) and s["epochs_run"] >= 1
    assert set(s["time_s"]) >= {"total", "train", "eval"} and s["time_s"]["total"] > 0
    assert set(s["data"]["md5"]) == {"train", "test", "meta"} and s["data"]["split_seed"] == 0
    assert all(len(v) == 32 for v in s["data"]["md5"].values())
    expected = "resnet18" if run == "resnet18-frozen" else "cnn"
    assert s["model"] == expected


def test_runs_have_the_expected_models_and_counts(compare_dir):
    cnn, frozen, chase = (_summary(compare_dir, r) for r in RUNS)
    assert cnn["params"] == chase["params"] == {"total": 846_308, "trainable": 846_308}
    assert frozen["params"] == {"total": 11_333_540, "trainable": 157_028}
    assert frozen["mode"] == "frozen" and frozen["feature_cache"]["train"]["hit"] is False
    assert cnn["epochs_run"] == 1 and frozen["epochs_run"] == 1 and 1 <= chase["epochs_run"] <= 2
    target = frozen["fit_state"]["best_val_acc"]
    chase_cfg = yaml.safe_load((compare_dir / "cnn-chase" / "config.yaml").read_text())
    assert chase_cfg["optim"]["target_val_acc"] == pytest.approx(target)
    assert chase_cfg["optim"]["patience"] == 5 and chase_cfg["optim"]["epochs"] == 2
    assert (
        chase_cfg["data"]["image_size"] == 32
    )  # the cnn keeps its 32 px; --image-size is the backbone's
    assert chase_cfg["resolved"]["image_size"] == 32 and chase_cfg["run"]["precision"] == "fp32"


def test_model_summaries(compare_dir):
    cnn = (compare_dir / "cnn" / "model_summary.txt").read_text()
    for layer in ("Conv2d", "ReLU", "BatchNorm2d", "MaxPool2d", "Linear"):
        assert layer in cnn
    assert "[50, 16, 32, 32]" in cnn and "Total params: 846,308" in cnn
    frozen = (compare_dir / "resnet18-frozen" / "model_summary.txt").read_text()
    assert "Total params: 11,333,540" in frozen and "Trainable params: 157,028" in frozen


def test_report_md_tables_and_observations(compare_dir):
    text = (compare_dir / "report.md").read_text()
    for title in ("CNN trained from scratch", "Pretrained backbone, frozen", "CNN trained towards"):
        assert f"## {title}" in text
    assert (
        text.count("**Train**|") == 3
        and text.count("**Validation**|") == 3
        and text.count("**Test**|") == 3
    )
    assert "11,333,540 total, 157,028 trainable" in text and "846,308 total" in text
    assert "## Observations" in text and "Train-minus-validation" in text
    for run in RUNS:
        assert f"]({run}/curves.png)" in text
    frozen = _summary(compare_dir, "resnet18-frozen")
    assert f"{frozen['test']['acc']:.4f}" in text  # numbers come from the summaries


def test_report_rebuilds_from_files_alone(compare_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(
        compare_dir, copy, ignore=shutil.ignore_patterns("*.pt", "report.*", "curves.png")
    )
    write_compare_report(copy)
    assert (copy / "report.md").read_text() == (compare_dir / "report.md").read_text()
    assert (copy / "cnn" / "curves.png").is_file()  # re-plotted from metrics.csv


def _fake(acc: float, seconds: float = 10.0) -> Summary:
    split = {"loss": 1.0, "acc": acc}
    return Summary(
        model="resnet18",
        mode="frozen",
        run_dir="",
        weights="",
        params={},
        train=split,
        val=split,
        test=split,
        best_epoch=1,
        epochs_run=1,
        stop_reason="",
        time_s={"total": seconds},
        data={},
    )


@pytest.mark.parametrize(
    "frozen_acc, phrase",
    [
        (0.5, "10.0 points higher than"),
        (0.3, "10.0 points lower than"),
        (0.4, "the same as the CNN's"),
    ],
)
def test_observation_wording(frozen_acc, phrase):
    out = observations({"cnn": (None, _fake(0.4)), "frozen": (None, _fake(frozen_acc))})
    assert phrase in out[0]
    assert "same as than" not in out[0]


def test_experiment_configs_share_everything_but_the_model(tmp_path):
    args = build_parser().parse_args(
        [
            "compare",
            "--epochs",
            "3",
            "--image-size",
            "64",
            "--backbone",
            "timm:test_resnet",
            "--lr",
            "0.01",
        ]
    )
    base = config_from_args(args)
    cfgs = experiment_configs(
        base, CompareConfig(backbone=args.backbone), tmp_path, chase_target=0.25
    )
    assert (cfgs["cnn"].model.name, cfgs["cnn"].model.mode, cfgs["cnn"].data.image_size) == (
        "cnn",
        "scratch",
        0,
    )
    assert (cfgs["frozen"].model.name, cfgs["frozen"].model.mode) == ("timm:test_resnet", "frozen")
    assert cfgs["frozen"].data.image_size == 64 and cfgs["frozen"].run.run_dir == str(
        tmp_path / "timm-test_resnet-frozen"
    )
    assert (
        cfgs["chase"].optim.epochs,
        cfgs["chase"].optim.patience,
        cfgs["chase"].optim.target_val_acc,
    ) == (50, 5, 0.25)
    assert all(c.optim.lr == 0.01 for c in cfgs.values())


def test_chase_continues_experiment_one_bit_for_bit(tmp_path):
    """The chase resumed from experiment 1's checkpoint equals a chase trained from scratch."""
    from transferlab.comparison import chase_can_continue, continue_from
    from transferlab.config import Config, DataConfig, OptimConfig, RunConfig
    from transferlab.experiment import run_experiment
    from transferlab.rundir import RunDir

    data = write_cifar_like(tmp_path / "data", n_train=120, n_test=30)

    def cfg(name: str, epochs: int, patience: int = 0, target: float = 0.0) -> Config:
        return Config(
            data=DataConfig(data_dir=str(data), val_size=30),
            optim=OptimConfig(
                epochs=epochs, batch_size=30, patience=patience, target_val_acc=target
            ),
            run=RunConfig(
                run_dir=str(tmp_path / name), precision="fp32", seed=4, progress=False, report=False
            ),
        )

    first = cfg("cnn", 2)
    run_experiment(first)
    chase = cfg("chase", 4, patience=5, target=0.99)
    assert chase_can_continue(first, chase, tmp_path / "cnn")
    cosine = cfg("c2", 4, patience=5, target=0.99)
    cosine.optim.schedule = "cosine"  # the budget changes the lr of every epoch: not the same
    assert not chase_can_continue(first, cosine, tmp_path / "cnn")
    other_seed = cfg("c3", 4, patience=5, target=0.99)
    other_seed.run.seed = 5  # an independent replicate is not the same computation
    assert not chase_can_continue(first, other_seed, tmp_path / "cnn")
    continue_from(tmp_path / "cnn", chase)
    assert RunDir(tmp_path / "chase").continued_from.is_file()
    run_experiment(chase, resume=True)
    fresh = cfg("fresh", 4, patience=5, target=0.99)
    run_experiment(fresh)
    numbers = ("train_loss", "train_acc", "val_loss", "val_acc", "lr")
    assert [[r[k] for k in numbers] for r in metrics_rows(tmp_path / "chase")] == [
        [r[k] for k in numbers] for r in metrics_rows(tmp_path / "fresh")
    ]
    assert len(metrics_rows(tmp_path / "chase")) == 4


@pytest.mark.parametrize(
    "accs, patience, target, ok",
    [
        ([0.1, 0.3], 5, 0.5, True),
        ([0.1, 0.3], 5, 0.25, False),  # experiment 1's curve reached the target: the chase stopped
        ([0.3, 0.2, 0.1], 2, 0.9, False),  # patience 2 ran out at epoch 3
        ([0.3, 0.2, 0.4], 2, 0.9, True),
    ],
)
def test_chase_replays_its_stopping_rules_on_experiment_one(tmp_path, accs, patience, target, ok):
    from transferlab.comparison import chase_can_continue
    from transferlab.config import Config, OptimConfig

    first_dir = tmp_path / "cnn"
    first_dir.mkdir()
    (first_dir / "last.pt").write_bytes(b"")
    rows = "".join(f"{i + 1},1,0,1,{a},0.001,1,1\n" for i, a in enumerate(accs))
    (first_dir / "metrics.csv").write_text(
        "epoch,train_loss,train_acc,val_loss,val_acc,lr,epoch_time_s,train_img_s\n" + rows
    )
    first = Config(optim=OptimConfig(epochs=len(accs)))
    chase = Config(optim=OptimConfig(epochs=50, patience=patience, target_val_acc=target))
    assert chase_can_continue(first, chase, first_dir) is ok
