"""In-memory batch iterator over a uint8 image tensor: no DataLoader workers, no per-image Python.

The whole dataset is one (N, 3, H, W) uint8 tensor (CIFAR-100 train is 150 MB) that may
already live on the training device. Each batch is one gather; augmentation runs on the
device on the uint8 batch.

Sharding (``world_size > 1``), like ``DistributedSampler``:

* ``shuffle=True`` (training): one permutation of ``range(N)`` seeded with ``seed + epoch``,
  identical on every rank. With ``drop_last=False`` it is padded by wrapping around to its
  start up to a multiple of ``world_size`` (so up to ``world_size - 1`` samples are seen
  twice per epoch); with ``drop_last=True`` its tail is trimmed to a multiple of
  ``world_size`` and a short last batch is dropped. Rank r takes positions r::world_size, so
  every rank has the same number of samples and batches (DDP never waits on a missing rank).
  Global batches equal single-process batches: with ``batch_size`` B/W per rank, rank r's
  batch b holds positions b*B + r, b*B + r + W, ... of the permutation, so the W shards of
  global batch b are exactly positions [b*B, (b+1)*B), the single-process batch b. With the
  same seed, DDP (which averages the ranks' mean gradients over equal shards) therefore takes
  the same steps as one process, up to float rounding, whenever N is a multiple of W (else
  the wrap padding adds up to W - 1 repeats to the last batch). tests/test_ddp.py checks it.
* ``shuffle=False`` (evaluation): rank r takes indices r::world_size in order, with no
  padding, so every sample is seen exactly once across ranks; shard sizes may differ by one
  (and so may batch counts). ``drop_last=True`` drops each rank's short last batch.

Determinism: the order depends only on (seed, epoch); the augmentation generator is seeded
from (seed + epoch, rank) at the start of each pass, so iterating twice in the same epoch
gives identical batches, on the same device and torch version.

Usage:
    aug = lambda x, g: augment_batch(x, crop_padding=4, flip=True, cutout_size=0, generator=g)
    loader = TensorLoader(images, labels, batch_size=512, shuffle=True, device="cuda",
                          augment=aug)
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for x_uint8, y in loader:
            x = to_float_normalized(x_uint8, CIFAR100_MEAN, CIFAR100_STD, size=None)
"""

import logging
import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from transferlab.distributed import augment_seed, shard_order

logger = logging.getLogger(__name__)


class TensorLoader:
    """Iterate ``(x_uint8, y)`` batches of ``batch_size`` (per rank) on ``device``."""

    # The arguments are DataLoader's and DistributedSampler's (batch, shuffle, drop_last, seed,
    # rank, world_size) plus the data and the device: one loader in place of both.
    def __init__(  # noqa: PLR0913
        self,
        images: Tensor,
        labels: Tensor,
        batch_size: int,
        shuffle: bool,
        drop_last: bool = False,
        device: torch.device | str = "cpu",
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        augment: Callable[[Tensor, torch.Generator], Tensor] | None = None,
        sample_weights: Tensor | None = None,
    ) -> None:
        # images is usually uint8 (N, C, H, W); cached features (N, [K,] D) float work the same.
        if images.dim() < 2:
            raise ValueError(f"images must be (N, ...), got shape {tuple(images.shape)}")
        if labels.shape != (images.shape[0],) or labels.dtype != torch.int64:
            raise ValueError(
                f"labels must be int64 of shape ({images.shape[0]},), "
                f"got {labels.dtype} {tuple(labels.shape)}"
            )
        if labels.device != images.device:
            raise ValueError(f"images on {images.device} but labels on {labels.device}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}"
            )
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.device = torch.device(device)
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.augment = augment
        self.sample_weights = sample_weights  # (N,): draw with replacement (--balance sampler)
        self.epoch = 0
        self.images = images
        self.labels = labels
        # Host -> GPU: gather each batch straight into a pinned buffer (index_select out=),
        # then copy with non_blocking=True. Pinning the whole source tensor would not help:
        # a gather from it returns a fresh, unpinned tensor. Pinned buffers come from torch's
        # caching host allocator, which keeps a buffer alive until its async copy is done.
        self._pinned = (
            images.device.type == "cpu" and self.device.type == "cuda" and torch.cuda.is_available()
        )
        # One augmentation generator per loader, on the device; re-seeded in __iter__.
        self._generator = torch.Generator(device=self.device) if augment is not None else None
        logger.debug(
            "TensorLoader: %d samples on %s -> %s (pinned copy: %s), rank %d/%d",
            images.shape[0],
            images.device,
            self.device,
            self._pinned,
            rank,
            world_size,
        )

    def set_epoch(self, epoch: int) -> None:
        """Use permutation and augmentation seeds for ``epoch`` (call before each epoch)."""
        self.epoch = epoch

    @property
    def num_samples(self) -> int:
        """Samples this rank yields per epoch (after padding/trimming, before drop_last)."""
        n, ws = self.images.shape[0], self.world_size
        if self.shuffle:
            return n // ws if self.drop_last else math.ceil(n / ws)
        return len(range(self.rank, n, ws))  # eval: r::ws, unequal shards allowed

    def __len__(self) -> int:
        """Batches this rank yields per epoch."""
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def _indices(self) -> Tensor:
        """This rank's sample indices for the current epoch, int64 (num_samples,) on the CPU."""
        return shard_order(
            self.images.shape[0],
            self.shuffle,
            self.seed,
            self.epoch,
            self.rank,
            self.world_size,
            self.drop_last,
            self.sample_weights,
        )

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        idx = self._indices().to(self.images.device)  # index where the data lives
        if self._generator is not None:
            self._generator.manual_seed(augment_seed(self.seed, self.epoch, self.rank))
        bs = self.batch_size
        for b in range(len(self)):
            batch_idx = idx[b * bs : (b + 1) * bs]
            x, y = self._fetch(batch_idx)
            if self.augment is not None:
                x = self.augment(x, self._generator)
            yield x, y

    def _fetch(self, batch_idx: Tensor) -> tuple[Tensor, Tensor]:
        """Gather one batch and move it to ``self.device``: x uint8 (B, C, H, W), y int64 (B,)."""
        if self._pinned:
            b = batch_idx.shape[0]
            x = torch.empty((b, *self.images.shape[1:]), dtype=self.images.dtype, pin_memory=True)
            y = torch.empty((b,), dtype=torch.int64, pin_memory=True)
            torch.index_select(self.images, 0, batch_idx, out=x)
            torch.index_select(self.labels, 0, batch_idx, out=y)
            return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        x = self.images[batch_idx]
        y = self.labels[batch_idx]
        return x.to(self.device), y.to(self.device)  # no-op when already there
