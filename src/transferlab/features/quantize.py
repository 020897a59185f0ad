"""int8 extraction: the backbone's OpenVINO IR quantised by NNCF, calibrated on the run's data.

``--feature-precision int8`` runs the frozen backbone as an int8 OpenVINO model: NNCF's post-
training quantisation (``nncf.quantize``: min/max statistics of each quantised tensor, then full
bias correction, :data:`SETTINGS`) on at most :data:`CALIBRATION_MAX` images of the run's own
training split, drawn with its split seed (``--split-seed``: not the run's ``--seed``, so a study's
replicates share one quantised model and one feature cache entry, as they share the split). On
AVX512-VNNI/AMX CPUs int8 convolutions run at about twice the bf16 MAC rate; what that costs in
accuracy is measured, not assumed (benchmarks/extract_engines.py --int8, RESULTS.md).

The calibration set is named by :func:`calibration_id` (the training split's identity, the drawn
indices and the quantiser's settings) before anything is extracted, so the plan and the feature
cache key carry it, and ``predict`` finds the same quantised model without the training data. The
quantised model is cached like the converted engines (engines.converted_model: one safetensors file
under ``cache_root/engines``, keyed by the weights' hash, the image size, the calibration id, the
preprocessing and the library versions, nncf's included; written atomically with a sha256; a
corrupt file is deleted and rebuilt).

``auto`` never picks int8: the user asks for it, because the head's accuracy is at stake.

Usage:
    idx = calibration_indices(len(ds.train), seed)              # UserError below 10 images
    cal = Calibration(calibration_id(identity, idx), lambda: prepared_batches)
    int8_model = quantize_model(ov_model, cal.batches())     # engines.py caches the result
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from types import ModuleType

import torch

from transferlab.errors import UserError
from transferlab.extras import installed, load_extra
from transferlab.features import cache as fcache

log = logging.getLogger(__name__)

CALIBRATION_MAX = 300  # images (NNCF's own default subset_size)
CALIBRATION_MIN = 10  # below this the min/max statistics describe a handful of images
EXTRA = "int8"  # the pyproject extra: openvino + nncf
PACKAGES = ("openvino", "nncf")


@dataclass(frozen=True)
class Int8Settings:
    """How NNCF quantises (its cache keys hold these, so a change rebuilds the models).

    ``fast_bias_correction``: NNCF's default one-pass bias correction; False runs its full
    BiasCorrection (slower: a pass per layer). ``preset``: "performance" (symmetric) or "mixed"
    (asymmetric activations). ``fp32_last_conv``: the last convolution (conv_head, 1280 output
    channels that the head reads directly) stays in fp32 through an ignored scope.
    """

    fast_bias_correction: bool = True
    preset: str = "performance"
    fp32_last_conv: bool = False

    def key(self) -> dict:
        return {"nncf": nncf_version(), **asdict(self)}


# The measured choice (benchmarks/extract_engines.py --int8-variants, RESULTS.md): NNCF's full
# bias correction; on lite0's CIFAR-100 probe it lost 0.24 points to fp32 where the fast default
# lost 1.12. Mixed (asymmetric) activations and an fp32 conv_head gained nothing.
SETTINGS = Int8Settings(fast_bias_correction=False)


@dataclass(frozen=True)
class Calibration:
    """The calibration set: its id (in the plan and the cache keys) and, on a cache miss, its
    images as prepared float NCHW batches (resized and normalised like the features' input)."""

    key: str
    batches: Callable[[], Iterable[torch.Tensor]]


def require_int8() -> None:
    """UserError naming the extra when OpenVINO or NNCF is not installed."""
    missing = [p for p in PACKAGES if not installed(p)]
    if missing:
        raise UserError(
            f"--feature-precision int8 needs {' and '.join(missing)}: "
            f"pip install 'transferlab[{EXTRA}]' (or use --feature-precision auto, fp32 or bf16)"
        )


def _nncf() -> ModuleType:
    """nncf, imported on first use (the optional extra's one loader), quiet."""
    require_int8()
    nncf = load_extra("nncf", EXTRA, "--feature-precision int8")
    logging.getLogger("nncf").setLevel(logging.WARNING)  # progress lines per algorithm
    return nncf


def nncf_version() -> str:
    """nncf's version, or "none" (part of the quantised model's cache key)."""
    if not installed("nncf"):
        return "none"
    return str(load_extra("nncf", EXTRA, "int8").__version__)


def calibration_indices(n_train: int, seed: int) -> torch.Tensor:
    """Sorted indices of at most CALIBRATION_MAX training images, drawn with ``seed``."""
    if n_train < CALIBRATION_MIN:
        raise UserError(
            f"--feature-precision int8 calibrates on the training images, and there are only "
            f"{n_train} readable ones; it needs at least {CALIBRATION_MIN} (or use "
            "--feature-precision fp32 or bf16)"
        )
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n_train, generator=g)[:CALIBRATION_MAX].sort().values


def calibration_id(identity: dict, indices: torch.Tensor) -> str:
    """The calibration set's hash: the training split's identity (data hash, split, subset), the
    drawn indices and the quantiser's settings (with nncf's version)."""
    quantiser = SETTINGS.key()  # how the images become an int8 model: a change is a new model
    return fcache.cache_key(
        {**identity, "indices": indices.tolist(), "n": len(indices), "quantiser": quantiser}
    )


def _last_conv(model) -> str:
    """The friendly name of an ``openvino.Model``'s last Convolution node."""
    convs = [
        op.get_friendly_name()
        for op in model.get_ordered_ops()
        if op.get_type_name() == "Convolution"
    ]
    if not convs:
        raise ValueError("the model has no Convolution node")
    return convs[-1]


def quantize_model(model, batches: Iterable[torch.Tensor], settings: Int8Settings = SETTINGS):
    """An ``openvino.Model`` quantised to int8 by NNCF on the calibration ``batches``.

    Each calibration image is one NNCF sample (batches are cut into single images, the form
    NNCF's statistics expect). UserError when fewer than CALIBRATION_MIN images came.
    """
    nncf = _nncf()
    images = [x[i : i + 1].float().contiguous().numpy() for x in batches for i in range(len(x))]
    if len(images) < CALIBRATION_MIN:
        raise UserError(
            f"--feature-precision int8: only {len(images)} calibration images could be read; "
            f"it needs at least {CALIBRATION_MIN} (or use --feature-precision fp32 or bf16)"
        )
    with contextlib.redirect_stdout(sys.stderr):  # NNCF's progress bars: never in stdout's data
        quantized = nncf.quantize(
            model,
            nncf.Dataset(images),
            subset_size=len(images),
            fast_bias_correction=settings.fast_bias_correction,
            preset=nncf.QuantizationPreset(settings.preset),
            ignored_scope=(
                nncf.IgnoredScope(names=[_last_conv(model)]) if settings.fp32_last_conv else None
            ),
        )
    log.info(
        "quantised the backbone to int8 with NNCF on %d calibration images (%s)",
        len(images),
        settings,
    )
    return quantized
