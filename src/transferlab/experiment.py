"""One experiment end to end: data, model, the fast path to take, fit, test, and the run files.

Pipeline: prepare the run dir -> load data -> build the model -> choose the path (cached
features when the backbone is frozen and no per-batch randomness touches its input, else
pixels through the model) -> fit -> restore the best weights -> test -> write summary.json,
model_summary.txt and curves.png.

Usage:
    summary = run_experiment(cfg)                       # a new run
    summary = run_experiment(cfg, resume=True)          # continue cfg.run.run_dir
"""

from __future__ import annotations

import json
import logging
import platform
import random
import time
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

import torch

from transferlab import __version__
from transferlab.config import Config, config_from_dict, save_config
from transferlab.data.augment import augment_batch
from transferlab.data.cifar import ImageDataset, load_cifar100
from transferlab.data.preprocess import to_float_normalized
from transferlab.data.tensor_loader import TensorLoader
from transferlab.distributed import (
    DistEnv,
    all_ranks_true,
    barrier,
    broadcast_module,
    broadcast_object,
    init_distributed,
    run_checked,
    wrap_ddp,
)
from transferlab.errors import TrainingStopped, UserError
from transferlab.features import cache as fcache
from transferlab.features.extract import choose_precision, extract_features
from transferlab.models.classifier import Classifier, count_params
from transferlab.models.registry import build_model, resolve_name
from transferlab.report.predictions import FILENAME as PREDICTIONS_FILE
from transferlab.report.predictions import collect_predictions, save_predictions
from transferlab.train.checkpoint import RESUME_KEYS, atomic_write, load_checkpoint, set_rng_state
from transferlab.train.fit import FitState, Job, enter_phase, fit, initial_phase, truncate_metrics
from transferlab.train.loop import StepContext, evaluate
from transferlab.train.precision import resolve_precision

log = logging.getLogger(__name__)


def default_run_dir(cfg: Config) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    name = cfg.model.name.replace(":", "-").replace("/", "-")
    return Path("runs") / f"{name}-{stamp}"


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Create the run dir; refuse a non-empty one unless resuming or --overwrite."""
    if resume:
        if not (run_dir / "last.pt").is_file():
            raise UserError(f"cannot resume: {run_dir / 'last.pt'} does not exist")
        return
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"run dir {run_dir} is a file, not a folder; choose another --run-dir")
    if run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
        raise UserError(f"run dir {run_dir} is not empty; pass --overwrite to reuse it or --resume {run_dir} to continue")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to run dir {run_dir} ({e.strerror or e}); choose another --run-dir") from None
    if overwrite:
        for name in ("metrics.csv", "summary.json", "best.pt", "last.pt"):
            (run_dir / name).unlink(missing_ok=True)


def load_data(cfg: Config) -> ImageDataset:
    """The dataset named by ``cfg.data.dataset``."""
    d = cfg.data
    if d.dataset == "cifar100":
        ds = load_cifar100(d.data_dir, d.download, d.split_seed, d.val_size)
    else:
        from transferlab.data.folder import load_folder_dataset

        ds = load_folder_dataset(d)  # decode size is set once the model is known (run_experiment)
    if d.train_subset and d.train_subset < len(ds.train):
        g = torch.Generator().manual_seed(d.split_seed + 1)
        idx = torch.randperm(len(ds.train), generator=g)[: d.train_subset]
        if hasattr(ds.train, "subset"):  # folder split: paths + labels
            ds.train = ds.train.subset(idx)
        else:
            ds.train = type(ds.train)(ds.train.images[idx], ds.train.labels[idx])
    return ds


def make_loader(split, batch_size: int, shuffle: bool, device: torch.device, seed: int, env: DistEnv, augment=None):
    """A batch source of (x_uint8, y) on ``device``: in-memory for tensors, DataLoader for folders."""
    if hasattr(split, "images"):
        return TensorLoader(split.images, split.labels, batch_size, shuffle, device=device, seed=seed,
                            rank=env.rank, world_size=env.world_size, augment=augment)
    from transferlab.data.folder import folder_loader

    return folder_loader(split, batch_size, shuffle, device, seed, env, augment)


def _augment_fn(cfg: Config):
    d = cfg.data
    if not (d.crop_padding or d.flip or d.cutout):
        return None
    return lambda x, g: augment_batch(x, crop_padding=d.crop_padding, flip=d.flip, cutout_size=d.cutout, generator=g)


def _prepare_fn(model: Classifier, size: int, channels_last: bool):
    pp = model.preprocess
    return lambda x: to_float_normalized(x, pp.mean, pp.std, size, pp.interpolation, channels_last=channels_last)


def uses_feature_cache(cfg: Config) -> bool:
    """Frozen backbone and no per-batch randomness on its input (augmented views are cached)."""
    random_input = bool(cfg.data.crop_padding or cfg.data.flip or cfg.data.cutout) and cfg.run.feature_views == 1
    return cfg.model.mode == "frozen" and cfg.run.feature_cache and not random_input


def use_channels_last(requested: bool, size: int, device: torch.device) -> bool:
    """channels_last unless turned off; at 32 px only on the CPU.

    Measured on the 2-core Xeon (benchmarks/channels_last.py): the seed CNN's bf16 train step is
    ~1.5x faster channels_last (oneDNN's blocked convs); the 32 px GPU step was measured only in
    NCHW, so it stays there.
    """
    return requested and (size > 32 or device.type == "cpu")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def run_experiment(cfg: Config, resume: bool = False, dataset: ImageDataset | None = None,
                   env: DistEnv | None = None, stop_requested=lambda: False) -> dict:
    """Run (or resume) one experiment; returns the summary written to summary.json."""
    t_start = time.perf_counter()
    env = env or init_distributed(cfg.run.device)
    run_dir = Path(cfg.run.run_dir) if cfg.run.run_dir else default_run_dir(cfg)
    run_dir = Path(broadcast_object(str(run_dir), env))
    cfg.run.run_dir = str(run_dir)
    ckpt = None
    # rank 0 creates the dir; a refusal (not empty, not writable) ends every rank with its message
    run_checked(lambda: prepare_run_dir(run_dir, resume, cfg.run.overwrite), env, main_only=True)
    if resume:  # every rank reads last.pt (multi-node: the run dir must be shared)
        ckpt = run_checked(lambda: load_checkpoint(run_dir / "last.pt", require=RESUME_KEYS), env)
        try:
            saved = config_from_dict(ckpt["config"])
        except UserError as e:
            raise UserError(f"{run_dir / 'last.pt'} holds an invalid config: {e}") from None
        saved.run.device, saved.run.progress = cfg.run.device, cfg.run.progress
        cfg = saved
    _seed_everything(cfg.run.seed)
    resolve_name(cfg.model.name)  # fail on an unknown model or fp16 on a CPU before the data load
    resolve_precision(cfg.run.precision, env.device)
    if cfg.model.name == "cnn" and cfg.data.image_size not in (0, 32):
        raise UserError(f"--image-size {cfg.data.image_size}: the cnn takes 32 px inputs (five 2x poolings to 1x1)")
    ds = dataset or run_checked(lambda: load_data(cfg), env)  # data missing on one node: all ranks say so
    model = build_model(cfg.model, num_classes=len(ds.classes)).to(env.device)
    size = cfg.data.image_size or model.preprocess.input_size
    if hasattr(ds, "set_image_size"):  # folder data: workers decode straight to the model's size
        ds.set_image_size(size)
        if env.is_main:
            ds.write_manifest(run_dir / "data_manifest.json")
    precision = resolve_precision(cfg.run.precision, env.device)
    channels_last = use_channels_last(cfg.run.channels_last, size, env.device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    ctx = StepContext(device=env.device, precision=precision, env=env, params=[],
                      label_smoothing=cfg.optim.label_smoothing, grad_clip=cfg.optim.grad_clip,
                      nan_patience=cfg.run.nan_patience, progress=cfg.run.progress, stop_requested=stop_requested)
    per_rank = _per_rank_batch(cfg.optim.batch_size, env)
    eval_bs = max(1, cfg.optim.eval_batch_size // env.world_size)
    extra = {"md5": ds.md5, "split_seed": ds.split_seed, "source": ds.source, "image_size": size,
             "precision": precision, "world_size": env.world_size, "folder": getattr(ds, "info", None)}
    t_setup = time.perf_counter()
    if uses_feature_cache(cfg):
        job_parts, test_forward, test_loader, extract_info = _feature_path(
            cfg, model, ds, size, channels_last, ctx, env, per_rank, eval_bs)
        extra["feature_cache"] = extract_info
    else:
        job_parts, test_forward, test_loader = _pixel_path(cfg, model, ds, size, channels_last, env, per_rank, eval_bs)
    setup_s = time.perf_counter() - t_setup
    job = Job(cfg=cfg, model=model, ctx=ctx, env=env, run_dir=run_dir, classes=ds.classes, extra=extra, **job_parts)
    if job.train_forward is None:  # pixel path: enter_phase may re-wrap DDP, so look the module up per call
        prepare = _prepare_fn(model, size, channels_last)
        job.train_forward = lambda x: job.train_module(prepare(x))
    state = FitState(phase=initial_phase(cfg))
    enter_phase(job, state.phase)
    if ckpt is not None:
        state = _restore(job, ckpt)
    elif env.is_main:
        save_config(cfg, run_dir / "config.yaml")
        write_model_summary(model, cfg, size, run_dir / "model_summary.txt")
    if cfg.model.solver == "lbfgs":
        from transferlab.features.probe import fit_linear_probe

        state = fit_linear_probe(job, state)
    else:
        state = fit(job, state)
    return finish(job, state, test_forward, test_loader, t_start, setup_s)


def _per_rank_batch(batch_size: int, env: DistEnv) -> int:
    if batch_size % env.world_size:
        raise UserError(f"--batch-size {batch_size} must divide evenly over {env.world_size} processes")
    return batch_size // env.world_size


def _pixel_path(cfg, model, ds, size, channels_last, env, per_rank, eval_bs):
    prepare = _prepare_fn(model, size, channels_last)
    ddp = wrap_ddp(model, env, sync_bn=cfg.model.sync_bn)
    train_loader = make_loader(ds.train, per_rank, True, env.device, cfg.run.seed, env, _augment_fn(cfg))
    val_loader = make_loader(ds.val, eval_bs, False, env.device, cfg.run.seed, env)
    test_loader = make_loader(ds.test, eval_bs, False, env.device, cfg.run.seed, env)
    if cfg.run.compile:
        ddp = torch.compile(ddp)
    parts = {"train_module": ddp, "train_forward": None,  # bound in run_experiment
             "eval_forward": lambda x: model(prepare(x)), "train_loader": train_loader, "val_loader": val_loader}
    return parts, (lambda x: model(prepare(x))), test_loader


def _feature_key(cfg, model, ds, size, precision, split, views, whash) -> dict:
    pp = model.preprocess
    return {"backbone": cfg.model.name, "weights": whash, "image_size": size,
            "mean": pp.mean, "std": pp.std, "interpolation": pp.interpolation, "precision": precision,
            "data_md5": ds.md5, "data_source": ds.source, "split": split, "split_seed": ds.split_seed,
            "val_size": cfg.data.val_size, "train_subset": cfg.data.train_subset, "views": views,
            "augment": list(view_augment(cfg)) if views > 1 else None, "seed": cfg.run.seed if views > 1 else None,
            "version": 1}


def view_augment(cfg: Config) -> tuple[int, bool]:
    """(crop padding, flip) of the cached training views: the user's --crop-padding/--flip when
    given, else random crop with 4 px padding plus horizontal flip."""
    if cfg.data.crop_padding or cfg.data.flip:
        return cfg.data.crop_padding, cfg.data.flip
    return 4, True


def cached_features(cfg, model, ds, split_name, split, size, channels_last, ctx, env, eval_bs, root, precision, whash):
    """(features, labels) for one split, from the cache or freshly extracted (then stored)."""
    views = cfg.run.feature_views if split_name == "train" else 1
    key = fcache.cache_key(_feature_key(cfg, model, ds, size, precision, split_name, views, whash))
    # rank 0 looks first (it deletes a corrupt entry); the others read only after it found a good
    # one, and use it only if every rank could (a cache dir not shared across nodes: all extract)
    hit = fcache.load_entry(root, key) if env.is_main else None
    if broadcast_object(hit is not None, env):
        hit = hit or fcache.load_entry(root, key)
        if not all_ranks_true(hit is not None, env):
            log.warning("feature cache %s is not visible to every rank (share it across nodes); extracting", root)
            hit = None
    if hit:
        tensors, _ = hit
        log.info("feature cache hit for %s/%s (key %s): skipping extraction", cfg.model.name, split_name, key)
        return tensors["features"], tensors["labels"], {"hit": True, "key": key, "img_s": None}
    prepare = _prepare_fn(model, size, channels_last)
    views_out, speed = [], 0.0
    for v in range(views):
        aug = None
        if views > 1:  # augmented at the input resolution, before the resize; one stream per view
            pad, flip = view_augment(cfg)
            def aug(x, g, pad=pad, flip=flip):
                return augment_batch(x, crop_padding=pad, flip=flip, cutout_size=0, generator=g)
        loader = make_loader(split, eval_bs, False, env.device, cfg.run.seed * 1000 + v, env, aug)
        f, speed = extract_features(model.features, prepare, loader, env.device, precision, env, len(split),
                                    progress=cfg.run.progress, desc=f"extract {split_name}" + (f" view {v + 1}" if views > 1 else ""))
        views_out.append(f)
    feats = torch.stack(views_out, 1) if views > 1 else views_out[0]
    labels = split.labels.clone()
    if env.is_main:
        try:
            fcache.save_entry(root, key, {"features": feats, "labels": labels},
                              {"backbone": cfg.model.name, "split": split_name, "views": views, "image_size": size,
                               "precision": precision, "n": len(split)})
        except OSError as e:
            log.warning("could not write feature cache %s (%s); continuing without caching", root, e.strerror or e)
    barrier(env)
    return feats, labels, {"hit": False, "key": key, "img_s": round(speed, 1)}


def _feature_path(cfg, model, ds, size, channels_last, ctx, env, per_rank, eval_bs):
    root = fcache.cache_root(cfg.run.cache_dir)
    # one choice for all ranks (auto measures, and ranks could disagree); rank 0 writes the memo
    precision = broadcast_object(choose_precision(model.features, cfg.model.name, size, env.device, root,
                                                  cfg.run.precision, channels_last) if env.is_main else None, env)
    broadcast_module(model.backbone, env)  # every rank extracts with rank 0's backbone: one cache key
    model.eval()
    data, info = {}, {"precision": precision, "root": str(root)}
    whash = fcache.weights_hash(model.backbone)
    t0 = time.perf_counter()
    for name in ("train", "val", "test"):
        f, y, meta = cached_features(cfg, model, ds, name, getattr(ds, name), size, channels_last, ctx, env,
                                     eval_bs, root, precision, whash)
        data[name] = (f.to(env.device), y.to(env.device))
        info[name] = meta
    info["seconds"] = round(time.perf_counter() - t0, 2)
    ctx.precision = "fp32" if env.device.type == "cpu" else ctx.precision  # tiny head: fp32 is as fast
    head = wrap_ddp(model.head, env)
    views = cfg.run.feature_views

    def pick_view(f, g):  # (B, K, D) -> (B, D): one random cached view per sample and epoch
        idx = torch.randint(0, f.shape[1], (f.shape[0],), generator=g, device=f.device)
        return f[torch.arange(f.shape[0], device=f.device), idx]

    train_loader = TensorLoader(*data["train"], per_rank, True, device=env.device, seed=cfg.run.seed,
                                rank=env.rank, world_size=env.world_size, augment=pick_view if views > 1 else None)
    val_loader = TensorLoader(*data["val"], eval_bs, False, device=env.device, rank=env.rank, world_size=env.world_size)
    test_loader = TensorLoader(*data["test"], eval_bs, False, device=env.device, rank=env.rank, world_size=env.world_size)
    parts = {"train_module": head, "train_forward": head, "eval_forward": model.head,
             "train_loader": train_loader, "val_loader": val_loader}
    return parts, model.head, test_loader, info


def _restore(job: Job, ckpt: dict) -> FitState:
    try:
        state = FitState(**ckpt["fit_state"])
        job.model.load_state_dict(ckpt["model"])
        enter_phase(job, state.phase)  # rebuild the phase's param groups before loading their state
        job.optimizer.load_state_dict(ckpt["optimizer"])
        job.scheduler.load_state_dict(ckpt["scheduler"])
        job.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:  # a loadable file from another model/version
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise UserError(f"{job.run_dir / 'last.pt'} does not fit this run ({type(e).__name__}: {first})") from None
    if job.env.is_main:
        truncate_metrics(job.run_dir / "metrics.csv", state.epoch)
    log.info("resumed %s at epoch %d (phase %s)", job.run_dir, state.epoch, state.phase)
    return state


def write_model_summary(model: Classifier, cfg: Config, size: int, path: Path) -> None:
    """torchinfo summary (layers, output shapes, parameter counts) to ``path``."""
    from torchinfo import summary

    batch = cfg.optim.batch_size if size <= 64 else 1  # the seed's CNN summary uses batch 200
    device = next(model.parameters()).device
    was_training = model.training
    try:
        text = str(summary(model, input_size=(batch, 3, size, size), depth=3, verbose=0, device=device,
                           col_names=("output_size", "num_params", "trainable")))
    finally:
        model.train(was_training)
    path.write_text(f"{cfg.model.name} ({cfg.model.mode})\n{text}\n")  # torchinfo's text holds the counts


def finish(job: Job, state: FitState, test_forward, test_loader, t_start: float, setup_s: float) -> dict:
    """Restore the best weights, evaluate on test, write summary.json and curves.png."""
    best = job.run_dir / "best.pt"
    if best.is_file() or not job.env.is_main:  # rank 0 reads; a bad file stops every rank with its message
        run_checked(lambda: job.model.load_state_dict(load_checkpoint(best)["model"]), job.env, main_only=True)
    broadcast_module(job.model, job.env)  # every rank needs rank 0's best weights
    job.model.eval()
    t0 = time.perf_counter()
    train_loss, train_acc = evaluate(test_forward, _eval_loader_like(job), job.ctx, desc="train (best)")
    val_loss, val_acc = evaluate(job.eval_forward, job.val_loader, job.ctx, desc="val (best)")
    test_loss, test_acc, test_preds = collect_predictions(test_forward, test_loader, job.ctx)  # for reports
    final_eval_s = time.perf_counter() - t0
    total = time.perf_counter() - t_start
    cfg = job.cfg
    summary = {
        "model": cfg.model.name, "mode": cfg.model.mode, "run_dir": str(job.run_dir),
        "weights": "n/a (scratch)" if cfg.model.mode == "scratch" else cfg.model.weights,
        "params": count_params(job.model),
        "train": {"loss": train_loss, "acc": train_acc},
        "val": {"loss": val_loss, "acc": val_acc},
        "test": {"loss": test_loss, "acc": test_acc},
        "best_epoch": state.best_epoch, "epochs_run": state.epoch, "stop_reason": state.stop_reason,
        "time_s": {"total": round(total, 2), "train": round(state.train_s, 2),
                   "eval": round(state.eval_s + final_eval_s, 2), "setup": round(setup_s, 2)},
        "data": {"md5": job.extra.get("md5", {}), "split_seed": job.extra.get("split_seed"),
                 "source": job.extra.get("source"), "classes": len(job.classes), "folder": job.extra.get("folder"),
                 "n": {"train": len(job.train_loader.labels) if hasattr(job.train_loader, "labels") else None}},
        "precision": job.ctx.precision, "image_size": job.extra.get("image_size"),
        "feature_cache": job.extra.get("feature_cache"),
        "probe": job.extra.get("probe"),
        "seed": cfg.run.seed, "world_size": job.env.world_size,
        "versions": {"transferlab": __version__, "torch": torch.__version__, "python": platform.python_version()},
        "fit_state": asdict(state),
    }
    if job.env.is_main:
        path = job.run_dir / "summary.json"
        try:
            atomic_write(path, lambda f: f.write(json.dumps(summary, indent=2, default=str).encode()))
        except OSError as e:
            raise TrainingStopped(f"could not write {path} ({e.strerror or e}); last.pt, best.pt and "
                                  "metrics.csv are intact") from None
        save_predictions(job.run_dir / PREDICTIONS_FILE, test_preds, job.classes)
        from transferlab.report.plots import plot_curves

        plot_curves(job.run_dir / "metrics.csv", job.run_dir / "curves.png", title=f"{cfg.model.name} ({cfg.model.mode})")
    return summary


def _eval_loader_like(job: Job):
    """The training split without shuffling or augmentation (for the final train loss/acc)."""
    tl = job.train_loader
    if isinstance(tl, TensorLoader):
        labels = tl.labels
        images = tl.images
        return TensorLoader(images, labels, job.cfg.optim.eval_batch_size // job.env.world_size or 1, False,
                            device=tl.device, rank=job.env.rank, world_size=job.env.world_size,
                            augment=tl.augment if images.dim() == 3 else None)
    return tl.eval_view()
