"""Optimisers and per-step learning-rate schedules.

The optimiser sees only parameters that train. Norms and biases (every parameter with
ndim <= 1) get no weight decay. In finetune/gradual modes the backbone trains at
``lr / backbone_lr_div`` (discriminative learning rates, as in fastai/ULMFiT).

Usage:
    opt = build_optimizer(model, ocfg, backbone_lr_div=10.0)
    sched = build_scheduler(opt, ocfg, steps_per_epoch=225, epochs=10)
"""

from __future__ import annotations

import math

import torch
from torch import nn

from transferlab.config import OptimConfig
from transferlab.errors import UserError


def param_groups(
    model: nn.Module, lr: float, weight_decay: float, backbone_lr_div: float
) -> list[dict]:
    """Trainable parameters split by (backbone|head) x (decay|no-decay), with their lr."""
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part = "backbone" if name.startswith("backbone.") else "head"
        decay = p.ndim > 1  # weights of convs/linears decay; norms and biases do not
        groups.setdefault((part, decay), []).append(p)
    out = []
    for (part, decay), params in sorted(groups.items()):
        group_lr = lr / backbone_lr_div if part == "backbone" else lr
        out.append(
            {
                "params": params,
                "lr": group_lr,
                "weight_decay": weight_decay if decay else 0.0,
                "name": f"{part}{'' if decay else '_no_decay'}",
            }
        )
    if not out:
        raise UserError("nothing to train: every parameter is frozen")
    return out


def build_optimizer(
    model: nn.Module, cfg: OptimConfig, backbone_lr_div: float
) -> torch.optim.Optimizer:
    """Adam (the seed's), AdamW, or SGD with Nesterov momentum over the trainable groups."""
    groups = param_groups(model, cfg.lr, cfg.weight_decay, backbone_lr_div)
    # One fused kernel per step on CUDA instead of one launch per tensor (small models are
    # launch-bound there); the CPU keeps the default implementation.
    fused = {"fused": True} if all(p.is_cuda for g in groups for p in g["params"]) else {}
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, **fused)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, **fused)
    return torch.optim.SGD(
        groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0, **fused
    )


def build_scheduler(
    opt: torch.optim.Optimizer, cfg: OptimConfig, steps_per_epoch: int, epochs: int
):
    """A per-optimiser-step schedule over ``epochs`` epochs: constant, cosine or OneCycle."""
    total = max(1, steps_per_epoch * epochs)
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    if cfg.schedule == "onecycle":
        pct = min(0.9, max(warmup / total, 0.05)) if warmup else 0.25
        return torch.optim.lr_scheduler.OneCycleLR(
            opt,
            max_lr=[g["lr"] for g in opt.param_groups],
            total_steps=total,
            pct_start=pct,
            cycle_momentum=cfg.optimizer == "sgd",
        )
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(opt, _WarmupCosine(warmup, total))
    return torch.optim.lr_scheduler.LambdaLR(opt, _Constant())


class _Constant:
    def __call__(self, step: int) -> float:
        return 1.0


class _WarmupCosine:
    """Linear warm-up from 1/warmup to 1, then cosine decay to 0 at ``total`` steps."""

    def __init__(self, warmup: int, total: int):
        self.warmup, self.total = warmup, total

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
