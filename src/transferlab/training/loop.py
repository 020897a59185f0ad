"""The epoch loop: ``train_one_epoch`` and ``evaluate``, as plain functions.

A batch source yields ``(x, y)`` on the device; ``forward(x)`` maps it to logits. That one
parameter covers every path: pixels (``model(preprocess(augment(x)))``), and cached features
(``head(f)``). Loss, accuracy and counts are summed on the device and all-reduced over DDP ranks,
so every sample counts exactly once.

Usage:
    stats = train_one_epoch(forward, loader, OptimParts(opt, sched, scaler), ctx, StepGuard(ctx))
    val = evaluate(forward, val_loader, ctx, num_classes=100)  # val.loss, val.acc, ...
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from transferlab.classmetrics import balanced_accuracy, topk_correct
from transferlab.distributed import DistEnv, all_reduce_sum
from transferlab.errors import TrainingStopped
from transferlab.precision import autocast
from transferlab.progress import progress

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepContext:
    """What every step needs besides the data: device, precision, DDP, loss settings, guards."""

    device: torch.device
    precision: str  # resolved: fp32 | bf16 | fp16
    env: DistEnv
    label_smoothing: float = 0.0
    grad_clip: float = 0.0
    nan_patience: int = 0
    class_weights: torch.Tensor | None = None  # (C,) on the device: --balance weights
    progress: bool = True
    stop_requested: Callable[[], bool] = field(default=lambda: False)


@dataclass
class OptimParts:
    """The optimiser, its schedule and the loss scaler of the current phase."""

    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]


@dataclass
class EpochStats:
    """Sums for one (possibly partial) training epoch; ``step`` counts batches done."""

    loss_sum: float = 0.0
    correct: float = 0.0
    count: float = 0.0
    seconds: float = 0.0
    step: int = 0
    interrupted: bool = False

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.count, 1.0)

    @property
    def acc(self) -> float:
        return self.correct / max(self.count, 1.0)

    @property
    def img_per_s(self) -> float:
        return self.count / max(self.seconds, 1e-9)


_DIVERGED_HINT = (
    "the last good checkpoint is kept. Lower --lr, add --grad-clip, or use --precision fp32."
)


class StepGuard:
    """The one place for non-finite losses and stop requests, decided alike on every rank.

    ``check(loss)`` returns (apply this step, stop now). Under DDP it costs one all-reduce per
    step: a rank that skipped a step or stopped alone (a signal seen by one process) would leave
    the others waiting in DDP's gradient all-reduce. On one GPU with ``--nan-patience 0`` nothing
    is skipped, so finiteness is kept in a device-side flag (a host sync per step costs ~40% on
    small models) and read by :meth:`raise_if_bad` before any checkpoint and at the epoch end,
    so non-finite weights are never saved.
    """

    def __init__(self, ctx: StepContext, nan_count: int = 0):
        self.ctx = ctx
        self.nan_count = nan_count  # non-finite steps skipped so far in the run
        self.lazy = ctx.device.type == "cuda" and not ctx.env.enabled and ctx.nan_patience == 0
        self._bad = torch.zeros((), dtype=torch.bool, device=ctx.device)

    def check(self, loss: torch.Tensor, desc: str, step: int, steps: int) -> tuple[bool, bool]:
        if self.lazy:
            self._bad |= ~torch.isfinite(loss.detach())
            return True, self.ctx.stop_requested()
        finite, stop = self._agree(loss)
        if not finite:
            self.nan_count += 1
            if self.nan_count > self.ctx.nan_patience:
                raise TrainingStopped(
                    f"{desc}: loss became {loss.item()} at step {step + 1} of {steps} "
                    f"({self.nan_count} non-finite step(s), --nan-patience "
                    f"{self.ctx.nan_patience}); {_DIVERGED_HINT}"
                )
            log.warning("non-finite loss at step %d skipped (%d so far)", step, self.nan_count)
        return finite, stop

    def _agree(self, loss: torch.Tensor) -> tuple[bool, bool]:
        stop = self.ctx.stop_requested()
        env = self.ctx.env
        if not env.enabled:
            return bool(torch.isfinite(loss.detach()).item()), stop
        flags = torch.stack(
            [
                torch.isfinite(loss.detach()).float().reshape(()),
                torch.tensor(float(stop), device=loss.device),
            ]
        )
        all_reduce_sum(flags, env)
        finite, stops = flags.tolist()
        return finite == env.world_size, stops > 0

    def raise_if_bad(self, desc: str, step: int) -> None:
        if self.lazy and bool(self._bad.item()):
            raise TrainingStopped(
                f"{desc}: the loss became non-finite before step {step} "
                f"(checked lazily on the GPU); {_DIVERGED_HINT}"
            )


def _optimizer_step(loss: torch.Tensor, opt: OptimParts, grad_clip: float) -> None:
    opt.optimizer.zero_grad(set_to_none=True)
    opt.scaler.scale(loss).backward()
    if grad_clip > 0:
        opt.scaler.unscale_(opt.optimizer)
        nn.utils.clip_grad_norm_(opt.params, grad_clip)
    opt.scaler.step(opt.optimizer)
    opt.scaler.update()
    opt.scheduler.step()


def train_one_epoch(  # noqa: PLR0913 - the step's parts and two hooks
    forward: Callable[[torch.Tensor], torch.Tensor],
    loader: Iterable,
    opt: OptimParts,
    ctx: StepContext,
    guard: StepGuard,
    stats: EpochStats | None = None,
    on_step: Callable[[EpochStats], None] | None = None,
    desc: str = "train",
    on_batch: Callable[[], object] | None = None,
) -> EpochStats:
    """Train over ``loader`` once; resume a partial epoch by passing its ``stats``.

    Batches before ``stats.step`` are drawn and skipped (so augmentation RNG stays in sync).
    ``on_step`` runs after every optimiser step with the folded totals (step checkpoints: a host
    sync); ``on_batch`` runs after every batch with nothing (the thread re-check: no sync). A stop
    request (signal) ends the epoch early with ``interrupted=True``.
    """
    stats = stats or EpochStats()
    stats.interrupted = False  # a resumed partial epoch was interrupted before; it runs on now
    skip = stats.step
    # Running (loss_sum, correct, count) in float64. Rank 0 starts from a resumed partial epoch's
    # totals, so the additions happen in the same order (same bits) as in an uninterrupted epoch.
    start = [stats.loss_sum, stats.correct, stats.count] if ctx.env.is_main else [0.0, 0.0, 0.0]
    sums = torch.tensor(start, dtype=torch.float64, device=ctx.device)
    t0 = time.perf_counter()
    for i, (x, y) in enumerate(progress(loader, desc, ctx.progress and ctx.env.is_main)):
        if i < skip:
            continue
        with autocast(ctx.precision, ctx.device):
            logits = forward(x)
            loss = F.cross_entropy(
                logits.float(), y, weight=ctx.class_weights, label_smoothing=ctx.label_smoothing
            )
        apply, stop = guard.check(loss, desc, stats.step, len(loader))
        stats.step += 1
        if on_batch is not None:
            on_batch()
        if not apply:
            opt.optimizer.zero_grad(set_to_none=True)
            continue
        _optimizer_step(loss, opt, ctx.grad_clip)
        with torch.no_grad():  # no host->device copies here: they would sync every step
            sums[0] += loss.detach().double() * y.shape[0]
            sums[1] += (logits.argmax(1) == y).sum()
            sums[2] += y.shape[0]
        if on_step is not None or stop:
            guard.raise_if_bad(desc, stats.step)
            t0 = _fold(stats, sums, ctx.env, t0)
            if on_step is not None:
                on_step(stats)
            if stop:
                stats.interrupted = True
                return stats
    guard.raise_if_bad(desc, stats.step)
    _fold(stats, sums, ctx.env, t0)
    return stats


def _fold(stats: EpochStats, sums: torch.Tensor, env: DistEnv, t0: float) -> float:
    """Set the epoch totals from the running sums (all-reduced: every rank gets the global
    ones); returns the new start time."""
    stats.loss_sum, stats.correct, stats.count = all_reduce_sum(sums.clone(), env).tolist()
    now = time.perf_counter()
    stats.seconds += now - t0
    return now


@dataclass(frozen=True)
class EvalResult:
    """One pass over an eval loader: mean loss, top-1, and (with ``num_classes``) the confusion
    matrix (rows: true class, columns: predicted; numpy int64) and the top-5 accuracy."""

    loss: float
    acc: float
    confusion: np.ndarray | None = None
    top5_acc: float | None = None

    @property
    def balanced_acc(self) -> float:
        """Mean per-class recall (nan without a confusion matrix)."""
        return math.nan if self.confusion is None else balanced_accuracy(self.confusion)


@torch.inference_mode()
def evaluate(
    forward: Callable[[torch.Tensor], torch.Tensor],
    loader: Iterable,
    ctx: StepContext,
    desc: str = "eval",
    num_classes: int = 0,
) -> EvalResult:
    """Mean loss (without label smoothing) and accuracy over every sample, exactly once.

    With ``num_classes`` it also sums a confusion matrix and top-5 hits on the device (one
    all-reduce with the rest), for balanced accuracy and the per-class metrics.
    """
    c = num_classes
    sums = torch.zeros(4 + c * c, dtype=torch.float64, device=ctx.device)
    for x, y in progress(loader, desc, ctx.progress and ctx.env.is_main):
        with autocast(ctx.precision, ctx.device):
            logits = forward(x)
        logits = logits.float()
        loss = F.cross_entropy(logits, y, reduction="sum")
        sums[0] += loss.double()
        sums[1] += (logits.argmax(1) == y).sum()
        sums[2] += y.shape[0]
        if c:
            sums[3] += topk_correct(logits, y, 5)
            sums[4:] += torch.bincount(y * c + logits.argmax(1), minlength=c * c)
    sums = all_reduce_sum(sums, ctx.env).cpu()
    loss_sum, correct, count, top5 = sums[:4].tolist()
    if count == 0:
        return EvalResult(math.nan, math.nan)
    if not c:
        return EvalResult(loss_sum / count, correct / count)
    confusion = sums[4:].reshape(c, c).round().long().numpy()
    return EvalResult(loss_sum / count, correct / count, confusion, top5 / count)


@torch.inference_mode()
def predict_logits(
    forward: Callable[[torch.Tensor], torch.Tensor], loader: Iterable, ctx: StepContext
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels for every batch of ``loader`` on this rank (CPU tensors)."""
    outs, ys = [], []
    for x, y in loader:
        with autocast(ctx.precision, ctx.device):
            outs.append(forward(x).float().cpu())
        ys.append(y.cpu())
    return torch.cat(outs), torch.cat(ys)
