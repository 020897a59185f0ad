"""Lite1/Lite2 offline weights: key mapping into timm, parity with the reference port, registry."""

import pytest
import torch

from transferlab.config import ModelConfig
from transferlab.errors import UserError

timm = pytest.importorskip("timm")

from transferlab.models.lite import (  # noqa: E402
    LITE_VARIANTS,
    lite_weights_path,
    load_lite_pretrained,
    map_lite_state_dict,
    read_lite_weights,
)
from transferlab.models.registry import (  # noqa: E402
    build_model,
    offline_timm_names,
    offline_weights_available,
)

VARIANTS = [("tf_efficientnet_lite1", 240), ("tf_efficientnet_lite2", 260)]


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
