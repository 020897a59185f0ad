"""``--feature-layers N``: the last N stages' pooled outputs beside the final features.

A tiny timm EfficientNet (``test_efficientnet``, random weights) on tiny CIFAR-like data, fp32.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from transferlab.cli import main
from transferlab.data.cifar import write_cifar_like
from transferlab.features import cache as fcache
from transferlab.models.taps import LayerTaps


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_cifar_like(tmp_path_factory.mktemp("taps"), 80, 40, n_classes=4)


def _args(data: Path, run: Path, *extra: str) -> list[str]:
    return [
        "train",
        *("--data-dir", str(data), "--val-size", "40", "--model", "timm:test_efficientnet"),
        *("--weights", "none", "--image-size", "32", "--epochs", "2", "--batch-size", "20"),
        *("--device", "cpu", "--precision", "fp32", "--engine", "torch"),
        *("--cache-dir", str(run.parent / "cache"), "--run-dir", str(run)),
        *("--no-progress", "--no-report", *extra),
    ]


def test_taps_are_the_final_features_then_the_pooled_stage_outputs():
    torch.manual_seed(0)
    net = timm.create_model("test_efficientnet", pretrained=False, num_classes=0).eval()
    seen = {}
    hooks = [
        net.blocks[i].register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out))
        for i in range(len(net.blocks))
    ]
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        final = net(x)
        got = LayerTaps(net, 2)(x)
    for h in hooks:
        h.remove()
    n = len(net.blocks)
    want = torch.cat([final, seen[n - 1].mean((2, 3)), seen[n - 2].mean((2, 3))], 1)
    assert got.shape == want.shape and LayerTaps(net, 2).feature_dim == want.shape[1]
    torch.testing.assert_close(got, want)


def test_a_frozen_run_caches_wider_features_and_predicts_exports_and_explains(
    data, tmp_path, capsys
):
    keys = {}
    for n in (0, 2):
        run = tmp_path / f"n{n}"
        assert main(_args(data, run, "--feature-layers", str(n))) == 0
        keys[n] = json.loads((run / "summary.json").read_text())["feature_cache"]["train"]["key"]
    assert keys[0] != keys[2]  # the key names the layers
    root = fcache.cache_root(str(tmp_path / "cache"))
    plain = fcache.load_entry(root, keys[0])[0]["features"]
    wide = fcache.load_entry(root, keys[2])[0]["features"]
    torch.testing.assert_close(wide[:, : plain.shape[1]], plain)  # the final features first
    assert wide.shape[1] > plain.shape[1]
    capsys.readouterr()
    out = tmp_path / "m.onnx"
    assert main(["export", str(tmp_path / "n2"), "--format", "onnx", "--output", str(out)]) == 0
    assert "OK" in capsys.readouterr().out  # the whole network, checked against PyTorch
    png = tmp_path / "x.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(png)
    assert main(["predict", str(tmp_path / "n2"), str(png)]) == 0
    cams = tmp_path / "cams"
    assert main(["explain", str(tmp_path / "n2"), str(png), "--out", str(cams)]) == 0
    assert list(cams.glob("*_gradcam.png"))  # Grad-CAM finds the wrapped network's last stage


@pytest.mark.parametrize(
    "flags, text",
    [
        (("--feature-layers", "-1"), "--feature-layers must be >= 0"),
        (("--feature-layers", "99"), "--feature-layers 99: timm:test_efficientnet has"),
        (("--feature-layers", "1", "--mode", "partial"), "applies to --mode frozen"),
        (("--feature-layers", "1", "--model", "resnet18"), "no stage structure it knows"),
    ],
)
def test_bad_feature_layers_exit_2(data, tmp_path, capsys, flags, text):
    assert main(_args(data, tmp_path / "bad", *flags)) == 2
    err = capsys.readouterr().err
    assert text in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
