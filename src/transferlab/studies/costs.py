"""What a model costs per image: forward MACs, parameters, and inference img/s measured here.

MACs come from ``torch.utils.flop_counter.FlopCounterMode`` (no extra dependency): it counts
the FLOPs of matmuls and convolutions of one forward pass, and one multiply-accumulate is two
FLOPs. Inference speed is timed on this machine after one warm-up batch, in the precision and
memory layout the runs use (bf16 autocast on CPUs that have it; channels_last where the plan picks
it: the default layout costs about 2x on this CPU's oneDNN convolutions).

Usage:
    cost = model_cost(model, image_size=224, batch=16, channels_last=True)
    cost.macs, cost.params_total, cost.img_s
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelCost:
    """Per-image forward cost of one model at one input size."""

    macs: int  # multiply-accumulates of one image's forward pass (FLOPs / 2)
    params_total: int
    params_trainable: int
    img_s: float  # inference images per second on this machine (batch ``batch``)
    image_size: int
    batch: int

    def to_dict(self) -> dict:
        return asdict(self)


def forward_macs(model: nn.Module, image_size: int) -> int:
    """MACs of one 3 x image_size x image_size image through ``model`` (eval mode, fp32)."""
    was_training = model.training
    model.eval()
    x = torch.zeros(1, 3, image_size, image_size, device=next(model.parameters()).device)
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops() // 2)


def inference_img_s(
    model: nn.Module,
    image_size: int,
    batch: int = 16,
    rounds: int = 3,
    precision: str = "fp32",
    channels_last: bool = False,
) -> float:
    """Images per second of ``model`` on a random batch (best of ``rounds`` after a warm-up).

    ``channels_last`` converts the model (in place, as the runs do) and the batch.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    x = torch.randn(batch, 3, image_size, image_size, device=device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    dtype = torch.bfloat16 if precision == "bf16" else None
    best = float("inf")
    try:
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            model(x)  # warm-up (allocations, oneDNN kernel choice)
            for _ in range(rounds):
                t0 = time.perf_counter()
                model(x)
                best = min(best, time.perf_counter() - t0)
    finally:
        model.train(was_training)
    return batch / best


def model_cost(
    model: nn.Module,
    image_size: int,
    batch: int = 16,
    precision: str = "fp32",
    channels_last: bool = False,
) -> ModelCost:
    """MACs, parameters and inference speed of ``model`` at ``image_size``."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return ModelCost(
        macs=forward_macs(model, image_size),
        params_total=total,
        params_trainable=trainable,
        img_s=round(
            inference_img_s(
                model, image_size, batch, precision=precision, channels_last=channels_last
            ),
            1,
        ),
        image_size=image_size,
        batch=batch,
    )
