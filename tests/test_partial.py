"""``--mode partial``: the last stages train on the cached output of the frozen ones.

A tiny timm EfficientNet (``test_efficientnet``, random weights) on tiny CIFAR-like data, fp32,
one thread, so the cached and the live paths can agree to the bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import metrics_rows
from transferlab.cli import main
from transferlab.config import ModelConfig, config_from_dict
from transferlab.data.cifar import write_cifar_like
from transferlab.data.load import load_data
from transferlab.data.pipeline import prepare_fn
from transferlab.features import cache as fcache
from transferlab.models.partial import StagePrefix
from transferlab.models.registry import build_model
from transferlab.plan import Plan
from transferlab.training.checkpoint import load_checkpoint

TIMING = ("epoch_time_s", "train_img_s")  # columns that measure the machine, not the run


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_cifar_like(tmp_path_factory.mktemp("partial"), 120, 40, n_classes=4)


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
        "--mode",
        "partial",
        "--image-size",
        "32",
        "--epochs",
        "3",
        "--lr",
        "0.01",
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


def _rows(run: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in metrics_rows(run)]


def _model(run: Path, ckpt_name: str = "best.pt"):
    """(model, plan, config) of a run, rebuilt from its checkpoint."""
    ckpt = load_checkpoint(run / ckpt_name)
    cfg = config_from_dict(ckpt["config"])
    net = build_model(cfg.model, len(ckpt["classes"]))
    net.load_state_dict(ckpt["model"])
    return net.eval(), Plan.from_dict(ckpt["plan"]), cfg


@pytest.mark.parametrize("k, bn", [(1, "frozen"), (2, "frozen"), (1, "train")])
def test_partial_on_cached_activations_equals_live_training(data, tmp_path, k, bn):
    cached, live = tmp_path / "cached", tmp_path / "live"
    flags = ("--train-stages", str(k), "--partial-bn", bn)
    assert main(_args(data, cached, *flags)) == 0
    assert main(_args(data, live, *flags, "--no-feature-cache")) == 0
    assert json.loads((cached / "summary.json").read_text())["feature_cache"] is not None
    assert json.loads((live / "summary.json").read_text())["feature_cache"] is None
    assert _rows(cached) == _rows(live)  # identical metrics rows, every epoch
    a = load_checkpoint(cached / "last.pt")["model"]
    b = load_checkpoint(live / "last.pt")["model"]
    assert all(torch.equal(a[name], b[name]) for name in a)
    # the prefix kept its weights, the trained stages moved
    torch.manual_seed(0)
    fresh = build_model(
        ModelConfig(name="timm:test_efficientnet", weights="none", mode="partial"), 100
    ).state_dict()
    n = 1 + max(int(name.split(".")[2]) for name in a if name.startswith("backbone.blocks."))
    prefix = (
        "backbone.conv_stem.",
        "backbone.bn1.",
        *(f"backbone.blocks.{i}." for i in range(n - k)),
    )
    trained = tuple(f"backbone.blocks.{i}." for i in range(n - k, n)) + ("backbone.conv_head.",)
    assert all(torch.equal(a[name], fresh[name]) for name in a if name.startswith(prefix))
    assert all(
        not torch.equal(a[name], fresh[name])
        for name in a
        if name.startswith(trained) and name.endswith("weight")
    )
    # --partial-bn: the trained stages' running statistics stay (frozen) or follow the batches
    bn2 = "backbone.bn2.running_mean"
    assert torch.equal(a[bn2], fresh[bn2]) == (bn == "frozen")


def test_cache_holds_the_cut_activations(data, tmp_path):
    root = fcache.cache_root(str(tmp_path / "cache"))
    keys = {}
    for k in (1, 2):
        run = tmp_path / f"k{k}"
        assert main(_args(data, run, "--train-stages", str(k), "--epochs", "1")) == 0
        keys[k] = json.loads((run / "summary.json").read_text())["feature_cache"]["val"]["key"]
    assert keys[1] != keys[2]  # the key holds the cut
    net, plan, cfg = _model(tmp_path / "k2")
    got = fcache.load_entry(root, keys[2])[0]["features"]
    with torch.no_grad():
        want = StagePrefix(net.backbone, 2)(prepare_fn(plan)(load_data(cfg).val.images))
    assert got.dtype == torch.float32 and got.shape == want.shape  # --precision fp32: exact
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_default_precision_stores_bf16(data, tmp_path):
    run = tmp_path / "bf16"
    args = [a if a != "fp32" else "auto" for a in _args(data, run, "--epochs", "1")]
    assert main(args) == 0
    key = json.loads((run / "summary.json").read_text())["feature_cache"]["train"]["key"]
    got = fcache.load_entry(fcache.cache_root(str(tmp_path / "cache")), key)[0]["features"]
    assert got.dtype == torch.bfloat16


def test_views_predict_export_and_resume(data, tmp_path, capsys):
    run = tmp_path / "views"
    assert main(_args(data, run, "--feature-views", "2", "--epochs", "2")) == 0
    s = json.loads((run / "summary.json").read_text())
    assert s["feature_cache"]["train"]["hit"] is False
    assert main(["train", "--resume", str(run), "--epochs", "3", "--no-progress"]) == 0
    assert len(metrics_rows(run)) == 3
    capsys.readouterr()
    out = tmp_path / "m.onnx"
    assert main(["export", str(run), "--format", "onnx", "--output", str(out)]) == 0
    assert "OK" in capsys.readouterr().out  # the whole network, checked against PyTorch
    png = tmp_path / "x.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(png)
    assert main(["predict", str(run), str(png)]) == 0


@pytest.mark.parametrize(
    "flags, text",
    [
        (("--train-stages", "0"), "--train-stages must be >= 1"),
        (("--train-stages", "-1"), "--train-stages must be >= 1"),
        (("--train-stages", "99"), "stages; use 1 to"),
        (("--model", "resnet18", "--weights", "none"), "supports timm EfficientNet"),
        (("--model", "cnn", "--image-size", "32"), "--mode partial needs a backbone"),
        (("--feature-precision", "int8", "--engine", "auto"), "int8 quantises a whole"),
        (("--mode", "frozen", "--train-stages", "2"), "apply to --mode partial"),
    ],
)
def test_bad_partial_flags_exit_2(data, tmp_path, capsys, flags, text):
    assert main(_args(data, tmp_path / "bad", *flags)) == 2
    err = capsys.readouterr().err
    assert text in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_refuses_before_extracting_when_the_disk_is_full(data, tmp_path, capsys, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9, 1000))
    assert main(_args(data, tmp_path / "full")) == 2
    err = capsys.readouterr().err
    assert "needs" in err and "free" in err and "Traceback" not in err
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").glob("*.safetensors"))


def test_tune_searches_partial_heads_from_the_pretrained_stages(data, tmp_path):
    run = tmp_path / "tuned"
    assert main(_args(data, run, "--tune", "2", "--epochs", "1")) == 0
    result = json.loads((run / "tune.json").read_text())
    s = json.loads((run / "summary.json").read_text())
    # every trial and the final run start from the same stages: the best trial is reproduced
    assert s["fit_state"]["best_score"] == pytest.approx(result["best_val_score"])


def test_study_runs_a_partial_arm_and_a_tuned_frozen_arm(data, tmp_path):
    from transferlab.studies import run_study
    from transferlab.studies.grid import make_grid

    overrides = {
        "data": {"data_dir": str(data), "val_size": 40, "image_size": 32},
        "model": {"weights": "none"},
        "optim": {"epochs": 1, "batch_size": 20},
        "run": {
            "progress": False,
            "cache_dir": str(tmp_path / "cache"),
            "device": "cpu",
            "precision": "fp32",
            "engine": "torch",
        },
    }
    arms = ["timm:test_efficientnet:partial", "timm:test_efficientnet:frozen:tune2"]
    grid = make_grid(arms, "all", seeds=1, overrides=overrides, min_steps=4)
    run_study(grid, tmp_path / "study")
    summaries = sorted((tmp_path / "study").glob("*/*/summary.json"))
    assert len(summaries) == 2
    modes = {json.loads(p.read_text())["mode"] for p in summaries}
    assert modes == {"partial", "frozen"}
    assert len(list((tmp_path / "study").glob("*/*/tune.json"))) == 1
