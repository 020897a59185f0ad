"""Tests for transferlab.data.augment: shapes, determinism, exactness against naive references."""

import pytest
import torch
import torch.nn.functional as F

from transferlab.data.augment import augment_batch, cutout, random_crop, random_hflip


def _batch(n: int = 16, h: int = 8, w: int = 10, dtype=torch.uint8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, 256, (n, 3, h, w), generator=g)  # no zeros: cutout/pad are visible
    return x.to(dtype)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _aug(x, seed, **kw):
    kw = {"crop_padding": 4, "flip": True, "cutout_size": 3} | kw
    return augment_batch(x, generator=_gen(seed), **kw)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
@pytest.mark.parametrize(
    "fn",
    [
        lambda x, g: random_crop(x, 4, g),
        lambda x, g: random_hflip(x, g),
        lambda x, g: cutout(x, 3, g),
        lambda x, g: augment_batch(x, crop_padding=2, flip=True, cutout_size=4, generator=g),
    ],
)
def test_shape_and_dtype_preserved(fn, dtype):
    x = _batch(dtype=dtype)
    out = fn(x, _gen(0))
    assert out.shape == x.shape and out.dtype == x.dtype


def test_deterministic_under_seed():
    x = _batch()
    assert torch.equal(_aug(x, 1), _aug(x, 1))
    assert not torch.equal(_aug(x, 1), _aug(x, 2))


def test_input_not_modified():
    x = _batch()
    before = x.clone()
    _aug(x, 0)
    assert torch.equal(x, before)


def test_flip_is_exact_flip():
    x = _batch(n=64)
    out = random_hflip(x, _gen(3))
    flipped = 0
    for img, o in zip(x, out, strict=True):
        if torch.equal(o, img):
            continue
        assert torch.equal(o, torch.flip(img, dims=[-1]))
        flipped += 1
    assert 0 < flipped < 64  # p=0.5 on 64 images: both outcomes occur for this seed
    assert torch.equal(random_hflip(x, _gen(3), p=0.0), x)
    assert torch.equal(random_hflip(x, _gen(3), p=1.0), x.flip(-1))


def test_crop_padding_zero_is_identity():
    x = _batch()
    assert torch.equal(random_crop(x, 0, _gen(0)), x)
    assert torch.equal(
        augment_batch(x, crop_padding=0, flip=False, cutout_size=0, generator=_gen(0)), x
    )


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_crop_matches_naive_reference(dtype):
    x = _batch(n=32, dtype=dtype)
    p, (h, w) = 4, x.shape[-2:]
    out = random_crop(x, p, _gen(5))
    # Reference: replay the same offsets and crop each image by slicing its padded copy.
    g = _gen(5)
    dy = torch.randint(0, 2 * p + 1, (32,), generator=g)
    dx = torch.randint(0, 2 * p + 1, (32,), generator=g)
    for i in range(32):
        padded = F.pad(x[i], (p, p, p, p))  # zero padding, (C, H+2p, W+2p)
        ref = padded[:, dy[i] : dy[i] + h, dx[i] : dx[i] + w]
        assert torch.equal(out[i], ref)
    assert len(set(zip(dy.tolist(), dx.tolist(), strict=True))) > 1  # offsets really vary


def test_crop_pixels_come_from_a_padded_window():
    # Independent of the RNG replay: each output must equal some window of the padded image.
    x = _batch(n=8)
    p, (h, w) = 2, x.shape[-2:]
    out = random_crop(x, p, _gen(9))
    for i in range(8):
        padded = F.pad(x[i], (p, p, p, p))
        windows = [
            padded[:, a : a + h, b : b + w] for a in range(2 * p + 1) for b in range(2 * p + 1)
        ]
        assert any(torch.equal(out[i], win) for win in windows)


def test_cutout_zeroes_a_clipped_square():
    x = torch.ones(200, 3, 20, 20, dtype=torch.uint8)
    size = 4
    out = cutout(x, size, _gen(7))
    zero = out == 0  # (N, C, H, W)
    assert torch.equal(zero, zero[:, :1].expand_as(zero))  # same square in every channel
    interior = 0
    for z in zero[:, 0]:
        rows = z.any(1).nonzero().flatten()
        cols = z.any(0).nonzero().flatten()
        count = int(z.sum())
        assert 0 < count <= size * size
        # The zeroed pixels form one full rectangle of at most size x size.
        assert count == len(rows) * len(cols)
        assert len(rows) <= size and len(cols) <= size
        assert rows[-1] - rows[0] + 1 == len(rows) and cols[-1] - cols[0] + 1 == len(cols)
        if rows[0] > 0 and cols[0] > 0 and rows[-1] < 19 and cols[-1] < 19:
            assert count == size * size  # away from the border: exactly size^2
            interior += 1
    assert interior > 50  # most centres in a 20x20 image give an unclipped 4x4 square


def test_cutout_zero_size_is_identity():
    x = _batch()
    assert torch.equal(cutout(x, 0, _gen(0)), x)


def test_generator_device_mismatch_rejected():
    x = _batch()
    with pytest.raises(ValueError):
        random_crop(x[0], 4, _gen(0))  # not NCHW
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="generator"):
            random_hflip(x, torch.Generator(device="cuda"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_shapes_and_determinism():
    x = _batch(n=64).cuda()
    g1 = torch.Generator(device="cuda").manual_seed(0)
    g2 = torch.Generator(device="cuda").manual_seed(0)
    a = augment_batch(x, crop_padding=4, flip=True, cutout_size=3, generator=g1)
    b = augment_batch(x, crop_padding=4, flip=True, cutout_size=3, generator=g2)
    assert a.device == x.device and a.dtype == torch.uint8 and torch.equal(a, b)
