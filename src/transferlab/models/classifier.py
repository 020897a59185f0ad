"""A classifier is a backbone plus a head, with an explicit ``features(x)`` / ``head(f)`` API.

That split makes "freeze the backbone", "cache the features" and "swap the head" one line each.
The preprocessing a backbone expects (mean, std, input size, interpolation) travels with it.

Usage:
    model = Classifier(backbone, make_head("mlp", 512, 100, hidden=256), feature_dim=512,
                       preprocess=pp, name="resnet18")
    f = model.features(x)          # (N, 512)
    logits = model.head(f)         # (N, 100)
    set_backbone_frozen(model, True)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Preprocess:
    """What the backbone expects of its input, taken from its weights' metadata."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_size: int  # square side in px
    interpolation: str = "bilinear"

    def to_dict(self) -> dict:
        return asdict(self)


def _mlp_head(in_features: int, num_classes: int, hidden: int, dropout: float) -> nn.Module:
    """The seed's head Linear(D, hidden)-ReLU-Linear(hidden, C); hidden=0 gives Linear(D, C).

    ``dropout`` > 0 adds Dropout on the features (and after the hidden layer); the seed used none.
    """
    if hidden == 0:
        return _linear_head(in_features, num_classes, hidden, dropout)
    drop = [nn.Dropout(dropout)] if dropout > 0 else []
    return nn.Sequential(
        *drop,
        nn.Linear(in_features, hidden),
        nn.ReLU(inplace=True),
        *drop,
        nn.Linear(hidden, num_classes),
    )


def _linear_head(in_features: int, num_classes: int, hidden: int, dropout: float) -> nn.Module:
    """Linear(D, C), after Dropout when ``dropout`` > 0 (``hidden`` is not used)."""
    drop = [nn.Dropout(dropout)] if dropout > 0 else []
    return nn.Sequential(*drop, nn.Linear(in_features, num_classes))


@dataclass(frozen=True)
class HeadSpec:
    """One head: its builder (in_features, num_classes, hidden, dropout) -> module."""

    name: str
    help: str  # joins --head's help
    build: Callable[[int, int, int, float], nn.Module]
    linear: bool  # a single Linear layer (what --solver lbfgs fits) whatever --head-hidden says


# Adding a head: its builder above and one spec here; --head's choices and help derive from it.
HEADS: dict[str, HeadSpec] = {
    spec.name: spec
    for spec in (
        HeadSpec("mlp", "a hidden layer of --head-hidden units", _mlp_head, linear=False),
        HeadSpec("linear", "one Linear layer", _linear_head, linear=True),
    )
}


def make_head(
    name: str, in_features: int, num_classes: int, hidden: int = 0, dropout: float = 0.0
) -> nn.Module:
    """The ``name`` head from :data:`HEADS` (an unknown name is a KeyError: config checks it)."""
    return HEADS[name].build(in_features, num_classes, hidden, dropout)


class Classifier(nn.Module):
    """``backbone`` maps images to (N, feature_dim) features; ``head`` maps features to logits."""

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        feature_dim: int,
        preprocess: Preprocess,
        name: str,
    ):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.feature_dim = feature_dim
        self.preprocess = preprocess
        self.arch = name
        self.backbone_frozen = False
        # backbone parts that train in train mode although the backbone is frozen (partial mode
        # with --partial-bn train); a tuple, so not registered twice in the state dict
        self.train_mode_parts: tuple[nn.Module, ...] = ()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features (N, feature_dim) of a normalised float batch."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def train(self, mode: bool = True) -> Classifier:
        # A frozen backbone stays in eval mode even while the head trains: in train mode its
        # BatchNorm layers would normalise with batch statistics and overwrite their running
        # statistics every step. The "frozen" features would then drift away from what the
        # pretrained weights were trained with, and would differ from the cached features.
        super().train(mode)
        if mode and self.backbone_frozen:
            self.backbone.eval()
            for part in self.train_mode_parts:
                part.train()
        return self


def set_backbone_frozen(model: Classifier, frozen: bool) -> None:
    """Freeze or unfreeze the backbone: requires_grad, plus the BatchNorm policy in ``train()``.

    BN policy: frozen backbone -> all its BN (and dropout) layers in eval mode, running stats fixed.
    Unfrozen -> BN trains normally (batch statistics, running stats updated).
    """
    for p in model.backbone.parameters():
        p.requires_grad_(not frozen)
    model.backbone_frozen = frozen
    model.train(model.training)


def count_params(model: nn.Module) -> dict[str, int]:
    """Total and trainable parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable}
