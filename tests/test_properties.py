"""Property tests: whatever a config or a file holds, the readers answer with a UserError
(or, for the feature cache, a miss that triggers a rebuild), never another exception or a hang.
"""

from __future__ import annotations

import pickle
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from transferlab.config import SECTIONS, coerce, config_from_dict, config_to_dict, load_yaml
from transferlab.data.cifar import safe_unpickle
from transferlab.errors import UserError
from transferlab.features import cache as fcache
from transferlab.models.weights import safe_torch_load

FAST = settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(
        [
            "cnn",
            "resnet18",
            "frozen",
            "scratch",
            "lbfgs",
            "adam",
            "cosine",
            "fp32",
            "1e-3",
            "true",
            "cpu",
        ]
    ),
)
values = st.one_of(
    scalars,
    st.lists(scalars, max_size=3),
    st.dictionaries(st.text(max_size=4), scalars, max_size=2),
)
field_names = st.sampled_from(
    sorted({f for cls in SECTIONS.values() for f in cls.__dataclass_fields__})
)
sections = st.dictionaries(
    st.one_of(field_names, st.text(max_size=6), st.integers()), values, max_size=5
)
configs = st.dictionaries(
    st.one_of(st.sampled_from(sorted(SECTIONS)), st.text(max_size=5), st.integers()),
    st.one_of(sections, scalars),
    max_size=4,
)


@FAST
@given(configs)
def test_random_configs_give_a_config_or_a_user_error(d):
    try:
        cfg = config_from_dict(d)
    except UserError as e:
        assert "\n" not in str(e)
        return
    assert cfg.optim.lr > 0 and cfg.optim.epochs > 0 and cfg.optim.batch_size > 0


@FAST
@given(st.fixed_dictionaries({}, optional={name: sections for name in SECTIONS}))
def test_random_known_sections_give_a_config_or_a_user_error(d):
    try:
        cfg = config_from_dict(d)
    except UserError as e:  # one line that names what was wrong
        assert "\n" not in str(e) and str(e)
        return
    # a valid config survives its own round trip and holds the values it was given
    assert config_from_dict(config_to_dict(cfg)) == cfg
    for section, values in d.items():
        fields = SECTIONS[section].__dataclass_fields__
        for key, value in (values or {}).items():
            if key != "mode":  # "" resolves to the model's default mode
                assert getattr(getattr(cfg, section), key) == coerce(
                    value, fields[key], f"{section}.{key}"
                )


def _tmp_file(data: bytes, suffix: str = "") -> Path:
    f = tempfile.NamedTemporaryFile(suffix=suffix, delete=False)
    f.write(data)
    f.close()
    return Path(f.name)


def _loads_or_names_the_file(load, data: bytes, suffix: str = "") -> None:
    """``load`` on a file holding ``data`` either returns or raises a UserError naming the file."""
    path = _tmp_file(data, suffix)
    try:
        load(path)
    except UserError as e:
        assert str(path) in str(e)
    finally:
        path.unlink()


def _pickle_prefixed(draw_bytes: bytes) -> bytes:
    """Bytes that start like a real protocol-2 pickle, so unpickling gets past the first opcode."""
    return (
        pickle.dumps({"data": np.zeros((1, 4), np.uint8), "fine_labels": [1]}, protocol=2)[:20]
        + draw_bytes
    )


any_bytes = st.one_of(st.binary(max_size=2048), st.binary(max_size=512).map(_pickle_prefixed))


@FAST
@given(any_bytes)
def test_safe_unpickle_random_bytes(data):
    _loads_or_names_the_file(safe_unpickle, data)


def _zip_prefixed(data: bytes) -> bytes:
    """A real torch.save'd file with random bytes spliced in (reaches zip and pickle readers)."""
    import io

    buf = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buf)
    raw = buf.getvalue()
    cut = len(data) % len(raw)
    return raw[:cut] + data + raw[cut + len(data) :]


@FAST
@given(st.one_of(st.binary(max_size=2048), st.binary(min_size=1, max_size=64).map(_zip_prefixed)))
def test_safe_torch_load_random_bytes(data):
    _loads_or_names_the_file(safe_torch_load, data, ".pt")


def _safetensors_prefixed(data: bytes) -> bytes:
    """A real cache entry's bytes with random bytes spliced in."""
    with tempfile.TemporaryDirectory() as d:
        path = fcache.save_entry(
            Path(d), "k", {"features": torch.ones(3, 2), "labels": torch.arange(3)}, {"n": 3}
        )
        raw = path.read_bytes()
    cut = len(data) % len(raw)
    return raw[:cut] + data + raw[cut + len(data) :]


@FAST
@given(
    st.one_of(
        st.binary(max_size=2048), st.binary(min_size=1, max_size=32).map(_safetensors_prefixed)
    )
)
def test_cache_load_entry_random_bytes_is_a_miss(tmp_path, data):
    key = "prop"
    fcache.entry_path(tmp_path, key).write_bytes(data)
    hit = fcache.load_entry(tmp_path, key)
    if hit is None:
        assert not fcache.entry_path(tmp_path, key).exists()  # removed, to be rebuilt
    else:  # the splice happened to leave a valid, checksummed entry
        tensors, _ = hit
        assert set(tensors) == {"features", "labels"}


@FAST
@given(st.one_of(st.binary(max_size=1024), st.text(max_size=300).map(str.encode)))
def test_load_yaml_random_bytes(data):
    path = _tmp_file(data, ".yaml")
    try:
        out = load_yaml(path)
        assert isinstance(out, dict)
        config_from_dict(out)
    except UserError:
        pass
    finally:
        path.unlink()


@pytest.mark.parametrize(
    "text, field, value",
    [
        ("optim:\n  lr: 1e-3\n", "optim.lr", 1e-3),
        ("run: {seed: 3}\n", "run.seed", 3),
        ("", "optim.epochs", 10),
    ],
)
def test_good_yaml_still_loads(tmp_path, text, field, value):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    cfg = config_from_dict(load_yaml(path))
    section, key = field.split(".")
    assert getattr(getattr(cfg, section), key) == value
