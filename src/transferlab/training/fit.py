"""``fit``: epochs, validation, early stopping, metrics rows, checkpoints, resume.

What a run needs travels in a :class:`Job` (config, plan, model, pipeline, step context);
the optimiser of the current phase in :class:`~transferlab.training.loop.OptimParts`; everything
that changes as it trains lives in :class:`FitState`, which is saved in every checkpoint, so a
resumed run continues exactly where the last checkpoint left off.

Usage:
    opt = enter_phase(job, initial_phase(cfg))
    state = fit(job, FitState(phase=initial_phase(cfg)), opt)
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from transferlab.config import Config
from transferlab.distributed import DistEnv, broadcast_module, rewrap_ddp, run_checked, unwrap
from transferlab.errors import TrainingStopped, UserError, is_torch_write_failure
from transferlab.io import temp_path, write_torch
from transferlab.metrics import append_metrics, epoch_row, log_epoch_scalars, truncate_metrics
from transferlab.models.classifier import Classifier, set_backbone_frozen
from transferlab.pipeline import Pipeline
from transferlab.plan import Plan, resolved_config_dict, resolved_config_text
from transferlab.precision import make_scaler
from transferlab.rundir import RunDir
from transferlab.threads import ThreadWatch
from transferlab.training.checkpoint import rng_state, set_rng_state
from transferlab.training.loop import (
    EpochStats,
    EvalResult,
    OptimParts,
    StepContext,
    StepGuard,
    evaluate,
    train_one_epoch,
)
from transferlab.training.optim import build_optimizer, build_scheduler

log = logging.getLogger(__name__)


@dataclass
class FitState:
    """Progress of a run: saved in each checkpoint and restored on resume."""

    epoch: int = 0  # epochs completed
    phase: str = "main"  # gradual: "frozen" then "unfrozen"
    best_val_acc: float = -1.0  # val accuracy at the best epoch
    best_epoch: int = 0
    bad_epochs: int = 0  # epochs since the best (patience)
    best_score: float = -1.0  # the --select-by metric at the best epoch
    train_s: float = 0.0
    eval_s: float = 0.0
    stop_reason: str = ""
    partial: dict = field(default_factory=dict)  # EpochStats of an interrupted epoch
    nan_count: int = 0
    probe: dict = field(default_factory=dict)  # ProbeResult of the L-BFGS probe (features/probe)


@dataclass(frozen=True)
class DataInfo:
    """What the run was trained on (summary.json's ``data``; checkpoints)."""

    classes: tuple[str, ...]
    md5: dict
    split_seed: int
    source: str
    folder: dict | None  # folder data: layout, class counts, bad images
    n_train: int


@dataclass(frozen=True)
class Job:
    """The fixed parts of a run (the pipeline's train module is re-wrapped per phase)."""

    cfg: Config
    plan: Plan
    model: Classifier  # the bare model (checkpoints hold its state)
    pipe: Pipeline
    ctx: StepContext
    env: DistEnv
    run_dir: Path
    data: DataInfo
    # called once an epoch is on disk: an --overwrite's old run goes only when the new one has
    # earned it (rundir.RunDirHandle.commit; idempotent); a stop before that puts it back
    commit_run_dir: Callable[[], None] = lambda: None

    @property
    def files(self) -> RunDir:
        """The run dir's files."""
        return RunDir(self.run_dir)


def phase_epochs(cfg: Config, phase: str) -> int:
    """Epochs the schedule of ``phase`` spans."""
    if phase == "frozen":
        return cfg.model.freeze_epochs
    if phase == "unfrozen":
        return cfg.optim.epochs - cfg.model.freeze_epochs
    return cfg.optim.epochs


def enter_phase(job: Job, phase: str) -> OptimParts:
    """Set the freeze state for ``phase``; return a fresh optimiser, schedule and scaler.

    Resume calls this with the checkpoint's phase before loading the saved states, so the
    parameter groups are rebuilt exactly as they were (the gradual-unfreeze resume case).
    """
    if phase in ("frozen", "unfrozen"):
        set_backbone_frozen(job.model, phase == "frozen")
        # DDP only all-reduces what required grad when it was built: build it anew
        job.pipe.train_module = rewrap_ddp(job.pipe.train_module, job.env)
    cfg = job.cfg
    # discriminative lrs only when a pretrained backbone is tuned; scratch trains all at --lr
    tuned = cfg.model.mode in ("finetune", "gradual", "partial")
    div = cfg.model.backbone_lr_div if tuned else 1.0
    optimizer = build_optimizer(unwrap(job.pipe.train_module), cfg.optim, div)
    scheduler = build_scheduler(
        optimizer, cfg.optim, len(job.pipe.train_loader), phase_epochs(cfg, phase)
    )
    return OptimParts(optimizer, scheduler, make_scaler(job.ctx.precision, job.ctx.device))


def initial_phase(cfg: Config) -> str:
    return "frozen" if cfg.model.mode == "gradual" else "main"


def start_state(job: Job, ckpt: dict | None) -> tuple[FitState, OptimParts]:
    """A fresh state, or the checkpoint's state with its optimiser, schedule and RNG."""
    state = FitState(phase=initial_phase(job.cfg))
    opt = enter_phase(job, state.phase)
    if ckpt is None:
        return state, opt
    try:
        state = FitState(**ckpt["fit_state"])
        job.model.load_state_dict(ckpt["model"])
        opt = enter_phase(job, state.phase)  # rebuild the phase's param groups, then load them
        opt.optimizer.load_state_dict(ckpt["optimizer"])
        opt.scheduler.load_state_dict(ckpt["scheduler"])
        opt.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:  # another model or version
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise UserError(
            f"{job.files.last} does not fit this run ({type(e).__name__}: {first})"
        ) from None
    if job.env.is_main:
        truncate_metrics(job.files.metrics, state.epoch)
    log.info("resumed %s at epoch %d (phase %s)", job.run_dir, state.epoch, state.phase)
    return state, opt


def checkpoint_state(job: Job, state: FitState, opt: OptimParts) -> dict:
    """Everything needed to resume (and to predict with the model alone)."""
    return {
        "model": unwrap(job.model).state_dict(),
        "optimizer": opt.optimizer.state_dict(),
        "scheduler": opt.scheduler.state_dict(),
        "scaler": opt.scaler.state_dict(),
        "fit_state": asdict(state),
        "rng": rng_state(),
        "config": {
            k: v for k, v in resolved_config_dict(job.cfg, job.plan).items() if k != "resolved"
        },
        "plan": job.plan.to_dict(),
        "config_hash": hashlib.sha256(resolved_config_text(job.cfg, job.plan).encode()).hexdigest(),
        "classes": list(job.data.classes),
        "preprocess": job.model.preprocess.to_dict(),
        "arch": job.model.arch,
        "data": asdict(job.data),
    }


def save_checkpoint(job: Job, state: FitState, opt: OptimParts, name: str) -> None:
    """Atomically write ``name`` (rank 0 only); a failed write stops the run, old file intact."""
    if not job.env.is_main:
        return
    path = job.run_dir / name
    try:
        write_torch(path, checkpoint_state(job, state, opt))
    except (OSError, RuntimeError) as e:  # torch.save reports a short write as a RuntimeError
        if isinstance(e, RuntimeError) and not is_torch_write_failure(e):
            raise
        why = e.strerror if isinstance(e, OSError) and e.strerror else "the write failed"
        raise TrainingStopped(
            f"could not write checkpoint {path} ({why}); the previous checkpoint and "
            f"{RunDir.METRICS} are intact. Free disk space, then resume with --resume.",
            exit_code=1,
        ) from None


def link_best(job: Job, state: FitState, opt: OptimParts) -> None:
    """best.pt = the just-written last.pt, as an atomic hard link (no second copy to write).

    last.pt is always replaced by a new file (os.replace), so the linked inode stays best.pt's.
    """
    if not job.env.is_main:
        return
    files = RunDir(job.run_dir)
    try:
        with temp_path(files.best) as tmp:
            os.link(files.last, tmp)
    except OSError:  # no hard links on this filesystem: write a copy
        save_checkpoint(job, state, opt, RunDir.BEST)


def write_epoch(job: Job, state: FitState, opt: OptimParts, row: dict, improved: bool) -> None:
    """The end of an epoch on disk: its metrics row, then last.pt (and best.pt)."""
    append_metrics(job.files.metrics, row)
    if job.cfg.run.tensorboard:  # the same row as TensorBoard scalars, in RUN_DIR/tb
        log_epoch_scalars(job.files.tensorboard, row)
    save_checkpoint(job, state, opt, RunDir.LAST)
    if improved:
        link_best(job, state, opt)
    job.commit_run_dir()


def _should_stop(cfg: Config, state: FitState) -> str:
    if cfg.optim.target_val_acc and state.best_val_acc >= cfg.optim.target_val_acc:
        return f"reached target val acc {cfg.optim.target_val_acc:.4f}"
    if cfg.optim.patience and state.bad_epochs >= cfg.optim.patience:
        what = cfg.optim.select_by.replace("_", "-")
        return f"no {what} improvement for {cfg.optim.patience} epochs"
    return ""


def _train_epoch(
    job: Job, state: FitState, opt: OptimParts, guard: StepGuard, epoch: int, watch: ThreadWatch
) -> EpochStats:
    """One training epoch (or the rest of an interrupted one); an interruption is saved."""
    every = job.cfg.run.ckpt_every_steps

    def on_step(stats: EpochStats) -> None:
        if stats.step % every == 0:
            state.partial = asdict(stats)
            run_checked(
                lambda: save_checkpoint(job, state, opt, RunDir.LAST), job.env, main_only=True
            )

    job.pipe.train_module.train()
    if hasattr(job.pipe.train_loader, "set_epoch"):
        job.pipe.train_loader.set_epoch(epoch)
    partial = EpochStats(**state.partial) if state.partial else None
    stats = train_one_epoch(
        job.pipe.train_forward,
        job.pipe.train_loader,
        opt,
        job.ctx,
        guard,
        partial,
        on_step if every else None,
        desc=f"epoch {epoch + 1}",
        on_batch=watch.tick,
    )
    state.nan_count = guard.nan_count
    if stats.interrupted:
        state.partial = asdict(stats)
        # every rank waits for rank 0's write: an early exit would make torchrun kill rank 0
        run_checked(lambda: save_checkpoint(job, state, opt, RunDir.LAST), job.env, main_only=True)
        code = getattr(job.ctx.stop_requested, "exit_code", 130)
        raise TrainingStopped(
            f"interrupted during epoch {epoch + 1}; checkpoint saved. Resume with: "
            f"transferlab train --resume {job.run_dir}",
            exit_code=code,
        )
    state.partial = {}
    state.train_s += stats.seconds
    return stats


def _validate(job: Job, state: FitState, epoch: int) -> EvalResult:
    """Validation after ``epoch`` (loss, accuracy, confusion); a diverged model stops the run."""
    job.pipe.train_module.eval()
    # BatchNorm running stats: each rank's last forward updated its own copy; use rank 0's
    # (what its checkpoint holds), so validation and the saved model agree.
    broadcast_module(job.model, job.env, buffers_only=True)
    val = evaluate(
        job.pipe.eval_forward,
        job.pipe.val_loader,
        job.ctx,
        desc="val",
        num_classes=len(job.data.classes),
    )
    val_loss = val.loss
    if math.isnan(val_loss) or math.isinf(val_loss):  # diverged in the last steps: keep last.pt
        raise TrainingStopped(
            f"epoch {epoch + 1}: validation loss is {val_loss} (the weights diverged); "
            f"{RunDir.LAST} still holds epoch {state.epoch}. Lower --lr, add --grad-clip, or use "
            "--precision fp32."
        )
    return val


def selection_score(select_by: str, acc: float, balanced_acc: float) -> float:
    """The validation number that picks the best checkpoint and drives early stopping."""
    return balanced_acc if select_by == "val_balanced_acc" else acc


def _record(state: FitState, epoch: int, val: EvalResult, cfg: Config) -> bool:
    """Update best/patience/stop after an epoch; True when it improved on the best."""
    state.epoch = epoch + 1
    score = selection_score(cfg.optim.select_by, val.acc, val.balanced_acc)
    improved = score > state.best_score
    if improved:
        state.best_score, state.best_val_acc = score, val.acc
        state.best_epoch, state.bad_epochs = epoch + 1, 0
    else:
        state.bad_epochs += 1
    state.stop_reason = _should_stop(cfg, state)
    return improved


def fit(job: Job, state: FitState, opt: OptimParts) -> FitState:
    """Train from ``state`` to the end of the epoch budget or an early stop."""
    cfg, env = job.cfg, job.env
    guard = StepGuard(job.ctx, state.nan_count)
    watch = ThreadWatch(cfg.run.threads, "train")  # a neighbour that starts mid-run is seen
    for epoch in range(state.epoch, cfg.optim.epochs):
        if state.phase == "frozen" and epoch >= cfg.model.freeze_epochs:
            log.info(
                "epoch %d: unfreezing the backbone (lr / %g)", epoch + 1, cfg.model.backbone_lr_div
            )
            state.phase = "unfrozen"
            opt = enter_phase(job, "unfrozen")
        stats = _train_epoch(job, state, opt, guard, epoch, watch)
        t0 = time.perf_counter()
        val = _validate(job, state, epoch)
        state.eval_s += time.perf_counter() - t0
        improved = _record(state, epoch, val, cfg)
        row = epoch_row(
            epoch + 1,
            (stats.loss, stats.acc),
            (val.loss, val.acc),
            opt.optimizer.param_groups[-1]["lr"],
            stats.seconds + time.perf_counter() - t0,
            stats.img_per_s,
            val_balanced_acc=val.balanced_acc,
        )
        if env.is_main:
            log.info(
                "epoch %d/%d  train loss %.4f acc %.4f  val loss %.4f acc %.4f "
                "balanced %.4f  %.0f img/s",
                epoch + 1,
                cfg.optim.epochs,
                stats.loss,
                stats.acc,
                val.loss,
                val.acc,
                val.balanced_acc,
                stats.img_per_s,
            )
        # rank 0 writes; every rank waits for it and sees its error (disk full) as its own
        run_checked(
            functools.partial(write_epoch, job, state, opt, row, improved), env, main_only=True
        )
        if state.stop_reason:
            log.info("early stop after epoch %d: %s", epoch + 1, state.stop_reason)
            break
        watch.recheck()
    if not state.stop_reason:
        state.stop_reason = f"epoch budget ({cfg.optim.epochs}) done"
    return state
