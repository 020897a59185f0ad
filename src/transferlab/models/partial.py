"""Partial fine-tuning: a backbone cut before its last K stages (``--mode partial``).

A timm EfficientNet-style backbone runs ``conv_stem -> bn1 -> blocks[0..n-1] -> conv_head -> bn2
-> global_pool``. With ``--train-stages K`` the last K stages (``blocks[-K:]``), ``conv_head``,
``bn2`` and the head train; the prefix (``conv_stem``, ``bn1``, ``blocks[:-K]``) is frozen. The
prefix runs once per image through the extraction engine and its output, the cut's activations,
is cached (features/pipeline.py); every epoch after that runs only the trained part.

BatchNorm in the trained stages normalises with batch statistics and updates its running ones
while its weight and bias train (``--partial-bn train``, the default); ``--partial-bn frozen``
keeps the pretrained running statistics (eval mode), to measure against. Measured on real
CIFAR-100 at 64 per class (lite0, K=1, AdamW, backbone at lr/10, one seed, RESULTS.md): frozen
statistics 66.01% test, batch statistics 67.53% (the frozen head: 63.46%). Under DDP each rank
normalises with its own batch (no SyncBatchNorm), as torch does by default. The live path
(``--no-feature-cache``) follows the same rule: the backbone of a partial model stays in eval
mode, as a frozen one does (models/classifier.py), but for the trained parts under
``--partial-bn train``.

Usage:
    check_stages(model.backbone, "timm:tf_efficientnet_lite0", k=1)   # UserError when it can't
    set_partial_trainable(model, k=1)
    prefix = StagePrefix(model.backbone, k=1)          # images -> (N, C*H*W) cut activations
    trainer = PartialTrainer(model, k=1, shape=(192, 7, 7))   # cut activations -> logits
"""

from __future__ import annotations

import torch
from torch import nn

from transferlab.errors import UserError
from transferlab.models.classifier import Classifier, set_backbone_frozen

STAGE_PARTS = ("conv_stem", "bn1", "blocks", "conv_head", "bn2", "global_pool")
SUPPORTED = (
    "timm EfficientNet-style models (conv_stem, blocks, conv_head): timm:tf_efficientnet_lite0-4, "
    "timm:efficientnet_b0-b7, timm:tf_efficientnet_*, timm:mobilenetv2_*, timm:mnasnet_*"
)


def has_stages(backbone: nn.Module) -> bool:
    """True for a backbone with the EfficientNet stage structure this module knows."""
    return all(hasattr(backbone, p) for p in STAGE_PARTS) and isinstance(
        backbone.blocks, nn.Sequential
    )


def check_stages(backbone: nn.Module, name: str, k: int, flag: str = "--train-stages") -> None:
    """A one-line UserError unless ``backbone`` has stages and 1 <= k <= their number (``flag``
    is the option that asked: --train-stages or --feature-layers)."""
    if not has_stages(backbone):
        what = "--mode partial" if flag == "--train-stages" else flag
        raise UserError(f"{what}: {name} has no stage structure it knows; it supports {SUPPORTED}")
    n = len(backbone.blocks)
    if not 1 <= k <= n:
        raise UserError(f"{flag} {k}: {name} has {n} stages; use 1 to {n}")


def trained_parts(backbone: nn.Module, k: int) -> nn.ModuleDict:
    """The backbone modules that train: the last ``k`` stages, conv_head and bn2 (shared)."""
    return nn.ModuleDict(
        {
            "blocks": nn.Sequential(*list(backbone.blocks)[-k:]),
            "conv_head": backbone.conv_head,
            "bn2": backbone.bn2,
        }
    )


def set_partial_trainable(model: Classifier, k: int, bn_train: bool = False) -> None:
    """Freeze the backbone (eval-mode BatchNorm, see the module docstring), then let the last
    ``k`` stages, conv_head and bn2 train (``bn_train``: in train mode, batch statistics)."""
    set_backbone_frozen(model, True)
    parts = trained_parts(model.backbone, k)
    for p in parts.parameters():
        p.requires_grad_(True)
    model.train_mode_parts = (parts,) if bn_train else ()
    model.train(model.training)


class StagePrefix(nn.Module):
    """Images -> the cut's activations, flattened to (N, C*H*W) (what the engines extract).

    Always in eval mode: its modules are the model's frozen prefix, shared, and whatever puts a
    module back in "its" mode (``torch.onnx.export`` restores the mode it found) must not set
    them training. A fresh module starts in train mode, and an engine probe's export once left
    the prefix training: its BatchNorm then took random probe batches into its running
    statistics and the engine converted after it normalised with batch statistics.
    """

    def __init__(self, backbone: nn.Module, k: int):
        super().__init__()
        self.conv_stem, self.bn1 = backbone.conv_stem, backbone.bn1
        self.blocks = nn.Sequential(*list(backbone.blocks)[:-k])
        self.train(False)

    def train(self, mode: bool = True) -> StagePrefix:
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.bn1(self.conv_stem(x))).flatten(1)


@torch.no_grad()
def cut_shape(backbone: nn.Module, k: int, size: int) -> tuple[int, int, int]:
    """(C, H, W) of the cut's activations at ``size`` px (one eval forward of a blank image)."""
    prefix = StagePrefix(backbone, k)
    was = backbone.training
    backbone.eval()
    x = torch.zeros(1, 3, size, size, device=next(backbone.parameters()).device)
    out = prefix.blocks(prefix.bn1(prefix.conv_stem(x)))
    backbone.train(was)
    return tuple(out.shape[1:])


class PartialTrainer(nn.Module):
    """Cut activations (N, C*H*W) -> logits through the trained stages and the head.

    ``backbone`` and ``head`` share their modules with ``model`` (so checkpoints of the model
    hold what trained); the parameter names start with ``backbone.`` and ``head.``, so the
    optimiser gives the backbone its ``lr / --backbone-lr-div``.
    """

    def __init__(
        self,
        model: Classifier,
        k: int,
        shape: tuple[int, int, int],
        channels_last: bool = False,
        bn_train: bool = False,
    ):
        super().__init__()
        self.backbone = trained_parts(model.backbone, k)
        self.bn_train = bn_train
        self.head = model.head
        self.pool = model.backbone.global_pool
        self.shape = tuple(shape)
        self.channels_last = channels_last

    def train(self, mode: bool = True) -> PartialTrainer:
        super().train(mode)
        if not self.bn_train:
            self.backbone.eval()  # pretrained BatchNorm statistics (the module docstring says why)
        return self

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        x = f.float().reshape(-1, *self.shape)  # the cache stores bf16
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        b = self.backbone
        x = b["bn2"](b["conv_head"](b["blocks"](x)))
        # the backbone's own dropout (timm's forward_head) is off: its modules stay in eval mode
        return self.head(self.pool(x))
