"""Linear probe: full-batch L-BFGS multinomial logistic regression on cached features.

The protocol of Kornblith et al. 2019 ("Do Better ImageNet Models Transfer Better?") and
SimCLR's linear evaluation: fit an L2-regularised softmax classifier on frozen features, with
the L2 strength picked on the validation split, then report test accuracy. Features are
standardised for a well-conditioned problem and the scaling is folded back into the linear
head, so the saved model takes raw features like any other head.

Usage:
    transferlab train --model timm:tf_efficientnet_lite0 --head linear --solver lbfgs
"""

from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F

from transferlab.classmetrics import balanced_accuracy, confusion_matrix
from transferlab.distributed import unwrap
from transferlab.errors import UserError
from transferlab.metrics import append_metrics, epoch_row
from transferlab.rundir import RunDir
from transferlab.training.fit import FitState, Job, link_best, save_checkpoint, selection_score
from transferlab.training.loop import OptimParts

log = logging.getLogger(__name__)

L2_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 3e-2, 1e-1)  # per-sample-averaged loss + l2/2 * ||W||^2


def lbfgs_logreg(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    l2: float,
    max_iter: int = 100,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit W (C, D), b (C,) minimising mean cross-entropy + l2/2 ||W||^2 with full-batch L-BFGS."""
    d = x.shape[1]
    w = (
        torch.zeros(num_classes, d, dtype=x.dtype, device=x.device)
        if init is None
        else init[0].clone()
    )
    b = (
        torch.zeros(num_classes, dtype=x.dtype, device=x.device)
        if init is None
        else init[1].clone()
    )
    w.requires_grad_(True)
    b.requires_grad_(True)
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1,
        max_iter=max_iter,
        history_size=20,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-6,
        tolerance_change=1e-9,
    )

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(torch.addmm(b, x, w.t()), y) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


def _linear_layer(head: torch.nn.Module) -> torch.nn.Linear:
    layers = [m for m in head.modules() if isinstance(m, torch.nn.Linear)]
    if len(layers) != 1:
        raise UserError("--solver lbfgs fits a linear head; add --head linear")
    return layers[0]


def _split_tensors(loader) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = loader.images.float(), loader.labels
    if x.dim() == 3:  # (N, K, D) augmented views: every view is a training sample
        k = x.shape[1]
        return x.reshape(-1, x.shape[-1]), y.repeat_interleave(k)
    return x, y


def fit_linear_probe(job: Job, state: FitState, opt: OptimParts) -> FitState:
    """Pick the L2 strength on validation accuracy, load the fitted weights into the head.

    ``opt`` is only saved in the checkpoint (the probe has no optimiser steps), so a probe run's
    checkpoints have the same shape as any other run's.
    """
    linear = _linear_layer(unwrap(job.model.head))
    x, y = _split_tensors(job.pipe.train_loader)
    xv, yv = job.pipe.val_loader.images.float(), job.pipe.val_loader.labels
    mu, sigma = x.mean(0), x.std(0)
    sigma = sigma.clamp_min(
        1e-3 * sigma.mean().item() + 1e-8
    )  # near-constant features stay well-conditioned
    xs, xvs = (x - mu) / sigma, (xv - mu) / sigma
    c = len(job.data.classes)
    t0 = time.perf_counter()
    trials, best, init = [], None, None
    for l2 in sorted(L2_GRID, reverse=True):  # strong to weak, warm-starting each fit
        w, b = lbfgs_logreg(xs, y, c, l2, init=init)
        init = (w, b)
        with torch.no_grad():
            logits = torch.addmm(b, xvs, w.t())
            val_loss = F.cross_entropy(logits, yv).item()
            val_acc = (logits.argmax(1) == yv).float().mean().item()
            val_bal = balanced_accuracy(confusion_matrix(yv, logits.argmax(1), c))
        trials.append({"l2": l2, "val_loss": round(val_loss, 5), "val_acc": round(val_acc, 5)})
        log.info("lbfgs probe: l2 %.0e -> val acc %.4f", l2, val_acc)
        score = selection_score(job.cfg.optim.select_by, val_acc, val_bal)
        if best is None or score > best[0]:
            best = (score, val_acc, val_bal, val_loss, l2, w, b)
    score, val_acc, val_bal, val_loss, l2, w, b = best
    if l2 in (min(L2_GRID), max(L2_GRID)):
        log.warning("lbfgs probe: the best L2 (%g) is at the edge of the grid %s", l2, L2_GRID)
    with torch.no_grad():  # fold the standardisation in: W' = W / sigma, b' = b - W' mu
        w_raw = w / sigma
        linear.weight.copy_(w_raw)
        linear.bias.copy_(b - w_raw @ mu)
        train_logits = linear(x)
        train_loss = F.cross_entropy(train_logits, y).item()
        train_acc = (train_logits.argmax(1) == y).float().mean().item()
    seconds = time.perf_counter() - t0
    state.epoch, state.best_epoch, state.best_val_acc, state.best_score = 1, 1, val_acc, score
    state.train_s += seconds
    state.stop_reason = f"L-BFGS probe, l2 {l2:g} chosen on validation"
    state.probe = {"l2": l2, "trials": trials, "seconds": round(seconds, 2)}
    if job.env.is_main:  # the row's lr column holds the chosen L2
        append_metrics(
            job.files.metrics,
            epoch_row(
                1,
                (train_loss, train_acc),
                (val_loss, val_acc),
                l2,
                seconds,
                len(y) * len(trials) / max(seconds, 1e-9),
                val_balanced_acc=val_bal,
            ),
        )
        save_checkpoint(job, state, opt, RunDir.LAST)
        link_best(job, state, opt)
        job.commit_run_dir()
    return state
