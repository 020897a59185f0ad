"""The resolved plan of a run: every value that ``auto`` or ``0`` stood for, decided once.

Right after the model is built, :func:`resolve_plan` fixes the image size, the preprocessing
(the weights' own eval transform: resize, centre crop by ``crop_pct``, mean, std,
interpolation), the precision of each stage (training, head steps on cached features,
extraction), the extraction engine and batch, the memory layout, the per-rank batch sizes and
the path the run takes (cached features or pixels). The plan is written into ``config.yaml``
(its ``resolved:`` section) and into every checkpoint; predict, export, report and resume read
it from there and never work it out again.

Usage:
    plan = resolve_plan(cfg, model, env, pixels_in_memory=True, cache_root=root)
    plan.image_size, plan.train_precision, plan.path     # 224, "bf16", "features"
    plan = Plan.from_dict(checkpoint["plan"])
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from transferlab.config import Config, config_to_dict
from transferlab.distributed import DistEnv
from transferlab.errors import UserError
from transferlab.io import write_atomic
from transferlab.models.classifier import Classifier
from transferlab.models.registry import weights_crop_pct
from transferlab.precision import resolve_precision

log = logging.getLogger(__name__)

PATHS = ("features", "pixels")


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes a model input: the weights' eval transform, or a batched resize.

    Decoded images (folders, predict, export): shorter side resized to ``resize`` px with
    ``interpolation``, centre crop ``crop`` px, then ``(x / 255 - mean) / std``. In-memory
    tensors (CIFAR at 32 px, ``on_device_resize``): the whole 32 px image is resized to ``crop``
    in batches on the device, with no crop, as the seed study did.
    """

    crop: int  # model input side in px
    resize: int  # shorter side before the centre crop: floor(crop / crop_pct)
    crop_pct: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    on_device_resize: bool  # in-memory uint8 tensors: batched resize on the device, no crop


@dataclass(frozen=True)
class ExtractPlan:
    """How frozen features are extracted: engine, its precision, and the measured batch."""

    engine: str  # torch | openvino | onnxruntime
    precision: str  # fp32 | bf16 | fp16 | int8 (openvino)
    batch_size: int  # per rank, images per engine call
    calibration: str = ""  # int8: the calibration set's id (features/quantize.calibration_id)


@dataclass(frozen=True)
class Plan:
    """Everything resolved about one run (see the module docstring)."""

    image_size: int
    preprocessing: Preprocessing
    train_precision: str  # autocast of training steps on pixels
    head_precision: str  # autocast of head steps on cached features
    extract: ExtractPlan | None  # None on the pixel path
    channels_last: bool
    batch_per_rank: int
    eval_batch_per_rank: int
    world_size: int
    path: str  # features | pixels

    @property
    def step_precision(self) -> str:
        """The precision of this run's training and evaluation steps."""
        return self.head_precision if self.path == "features" else self.train_precision

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        """Rebuild a saved plan; a missing or foreign one is a UserError."""
        try:
            pre = Preprocessing(
                **{
                    **d["preprocessing"],
                    "mean": tuple(d["preprocessing"]["mean"]),
                    "std": tuple(d["preprocessing"]["std"]),
                }
            )
            ext = ExtractPlan(**d["extract"]) if d.get("extract") else None
            return cls(**{**d, "preprocessing": pre, "extract": ext})
        except (KeyError, TypeError) as e:
            raise UserError(
                f"the saved run plan is incomplete ({type(e).__name__}: {e}); it was made "
                "by another version of transferlab: retrain the run"
            ) from None


def saved_plan(ckpt: dict, env: DistEnv) -> Plan:
    """The plan a checkpoint was trained with (resume never re-derives it)."""
    if "plan" not in ckpt:
        raise UserError(
            "this checkpoint has no resolved plan (an older transferlab made it); start a new run"
        )
    plan = Plan.from_dict(ckpt["plan"])
    if plan.world_size != env.world_size:
        raise UserError(
            f"the run was trained with {plan.world_size} process(es); resume it with the same "
            f"number (now {env.world_size})"
        )
    return plan


def uses_feature_cache(cfg: Config) -> bool:
    """Frozen backbone and no per-batch randomness on its input (augmented views are cached)."""
    d = cfg.data
    random_input = bool(d.crop_padding or d.flip or d.cutout) and cfg.run.feature_views == 1
    frozen_part = cfg.model.mode in ("frozen", "partial")  # partial: the prefix's output
    return frozen_part and cfg.run.feature_cache and not random_input


def only_where_features_are_cached(cfg: Config) -> Config:
    """``cfg`` with ``--feature-precision`` back at auto where the run extracts no cached
    features: compare's CNN runs and a study's scratch/finetune arms take the flag given for the
    frozen backbone (a single run given it in vain gets an error: validate.py)."""
    if uses_feature_cache(cfg) or cfg.run.feature_precision == "auto":
        return cfg
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, feature_precision="auto"))


def use_channels_last(requested: bool, size: int, device: torch.device) -> bool:
    """channels_last unless turned off; at 32 px only on the CPU.

    Measured on the 2-core Xeon (benchmarks/channels_last.py): the seed CNN's bf16 train step is
    ~1.5x faster channels_last (oneDNN's blocked convs); the 32 px GPU step was measured only in
    NCHW, so it stays there.
    """
    return requested and (size > 32 or device.type == "cpu")


def make_preprocessing(
    model: Classifier, crop_pct: float, size: int, on_device_resize: bool
) -> Preprocessing:
    """The eval transform at ``size`` px (timm's rule: resize to floor(size / crop_pct))."""
    pp = model.preprocess
    return Preprocessing(
        crop=size,
        resize=math.floor(size / crop_pct),
        crop_pct=crop_pct,
        mean=tuple(pp.mean),
        std=tuple(pp.std),
        interpolation=pp.interpolation,
        on_device_resize=on_device_resize,
    )


def square_preprocessing(size: int) -> Preprocessing:
    """Shorter side to ``size``, centre crop, no normalisation change: for thumbnails."""
    return Preprocessing(
        crop=size,
        resize=size,
        crop_pct=1.0,
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        interpolation="bilinear",
        on_device_resize=False,
    )


def per_rank(batch_size: int, env: DistEnv) -> int:
    """The per-process share of a global batch; it must split evenly."""
    if batch_size % env.world_size:
        raise UserError(
            f"--batch-size {batch_size} must divide evenly over {env.world_size} processes"
        )
    return batch_size // env.world_size


def resolve_plan(
    cfg: Config,
    model: Classifier,
    env: DistEnv,
    pixels_in_memory: bool,
    extract: ExtractPlan | None,
) -> Plan:
    """Decide every resolved value of the run (rank 0 decides; the caller broadcasts).

    ``extract`` is the extraction choice for the features path (measured by
    ``features.pipeline.choose_extraction``), or None for the pixel path.
    """
    size = cfg.data.image_size or model.preprocess.input_size
    crop_pct = weights_crop_pct(cfg.model.name, cfg.model.weights, model.backbone)
    train_precision = resolve_precision(cfg.run.precision, env.device)
    path = "features" if uses_feature_cache(cfg) else "pixels"
    # the head on cached features is a few small matmuls: on the CPU fp32 is as fast as bf16.
    # Partial mode's last lite0 stage and conv_head are convolutions: they train at the run's
    # precision, so --precision auto gives bf16 autocast where the CPU has native bf16 (Zen 4
    # AVX512_BF16, 64/class: 630 img/s against fp32's 365-480, test 67.55% against 67.53%;
    # RESULTS.md issue 21) and fp32 elsewhere (a Xeon without it: bf16 23 img/s, fp32 39)
    cpu_head = env.device.type == "cpu" and cfg.model.mode != "partial"
    head_precision = "fp32" if cpu_head else train_precision
    return Plan(
        image_size=size,
        preprocessing=make_preprocessing(model, crop_pct, size, on_device_resize=pixels_in_memory),
        train_precision=train_precision,
        head_precision=head_precision,
        extract=extract if path == "features" else None,
        channels_last=use_channels_last(cfg.run.channels_last, size, env.device),
        batch_per_rank=per_rank(cfg.optim.batch_size, env),
        eval_batch_per_rank=max(1, cfg.optim.eval_batch_size // env.world_size),
        world_size=env.world_size,
        path=path,
    )


def resolved_config_dict(cfg: Config, plan: Plan) -> dict:
    """config.yaml's content: the config with 0/auto replaced by what they resolved to, and the
    whole plan under ``resolved:`` (a rerun with ``--preset config.yaml`` repeats the run)."""
    d = config_to_dict(cfg)
    d["data"]["image_size"] = plan.image_size
    d["run"]["precision"] = plan.train_precision
    if plan.extract is not None:
        d["run"]["engine"] = plan.extract.engine
    d["resolved"] = plan.to_dict()
    return d


def resolved_config_text(cfg: Config, plan: Plan) -> str:
    """config.yaml's text; checkpoints store its sha256 so a resume sees an edited file."""
    return yaml.safe_dump(resolved_config_dict(cfg, plan), sort_keys=False)


def save_resolved_config(cfg: Config, plan: Plan, path: Path) -> None:
    """Write config.yaml with its ``resolved:`` section (atomically)."""
    write_atomic(path, resolved_config_text(cfg, plan))
