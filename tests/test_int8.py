"""int8 extraction (issue 25): a frozen run extracts with NNCF's quantised OpenVINO model, its
cache key and plan say int8, predict uses the same int8 model, a corrupt quantised model is
rebuilt, and bad input is one line with exit 2. A tiny CIFAR-format set (10 classes, 32 px) and
an untrained ResNet-18 state dict on disk; CPU, seconds."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
from pathlib import Path

import pytest
import torch
import torchvision
import yaml

from transferlab.cli import main
from transferlab.config import Config, RunConfig, config_from_dict
from transferlab.data.cifar import write_cifar_like
from transferlab.data.load import load_data
from transferlab.errors import UserError
from transferlab.features import cache as fcache
from transferlab.features import engines, quantize
from transferlab.features.engines import EngineChoice, build_engine
from transferlab.features.pipeline import extraction_precision, feature_key
from transferlab.features.quantize import Calibration
from transferlab.plan import Plan
from transferlab.predict import load_run_model

pytest.importorskip("openvino")
pytest.importorskip("nncf")

CPU = torch.device("cpu")


def _args(root: Path, name: str, *extra: str) -> list[str]:
    return [
        "train",
        "--data-dir",
        str(root / "data"),
        "--val-size",
        "60",
        "--model",
        "resnet18",
        "--weights",
        str(root / "r18.pth"),
        "--image-size",
        "32",
        "--epochs",
        "1",
        "--batch-size",
        "40",
        "--device",
        "cpu",
        "--precision",
        "fp32",
        "--cache-dir",
        str(root / "cache"),
        "--run-dir",
        str(root / name),
        "--no-progress",
        "--no-report",
        *extra,
    ]


@pytest.fixture(scope="module")
def int8_run(tmp_path_factory):
    """One frozen int8 run: (root, run dir)."""
    root = tmp_path_factory.mktemp("int8")
    write_cifar_like(root / "data", 300, 100, n_classes=10)
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), root / "r18.pth")
    assert main(_args(root, "run", "--feature-precision", "int8")) == 0
    return root, root / "run"


def _saved(run: Path) -> tuple[Config, Plan]:
    d = yaml.safe_load((run / "config.yaml").read_text())
    return config_from_dict(d), Plan.from_dict(d["resolved"])


def test_int8_extraction_runs_and_the_plan_says_so(int8_run):
    root, run = int8_run
    _, plan = _saved(run)
    assert (plan.extract.engine, plan.extract.precision) == ("openvino", "int8")
    assert len(plan.extract.calibration) == 24  # the calibration set's id
    quantised = [
        meta
        for p in (root / "cache" / "engines").glob("*.safetensors")
        if "int8" in (meta := fcache._meta_of(p))["key_parts"]
    ]
    assert len(quantised) == 1 and plan.extract.calibration in quantised[0]["key_parts"]


def test_the_feature_cache_key_separates_int8_from_bf16(int8_run):
    _, run = int8_run
    cfg, plan = _saved(run)
    ds = load_data(cfg)
    bf16 = dataclasses.replace(
        plan, extract=dataclasses.replace(plan.extract, precision="bf16", calibration="")
    )
    key = fcache.cache_key(feature_key(cfg, plan, ds, "train", "w"))
    assert key != fcache.cache_key(feature_key(cfg, bf16, ds, "train", "w"))
    other = dataclasses.replace(plan, extract=dataclasses.replace(plan.extract, calibration="x"))
    assert key != fcache.cache_key(feature_key(cfg, other, ds, "train", "w"))


def test_predict_on_an_int8_run_uses_int8(int8_run, monkeypatch):
    _, run = int8_run
    built = []
    real = engines.build_engine

    def spy(choice, *a, **k):
        built.append((choice, k.get("calibration")))
        return real(choice, *a, **k)

    monkeypatch.setattr(engines, "build_engine", spy)
    rm = load_run_model(run, "cpu")
    (choice, calibration), *_ = built
    assert (choice.name, choice.precision) == ("openvino", "int8")
    assert calibration.key == _saved(run)[1].extract.calibration
    x = torch.rand(5, 3, 32, 32)
    logits = rm.logits(x)
    assert logits.shape == (5, len(rm.classes)) and torch.isfinite(logits).all()


@pytest.mark.slow  # quantises ResNet-18 again (20 s on the shared 2-core CPU)
def test_predict_quantises_again_from_the_runs_data_when_the_cache_is_gone(int8_run):
    root, run = int8_run
    x = torch.rand(5, 3, 32, 32)
    logits = load_run_model(run, "cpu").logits(x)
    for p in (root / "cache" / "engines").glob("*.safetensors"):
        p.unlink()
    again = load_run_model(run, "cpu").logits(x)
    torch.testing.assert_close(again, logits, atol=1e-4, rtol=1e-4)


def _tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
    ).eval()


def _build_int8(net, root, calibration):
    return build_engine(
        EngineChoice("openvino", "int8", 4),
        net,
        16,
        CPU,
        root,
        fcache.weights_hash(net),
        calibration=calibration,
    )


def test_corrupt_quantised_model_is_rebuilt(tmp_path, caplog):
    net = _tiny()
    g = torch.Generator().manual_seed(1)
    cal = Calibration("cal-a", lambda: [torch.randn(12, 3, 16, 16, generator=g)])
    _build_int8(net, tmp_path, cal)
    (path,) = (tmp_path / "engines").glob("*.safetensors")
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING):
        engine = _build_int8(net, tmp_path, cal)
    assert any("corrupt" in r.getMessage() for r in caplog.records)
    assert fcache.load_entry(tmp_path / "engines", path.stem) is not None  # rebuilt, intact
    x = torch.randn(6, 3, 16, 16)
    with torch.no_grad():
        ref = net(x)
    assert (engine(x) - ref).abs().max() < 0.1 * ref.abs().max()  # int8: close, not equal


def test_too_few_calibration_images_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="at least 10"):
        quantize.calibration_indices(9, seed=0)
    few = Calibration("cal-b", lambda: [torch.randn(9, 3, 16, 16)])
    with pytest.raises(UserError, match="only 9 calibration images"):
        _build_int8(_tiny(), tmp_path, few)


def test_int8_cli_bad_input_is_one_line_exit_2(int8_run, capsys, monkeypatch):
    root, _ = int8_run
    cases = [
        (["--feature-precision", "int8", "--engine", "torch"], "--engine torch has no int8"),
        (["--feature-precision", "int8", "--engine", "onnxruntime"], "has no int8 path"),
        (["--feature-precision", "int8", "--train-subset", "8", "--batch-size", "4"], "at least"),
        (["--feature-precision", "int8", "--mode", "finetune"], "quantises a frozen backbone"),
        (["--feature-precision", "bf16", "--mode", "finetune"], "this run has none"),
    ]
    for extra, message in cases:
        assert main(_args(root, "bad", "--overwrite", *extra)) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "nncf" else real(n, *a)
    )
    assert main(_args(root, "bad", "--overwrite", "--feature-precision", "int8")) == 2
    assert "pip install 'transferlab[int8]'" in capsys.readouterr().err


def test_auto_never_means_int8():
    assert extraction_precision(Config()) == "auto"
    assert extraction_precision(Config(run=RunConfig(precision="bf16"))) == "bf16"
    assert extraction_precision(Config(run=RunConfig(feature_precision="fp32"))) == "fp32"
    assert "int8" not in [p for _, p in engines._candidates("auto", "auto")]


def test_export_openvino_int8_writes_a_quantised_ir_and_checks_it(int8_run, capsys):
    root, _ = int8_run
    run = root / "cnn"
    args = ["train", "--data-dir", str(root / "data"), "--run-dir", str(run), "--model", "cnn"]
    args += ["--epochs", "1", "--no-progress", "--device", "cpu", "--val-size", "60"]
    assert main([*args, "--batch-size", "40", "--no-report"]) == 0
    capsys.readouterr()
    assert main(["export", str(run), "--format", "onnx", "--int8"]) == 2
    assert "use --format openvino" in capsys.readouterr().err
    code = main(["export", str(run), "--format", "openvino", "--int8", "--min-agreement", "0"])
    out = capsys.readouterr().out
    assert code == 0 and "top-1 agreement" in out and "60 validation images" in out
    meta = json.loads((run / "model.xml.json").read_text())
    assert meta["int8"]["calibration"] and meta["check"]["images"] == 60
    assert 0 <= meta["check"]["top1_agreement"] <= 1 and meta["check"]["ok"]
    assert "FakeQuantize" in (run / "model.xml").read_text()  # the IR on disk is quantised


def test_compare_and_study_keep_int8_for_the_frozen_backbone_only(tmp_path):
    from transferlab.comparison import experiment_configs
    from transferlab.config import CompareConfig
    from transferlab.studies.grid import Arm, Grid, cell_config

    base = Config(run=RunConfig(feature_precision="int8"))
    cc = CompareConfig(backbone="timm:tf_efficientnet_lite0")
    cfgs = experiment_configs(base, cc, tmp_path, chase_target=0.5)
    assert cfgs["frozen"].run.feature_precision == "int8"
    assert cfgs["cnn"].run.feature_precision == cfgs["chase"].run.feature_precision == "auto"
    arms = (Arm("cnn:scratch", "cnn", "scratch"), Arm("lite0:frozen", cc.backbone, "frozen"))
    grid = Grid(arms, ("all",), 1, overrides={"run": {"feature_precision": "int8"}})
    got = [cell_config(grid, a, 0, 0, tmp_path / a.key, 1000).run.feature_precision for a in arms]
    assert got == ["auto", "int8"]
