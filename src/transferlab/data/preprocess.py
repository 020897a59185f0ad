"""uint8 NCHW batch -> normalised float batch, resized on the fly (shared by models and the
feature extractor).

Usage:
    from transferlab.constants import IMAGENET_MEAN, IMAGENET_STD
    x = to_float_normalized(x_uint8, IMAGENET_MEAN, IMAGENET_STD, size=224)
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

_MODES = ("nearest", "nearest-exact", "bilinear", "bicubic", "area")


def to_float_normalized(
    x_uint8: Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    size: int | None,
    interpolation: str = "bilinear",
    channels_last: bool = False,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Convert a uint8 (N, C, H, W) batch to ``(x / 255 - mean) / std`` as ``dtype``.

    If ``size`` is given and differs from H or W, the batch is resized to (size, size) with
    ``F.interpolate(mode=interpolation, antialias=False, align_corners=False)``.
    ``channels_last`` returns a channels-last tensor (faster convs on recent GPUs).
    """
    if x_uint8.dim() != 4 or x_uint8.dtype != torch.uint8:
        raise ValueError(
            f"expected a uint8 NCHW batch, got {x_uint8.dtype} shape {tuple(x_uint8.shape)}"
        )
    if interpolation not in _MODES:
        raise ValueError(f"interpolation must be one of {_MODES}, got {interpolation!r}")
    c = x_uint8.shape[1]
    if len(mean) != c or len(std) != c:
        raise ValueError(f"mean/std need {c} values (one per channel), got {len(mean)}/{len(std)}")
    # Fold /255 and the normalisation into one affine map per channel: x * scale - shift.
    std_t = torch.tensor(std, dtype=torch.float32, device=x_uint8.device).view(1, c, 1, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=x_uint8.device).view(1, c, 1, 1)
    scale = 1.0 / (255.0 * std_t)
    shift = mean_t / std_t
    x = x_uint8
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)  # interpolate keeps the format
    # Normalise first, at the (small) input resolution: interpolation weights sum to 1 per
    # output pixel, so a per-channel affine map commutes with the resize. Compute in float32
    # (CPU half/bfloat16 interpolate support varies), cast at the end.
    x = x.float().mul_(scale).sub_(shift)
    h, w = x.shape[-2:]
    if size is not None and (size != h or size != w):
        linear = interpolation in ("bilinear", "bicubic")
        x = F.interpolate(
            x,
            size=(size, size),
            mode=interpolation,
            align_corners=False if linear else None,
            antialias=False,
        )
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.to(dtype)


def eval_transform(img, pre) -> Tensor:
    """A PIL RGB image -> uint8 (3, crop, crop) by the weights' eval transform.

    Shorter side to ``pre.resize`` px (PIL resampling with ``pre.interpolation``, as
    torchvision's ``Resize`` and timm's ``create_transform`` do on PIL images), then a centre
    crop of ``pre.crop`` px. The normalisation follows in batches (``to_float_normalized``).
    """
    img = TF.resize(img, pre.resize, interpolation=InterpolationMode(pre.interpolation))
    img = TF.center_crop(img, pre.crop)
    return TF.pil_to_tensor(img).contiguous()
