"""Tests for transferlab.data.tensor_loader.TensorLoader and transferlab.data.preprocess."""

import pytest
import torch

from transferlab.data.augment import augment_batch
from transferlab.data.preprocess import to_float_normalized
from transferlab.data.tensor_loader import TensorLoader


def _data(n: int):
    # Pixel value encodes the sample index (mod 256) so batches can be checked against labels.
    images = (torch.arange(n) % 256).to(torch.uint8).view(n, 1, 1, 1).expand(n, 3, 4, 4)
    return images.contiguous(), torch.arange(n, dtype=torch.int64)


def _labels(loader) -> list[int]:
    out = []
    for x, y in loader:
        assert x.dtype == torch.uint8 and y.dtype == torch.int64
        assert torch.equal(x[:, 0, 0, 0].long(), y % 256)  # images and labels stay paired
        out += y.tolist()
    return out


@pytest.mark.parametrize("shuffle", [True, False])
def test_every_sample_once_with_short_last_batch(shuffle):
    loader = TensorLoader(*_data(103), batch_size=10, shuffle=shuffle)
    sizes = [len(y) for _, y in loader]
    assert sizes == [10] * 10 + [3] and len(loader) == 11 and loader.num_samples == 103
    seen = _labels(loader)
    assert sorted(seen) == list(range(103))
    assert (seen == list(range(103))) is not shuffle


def test_drop_last():
    loader = TensorLoader(*_data(103), batch_size=10, shuffle=True, drop_last=True)
    sizes = [len(y) for _, y in loader]
    assert sizes == [10] * 10 and len(loader) == 10
    assert len(set(_labels(loader))) == 100


def test_set_epoch_changes_order_deterministically():
    a = TensorLoader(*_data(50), batch_size=8, shuffle=True, seed=3)
    b = TensorLoader(*_data(50), batch_size=8, shuffle=True, seed=3)
    e0 = _labels(a)
    assert _labels(a) == e0  # same epoch, same order
    a.set_epoch(1)
    e1 = _labels(a)
    assert e1 != e0 and sorted(e1) == sorted(e0)
    b.set_epoch(1)
    assert _labels(b) == e1
    c = TensorLoader(*_data(50), batch_size=8, shuffle=True, seed=4)
    assert _labels(c) != e0


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("n", [10, 11, 100])
def test_eval_shards_cover_each_sample_once(world_size, n):
    seen = []
    for rank in range(world_size):
        loader = TensorLoader(
            *_data(n), batch_size=4, shuffle=False, rank=rank, world_size=world_size
        )
        labels = _labels(loader)
        assert labels == list(range(rank, n, world_size))
        assert len(labels) == loader.num_samples
        assert len(loader) == -(-loader.num_samples // 4)
        seen += labels
    assert sorted(seen) == list(range(n))


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("n", [12, 13, 100])
def test_train_shards_disjoint_apart_from_wrap_and_equal_length(world_size, n):
    per_rank, lengths = [], set()
    for rank in range(world_size):
        loader = TensorLoader(
            *_data(n), batch_size=5, shuffle=True, rank=rank, world_size=world_size, seed=1
        )
        loader.set_epoch(2)
        labels = _labels(loader)
        assert len(labels) == loader.num_samples == -(-n // world_size)
        lengths.add((len(labels), len(loader)))
        per_rank.append(labels)
    assert len(lengths) == 1  # same samples and batches on every rank
    flat = [i for labels in per_rank for i in labels]
    assert set(flat) == set(range(n))  # full coverage
    pad = len(flat) - n
    assert pad == (-n) % world_size  # only the documented wrap padding is duplicated
    assert len(flat) - len(set(flat)) == pad


@pytest.mark.parametrize("world_size", [2, 3])
def test_train_shards_drop_last_are_disjoint(world_size):
    per_rank = []
    for rank in range(world_size):
        loader = TensorLoader(
            *_data(103),
            batch_size=4,
            shuffle=True,
            drop_last=True,
            rank=rank,
            world_size=world_size,
        )
        assert len(loader) == (103 // world_size) // 4
        per_rank.append(_labels(loader))
    flat = [i for labels in per_rank for i in labels]
    assert len(flat) == len(set(flat)) == world_size * len(per_rank[0])


def test_augment_applied_and_deterministic():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(1, 256, (40, 3, 8, 8), generator=g, dtype=torch.uint8)
    labels = torch.arange(40)

    def aug(x, gen):
        return augment_batch(x, crop_padding=2, flip=True, cutout_size=2, generator=gen)

    def run(epoch, seed=0):
        loader = TensorLoader(images, labels, batch_size=16, shuffle=True, seed=seed, augment=aug)
        loader.set_epoch(epoch)
        return [(x.clone(), y.clone()) for x, y in loader]

    a, b = run(0), run(0)
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    xs = torch.cat([x for x, _ in a])
    ys = torch.cat([y for _, y in a])
    assert xs.dtype == torch.uint8 and xs.shape == (40, 3, 8, 8)
    assert not torch.equal(xs, images[ys])  # augmentation changed something
    assert not torch.equal(torch.cat([x for x, _ in run(1)]), xs)


def test_feature_tensors_load_like_images():
    feats = torch.randn(10, 2, 4)  # (N, K views, D) cached features
    labels = torch.arange(10)
    loader = TensorLoader(feats, labels, batch_size=3, shuffle=False)
    xs = torch.cat([x for x, _ in loader])
    assert torch.equal(xs, feats)


def test_rejects_bad_input():
    images, labels = _data(10)
    with pytest.raises(ValueError):
        TensorLoader(images.flatten()[:10], labels, batch_size=2, shuffle=False)  # 1-D
    with pytest.raises(ValueError):
        TensorLoader(images, labels[:5], batch_size=2, shuffle=False)
    with pytest.raises(ValueError):
        TensorLoader(images, labels, batch_size=2, shuffle=False, rank=2, world_size=2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("on_device", [False, True])
def test_cuda_batches(on_device):
    images, labels = _data(70)
    if on_device:
        images, labels = images.cuda(), labels.cuda()

    def aug(x, gen):
        return augment_batch(x, crop_padding=1, flip=True, cutout_size=0, generator=gen)

    loader = TensorLoader(images, labels, batch_size=16, shuffle=True, device="cuda", augment=aug)
    ys = []
    for x, y in loader:
        assert x.is_cuda and y.is_cuda and x.dtype == torch.uint8
        ys += y.tolist()
    assert sorted(ys) == list(range(70))


# --- preprocess ---------------------------------------------------------------------------


def test_preprocess_normalises():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 3, 16, 16), generator=g, dtype=torch.uint8)
    xf = x.float() / 255
    mean = xf.mean(dim=(0, 2, 3)).tolist()
    std = xf.std(dim=(0, 2, 3)).tolist()
    out = to_float_normalized(x, mean, std, size=None)
    assert out.dtype == torch.float32 and out.shape == x.shape
    torch.testing.assert_close(out.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(out.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-4, rtol=0)
    # Exact formula, per pixel.
    ref = (xf - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest", "area"])
def test_preprocess_resize_matches_interpolate_then_normalise(interpolation):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (4, 3, 8, 8), generator=g, dtype=torch.uint8)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    out = to_float_normalized(x, mean, std, size=20, interpolation=interpolation)
    assert out.shape == (4, 3, 20, 20)
    kw = {"align_corners": False} if interpolation in ("bilinear", "bicubic") else {}
    resized = torch.nn.functional.interpolate(
        x.float() / 255, size=(20, 20), mode=interpolation, antialias=False, **kw
    )
    ref = (resized - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_preprocess_options():
    x = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    out = to_float_normalized(
        x, (0.5,) * 3, (0.5,) * 3, size=8, channels_last=True, dtype=torch.bfloat16
    )
    assert out.dtype == torch.bfloat16 and out.shape == (2, 3, 8, 8)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert float(out.min()) >= -1 and float(out.max()) <= 1
    with pytest.raises(ValueError):
        to_float_normalized(x.float(), (0.5,) * 3, (0.5,) * 3, size=None)
    with pytest.raises(ValueError):
        to_float_normalized(x, (0.5,) * 2, (0.5,) * 3, size=None)
