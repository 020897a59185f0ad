"""Images a user hands the API (paths, folders, PIL images, tensors) as files for predict/explain.

PIL images and tensors are written as lossless PNGs into a temporary folder, so they take the
very decode path of a file (the run's own preprocessing, as ``transferlab predict``).

Usage:
    with image_files(["cat.jpg", pil_image, chw_tensor]) as items:
        for label, path_or_error in items: ...
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from transferlab.errors import UserError
from transferlab.predict import expand_inputs


def _to_pil(image):
    """A PIL image, or a uint8/float CHW tensor (or HWC array) as a PIL image."""
    if isinstance(image, Image.Image):
        return image
    t = torch.as_tensor(image).detach().cpu()
    if t.dim() != 3:
        raise ValueError(f"expected one image (C, H, W); got shape {tuple(t.shape)}")
    if t.shape[0] not in (1, 3) and t.shape[-1] in (1, 3):  # HWC array
        t = t.permute(2, 0, 1)
    if t.is_floating_point():  # float in [0, 1], as torchvision's ToTensor gives
        if not torch.isfinite(t).all():  # NaN compares False with every bound below
            raise ValueError("float image holds NaN or infinite values; refusing it")
        if t.min() < 0 or t.max() > 1:
            raise ValueError("float images must be in [0, 1] (pixel / 255)")
        t = (t * 255).round().to(torch.uint8)
    elif t.dtype != torch.uint8:
        raise ValueError(f"integer images must be uint8; got {t.dtype}")
    arr = np.ascontiguousarray(t.permute(1, 2, 0).numpy())
    return Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr)


def _image_list(images) -> list:
    """Flatten a single image, an NCHW batch or a list into a list of images."""
    if isinstance(images, (str, os.PathLike)):
        return [images]
    if isinstance(images, torch.Tensor) or type(images).__module__ == "numpy":
        t = torch.as_tensor(images)
        return list(t) if t.dim() == 4 else [t]
    if not isinstance(images, (list, tuple)):
        return [images]  # a PIL image
    return list(images)


@contextmanager
def image_files(images) -> Iterator[list[tuple[str, Path | str]]]:
    """(label, path or error text) per image, for predict and explain.

    Paths stay paths (folders expand to their image files, as on the CLI). PIL images and tensors
    are written as lossless PNGs into a temporary folder for the duration, so they take the very
    decode path of a file; an object that is no image gets its error text instead of a path.
    """
    with tempfile.TemporaryDirectory(prefix="transferlab-images-") as tmp:
        out: list[tuple[str, Path | str]] = []
        for i, item in enumerate(_image_list(images)):
            if isinstance(item, (str, os.PathLike)):
                out += [(str(p), Path(p)) for p in expand_inputs([os.fspath(item)])]
                continue
            label = f"<image {i}>"
            try:
                path = Path(tmp) / f"image_{i}.png"
                _to_pil(item).save(path, format="PNG")
                out.append((label, path))
            except Exception as e:  # a wrong shape, dtype or range
                out.append((label, f"{type(e).__name__}: {e}"))
        if not out:
            raise UserError("no images: pass image files, folders, PIL images or tensors")
        yield out
