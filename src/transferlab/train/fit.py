"""``fit``: epochs, validation, early stopping, metrics rows, checkpoints, resume.

Everything a run needs travels in a :class:`Job` (model, forward functions, loaders, optimiser
factory); everything that changes as it trains lives in :class:`FitState`, which is saved in
every checkpoint, so a resumed run continues exactly where the last checkpoint left off.

Usage:
    state = fit(job, state=FitState(), run_dir=Path("runs/x"))
"""

from __future__ import annotations

import csv
import functools
import io
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from transferlab.config import Config, config_to_dict
from transferlab.distributed import DistEnv, broadcast_module, rewrap_ddp, run_checked, unwrap
from transferlab.errors import TrainingStopped
from transferlab.models.classifier import Classifier, set_backbone_frozen
from transferlab.report.tracking import log_epoch_scalars
from transferlab.train.checkpoint import atomic_save, atomic_write, rng_state
from transferlab.train.loop import EpochStats, StepContext, evaluate, train_one_epoch
from transferlab.train.optim import build_optimizer, build_scheduler
from transferlab.train.precision import make_scaler

log = logging.getLogger(__name__)

METRIC_COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_time_s", "train_img_s"]


@dataclass
class FitState:
    """Progress of a run: saved in each checkpoint and restored on resume."""

    epoch: int = 0  # epochs completed
    phase: str = "main"  # gradual: "frozen" then "unfrozen"
    best_val_acc: float = -1.0
    best_epoch: int = 0
    bad_epochs: int = 0  # epochs since the best val acc (patience)
    train_s: float = 0.0
    eval_s: float = 0.0
    stop_reason: str = ""
    partial: dict = field(default_factory=dict)  # EpochStats of an interrupted epoch
    nan_count: int = 0


@dataclass
class Job:
    """The fixed parts of a run."""

    cfg: Config
    model: Classifier  # the bare model (checkpoints hold its state)
    train_module: nn.Module  # what the optimiser trains: the (DDP-wrapped) model or head
    train_forward: Callable[[torch.Tensor], torch.Tensor]
    eval_forward: Callable[[torch.Tensor], torch.Tensor]
    train_loader: object
    val_loader: object
    ctx: StepContext
    env: DistEnv
    run_dir: Path
    classes: list[str]
    extra: dict = field(default_factory=dict)  # data md5, split seed, ... saved in checkpoints
    optimizer: torch.optim.Optimizer | None = None
    scheduler: object = None
    scaler: torch.amp.GradScaler | None = None


def phase_epochs(job: Job, phase: str) -> int:
    """Epochs the schedule of ``phase`` spans."""
    cfg = job.cfg
    if phase == "frozen":
        return cfg.model.freeze_epochs
    if phase == "unfrozen":
        return cfg.optim.epochs - cfg.model.freeze_epochs
    return cfg.optim.epochs


def enter_phase(job: Job, phase: str) -> None:
    """Set the freeze state for ``phase`` and build a fresh optimiser, schedule and scaler.

    Resume calls this with the checkpoint's phase before loading the saved states, so the
    parameter groups are rebuilt exactly as they were (the gradual-unfreeze resume case).
    """
    if phase == "frozen":
        set_backbone_frozen(job.model, True)
    elif phase == "unfrozen":
        set_backbone_frozen(job.model, False)
    if phase != "main":  # DDP only all-reduces what required grad when it was built: build it anew
        job.train_module = rewrap_ddp(job.train_module, job.env)
    cfg = job.cfg
    # discriminative lrs only when a pretrained backbone is tuned; scratch trains all at --lr (seed)
    div = cfg.model.backbone_lr_div if cfg.model.mode in ("finetune", "gradual") else 1.0
    job.optimizer = build_optimizer(unwrap(job.train_module), cfg.optim, div)
    job.scheduler = build_scheduler(job.optimizer, cfg.optim, len(job.train_loader), phase_epochs(job, phase))
    job.scaler = make_scaler(job.ctx.precision, job.ctx.device)
    job.ctx.params = [p for g in job.optimizer.param_groups for p in g["params"]]


def initial_phase(cfg: Config) -> str:
    return "frozen" if cfg.model.mode == "gradual" else "main"


def checkpoint_state(job: Job, state: FitState) -> dict:
    """Everything needed to resume (and to predict with the model alone)."""
    return {
        "model": unwrap(job.model).state_dict(),
        "optimizer": job.optimizer.state_dict(),
        "scheduler": job.scheduler.state_dict(),
        "scaler": job.scaler.state_dict(),
        "fit_state": asdict(state),
        "rng": rng_state(),
        "config": config_to_dict(job.cfg),
        "classes": list(job.classes),
        "preprocess": job.model.preprocess.to_dict(),
        "arch": job.model.arch,
        "extra": job.extra,
    }


def save_checkpoint(job: Job, state: FitState, name: str) -> None:
    """Atomically write ``name`` (rank 0 only); a failed write stops the run, old file intact."""
    if not job.env.is_main:
        return
    path = job.run_dir / name
    try:
        atomic_save(checkpoint_state(job, state), path)
    except OSError as e:
        raise TrainingStopped(
            f"could not write checkpoint {path} ({e.strerror or e}); the previous checkpoint and "
            "metrics.csv are intact. Free disk space, then resume with --resume.", exit_code=1
        ) from None


def append_metrics(path: Path, row: dict) -> None:
    """Append one row to metrics.csv and flush it to disk (a crash never loses it)."""
    size = path.stat().st_size if path.exists() else 0
    try:
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=METRIC_COLUMNS)
            if size == 0:
                w.writeheader()
            w.writerow(row)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        try:  # a full disk may have taken half the row: cut it off so the file stays valid CSV
            os.truncate(path, size)
        except OSError:
            pass
        raise TrainingStopped(f"could not append to {path} ({e.strerror or e}); earlier rows are intact") from None


def truncate_metrics(path: Path, last_epoch: int) -> None:
    """Keep only rows up to ``last_epoch`` (rows after the resumed checkpoint are redone)."""
    if not path.exists():
        return
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if str(r.get("epoch", "")).isdigit() and int(r["epoch"]) <= last_epoch]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=METRIC_COLUMNS)
    w.writeheader()
    w.writerows(rows)
    atomic_write(path, lambda f: f.write(buf.getvalue().encode()))


def _should_stop(cfg: Config, state: FitState) -> str:
    if cfg.optim.target_val_acc and state.best_val_acc >= cfg.optim.target_val_acc:
        return f"reached target val acc {cfg.optim.target_val_acc:.4f}"
    if cfg.optim.patience and state.bad_epochs >= cfg.optim.patience:
        return f"no val-acc improvement for {cfg.optim.patience} epochs"
    return ""


def _write_epoch(job: Job, state: FitState, row: dict, improved: bool) -> None:
    append_metrics(job.run_dir / "metrics.csv", row)
    if job.cfg.run.tensorboard:  # the same row as TensorBoard scalars, in RUN_DIR/tb
        log_epoch_scalars(job.run_dir / "tb", row)
    save_checkpoint(job, state, "last.pt")
    if improved:
        link_best(job, state)


def link_best(job: Job, state: FitState) -> None:
    """best.pt = the just-written last.pt, as an atomic hard link (no second copy to write).

    last.pt is always replaced by a new file (os.replace), so the linked inode stays best.pt's.
    """
    if not job.env.is_main:
        return
    last, best = job.run_dir / "last.pt", job.run_dir / "best.pt"
    tmp = job.run_dir / ".best.pt.link"
    try:
        tmp.unlink(missing_ok=True)
        os.link(last, tmp)
        os.replace(tmp, best)
    except OSError:  # no hard links on this filesystem: write a copy
        tmp.unlink(missing_ok=True)
        save_checkpoint(job, state, "best.pt")


def fit(job: Job, state: FitState) -> FitState:
    """Train from ``state`` to the end of the epoch budget or an early stop."""
    cfg, env = job.cfg, job.env
    every = cfg.run.ckpt_every_steps
    job.ctx.nan_count = state.nan_count

    def on_step(stats: EpochStats) -> None:
        if every and stats.step % every == 0:
            state.partial = asdict(stats)
            run_checked(lambda: save_checkpoint(job, state, "last.pt"), env, main_only=True)

    if state.epoch == 0 and not state.partial:
        # a checkpoint before the first step: a run killed in its first epoch can be resumed too
        run_checked(lambda: save_checkpoint(job, state, "last.pt"), env, main_only=True)
    for epoch in range(state.epoch, cfg.optim.epochs):
        if cfg.model.mode == "gradual" and state.phase == "frozen" and epoch >= cfg.model.freeze_epochs:
            log.info("epoch %d: unfreezing the backbone (lr / %g)", epoch + 1, cfg.model.backbone_lr_div)
            state.phase = "unfrozen"
            enter_phase(job, "unfrozen")
        job.train_module.train()
        if hasattr(job.train_loader, "set_epoch"):
            job.train_loader.set_epoch(epoch)
        partial = EpochStats(**state.partial) if state.partial else None
        stats = train_one_epoch(job.train_forward, job.train_loader, job.optimizer, job.scheduler, job.scaler,
                                job.ctx, partial, on_step if every else None, desc=f"epoch {epoch + 1}")
        state.nan_count = job.ctx.nan_count
        if stats.interrupted:
            state.partial = asdict(stats)
            # every rank waits for rank 0's write: an early exit would make torchrun kill rank 0 mid-write
            run_checked(lambda: save_checkpoint(job, state, "last.pt"), env, main_only=True)
            raise TrainingStopped(
                f"interrupted during epoch {epoch + 1}; checkpoint saved. Resume with: "
                f"transferlab train --resume {job.run_dir}", exit_code=130)
        state.partial = {}
        state.train_s += stats.seconds
        t0 = time.perf_counter()
        job.train_module.eval()
        # BatchNorm running stats: each rank's last forward updated its own copy; use rank 0's
        # (what its checkpoint holds), so validation and the saved model agree.
        broadcast_module(job.model, env, buffers_only=True)
        val_loss, val_acc = evaluate(job.eval_forward, job.val_loader, job.ctx, desc="val")
        if math.isnan(val_loss) or math.isinf(val_loss):  # diverged in the last steps: keep the old last.pt
            raise TrainingStopped(
                f"epoch {epoch + 1}: validation loss is {val_loss} (the weights diverged); last.pt still holds "
                f"epoch {state.epoch}. Lower --lr, add --grad-clip, or use --precision fp32.")
        state.eval_s += time.perf_counter() - t0
        state.epoch = epoch + 1
        lr = job.optimizer.param_groups[-1]["lr"]
        row = {"epoch": epoch + 1, "train_loss": f"{stats.loss:.6f}", "train_acc": f"{stats.acc:.6f}",
               "val_loss": f"{val_loss:.6f}", "val_acc": f"{val_acc:.6f}", "lr": f"{lr:.6g}",
               "epoch_time_s": f"{stats.seconds + time.perf_counter() - t0:.3f}",
               "train_img_s": f"{stats.img_per_s:.1f}"}
        improved = val_acc > state.best_val_acc
        if improved:
            state.best_val_acc, state.best_epoch, state.bad_epochs = val_acc, epoch + 1, 0
        else:
            state.bad_epochs += 1
        state.stop_reason = _should_stop(cfg, state)
        if env.is_main:
            log.info("epoch %d/%d  train %.4f/%.4f  val %.4f/%.4f  %.0f img/s", epoch + 1, cfg.optim.epochs,
                     stats.loss, stats.acc, val_loss, val_acc, stats.img_per_s)
        # rank 0 writes; every rank waits for it and sees its error (disk full) as its own
        run_checked(functools.partial(_write_epoch, job, state, row, improved), env, main_only=True)
        if state.stop_reason:
            log.info("early stop after epoch %d: %s", epoch + 1, state.stop_reason)
            break
    if not state.stop_reason:
        state.stop_reason = f"epoch budget ({cfg.optim.epochs}) done"
    return state
