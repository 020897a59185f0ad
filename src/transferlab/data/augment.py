"""Batched, on-device image augmentation for NCHW tensors (uint8 or float).

Every op works on a whole batch with tensor ops (no per-image Python), draws its random
numbers from the ``torch.Generator`` it is given, and returns a new tensor of the same
shape and dtype. Same generator state in -> same output out.

Usage:
    g = torch.Generator(device=x.device).manual_seed(0)
    x_aug = augment_batch(x, crop_padding=4, flip=True, cutout_size=0, generator=g)

    # As a TensorLoader ``augment`` callable (positional ``(x, generator)``):
    aug = lambda x, g: augment_batch(x, crop_padding=4, flip=True, cutout_size=8, generator=g)
"""

import torch
import torch.nn.functional as F
from torch import Tensor


def _check_batch(x: Tensor, generator: torch.Generator) -> None:
    """Reject non-NCHW input and a generator on a different device than ``x``."""
    if x.dim() != 4:
        raise ValueError(f"expected an NCHW batch, got shape {tuple(x.shape)}")
    # Compare type and index, treating an index-less "cuda" as "cuda:0".
    gd, xd = torch.device(generator.device), x.device
    if gd.type != xd.type or (gd.type == "cuda" and (gd.index or 0) != (xd.index or 0)):
        raise ValueError(
            f"generator is on {gd} but the batch is on {xd}; create it with "
            f"torch.Generator(device=x.device)"
        )


def random_crop(x: Tensor, padding: int, generator: torch.Generator) -> Tensor:
    """Zero-pad each image by ``padding`` px, then take a random HxW crop per image.

    Same as torchvision ``RandomCrop(size=H, padding=padding)`` (constant 0 fill), batched.
    ``padding == 0`` returns ``x`` unchanged (no random numbers drawn).
    """
    _check_batch(x, generator)
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    if padding == 0:
        return x
    n, c, h, w = x.shape
    dev = generator.device
    # Top-left corner of each crop in padded coordinates, uniform in [0, 2p]: (N,) each.
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=dev)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=dev)
    hp, wp = h + 2 * padding, w + 2 * padding
    padded = F.pad(x, (padding, padding, padding, padding))  # (N, C, Hp, Wp), zeros
    # One gather over each flattened padded image (fastest of gather/unfold/offset-loop
    # variants measured on CPU): flat index of crop pixel (i, j) = (dy + i) * Wp + dx + j.
    window = (torch.arange(h, device=dev)[:, None] * wp + torch.arange(w, device=dev)).flatten()
    idx = (dy * wp + dx)[:, None] + window  # (N, H*W)
    out = padded.reshape(n, c, hp * wp).gather(2, idx[:, None, :].expand(n, c, h * w))
    return out.view(n, c, h, w)


def random_hflip(x: Tensor, generator: torch.Generator, p: float = 0.5) -> Tensor:
    """Flip each image left-right with probability ``p``; a flipped image is exactly
    ``torch.flip(img, dims=[-1])``."""
    _check_batch(x, generator)
    flip = torch.rand(x.shape[0], generator=generator, device=generator.device) < p  # (N,)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def cutout(x: Tensor, size: int, generator: torch.Generator) -> Tensor:
    """Zero a ``size`` x ``size`` square per image (all channels), clipped at the borders.

    The square's centre is uniform over the image (DeVries & Taylor 2017), so squares near
    an edge are partly outside and zero fewer than ``size**2`` pixels. ``size == 0`` is a no-op.
    """
    _check_batch(x, generator)
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    if size == 0:
        return x
    n, _, h, w = x.shape
    dev = generator.device
    cy = torch.randint(0, h, (n,), generator=generator, device=dev)  # centre row, (N,)
    cx = torch.randint(0, w, (n,), generator=generator, device=dev)  # centre col, (N,)
    y0 = (cy - size // 2)[:, None]  # top row (may be < 0), (N, 1)
    x0 = (cx - size // 2)[:, None]
    ys = torch.arange(h, device=dev)
    xs = torch.arange(w, device=dev)
    in_y = (ys >= y0) & (ys < y0 + size)  # (N, H)
    in_x = (xs >= x0) & (xs < x0 + size)  # (N, W)
    mask = in_y[:, None, :, None] & in_x[:, None, None, :]  # (N, 1, H, W), shared by channels
    return x.masked_fill(mask, 0)


def augment_batch(
    x: Tensor,
    *,
    crop_padding: int,
    flip: bool,
    cutout_size: int,
    generator: torch.Generator,
) -> Tensor:
    """Random crop (if ``crop_padding > 0``), then horizontal flip (if ``flip``), then
    cutout (if ``cutout_size > 0``). Deterministic given the generator's state."""
    _check_batch(x, generator)
    if crop_padding:
        x = random_crop(x, crop_padding, generator)
    if flip:
        x = random_hflip(x, generator)
    if cutout_size:
        x = cutout(x, cutout_size, generator)
    return x
