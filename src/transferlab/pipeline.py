"""What a run trains on, as one small typed object that ``data/`` and ``features/`` both build.

The pixel pipeline (``data.pipeline.build_pixel_pipeline``) feeds uint8 images through
``prepare`` (resize + normalise) into the model; the frozen-feature pipeline
(``features.pipeline.build_feature_pipeline``) feeds cached features into the head, with
``prepare`` the identity. ``fit`` and ``evaluate`` see only this object.

Usage:
    logits = pipe.train_forward(x)    # through the (DDP-wrapped, maybe compiled) train module
    logits = pipe.eval_forward(x)     # through the bare module
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class SplitFeatures:
    """Where one split's features came from."""

    hit: bool  # read from the cache
    key: str
    img_s: float | None  # extraction throughput (None on a hit)


@dataclass(frozen=True)
class FeatureInfo:
    """The feature cache's part of a run (summary.json's ``feature_cache``)."""

    root: str
    precision: str
    engine: str
    seconds: float
    splits: dict[str, SplitFeatures] = field(default_factory=dict)


@dataclass
class Pipeline:
    """Loaders and modules of one run; ``train_module`` is re-wrapped when a phase changes."""

    train_loader: object
    val_loader: object
    test_loader: object
    train_module: nn.Module  # what the optimiser trains: the (DDP-wrapped) model, or the head
    eval_module: nn.Module  # the same weights, unwrapped (evaluation and test)
    prepare: Callable[[torch.Tensor], torch.Tensor]  # loader batch -> module input
    features: FeatureInfo | None = None

    def train_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.train_module(self.prepare(x))

    def eval_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.eval_module(self.prepare(x))
