"""Grad-CAM: the generic target layer, overlays for a cached-features run, the report section."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from transferlab import api, explain
from transferlab.cli import build_parser
from transferlab.config import ModelConfig
from transferlab.errors import UserError
from transferlab.models.registry import build_model
from transferlab.predict import load_run_model

pytest.importorskip("pytorch_grad_cam")


@pytest.mark.parametrize(
    ("name", "want"),
    [
        ("cnn", "backbone.18"),  # block 5: Conv(16) ReLU(17) BatchNorm(18) MaxPool(19)
        ("resnet18", "backbone.layer4"),
        ("timm:resnet18", "backbone.layer4"),  # feature_info's last stage
        ("timm:efficientnet_b0", "backbone.blocks.6"),
    ],
)
def test_target_layer_is_the_last_conv_stage(name, want):
    model = build_model(
        ModelConfig(name=name, weights="none", mode="finetune" if name != "cnn" else ""), 10
    )
    layer = explain.target_layer(model)
    assert {m: n for n, m in model.named_modules()}[layer] == want
    assert explain.layer_name(model) == want
    if name == "cnn":
        assert isinstance(layer, nn.BatchNorm2d) and layer.num_features == 512


@pytest.fixture(scope="module")
def frozen_run(tmp_path_factory, tiny_cifar):
    """A frozen ResNet-18 (random weights) trained on cached features at 64 px."""
    out = tmp_path_factory.mktemp("explain") / "frozen"
    return api.train(
        model="resnet18",
        weights="none",
        epochs=1,
        image_size=64,
        data_dir=str(tiny_cifar),
        val_size=50,
        no_report=True,
        run_dir=str(out),
        progress=False,
        device="cpu",
        cache_dir=str(out.parent / "cache"),
    )


def test_cached_features_run_gets_maps(frozen_run, tmp_path):
    assert frozen_run.summary.feature_cache, "the run should have trained on cached features"
    rm = load_run_model(frozen_run.dir)
    x = torch.randint(
        0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    res = explain.cam_maps(rm, x, [list(range(10)), list(range(10, 20))], torch.device("cpu"))
    assert res.maps.shape == (2, 10, 64, 64) and res.probs.shape == (2, 100)
    assert res.maps.min() >= 0 and res.maps.max() <= 1
    distinct = {m.tobytes() for m in res.maps[0]}
    assert len(distinct) > 1  # a map depends on the class asked for


def test_explain_images_and_cli(frozen_run, tmp_path, caplog):
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(
        tmp_path / "a.png"
    )
    (tmp_path / "bad.png").write_bytes(b"not an image")
    rm = load_run_model(frozen_run.dir)
    paths = explain.explain_images(
        frozen_run.dir,
        [tmp_path / "a.png", tmp_path / "bad.png"],
        tmp_path / "o",
        target=rm.classes[3],
    )
    assert [p.name for p in paths] == ["a_gradcam.png"]
    with Image.open(paths[0]) as im:
        assert im.size[0] > im.size[1]  # image + 2 maps side by side
    assert "cannot read bad" in caplog.text
    with pytest.raises(UserError, match="is not a class"):
        explain.explain_images(frozen_run.dir, [tmp_path / "a.png"], tmp_path / "o", target="nope")
    args = build_parser().parse_args(
        ["explain", str(frozen_run.dir), str(tmp_path / "a.png"), "--out", str(tmp_path / "c")]
    )
    assert explain.cmd_explain(args) == 0 and (tmp_path / "c" / "a_gradcam.png").is_file()
    assert [
        p.name
        for p in frozen_run.explain([torch.zeros(3, 32, 32, dtype=torch.uint8)], tmp_path / "d")
    ] == ["image_0_gradcam.png"]


def test_report_has_overlays(frozen_run):
    md, _ = frozen_run.report()
    text = md.read_text()
    assert "## Why the model decides (Grad-CAM)" in text and "(gradcam_mistakes.png)" in text
    assert "Grad-CAM on `backbone.layer4`" in text
    assert (frozen_run.dir / "gradcam_mistakes.png").is_file()
    assert "Not drawn" not in text


def test_without_the_extra(frozen_run, monkeypatch, tmp_path):
    monkeypatch.setattr(explain, "available", lambda: False)
    with pytest.raises(UserError, match=r"pip install 'transferlab\[explain\]'"):
        explain.explain_images(frozen_run.dir, [tmp_path / "a.png"], tmp_path)
    md, _ = frozen_run.report()
    assert "Not drawn: `pip install 'transferlab[explain]'`" in md.read_text()
