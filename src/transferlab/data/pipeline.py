"""The pixel pipeline: uint8 images -> (augment) -> resize + normalise -> model.

In-memory data (CIFAR) is served by :class:`~transferlab.data.tensor_loader.TensorLoader`,
folders by a DataLoader that decodes with the plan's eval transform; both yield uint8 batches
on the device, and ``prepare`` resizes and normalises them in batches.

Usage:
    pipe = build_pixel_pipeline(cfg, plan, model, ds, env)
"""

from __future__ import annotations

import torch

from transferlab.config import Config
from transferlab.data.augment import augment_batch
from transferlab.data.balance import sample_weights
from transferlab.data.cifar import ImageDataset
from transferlab.data.folder import folder_loader
from transferlab.data.preprocess import to_float_normalized
from transferlab.data.tensor_loader import TensorLoader
from transferlab.distributed import DistEnv, wrap_ddp
from transferlab.models.classifier import Classifier
from transferlab.pipeline import Pipeline
from transferlab.plan import Plan


def make_loader(
    split,
    batch_size: int,
    shuffle: bool,
    env: DistEnv,
    seed: int,
    augment=None,
    sample_weights: torch.Tensor | None = None,
):
    """Batches (x_uint8, y) on ``env.device``: in-memory for tensors, a DataLoader for folders.

    ``sample_weights`` (N,): a shuffled pass draws with replacement by them (--balance sampler).
    """
    if hasattr(split, "images"):
        return TensorLoader(
            split.images,
            split.labels,
            batch_size,
            shuffle,
            device=env.device,
            seed=seed,
            rank=env.rank,
            world_size=env.world_size,
            augment=augment,
            sample_weights=sample_weights,
        )

    return folder_loader(split, batch_size, shuffle, env.device, seed, env, augment, sample_weights)


def augment_fn(cfg: Config):
    """The training augmentation of ``cfg.data`` on uint8 batches, or None."""
    d = cfg.data
    if not (d.crop_padding or d.flip or d.cutout):
        return None
    return lambda x, g: augment_batch(
        x, crop_padding=d.crop_padding, flip=d.flip, cutout_size=d.cutout, generator=g
    )


def train_sample_weights(cfg: Config, labels: torch.Tensor, num_classes: int):
    """The training loader's draw weights under ``--balance sampler``, else None."""
    if cfg.optim.balance != "sampler":
        return None
    return sample_weights(torch.as_tensor(labels), num_classes)


def prepare_fn(plan: Plan):
    """uint8 batch -> normalised float batch at the plan's size and layout."""
    p = plan.preprocessing
    return lambda x: to_float_normalized(
        x, p.mean, p.std, plan.image_size, p.interpolation, channels_last=plan.channels_last
    )


def build_pixel_pipeline(
    cfg: Config, plan: Plan, model: Classifier, ds: ImageDataset, env: DistEnv
) -> Pipeline:
    """Loaders over pixels and the (DDP-wrapped, optionally compiled) model."""
    train_module = wrap_ddp(model, env, sync_bn=cfg.model.sync_bn)
    if cfg.run.compile:
        train_module = torch.compile(train_module)
    seed = cfg.run.seed
    weights = train_sample_weights(cfg, ds.train.labels, len(ds.classes))
    return Pipeline(
        train_loader=make_loader(
            ds.train, plan.batch_per_rank, True, env, seed, augment_fn(cfg), weights
        ),
        val_loader=make_loader(ds.val, plan.eval_batch_per_rank, False, env, seed),
        test_loader=make_loader(ds.test, plan.eval_batch_per_rank, False, env, seed),
        train_module=train_module,
        eval_module=model,
        prepare=prepare_fn(plan),
    )
