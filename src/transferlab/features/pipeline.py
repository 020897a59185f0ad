"""The frozen-feature pipeline: extract each split once (through the cache), then train the head.

This module owns the cache key, the extraction of a split, the DDP rules for the cache and
the loaders over cached tensors:
- rank 0 looks the key up first (it deletes a corrupt entry); the others read only after it
  found a good one, and use it only if every rank could (a cache dir not shared across nodes
  makes every rank extract);
- every rank extracts its shard with rank 0's backbone, rank 0 writes the entry.

Usage:
    choice = choose_extraction(cfg, model, ds, size, env, root)     # before the plan
    pipe = build_feature_pipeline(cfg, plan, model, ds, env, stop_requested)
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import time
from collections.abc import Callable

import torch

from transferlab.config import Config, lt_imbalance_ratio
from transferlab.data.augment import augment_batch
from transferlab.data.cifar import ImageDataset
from transferlab.data.pipeline import make_loader, prepare_fn, train_sample_weights
from transferlab.data.subsets import (
    long_tail_indices,
    select_per_class,
    select_rows_per_class,
    take_rows,
    union_indices,
)
from transferlab.data.tensor_loader import TensorLoader
from transferlab.distributed import (
    DistEnv,
    all_ranks_true,
    barrier,
    broadcast_module,
    broadcast_object,
    wrap_ddp,
)
from transferlab.errors import UserError
from transferlab.features import cache as fcache
from transferlab.features.content import content_digest
from transferlab.features.engines import EngineChoice, build_engine, resolve_engine
from transferlab.features.extract import extract_with_engine
from transferlab.features.quantize import Calibration, calibration_id, calibration_indices
from transferlab.models.classifier import Classifier
from transferlab.models.partial import PartialTrainer, StagePrefix, cut_shape
from transferlab.pipeline import FeatureInfo, Pipeline, SplitFeatures
from transferlab.plan import ExtractPlan, Plan
from transferlab.threads import ThreadWatch

log = logging.getLogger(__name__)

KEY_VERSION = 1


def extraction_precision(cfg: Config) -> str:
    """The precision asked of the extraction: ``--feature-precision``, or with ``auto`` what
    ``--precision`` asks (``auto``: the faster of fp32 and bf16 on this machine). ``auto`` never
    means int8: quantisation costs accuracy, so the user asks for it."""
    fp = cfg.run.feature_precision
    return cfg.run.precision if fp == "auto" else fp


def choose_extraction(
    cfg: Config, model: Classifier, ds: ImageDataset, size: int, env: DistEnv, channels_last: bool
) -> ExtractPlan:
    """The extraction engine, precision and batch: rank 0 measures them (``--engine auto``,
    ``--precision auto``) once per backbone, size, device and library versions, remembers the
    choice in the cache dir (so cache keys stay stable), and every rank uses its choice.
    int8 also names its calibration set (the plan and the cache keys carry it)."""
    choice = None
    if env.is_main:
        root = fcache.cache_root(cfg.run.cache_dir)
        cut = f"@cut-{cfg.model.train_stages}" if cfg.model.mode == "partial" else ""
        cut += f"@layers-{cfg.model.feature_layers}" if cfg.model.feature_layers else ""
        choice = resolve_engine(
            cfg.run.engine,
            extraction_module(cfg, model),
            cfg.model.name + cut,  # the engine's memo: the prefix is another network
            size,
            env.device,
            root,
            extraction_precision(cfg),
            channels_last,
        )
    choice = broadcast_object(choice, env)
    calibration = ""
    if choice.precision == "int8":
        calibration = calibration_id(
            train_identity(cfg, ds), calibration_indices(len(ds.train), cfg.data.split_seed)
        )
    return ExtractPlan(
        engine=choice.name,
        precision=choice.precision,
        batch_size=choice.batch_size,
        calibration=calibration,
    )


def train_identity(cfg: Config, ds: ImageDataset) -> dict:
    """What names the training split's images (as in the feature cache key)."""
    return {
        "data_md5": ds.md5,
        "data_source": ds.source,
        "split_seed": ds.split_seed,
        "val_size": cfg.data.val_size,
        "train_subset": cfg.data.train_subset,
        "n_train": len(ds.train),
    }


def calibration_set(
    cfg: Config, plan: Plan, ds: ImageDataset, normalised: bool = True
) -> Calibration:
    """The int8 calibration set of this run: at most 300 images of its training split, drawn
    with its split seed (a study's replicates share it),
    prepared like the features' input (the plan's resize and normalisation, NCHW), or with
    ``normalised=False`` as [0, 1] pixels (an export's input, its normalisation folded in).
    A run planned in int8 must find the same images (its plan names them)."""
    idx = calibration_indices(len(ds.train), cfg.data.split_seed)
    key = calibration_id(train_identity(cfg, ds), idx)
    planned = plan.extract.calibration if plan.extract else ""
    if planned and key != planned:
        raise UserError(
            "the training data differs from the data this run was planned with (its int8 "
            "calibration set changed); use the run's own data"
        )
    return Calibration(key, lambda: unit_batches(cfg, plan, ds.train, idx, normalised))


def unit_batches(cfg: Config, plan: Plan, split, idx: torch.Tensor, normalised: bool = True):
    """The images ``idx`` of ``split`` as float NCHW batches at the plan's size: normalised like
    the features' input, or [0, 1] pixels. Read in one process (every DDP rank reads them all)."""
    pp = plan.preprocessing
    if not normalised:
        pp = dataclasses.replace(pp, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    prepare = prepare_fn(dataclasses.replace(plan, channels_last=False, preprocessing=pp))
    if hasattr(split, "images"):
        sub = type(split)(split.images[idx], split.labels[idx])
    else:  # folder files: decoded by the plan's eval transform (predict and export set none)
        sub = dataclasses.replace(split.subset(idx), preprocessing=plan.preprocessing)
    for x, _ in make_loader(sub, 50, False, DistEnv(), cfg.run.seed):
        yield prepare(x)


def extraction_module(cfg: Config, model: Classifier) -> torch.nn.Module:
    """What the engine runs: the frozen backbone, or (``--mode partial``) its prefix up to the
    cut, whose activations come out flattened to (N, C*H*W)."""
    if cfg.model.mode == "partial":
        return StagePrefix(model.backbone, cfg.model.train_stages)
    return model.backbone


def storage_dtype(cfg: Config) -> torch.dtype:
    """How cached features are stored: float32, but partial mode's cut activations (tens of
    times larger) in bf16, unless an fp32 extraction asks for exact ones."""
    exact = cfg.model.mode != "partial" or extraction_precision(cfg) == "fp32"
    return torch.float32 if exact else torch.bfloat16


class _Engines:
    """Builds the plan's engine on the first cache miss (a warm cache needs none)."""

    def __init__(
        self,
        cfg: Config,
        plan: Plan,
        model: Classifier,
        env: DistEnv,
        whash: str,
        ds: ImageDataset | None = None,
    ):
        self.cfg, self.plan, self.model, self.env, self.whash = cfg, plan, model, env, whash
        self.ds = ds  # int8: the calibration images come from its training split
        self.engine = None

    def get(self):
        if self.engine is None:
            ext, cfg = self.plan.extract, self.cfg
            self.engine = build_engine(
                EngineChoice(ext.engine, ext.precision, ext.batch_size),
                extraction_module(cfg, self.model),
                self.plan.image_size,
                self.env.device,
                fcache.cache_root(cfg.run.cache_dir),
                self.whash,
                self.plan.channels_last,
                fallback=cfg.run.engine == "auto",
                calibration=self._calibration(),
            )
            if self.engine.choice.name != ext.engine:  # the plan (and cache key) said otherwise
                raise UserError(
                    f"the {ext.engine} engine could not be built for this backbone "
                    "now; rerun with --engine torch"
                )
        return self.engine

    def _calibration(self) -> Calibration | None:
        if self.plan.extract.precision != "int8":
            return None
        if self.ds is None:
            raise UserError("int8 extraction needs the run's training data to calibrate")
        return calibration_set(self.cfg, self.plan, self.ds)


def view_augment(cfg: Config) -> tuple[int, bool]:
    """(crop padding, flip) of the cached training views: the user's --crop-padding/--flip when
    given, else random crop with 4 px padding plus horizontal flip."""
    if cfg.data.crop_padding or cfg.data.flip:
        return cfg.data.crop_padding, cfg.data.flip
    return 4, True


def feature_key(cfg: Config, plan: Plan, ds: ImageDataset, split: str, whash: str) -> dict:
    """Everything that changes one split's features."""
    pp, views = plan.preprocessing, (cfg.run.feature_views if split == "train" else 1)
    ext = plan.extract
    key = {
        "backbone": cfg.model.name,
        "weights": whash,
        "image_size": plan.image_size,
        "mean": list(pp.mean),
        "std": list(pp.std),
        "interpolation": pp.interpolation,
        "precision": ext.precision,
        "data_md5": ds.md5,
        "data_source": ds.source,
        "split": split,
        "split_seed": ds.split_seed,
        "val_size": cfg.data.val_size,
        "train_subset": cfg.data.train_subset,
        "views": views,
        "augment": list(view_augment(cfg)) if views > 1 else None,
        "seed": cfg.run.seed if views > 1 else None,
        "version": KEY_VERSION,
    }
    if ext.engine != "torch":  # engines differ slightly in their features
        key["engine"] = ext.engine
    if ext.precision == "int8":  # the quantised model depends on its calibration images
        key["calibration"] = ext.calibration
    if not pp.on_device_resize:  # decoded images: the eval transform shapes the pixels
        key["resize"], key["crop"] = pp.resize, pp.crop
    if cfg.data.test_subset and split == "test":
        key["test_subset"] = cfg.data.test_subset
    if cfg.model.mode == "partial":  # the cut's activations: where the cut is, how stored
        key["cut"] = f"blocks[:-{cfg.model.train_stages}]"
        key["storage"] = str(storage_dtype(cfg)).removeprefix("torch.")
    if cfg.model.feature_layers:  # the last stages' pooled outputs beside the final features
        key["feature_layers"] = cfg.model.feature_layers
    if train_rows_recipe(cfg) and split == "train":  # only the rows a study uses
        key["rows"] = list(train_rows_recipe(cfg))
    return key


def train_rows_recipe(cfg: Config) -> tuple[int, int] | None:
    """(per class, seeds) of the training rows to extract, or None for every row (a long-tail
    split picks its rows from the whole split's features first). ``--extract-per-class -1``
    (auto): a ``--per-class K`` run extracts the rows of its subsets of seeds 0..--subset-seed
    (one cache entry per seed count), not the whole split; a study sets its rows explicitly."""
    d = cfg.data
    if d.dataset.startswith("cifar100-lt:"):
        return None
    if d.extract_per_class < 0:
        return (d.per_class, d.subset_seed + 1) if d.per_class else None
    if not d.extract_per_class:
        return None
    return d.extract_per_class, d.extract_seeds


def train_rows(cfg: Config, ds: ImageDataset) -> torch.Tensor | None:
    """The training rows to extract (sorted split indices), or None for every row."""
    recipe = train_rows_recipe(cfg)
    return None if recipe is None else union_indices(ds.train.labels, *recipe)


def split_cache_key(cfg: Config, plan: Plan, ds: ImageDataset, split: str, whash: str) -> str:
    """The cache key of one split: :func:`feature_key` plus, for files on disk (folder data), a
    digest of the files' bytes (a repaint at the same size changes it; features/content.py)."""
    parts = feature_key(cfg, plan, ds, split, whash)
    paths = getattr(getattr(ds, split), "paths", None)
    if paths is not None:
        memo = fcache.cache_root(cfg.run.cache_dir) / fcache.DIGEST_MEMO
        try:
            parts["content"] = content_digest(paths, memo)
        except OSError as e:
            raise UserError(
                f"cannot read a data file to key the feature cache ({e.filename}: "
                f"{e.strerror or e}); the data changed under the run, rerun it"
            ) from None
    return fcache.cache_key(parts)


def _lookup(root, key: str, env: DistEnv):
    hit = fcache.load_entry(root, key) if env.is_main else None
    if broadcast_object(hit is not None, env):
        hit = hit or fcache.load_entry(root, key)
        if not all_ranks_true(hit is not None, env):
            log.warning(
                "feature cache %s is not visible to every rank (share it across nodes); extracting",
                root,
            )
            hit = None
    return hit


def _rechecking(
    prepare: Callable[[torch.Tensor], torch.Tensor], watch: ThreadWatch
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``prepare`` that first ticks ``watch``: torch extraction follows a neighbour that starts
    mid-split within seconds, as training does between batches (transferlab/threads.py)."""

    def run(x: torch.Tensor) -> torch.Tensor:
        watch.tick()
        return prepare(x)

    return run


def _view_aug(cfg: Config, views: int):
    if views == 1:
        return None
    pad, flip = view_augment(cfg)  # augmented at the input resolution, before the resize
    return lambda x, g: augment_batch(x, crop_padding=pad, flip=flip, cutout_size=0, generator=g)


def split_features(
    cfg: Config,
    plan: Plan,
    ds: ImageDataset,
    name: str,
    env: DistEnv,
    engines: _Engines,
    stop_requested: Callable[[], bool],
) -> tuple[torch.Tensor, torch.Tensor, SplitFeatures]:
    """(features, labels) of one split, from the cache or freshly extracted (then stored)."""
    split = getattr(ds, name)
    rows = train_rows(cfg, ds) if name == "train" else None
    if rows is not None:
        split = take_rows(split, rows)
    root = fcache.cache_root(cfg.run.cache_dir)
    views = cfg.run.feature_views if name == "train" else 1
    key = broadcast_object(  # rank 0 reads the files once
        split_cache_key(cfg, plan, ds, name, engines.whash) if env.is_main else None, env
    )
    hit = _lookup(root, key, env)
    if hit:
        log.info(
            "feature cache hit for %s/%s (key %s): skipping extraction", cfg.model.name, name, key
        )
        return hit[0]["features"], hit[0]["labels"], SplitFeatures(True, key, None)
    if cfg.run.require_feature_cache:  # a study cell whose arm's extraction task ran first
        raise UserError(
            f"the {name} features of {cfg.model.name} (cache key {key}) are not in the feature "
            f"cache {root}, which this cell was promised; put the cache dir on storage every "
            "worker sees (--cache-dir), or rerun the study to extract them again"
        )
    # channels_last only feeds torch's kernels; a converted engine takes contiguous NCHW
    layout = dataclasses.replace(
        plan, channels_last=plan.channels_last and plan.extract.engine == "torch"
    )
    prepare, aug = prepare_fn(layout), _view_aug(cfg, views)
    if plan.extract.engine == "torch":  # a converted engine keeps the threads it was built with
        prepare = _rechecking(prepare, ThreadWatch(cfg.run.threads, "extract"))
    outs, speed = [], 0.0
    for v in range(views):  # one augmentation stream per view
        loader = make_loader(
            split, plan.eval_batch_per_rank, False, env, cfg.run.seed * 1000 + v, aug
        )
        desc = f"extract {name}" + (f" view {v + 1}" if views > 1 else "")
        f, speed = extract_with_engine(
            engines.get(), prepare, loader, env, len(split), cfg.run.progress, desc, stop_requested
        )
        outs.append(f.to(storage_dtype(cfg)))
    feats = torch.stack(outs, 1) if views > 1 else outs[0]
    labels = split.labels.clone()
    if env.is_main:
        meta = {
            "backbone": cfg.model.name,
            "split": name,
            "views": views,
            "image_size": plan.image_size,
            "precision": plan.extract.precision,
            "n": len(split),
            "engine": plan.extract.engine,
            "img_s": round(speed, 1),  # this machine's extraction speed, for rank's estimates
        }
        try:
            fcache.save_entry(root, key, {"features": feats, "labels": labels}, meta)
        except OSError as e:
            log.warning(
                "could not write feature cache %s (%s); continuing without caching",
                root,
                e.strerror or e,
            )
    barrier(env)
    return feats, labels, SplitFeatures(False, key, round(speed, 1))


def _human(n_bytes: float) -> str:
    return f"{n_bytes / 1e9:.2f} GB" if n_bytes >= 1e8 else f"{n_bytes / 1e6:.1f} MB"


def check_cut_space(
    cfg: Config, plan: Plan, ds: ImageDataset, whash: str, shape: tuple[int, int, int]
) -> None:
    """Partial mode: say how large the cut's activations are, and refuse before extracting
    when the cache dir's disk cannot hold the splits not cached yet."""
    root = fcache.cache_root(cfg.run.cache_dir)
    per_image = math.prod(shape) * torch.finfo(storage_dtype(cfg)).bits // 8
    need, sizes = 0, []
    rows = train_rows(cfg, ds)  # None: every training image
    for name in ("train", "val", "test"):
        views = cfg.run.feature_views if name == "train" else 1
        n = len(rows) if name == "train" and rows is not None else len(getattr(ds, name))
        size = n * views * per_image
        sizes.append(f"{name} {_human(size)}")
        if not fcache.entry_path(root, split_cache_key(cfg, plan, ds, name, whash)).is_file():
            need += size
    c, h, w = shape
    log.info(
        "partial cache: the cut's activations are %dx%dx%d (%s) per image: %s; %s to "
        "extract into %s",
        c,
        h,
        w,
        str(storage_dtype(cfg)).removeprefix("torch."),
        ", ".join(sizes),
        _human(need),
        root,
    )
    probe = root
    while not probe.exists() and probe != probe.parent:  # the cache dir may not exist yet
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need > free:
        raise UserError(
            f"the partial cache needs {_human(need)} in {root} and {_human(free)} is "
            "free; free space, pass --cache-dir on a larger disk, or use fewer "
            "--train-stages/--feature-views"
        )


def build_feature_pipeline(
    cfg: Config,
    plan: Plan,
    model: Classifier,
    ds: ImageDataset,
    env: DistEnv,
    stop_requested: Callable[[], bool] = lambda: False,
) -> Pipeline:
    """Extract (or load) the three splits' features and build the head's loaders.

    ``stop_requested`` (SIGINT/SIGTERM) is honoured within one batch of an extraction; the
    split being extracted is not cached, the ones before it are.
    """
    broadcast_module(model.backbone, env)  # every rank extracts with rank 0's backbone: one key
    model.eval()
    # the weights that make the features: the probe converted the same module (no second convert)
    whash = fcache.weights_hash(extraction_module(cfg, model))
    engines = _Engines(cfg, plan, model, env, whash, ds)
    shape = None
    if cfg.model.mode == "partial":
        shape = cut_shape(model.backbone, cfg.model.train_stages, plan.image_size)
        check_cut_space(cfg, plan, ds, engines.whash, shape)
    data, splits = {}, {}
    t0 = time.perf_counter()
    for name in ("train", "val", "test"):
        f, y, meta = split_features(cfg, plan, ds, name, env, engines, stop_requested)
        if name == "train" and cfg.data.dataset.startswith("cifar100-lt:"):  # rows, like below
            idx = long_tail_indices(y.cpu(), lt_imbalance_ratio(cfg.data.dataset))
            f, y = f[idx.to(f.device)], y[idx.to(y.device)]
        # the whole split (or a study's rows) is cached once; a study's sizes and seeds pick rows
        if name == "train" and cfg.data.per_class:
            rows = train_rows(cfg, ds)
            d = cfg.data
            if rows is None:
                f, y = select_per_class(f, y, d.per_class, d.subset_seed)
            else:
                f, y = select_rows_per_class(f, rows, ds.train.labels, d.per_class, d.subset_seed)
        data[name] = (f.to(env.device), y.to(env.device))
        splits[name] = meta
    if ds.fold is not None:  # --folds: this fold's rows of the pooled train + val features
        f = torch.cat([data["train"][0], data["val"][0]])
        y = torch.cat([data["train"][1], data["val"][1]])
        rows = {"train": ds.fold.train.to(f.device), "val": ds.fold.val.to(f.device)}
        data.update({name: (f[idx], y[idx]) for name, idx in rows.items()})
    info = FeatureInfo(
        root=str(fcache.cache_root(cfg.run.cache_dir)),
        precision=plan.extract.precision,
        engine=plan.extract.engine,
        seconds=round(time.perf_counter() - t0, 2),
        splits=splits,
    )

    def pick_view(f, g):  # (B, K, D) -> (B, D): one random cached view per sample and epoch
        idx = torch.randint(0, f.shape[1], (f.shape[0],), generator=g, device=f.device)
        return f[torch.arange(f.shape[0], device=f.device), idx]

    def loader(name: str, bs: int, shuffle: bool, augment=None, weights=None) -> TensorLoader:
        return TensorLoader(
            *data[name],
            bs,
            shuffle,
            device=env.device,
            seed=cfg.run.seed,
            rank=env.rank,
            world_size=env.world_size,
            augment=augment,
            sample_weights=weights,
        )

    views = cfg.run.feature_views
    weights = train_sample_weights(cfg, data["train"][1], len(ds.classes))
    module = model.head  # what trains on the cached tensors
    if shape is not None:  # partial: the last stages and the head
        module = PartialTrainer(
            model,
            cfg.model.train_stages,
            shape,
            plan.channels_last,
            bn_train=cfg.model.partial_bn == "train",
        )
    return Pipeline(
        train_loader=loader(
            "train", plan.batch_per_rank, True, pick_view if views > 1 else None, weights
        ),
        val_loader=loader("val", plan.eval_batch_per_rank, False),
        test_loader=loader("test", plan.eval_batch_per_rank, False),
        train_module=wrap_ddp(module, env),
        eval_module=module,
        prepare=lambda f: f,
        features=info,
    )
