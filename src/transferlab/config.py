"""Typed configuration: one dataclass per concern, validated in ``__post_init__``.

Precedence: dataclass defaults (the seed study's recipe) < YAML preset (``--preset``) < CLI flags.
The resolved config is saved as ``config.yaml`` in every run directory and inside every
checkpoint, so any run can be rebuilt from its own files.

Each field is declared once, with ``opt(default, help)``: a command's ``OptionSet`` derives both
the CLI's flags and the API's keywords from the fields, so a new field is all it takes to add a
``train`` option.

Usage:
    cfg = Config(model=ModelConfig(name="cnn"), optim=OptimConfig(epochs=10))
    cfg = config_from_layers("cnn-best", TRAIN.overrides({"epochs": 2, "no_report": True}))
    cfg2 = config_from_dict(load_yaml(run_dir / "config.yaml"))
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from transferlab.errors import UserError
from transferlab.features.engines import (
    ENGINES,
    FEATURE_PRECISIONS,
    INT8_ENGINES,
    int8_engine_message,
)
from transferlab.models.classifier import HEADS

MODES = ("frozen", "partial", "finetune", "gradual", "scratch")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("none", "cosine", "onecycle")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SOLVERS = ("sgd", "lbfgs")
BAD_IMAGE_POLICIES = ("skip", "error")
PARTIAL_BN = ("frozen", "train")  # --partial-bn: BatchNorm of partial mode's trained stages
SELECT_BY = ("val_acc", "val_balanced_acc")
BALANCE = ("none", "weights", "sampler")
CLASS_WEIGHTS = ("effective", "inverse")
# PIL's own decompression-bomb limit (Image.MAX_IMAGE_PIXELS): 1024 * 1024 * 1024 // 4 // 3
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485


def opt(
    default: Any,
    help: str,
    flag: str = "",
    aliases: tuple[str, ...] = (),
    choices: tuple[str, ...] = (),
    given_min: int | None = None,
) -> Any:
    """A config field with its command-line face: the one source of its default and help.

    Its CLI flag is ``--<field-name>`` (``--no-<field-name>`` for a True bool, which sets it
    False) and its API keyword the flag in snake_case (see :func:`keywords`). ``flag``: another
    flag name; ``aliases``: more flags for the same field; ``choices``: listed in ``--help``;
    ``given_min``: the least value a flag or keyword may ask for, where the default is an "off"
    value below it (``--folds``: 0 is off, and ``--folds 0`` is refused, as ``--folds 1`` is).
    """
    meta = {
        "help": help,
        "flag": flag,
        "aliases": aliases,
        "choices": choices,
        "given_min": given_min,
    }
    return field(default=default, metadata=meta)


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise UserError(message)


def _choice(value: str, choices: tuple[str, ...], flag: str) -> None:
    _check(value in choices, f"{flag} must be one of {', '.join(choices)}; got {value!r}")


def lt_imbalance_ratio(dataset: str) -> float:
    """IR of ``cifar100-lt:IR`` (largest / smallest class, >= 1); a bad one is a UserError."""
    text = dataset.split(":", 1)[1]
    try:
        ir = float(text)
    except ValueError:
        ir = math.nan
    _check(
        math.isfinite(ir) and ir >= 1,
        f"--data cifar100-lt:IR needs an imbalance ratio IR >= 1 (e.g. cifar100-lt:100); "
        f"got {text!r}",
    )
    return ir


@dataclass
class DataConfig:
    """Where the images come from and how they are split and augmented."""

    dataset: str = opt(
        "cifar100",
        "cifar100, or folder:PATH (PATH/{train,val,test}/<class>/ or PATH/<class>/)",
        flag="--data",
    )
    data_dir: str = opt("data", "parent folder of cifar-100-python/")
    download: bool = opt(False, "download CIFAR-100 with torchvision if the files are missing")
    split_seed: int = opt(0, "seed of the 45,000/5,000 train/val split")
    val_size: int = opt(5000, "CIFAR validation images held out of the 50,000")
    val_frac: float = opt(0.1, "folder data without val/: stratified validation fraction")
    test_frac: float = opt(0.1, "folder data without test/: stratified test fraction")
    train_subset: int = opt(0, "train on a seeded random subset of N images (0 = all)")
    per_class: int = opt(0, "train on a stratified, nested subset of N images per class (0 = all)")
    subset_seed: int = opt(0, "seed of the --per-class draw (a study's replicate)")
    extract_per_class: int = opt(
        -1,
        "cached features: extract only the training images of the --per-class K subsets of "
        "seeds 0..--extract-seeds minus 1, the rows a study without 'all' uses (0 = every "
        "image; -1 = auto: a --per-class run extracts the rows of its own subset, seeds "
        "0..--subset-seed, and a run on every image extracts every image)",
    )
    extract_seeds: int = opt(1, "seeds whose --extract-per-class subsets are extracted")
    test_subset: int = opt(0, "evaluate on the first N test images, for quick runs (0 = all)")
    max_image_pixels: int = opt(
        DEFAULT_MAX_IMAGE_PIXELS,
        "folder data and predict: skip images with more pixels (PIL's limit)",
    )
    image_size: int = opt(
        0, "input side in px (0 = the model's own: 32 for cnn, the weights' size otherwise)"
    )
    crop_padding: int = opt(0, "random crop with this padding in px (0 = off; the seed used none)")
    flip: bool = opt(False, "random horizontal flips")
    cutout: int = opt(0, "cutout square side in px at the training resolution (0 = off)")
    on_bad_image: str = opt(
        "skip", "folder data: skip (warn and count) or error", choices=BAD_IMAGE_POLICIES
    )
    num_workers: int = opt(2, "DataLoader workers for folder data (CIFAR needs none)")
    folds: int = opt(
        0,
        "K >= 2: K stratified folds of train+val (test untouched), each a run in RUN_DIR/fold-i; "
        "the best fold is the final model (leave it out for one run)",
        given_min=2,
    )
    check_data: bool = opt(
        True,
        "folder data: before training, count test images that are exact copies of train images",
    )

    def __post_init__(self) -> None:
        _check(
            self.dataset in ("cifar100",) or self.dataset.startswith(("folder:", "cifar100-lt:")),
            f"--data must be 'cifar100', 'cifar100-lt:IR' or 'folder:PATH'; got {self.dataset!r}",
        )
        if self.dataset.startswith("cifar100-lt:"):
            lt_imbalance_ratio(self.dataset)  # a bad IR fails here, before anything is read
        _check(
            not (self.dataset.startswith("cifar100-lt:") and self.train_subset),
            "--train-subset does not combine with --data cifar100-lt:IR (already a subset)",
        )
        _check(
            self.folds == 0 or self.folds >= 2,
            f"--folds must be at least 2 (0 = off); got {self.folds}",
        )
        _check(self.val_size > 0, f"--val-size must be positive; got {self.val_size}")
        _check(0 < self.val_frac < 1, f"--val-frac must be in (0, 1); got {self.val_frac}")
        _check(0 < self.test_frac < 1, f"--test-frac must be in (0, 1); got {self.test_frac}")
        _check(self.val_frac + self.test_frac < 1, "--val-frac + --test-frac must be below 1")
        _check(self.train_subset >= 0, f"--train-subset must be >= 0; got {self.train_subset}")
        _check(self.per_class >= 0, f"--per-class must be >= 0; got {self.per_class}")
        _check(self.test_subset >= 0, f"--test-subset must be >= 0; got {self.test_subset}")
        _check(
            self.extract_per_class >= -1 and self.extract_seeds >= 1,
            "--extract-per-class must be >= -1 and --extract-seeds >= 1; got "
            f"{self.extract_per_class}, {self.extract_seeds}",
        )
        _check(
            self.extract_per_class <= 0
            or (
                0 < self.per_class <= self.extract_per_class
                and self.subset_seed < self.extract_seeds
            ),
            f"--per-class {self.per_class} with --subset-seed {self.subset_seed} is not among the "
            f"extracted rows (--extract-per-class {self.extract_per_class}, --extract-seeds "
            f"{self.extract_seeds})",
        )
        _check(
            self.max_image_pixels > 0,
            f"--max-image-pixels must be positive; got {self.max_image_pixels}",
        )
        _check(
            self.image_size == 0 or self.image_size >= 16,
            f"--image-size must be at least 16 px; got {self.image_size}",
        )
        _check(self.crop_padding >= 0, f"--crop-padding must be >= 0; got {self.crop_padding}")
        _check(self.cutout >= 0, f"--cutout must be >= 0; got {self.cutout}")
        _choice(self.on_bad_image, BAD_IMAGE_POLICIES, "--on-bad-image")
        _check(self.num_workers >= 0, f"--num-workers must be >= 0; got {self.num_workers}")


@dataclass
class ModelConfig:
    """Which network, which weights, and what trains."""

    name: str = opt(
        "cnn",
        "cnn, a torchvision classifier (resnet18, ...), or timm:<name> (see `transferlab models`)",
        flag="--model",
    )
    weights: str = opt("imagenet", "imagenet, none, or PATH to a local state dict (not for cnn)")
    mode: str = opt(
        "",
        "frozen | partial | finetune | gradual | scratch ('' = scratch for cnn, frozen otherwise)",
    )
    head_hidden: int = opt(256, "hidden units of the head (256 = the seed's; 0 = linear)")
    head: str = opt(
        "mlp", " or ".join(f"{h.name} ({h.help})" for h in HEADS.values()), choices=tuple(HEADS)
    )
    head_dropout: float = opt(0.0, "dropout in the head (the seed used none)")
    drop_path: float = opt(
        0.0, "stochastic depth rate of a backbone that trains (timm drop_path_rate)"
    )
    solver: str = opt(
        "sgd",
        "sgd (the --optimizer) or lbfgs (full-batch linear probe on cached features)",
        choices=SOLVERS,
    )
    train_stages: int = opt(
        1,
        "partial: the last K backbone stages train (with conv_head, bn2 and the head) on the "
        "cached output of the frozen stages before them",
    )
    partial_bn: str = opt(
        "train",
        "partial: BatchNorm of the trained stages normalises with batch statistics and updates "
        "them (train: 1.5 points better at 64/class, RESULTS.md) or keeps its pretrained "
        "statistics (frozen)",
        choices=PARTIAL_BN,
    )
    feature_layers: int = opt(
        0,
        "frozen: also the pooled outputs of the last N stages beside the final features, under "
        "one head (Head2Toe; timm EfficientNet-style backbones; lite0 at 64/class with 3: +0.2 "
        "to +0.7 points, RESULTS.md)",
    )
    freeze_epochs: int = opt(1, "gradual: epochs with the backbone frozen before unfreezing")
    backbone_lr_div: float = opt(10.0, "finetune/gradual: backbone lr = lr / this")
    sync_bn: bool = opt(False, "SyncBatchNorm under DDP (CUDA only)")

    def __post_init__(self) -> None:
        _check(bool(self.name), "--model must not be empty")
        if self.mode == "":
            self.mode = "scratch" if self.name == "cnn" else "frozen"
        _choice(self.mode, MODES, "--mode")
        _choice(self.head, tuple(HEADS), "--head")
        _choice(self.solver, SOLVERS, "--solver")
        _check(
            0 <= self.head_dropout < 1, f"--head-dropout must be in [0, 1); got {self.head_dropout}"
        )
        _check(self.head_hidden >= 0, f"--head-hidden must be >= 0; got {self.head_hidden}")
        _check(0 <= self.drop_path < 1, f"--drop-path must be in [0, 1); got {self.drop_path}")
        _check(
            not (self.drop_path and self.name == "cnn"),
            "--drop-path needs residual blocks; the cnn has none",
        )
        _check(
            not (self.drop_path and self.mode == "frozen"),
            "--drop-path regularises a backbone that trains; use it with --mode finetune, "
            "gradual or scratch",
        )
        _choice(self.partial_bn, PARTIAL_BN, "--partial-bn")
        _check(
            self.mode == "partial" or (self.train_stages == 1 and self.partial_bn == "train"),
            "--train-stages and --partial-bn apply to --mode partial",
        )
        _check(self.train_stages >= 1, f"--train-stages must be >= 1; got {self.train_stages}")
        _check(
            not (self.name == "cnn" and self.mode == "partial"),
            "--mode partial needs a backbone with stages it knows (timm EfficientNet-style: "
            "timm:tf_efficientnet_lite0, ...); the cnn trains from scratch",
        )
        _check(
            self.feature_layers >= 0, f"--feature-layers must be >= 0; got {self.feature_layers}"
        )
        _check(
            not self.feature_layers or self.mode == "frozen",
            "--feature-layers applies to --mode frozen (the head reads the frozen stages' outputs)",
        )
        _check(self.freeze_epochs >= 0, f"--freeze-epochs must be >= 0; got {self.freeze_epochs}")
        _check(
            self.backbone_lr_div > 0,
            f"--backbone-lr-div must be positive; got {self.backbone_lr_div}",
        )
        _check(
            not (self.name == "cnn" and self.weights not in ("imagenet", "none")),
            "the cnn trains from scratch; --weights applies to pretrained backbones",
        )
        _check(
            not (self.name == "cnn" and self.mode in ("frozen", "gradual")),
            f"--mode {self.mode} needs a pretrained backbone; the cnn trains from scratch",
        )
        _check(
            not (self.solver == "lbfgs" and self.mode != "frozen"),
            "--solver lbfgs fits a probe on frozen features; use it with --mode frozen",
        )
        _check(
            not (self.solver == "lbfgs" and not HEADS[self.head].linear and self.head_hidden != 0),
            "--solver lbfgs fits a linear probe; add --head linear",
        )


@dataclass
class OptimConfig:
    """Optimiser, schedule, batch and stopping rules. Defaults follow the seed study."""

    optimizer: str = opt(
        "adam", "adam (the seed's) | adamw | sgd (Nesterov momentum)", choices=OPTIMIZERS
    )
    lr: float = opt(
        1e-3, "learning rate of the head, or of the whole model from scratch (seed: Adam 1e-3)"
    )
    weight_decay: float = opt(0.0, "weight decay, never on norms and biases")
    momentum: float = opt(0.9, "SGD momentum")
    schedule: str = opt("none", "none (the seed's) | cosine | onecycle", choices=SCHEDULES)
    warmup_epochs: float = opt(0.0, "linear warm-up length in epochs")
    label_smoothing: float = opt(0.0, "label smoothing of the training loss")
    batch_size: int = opt(200, "global batch size, split across processes (the seed's 200)")
    eval_batch_size: int = opt(500, "evaluation batch size")
    epochs: int = opt(10, "epoch budget (the seed's 10)", aliases=("--max-epochs",))
    patience: int = opt(0, "early stop after N epochs without val-acc gain (0 = off)")
    target_val_acc: float = opt(0.0, "stop once val accuracy reaches this (0 = off)")
    grad_clip: float = opt(0.0, "clip the gradient norm (0 = off)")
    select_by: str = opt(
        "val_acc",
        "the val metric that picks best.pt and drives --patience (balanced = mean class recall)",
        choices=SELECT_BY,
    )
    balance: str = opt(
        "none",
        "imbalanced classes: none, weights (class-weighted cross-entropy) or sampler "
        "(class-balanced sampling)",
        choices=BALANCE,
    )
    class_weights: str = opt(
        "effective",
        "--balance weights: effective (Cui et al. 2019, beta 0.999) or inverse (1 / frequency)",
        choices=CLASS_WEIGHTS,
    )
    tune: int = opt(
        0,
        "search the head for N Optuna trials on cached features, scored on val; the best "
        "trial's config is the run's (0 = no search)",
    )
    tune_storage: str = opt(
        "", "Optuna storage URL that several searches share ('' = RUN/tune.db, SQLite)"
    )
    tune_study: str = opt(
        "", "Optuna study name ('' = derived from the config: one command, one study)"
    )

    def __post_init__(self) -> None:
        _choice(self.optimizer, OPTIMIZERS, "--optimizer")
        _choice(self.select_by, SELECT_BY, "--select-by")
        _choice(self.balance, BALANCE, "--balance")
        _choice(self.class_weights, CLASS_WEIGHTS, "--class-weights")
        _choice(self.schedule, SCHEDULES, "--schedule")
        _check(self.lr > 0, f"--lr must be positive; got {self.lr}")
        _check(self.weight_decay >= 0, f"--weight-decay must be >= 0; got {self.weight_decay}")
        _check(0 <= self.momentum < 1, f"--momentum must be in [0, 1); got {self.momentum}")
        _check(self.warmup_epochs >= 0, f"--warmup-epochs must be >= 0; got {self.warmup_epochs}")
        _check(
            0 <= self.label_smoothing < 1,
            f"--label-smoothing must be in [0, 1); got {self.label_smoothing}",
        )
        _check(self.batch_size > 0, f"--batch-size must be positive; got {self.batch_size}")
        _check(
            self.eval_batch_size > 0,
            f"--eval-batch-size must be positive; got {self.eval_batch_size}",
        )
        _check(self.epochs > 0, f"--epochs must be positive; got {self.epochs}")
        _check(
            self.patience >= 0, f"--patience must be >= 1 (or 0 to disable); got {self.patience}"
        )
        _check(
            0 <= self.target_val_acc <= 1,
            f"--target-val-acc must be in [0, 1]; got {self.target_val_acc}",
        )
        _check(self.grad_clip >= 0, f"--grad-clip must be >= 0; got {self.grad_clip}")
        _check(self.tune >= 0, f"--tune must be a number of trials >= 1; got {self.tune}")
        _check(
            self.tune > 0 or not (self.tune_storage or self.tune_study),
            "--tune-storage and --tune-study belong to a search; add --tune N",
        )


@dataclass
class RunConfig:
    """Where and how the run executes: device, precision, caching, checkpoints, logging."""

    run_dir: str = opt("", "run directory ('' = runs/<model>-<timestamp>)")
    device: str = opt("auto", "auto | cpu | cuda | cuda:N")
    seed: int = opt(0, "seed of init, shuffling and augmentation")
    precision: str = opt(
        "auto",
        "auto (bf16 on AMX/AVX512-BF16 CPUs and CUDA, fp16 on old GPUs) | fp32 | bf16 | fp16",
        choices=PRECISIONS,
    )
    channels_last: bool = opt(True, "channels_last memory layout")
    compile: bool = opt(False, "torch.compile the model")
    feature_cache: bool = opt(True, "frozen mode: extract features once and cache them")
    cache_dir: str = opt(
        "", "feature cache dir ('' = $TRANSFERLAB_CACHE_DIR or ~/.cache/transferlab/features)"
    )
    require_feature_cache: bool = opt(
        False,
        "frozen mode: fail if a split's features are not in the cache instead of extracting "
        "them (a study's frozen cells: their arm's extraction task filled the cache first)",
    )
    feature_views: int = opt(1, "cache K augmented views per training image")
    ckpt_every_steps: int = opt(0, "also checkpoint every N optimiser steps (0 = per epoch only)")
    nan_patience: int = opt(0, "non-finite losses skipped before the run stops")
    overwrite: bool = opt(
        False,
        "replace a non-empty run dir (the old run is kept until the new one has a checkpoint)",
    )
    tensorboard: bool = opt(False, "write TensorBoard scalars to RUN_DIR/tb")
    track: str = opt(
        "", "log the run to MLflow: mlflow or mlflow:URI (URI default ./mlruns, offline)"
    )
    engine: str = opt(
        "auto",
        f"frozen-feature extraction engine: {' | '.join(ENGINES)}",
        choices=ENGINES,
    )
    feature_precision: str = opt(
        "auto",
        "frozen-feature extraction precision: auto (what --precision allows, the faster on this "
        "CPU; never int8), fp32, bf16, or int8 (OpenVINO quantised by NNCF on <= 300 training "
        "images drawn with --split-seed; the int8 extra)",
        choices=FEATURE_PRECISIONS,
    )
    threads: int = opt(
        0,
        "CPU threads of torch (0 = the cores other processes leave free, measured at the start "
        "of each phase)",
    )
    report: bool = opt(True, "write report.md and report.html at the end of the run")
    progress: bool = opt(True, "progress bars (img/s and ETA)")

    def __post_init__(self) -> None:
        _choice(self.precision, PRECISIONS, "--precision")
        _choice(self.engine, ENGINES, "--engine")
        _choice(self.feature_precision, FEATURE_PRECISIONS, "--feature-precision")
        _check(
            not (self.feature_precision == "int8" and self.engine not in ("auto", *INT8_ENGINES)),
            int8_engine_message(self.engine),
        )
        _check(self.threads >= 0, f"--threads must be >= 0 (0 = auto); got {self.threads}")
        _check(
            self.track == "" or self.track == "mlflow" or self.track.startswith("mlflow:"),
            f"--track must be mlflow or mlflow:URI; got {self.track!r}",
        )
        _check(self.feature_views >= 1, f"--feature-views must be >= 1; got {self.feature_views}")
        _check(
            self.ckpt_every_steps >= 0,
            f"--ckpt-every-steps must be >= 0; got {self.ckpt_every_steps}",
        )
        _check(self.nan_patience >= 0, f"--nan-patience must be >= 0; got {self.nan_patience}")
        _check(
            self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
            f"--device must be auto, cpu, cuda or cuda:N; got {self.device!r}",
        )


@dataclass
class Config:
    """A whole experiment."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        if self.run.feature_views > 1:
            _check(
                self.model.mode in ("frozen", "partial") and self.run.feature_cache,
                "--feature-views needs --mode frozen or partial with the feature cache on",
            )
        _check(
            not (self.model.solver == "lbfgs" and not self.run.feature_cache),
            "--solver lbfgs runs on cached features; drop --no-feature-cache",
        )
        _check(
            not (self.model.mode == "partial" and self.run.feature_precision == "int8"),
            "--feature-precision int8 quantises a whole frozen backbone; --mode partial trains "
            "its last stages: use --feature-precision fp32 or bf16",
        )
        if self.optim.tune:
            _check(
                self.model.mode in ("frozen", "partial")
                and self.run.feature_cache
                and self.model.solver == "sgd",
                "--tune searches heads on cached features; use it with --mode frozen or "
                "partial, the feature cache on and --solver sgd",
            )
        if self.data.folds:
            _check(
                not (self.data.per_class or self.data.dataset.startswith("cifar100-lt:")),
                "--folds pools train and val as they are; drop --per-class / cifar100-lt",
            )
            _check(self.run.feature_views == 1, "--folds works with one feature view")
        if self.model.mode == "gradual":
            _check(
                self.model.freeze_epochs < self.optim.epochs,
                f"--freeze-epochs ({self.model.freeze_epochs}) must be below "
                f"--epochs ({self.optim.epochs})",
            )


SECTIONS = {"data": DataConfig, "model": ModelConfig, "optim": OptimConfig, "run": RunConfig}
PRESET_DIR = Path(__file__).parent / "presets"


@dataclass
class CompareConfig:
    """``transferlab compare``: the seed study's experiments around one base config."""

    backbone: str = opt("resnet18", "pretrained backbone of experiment 2")
    chase_max_epochs: int = opt(50, "epoch cap of experiment 3 (the CNN chasing experiment 2)")
    chase_patience: int = opt(5, "patience of experiment 3 (the seed's 5)")
    with_cnn_best: bool = opt(False, "also train the CNN with the cnn-best preset")
    independent_chase: bool = opt(
        False,
        "run experiment 3 from scratch with --chase-seed instead "
        "of continuing experiment 1's checkpoint",
    )
    chase_seed: int = opt(1, "seed of an independent experiment 3 (--independent-chase)")
    run_dir: str = opt("", "folder for the runs and report.md ('' = runs/compare-<timestamp>)")

    def __post_init__(self) -> None:
        _check(
            self.chase_max_epochs >= 1 and self.chase_patience >= 1,
            "--chase-max-epochs and --chase-patience must be >= 1",
        )


# ---------------------------------------------------------------- options: the CLI and the API
# Each field's flag, keyword, type, default and help come from the field (``opt``) alone: the
# CLI's parser (``OptionSet.add_arguments``) and the API's keywords (``OptionSet.overrides``)
# both walk ``OptionSet.keywords``, so a new field is a new flag and a new keyword, and nothing
# else needs adding.


class Keyword(NamedTuple):
    """What an option's keyword (its flag in snake_case) sets: ``section.field``, negated for a
    ``--no-x`` flag."""

    section: str
    field: dataclasses.Field
    negated: bool


def flags_of(f: dataclasses.Field) -> list[str]:
    """A field's CLI flags: its own (``--<name>``, ``--no-<name>`` for a True bool) and aliases."""
    own = f.metadata["flag"] or ("--no-" if _negated(f) else "--") + f.name.replace("_", "-")
    return [own, *f.metadata["aliases"]]


def kind_of(f: dataclasses.Field) -> type:
    """A config field's type: int, float, str or bool (annotations may be strings)."""
    kinds = {"int": int, "float": float, "str": str, "bool": bool}
    return kinds[f.type if isinstance(f.type, str) else f.type.__name__]


def _negated(f: dataclasses.Field) -> bool:
    return kind_of(f) is bool and f.default is True


def keyword_of(flag: str) -> str:
    """The API keyword of a flag: ``--no-channels-last`` -> ``no_channels_last``."""
    return flag[2:].replace("-", "_")


def flag_of(keyword: str) -> str:
    """The CLI flag of an API keyword: ``image_size`` -> ``--image-size``."""
    return "--" + keyword.replace("_", "-")


@dataclass(frozen=True)
class OptionSet:
    """The config options of one command: the train config's fields less ``skip`` (keywords the
    command sets itself) or, with ``only``, just those; plus the fields of its ``own``
    dataclasses ((section, class) pairs)."""

    skip: tuple[str, ...] = ()
    own: tuple[tuple[str, type], ...] = ()
    only: tuple[str, ...] = ()

    def _sections(self) -> list[tuple[str, type, Callable[[str], bool]]]:
        def train(k: str) -> bool:
            return k in self.skip or bool(self.only) and k not in self.only

        sections = [(name, cls, train) for name, cls in SECTIONS.items()]
        return sections + [(name, cls, lambda k: False) for name, cls in self.own]

    def keywords(self) -> dict[str, Keyword]:
        """Every flag of the fields in snake_case. A ``--no-x`` field also takes its own name
        (``progress=False`` as ``no_progress=True``)."""
        out: dict[str, Keyword] = {}
        for section, cls, skipped in self._sections():
            for f in dataclasses.fields(cls):
                names = [(keyword_of(flag), _negated(f)) for flag in flags_of(f)]
                names += [(f.name, False)] if _negated(f) else []
                for name, negated in names:
                    if skipped(name):
                        continue
                    if name in out:  # a programming error, caught by the tests
                        raise TypeError(f"{flag_of(name)} is claimed by two config fields")
                    out[name] = Keyword(section, f, negated)
        return out

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """One flag per field (with its aliases), left out of the namespace unless given; its
        dest is its keyword. ``--help`` shows the field's help, choices and default."""
        for _, cls, skipped in self._sections():
            for f in dataclasses.fields(cls):
                flags = [flag for flag in flags_of(f) if not skipped(keyword_of(flag))]
                if not flags:
                    continue
                help_ = f.metadata["help"]  # what the field means (True: on)
                if _negated(f):
                    help_ = f"turn off: {help_} (on by default)"
                if f.metadata["choices"]:
                    help_ += f" [{' | '.join(f.metadata['choices'])}]"
                common = {"dest": keyword_of(flags[0]), "default": argparse.SUPPRESS}
                if kind_of(f) is bool:
                    parser.add_argument(*flags, action="store_true", help=help_, **common)
                else:
                    help_ += f" (default: {f.default!r})" if f.default != "" else ""
                    parser.add_argument(*flags, type=kind_of(f), help=help_, **common)

    def overrides(self, values: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """{section: {field: value}} of the options given (keyword -> value; None = not given),
        each coerced to its field's type: the CLI's parsed flags and the API's keywords alike.
        An unknown keyword is a UserError that lists the valid ones."""
        table = self.keywords()
        values = {k: v for k, v in values.items() if v is not None}
        bad = sorted(k for k in values if k not in table)
        if bad:
            raise UserError(
                f"unknown option(s) {', '.join(bad)}; valid: {', '.join(sorted(table))}"
            )
        out: dict[str, dict[str, Any]] = {}
        for name, value in values.items():
            section, f, negated = table[name]
            where = f"{name}=" if name == f.name and _negated(f) else f"{flag_of(name)} ({name}=)"
            value = coerce(value, f, where)
            least = f.metadata.get("given_min")
            if least is not None and value < least:
                raise UserError(
                    f"{flag_of(name)} must be at least {least}; got {value} "
                    f"(leave {flag_of(name)} out to turn it off)"
                )
            out.setdefault(section, {})[f.name] = not value if negated else value
        return out

    def from_namespace(self, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
        """:meth:`overrides` of the flags given on a command line parsed with
        :meth:`add_arguments` (the flags not given are not in ``args``)."""
        given = self.keywords()
        return self.overrides({k: v for k, v in vars(args).items() if k in given})


TRAIN = OptionSet()
# compare sets the model, its stopping rules and each experiment's run dir itself
COMPARE = OptionSet(
    skip=("model", "mode", "patience", "target_val_acc", "max_epochs", "run_dir"),
    own=(("compare", CompareConfig),),
)
# what a resume may change (where it runs, the bars, a larger epoch budget); the rest is the
# run's saved config
RESUMABLE = ("run.device", "run.progress", "optim.epochs")


def resume_config(run_dir: str | os.PathLike, given: dict[str, Any]) -> tuple[Config, int | None]:
    """The config a resume starts from (the run dir, and the fields a resume may change: the rest
    is read from its checkpoint) and the new epoch budget (None: unchanged). ``given``: keyword ->
    value (None = not given), as for :meth:`OptionSet.overrides`; a preset counts as given."""
    table = TRAIN.keywords()
    refused = sorted(
        flag_of(k)
        for k, v in given.items()
        if v is not None
        and (k not in table or f"{table[k].section}.{table[k].field.name}" not in RESUMABLE)
    )
    if refused:
        raise UserError(
            f"--resume continues with the run's saved config; drop {', '.join(refused)} "
            "(only --device, --no-progress and --epochs may change)"
        )
    over = TRAIN.overrides(given)
    cfg = Config()
    cfg.run.run_dir = os.fspath(run_dir)
    for section, values in over.items():
        for name, value in values.items():
            setattr(getattr(cfg, section), name, value)
    return cfg, over.get("optim", {}).get("epochs")


def resolve_preset(name: str) -> Path:
    """A preset name from the package's presets/ folder, or a YAML path."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    builtin = PRESET_DIR / f"{name}.yaml"
    if builtin.is_file():
        return builtin
    names = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
    raise UserError(
        f"unknown preset {name!r}; choices: {', '.join(names)} or a path to a .yaml file"
    )


def config_from_layers(base: Any, overrides: dict[str, dict[str, Any]]) -> Config:
    """Defaults < ``base`` < overrides ({section: {field: value}}), validated into a Config.

    ``base``: None, a preset name or YAML path (a run's config.yaml reruns it), a dict of
    sections, or a Config.
    """
    if base is None:
        base = {}
    elif isinstance(base, Config):
        base = config_to_dict(base)
    elif isinstance(base, (str, os.PathLike)):
        base = load_yaml(resolve_preset(os.fspath(base)))
    elif not isinstance(base, dict):
        raise UserError(
            f"a config must be a Config, a dict, a preset or a YAML path; got {type(base).__name__}"
        )
    return config_from_dict(merge_dicts(base, overrides))


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict of the config (YAML/JSON/checkpoint safe)."""
    return dataclasses.asdict(cfg)


def config_from_dict(d: dict[str, Any]) -> Config:
    """Build a Config from a nested dict; unknown sections or keys are an error, not ignored."""
    if not isinstance(d, dict):
        raise UserError(
            f"config must be a mapping of sections {sorted(SECTIONS)}; got {type(d).__name__}"
        )
    # ``resolved:`` is what a run decided (config.yaml's plan): output, re-resolved on a rerun
    unknown = set(d) - set(SECTIONS) - {"resolved"}
    if unknown:
        raise UserError(
            f"unknown config section(s) {sorted(map(str, unknown))}; valid: {sorted(SECTIONS)}"
        )
    parts = {}
    for name, cls in SECTIONS.items():
        section = d.get(name) or {}
        if not isinstance(section, dict):
            raise UserError(f"config section {name!r} must be a mapping")
        valid = {f.name: f for f in dataclasses.fields(cls)}
        bad = set(section) - set(valid)
        if bad:
            raise UserError(
                f"unknown key(s) {sorted(map(str, bad))} in config section {name!r}; "
                f"valid: {sorted(valid)}"
            )
        if name == "model" and section.get("mode") != "partial" and "partial_bn" in section:
            # runs written before --partial-bn's default became "train" hold "frozen"
            section = {k: v for k, v in section.items() if k != "partial_bn"}
        parts[name] = cls(
            **{k: coerce(v, valid[k], f"config key {name}.{k}") for k, v in section.items()}
        )
    return Config(**parts)


def coerce(value: Any, f: dataclasses.Field, where: str) -> Any:
    """``value`` as field ``f``'s type, or a UserError "``where`` must be ...". The one coercion
    of a config value, from YAML, a flag or an API keyword: numbers may come as strings (YAML
    reads 1e-3 as one), a bool as true/false, a path as a str; a float must be finite."""
    kind = kind_of(f)
    want = {int: "an int", float: "a number", str: "a string", bool: "True or False"}[kind]
    out = None
    if isinstance(value, bool) or kind is bool:  # `epochs: true` is a mistake, not 1
        if kind is bool and isinstance(value, bool):
            out = value
        elif kind is bool and isinstance(value, str) and value.lower() in ("true", "false"):
            out = value.lower() == "true"
    elif kind is str:
        out = os.fspath(value) if isinstance(value, (str, os.PathLike)) else None
    elif isinstance(value, (int, float, str)):
        try:
            number = float(value) if kind is float or isinstance(value, float) else int(value)
        except (ValueError, OverflowError):  # OverflowError: float(10**400)
            number = None
        if kind is int and isinstance(number, float):  # 2.0 is 2; 2.5 is no int
            number = int(number) if number.is_integer() else None
        out = number
    if out is None:
        raise UserError(f"{where} must be {want}; got {value!r}")
    if kind is float and not math.isfinite(out):
        raise UserError(f"{where} must be a finite number; got {value!r}")
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with a clear error for a missing or malformed file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise UserError(f"cannot read config {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path} is not a YAML text file (not UTF-8)") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a mapping of sections {sorted(SECTIONS)}")
    for name, section in data.items():
        if section is not None and not isinstance(section, dict):
            raise UserError(
                f"{path}: section {name!r} must be a mapping of options (key: value); "
                f"got {type(section).__name__}"
            )
    return data


def merge_dicts(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Two-level merge: override's sections update base's sections key by key."""
    out = {k: dict(v) for k, v in base.items()}
    for section, values in override.items():
        out.setdefault(section, {})
        if isinstance(values, dict):
            out[section].update(values)
        else:
            out[section] = values
    return out
