"""Training input pipelines for the seed CNN on real CIFAR-100, side by side in one run.

  (a) naive: a torchvision-style Dataset of PIL images + DataLoader workers + PIL transforms
      (RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor, Normalize), as most tutorials do;
  (b) ours: uint8 data in memory on the training device, batched crop/flip on the device
      (TensorLoader + augment_batch), normalised on the device;
  bare: the same train step on random tensors already on the device (the ceiling).
All three train the seed CNN for the same number of steps with the same batch and precision.
Prints img/s for each and the ratios b/bare (target >= 0.9) and b/a (target >= 3), plus the
naive input path alone (batches drawn, no step): with 0 workers loading and stepping alternate,
so b/a can be at most 1 + bare/that.

Usage:
    python benchmarks/train_pipeline.py --data-dir ../shared/datasets --steps 100
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms

from transferlab.config import ModelConfig, OptimConfig
from transferlab.constants import CIFAR100_MEAN, CIFAR100_STD
from transferlab.data.augment import augment_batch
from transferlab.data.cifar import load_cifar100
from transferlab.data.preprocess import to_float_normalized
from transferlab.data.tensor_loader import TensorLoader
from transferlab.distributed import resolve_device
from transferlab.experiment import use_channels_last
from transferlab.models.registry import build_model
from transferlab.precision import autocast, resolve_precision
from transferlab.training.optim import build_optimizer


class NaiveCifar(torch.utils.data.Dataset):
    """What torchvision.datasets.CIFAR100 does per item: HWC uint8 -> PIL -> transforms."""

    def __init__(self, images_nchw: torch.Tensor, labels: torch.Tensor, transform):
        self.data = images_nchw.permute(0, 2, 3, 1).numpy()  # HWC, as torchvision stores it
        self.labels = labels.numpy()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.data[i])), int(self.labels[i])


def make_step(model, opt, precision: str, device, memory_format):
    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        with autocast(precision, device):
            loss = F.cross_entropy(model(x.contiguous(memory_format=memory_format)).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def timed(batches, step, steps: int, warmup: int, device) -> float:
    """img/s over ``steps`` steps after ``warmup`` steps; ``batches`` yields (x, y) on device."""
    it = iter(batches)
    n = 0
    for i in range(warmup + steps):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
        x, y = next(it)
        step(x, y)
        if i >= warmup:
            n += y.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return n / (time.perf_counter() - t0)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="../shared/datasets")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=200)
    p.add_argument(
        "--workers", type=int, default=2, help="DataLoader workers for the naive pipeline"
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto")
    p.add_argument(
        "--nchw",
        action="store_true",
        help="NCHW layout for all three (default: as transferlab train)",
    )
    p.add_argument("--out", default="")
    return p.parse_args()


def naive_loader(ds, bs: int, workers: int, device: torch.device) -> torch.utils.data.DataLoader:
    """(a)'s input path: PIL images through torchvision transforms in DataLoader workers."""
    tf = transforms.Compose(
        [
            transforms.RandomCrop(32, padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(CIFAR100_MEAN, CIFAR100_STD),
        ]
    )
    return torch.utils.data.DataLoader(
        NaiveCifar(ds.train.images, ds.train.labels, tf),
        batch_size=bs,
        shuffle=True,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        drop_last=True,
    )


def main() -> None:
    args = parse_args()
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    ds = load_cifar100(args.data_dir, False, 0, 5000)
    bs = args.batch_size
    # the layout `transferlab train` would use for this model and device, for all three pipelines
    fmt = (
        torch.channels_last
        if use_channels_last(not args.nchw, 32, device)
        else torch.contiguous_format
    )

    def fresh():
        torch.manual_seed(0)
        model = build_model(ModelConfig(name="cnn"), 100).to(device).train().to(memory_format=fmt)
        return model, make_step(
            model, build_optimizer(model, OptimConfig(), 10.0), precision, device, fmt
        )

    # (a) naive
    loader = naive_loader(ds, bs, args.workers, device)

    def naive_batches_fn():
        while True:  # as many epochs as the step count needs
            for x, y in loader:
                yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    naive_batches = naive_batches_fn()
    _, step = fresh()
    naive = timed(naive_batches, step, args.steps, args.warmup, device)
    # the naive input path alone (no train step): how fast PIL + DataLoader can feed at all
    naive_data = timed(naive_batches, lambda x, y: None, args.steps, args.warmup, device)

    # (b) ours
    def aug(x, g):
        return augment_batch(x, crop_padding=4, flip=True, cutout_size=0, generator=g)

    images, labels = ds.train.images.to(device), ds.train.labels.to(device)
    tl = TensorLoader(images, labels, bs, True, drop_last=True, device=device, augment=aug)

    def ours_batches():
        epoch = 0
        while True:
            tl.set_epoch(epoch)
            for x, y in tl:
                yield to_float_normalized(x, CIFAR100_MEAN, CIFAR100_STD, None), y
            epoch += 1

    _, step = fresh()
    ours = timed(ours_batches(), step, args.steps, args.warmup, device)

    # bare: the same step on random tensors already on the device
    x = torch.randn(bs, 3, 32, 32, device=device)
    y = torch.randint(0, 100, (bs,), device=device)
    _, step = fresh()
    bare = timed(iter(lambda: (x, y), None), step, args.steps, args.warmup, device)

    print(
        f"\nseed CNN, batch {bs}, {args.steps} steps, {precision}, device {device}, "
        f"{torch.get_num_threads()} threads, naive workers {args.workers}, "
        f"{'channels_last' if fmt is torch.channels_last else 'NCHW'}"
    )
    print(f"{'pipeline':40s} {'img/s':>10s}")
    for label, v in (
        ("a) naive Dataset+DataLoader+PIL", naive),
        ("b) in-memory batched (ours)", ours),
        ("bare train step (random tensors)", bare),
    ):
        print(f"{label:40s} {v:10.0f}")
    print(f"{'a) input path alone, no train step':40s} {naive_data:10.0f}")
    print(f"b/bare = {ours / bare:.2f}  (target >= 0.9)")
    print(f"b/a    = {ours / naive:.2f}  (target >= 3)")
    if args.workers == 0:
        # loading and stepping alternate: a = 1 / (1/data + 1/step), so b/a <= 1 + bare/data
        print(
            "with 0 workers b/a is bounded by about 1 + bare/data = "
            f"{1 + bare / naive_data:.2f} at this step speed"
        )
    if args.out:
        Path(args.out).write_text(
            json.dumps(
                {
                    "naive": naive,
                    "naive_data_only": naive_data,
                    "ours": ours,
                    "bare": bare,
                    "device": str(device),
                    "precision": precision,
                    "memory_format": str(fmt),
                    "b_over_bare": ours / bare,
                    "b_over_a": ours / naive,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
