"""Every entry of each registry (engines, backbone sources, heads) works end to end.

Adding an engine, a source or a head means adding one spec: these tests walk the registries, so
a new entry is tested without a new test.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from transferlab.config import Config, ModelConfig, RunConfig
from transferlab.errors import UserError
from transferlab.features.engines import (
    ENGINE_SPECS,
    ENGINES,
    FEATURE_PRECISIONS,
    EngineChoice,
    build_engine,
    engine_installed,
)
from transferlab.models.classifier import HEADS, make_head
from transferlab.models.registry import SOURCES, build_model, resolve_name, weights_crop_pct

PYPROJECT = (Path(__file__).parents[1] / "pyproject.toml").read_text()


def _backbone() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    ).eval()


@pytest.mark.parametrize("name", list(ENGINE_SPECS))
def test_each_engine_spec_runs_and_matches_torch(name, tmp_path):
    spec = ENGINE_SPECS[name]
    assert spec.name == name and name in ENGINES
    assert set(spec.precisions) <= {"fp32", "bf16", "int8"} and "fp32" in spec.precisions
    assert ("int8" in spec.precisions) == (spec.quantizer is not None)  # int8 needs a quantizer
    assert (spec.converter is None) == (spec.loader is None)
    if spec.extra:  # the README's install line for it exists
        extra = re.search(rf"^{spec.extra} = \[(.*?)\]", PYPROJECT, re.M | re.S)
        assert extra and f'"{spec.package}' in extra.group(1), f"no {spec.extra} extra"
    assert Config(run=RunConfig(engine=name)).run.engine == name
    if not engine_installed(name):
        pytest.skip(f"{spec.package} is not installed")
    net, x = _backbone(), torch.rand(3, 3, 16, 16)
    engine = build_engine(
        EngineChoice(name, "fp32", 2), net, 16, torch.device("cpu"), tmp_path, "w0"
    )
    assert engine.choice.name == name
    got = torch.cat(list(engine.map(x.split(2))))
    torch.testing.assert_close(got, net(x), atol=1e-4, rtol=1e-4)


def test_engine_choices_derive_from_the_specs():
    assert ENGINES == ("auto", *ENGINE_SPECS)
    assert FEATURE_PRECISIONS == ("auto", "fp32", "bf16", "int8")
    with pytest.raises(UserError, match="--engine must be one of auto, torch"):
        RunConfig(engine="tensorrt")


@pytest.mark.parametrize("name", list(SOURCES))
def test_each_backbone_source_builds_its_example(name):
    source = SOURCES[name]
    assert resolve_name(source.example)[0] == name
    size = source.input_size or 32
    model = build_model(ModelConfig(name=source.example, weights="none"), num_classes=3)
    with torch.no_grad():
        feats = model.eval().features(torch.rand(2, 3, size, size))
    assert feats.shape == (2, model.feature_dim)
    assert 0 < weights_crop_pct(source.example, "none", model.backbone) <= 1


@pytest.mark.parametrize("name", list(HEADS))
def test_each_head_builds_and_is_a_config_choice(name):
    head = make_head(name, 8, 3, hidden=5, dropout=0.1)
    assert head(torch.rand(4, 8)).shape == (4, 3)
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    assert (len(linears) == 1) == HEADS[name].linear
    assert ModelConfig(name="resnet18", head=name).head == name
    with pytest.raises(UserError, match="--head must be one of"):
        ModelConfig(name="resnet18", head="transformer")
