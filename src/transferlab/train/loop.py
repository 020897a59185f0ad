"""The epoch loop: ``train_one_epoch`` and ``evaluate``, as plain functions.

A batch source yields ``(x, y)`` on the device; ``forward(x)`` maps it to logits. That one
parameter covers every path: pixels (``model(preprocess(augment(x)))``), and cached features
(``head(f)``). Loss, accuracy and counts are summed on the device and all-reduced over DDP ranks,
so every sample counts exactly once.

Usage:
    stats = train_one_epoch(forward, loader, opt, sched, scaler, ctx)
    val_loss, val_acc = evaluate(forward, val_loader, ctx)
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from transferlab.distributed import DistEnv, all_reduce_sum
from transferlab.errors import TrainingStopped
from transferlab.progress import progress
from transferlab.train.precision import autocast

log = logging.getLogger(__name__)


@dataclass
class StepContext:
    """What every step needs besides the data: device, precision, DDP, loss settings, guards."""

    device: torch.device
    precision: str  # resolved: fp32 | bf16 | fp16
    env: DistEnv
    params: list[nn.Parameter]  # the trainable parameters (for clipping)
    label_smoothing: float = 0.0
    grad_clip: float = 0.0
    nan_patience: int = 0
    progress: bool = True
    stop_requested: Callable[[], bool] = field(default=lambda: False)
    nan_count: int = 0


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


def _agree(loss: torch.Tensor, ctx: StepContext) -> tuple[bool, bool]:
    """(loss finite on every rank, stop requested on any rank), decided alike on every rank.

    Under DDP one all-reduce per step: a rank that skipped a step or stopped alone (a signal
    seen by one process) would leave the others waiting in DDP's gradient all-reduce.
    """
    stop = ctx.stop_requested()
    if not ctx.env.enabled:
        return bool(torch.isfinite(loss.detach()).item()), stop
    flags = torch.stack([torch.isfinite(loss.detach()).float().reshape(()),
                         torch.tensor(float(stop), device=loss.device)])
    all_reduce_sum(flags, ctx.env)
    finite, stops = flags.tolist()
    return finite == ctx.env.world_size, stops > 0


def train_one_epoch(
    forward: Callable[[torch.Tensor], torch.Tensor],
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    scheduler,
    scaler: torch.amp.GradScaler,
    ctx: StepContext,
    stats: EpochStats | None = None,
    on_step: Callable[[EpochStats], None] | None = None,
    desc: str = "train",
) -> EpochStats:
    """Train over ``loader`` once; resume a partial epoch by passing its ``stats``.

    Batches before ``stats.step`` are drawn and skipped (so augmentation RNG stays in sync).
    ``on_step`` runs after every optimiser step (step checkpoints); a stop request (signal)
    ends the epoch early with ``interrupted=True``.
    """
    stats = stats or EpochStats()
    stats.interrupted = False  # a resumed partial epoch was interrupted before; it runs on now
    skip = stats.step
    # Running (loss_sum, correct, count) in float64. Rank 0 starts from a resumed partial epoch's
    # totals, so the additions happen in the same order (same bits) as in an uninterrupted epoch.
    start = [stats.loss_sum, stats.correct, stats.count] if ctx.env.is_main else [0.0, 0.0, 0.0]
    sums = torch.tensor(start, dtype=torch.float64, device=ctx.device)
    # On one GPU with --nan-patience 0 nothing is skipped, so the finiteness check need not sync
    # the host every step (a sync per step costs ~40% on small models): a device-side flag is read
    # before any checkpoint and at the epoch end, so non-finite weights are never saved.
    lazy = ctx.device.type == "cuda" and not ctx.env.enabled and ctx.nan_patience == 0
    bad = torch.zeros((), dtype=torch.bool, device=ctx.device)
    t0 = time.perf_counter()
    for i, (x, y) in enumerate(progress(loader, desc, ctx.progress and ctx.env.is_main)):
        if i < skip:
            continue
        with autocast(ctx.precision, ctx.device):
            logits = forward(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=ctx.label_smoothing)
        if lazy:
            bad |= ~torch.isfinite(loss.detach())
            finite, stop = True, ctx.stop_requested()
        else:
            finite, stop = _agree(loss, ctx)
        if not finite:
            ctx.nan_count += 1
            if ctx.nan_count > ctx.nan_patience:
                raise TrainingStopped(
                    f"{desc}: loss became {loss.item()} at step {stats.step + 1} of {len(loader)} "
                    f"({ctx.nan_count} non-finite step(s), --nan-patience {ctx.nan_patience}); "
                    "the last good checkpoint is kept. Lower --lr, add --grad-clip, or use --precision fp32."
                )
            log.warning("non-finite loss at step %d skipped (%d so far)", stats.step, ctx.nan_count)
            optimizer.zero_grad(set_to_none=True)
            stats.step += 1
            continue
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if ctx.grad_clip > 0:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(ctx.params, ctx.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        with torch.no_grad():  # no host->device copies here: they would sync every step
            n = y.shape[0]
            sums[0] += loss.detach().double() * n
            sums[1] += (logits.argmax(1) == y).sum()
            sums[2] += n
        stats.step += 1
        if on_step is not None or stop:
            _raise_if_bad(bad, desc, stats)
            _fold(stats, sums, ctx.env, t0)
            t0 = time.perf_counter()
            if on_step is not None:
                on_step(stats)
            if stop:
                stats.interrupted = True
                return stats
    _raise_if_bad(bad, desc, stats)
    _fold(stats, sums, ctx.env, t0)
    return stats


def _raise_if_bad(bad: torch.Tensor, desc: str, stats: EpochStats) -> None:
    if bool(bad.item()):
        raise TrainingStopped(
            f"{desc}: the loss became non-finite before step {stats.step} (checked lazily on the GPU); "
            "the last good checkpoint is kept. Lower --lr, add --grad-clip, or use --precision fp32."
        )


def _fold(stats: EpochStats, sums: torch.Tensor, env: DistEnv, t0: float) -> None:
    """Set the epoch totals from the running sums (all-reduced: every rank gets the global ones)."""
    stats.loss_sum, stats.correct, stats.count = all_reduce_sum(sums.clone(), env).tolist()
    stats.seconds += time.perf_counter() - t0


@torch.inference_mode()
def evaluate(
    forward: Callable[[torch.Tensor], torch.Tensor], loader: Iterable, ctx: StepContext, desc: str = "eval"
) -> tuple[float, float]:
    """Mean loss (without label smoothing) and accuracy over every sample, exactly once."""
    sums = torch.zeros(3, dtype=torch.float64, device=ctx.device)
    for x, y in progress(loader, desc, ctx.progress and ctx.env.is_main):
        with autocast(ctx.precision, ctx.device):
            logits = forward(x)
        loss = F.cross_entropy(logits.float(), y, reduction="sum")
        sums[0] += loss.double()
        sums[1] += (logits.argmax(1) == y).sum()
        sums[2] += y.shape[0]
    loss_sum, correct, count = all_reduce_sum(sums, ctx.env).tolist()
    if count == 0:
        return math.nan, math.nan
    return loss_sum / count, correct / count


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
