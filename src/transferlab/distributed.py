"""Everything DDP lives here: init from the torchrun environment, reductions, rank-0 gating.

torchrun is the engine (one or many GPUs, one or many nodes); we build no launcher. Without
torchrun's variables this module describes a single process, and every helper is a no-op.

Usage:
    dist_env = init_distributed(device="auto", timeout_s=600)
    model = wrap_ddp(model, dist_env)
    totals = all_reduce_sum(torch.tensor([loss_sum, correct, count]), dist_env)
    if dist_env.is_main: write_files()
    cleanup(dist_env)
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from transferlab.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Only rank 0 writes logs, checkpoints, plots and reports."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> cuda:<local_rank> if available else cpu; validates explicit choices."""
    if device == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {device} asked for, but no CUDA GPU is available; use --device cpu")
        if device == "cuda":
            return torch.device(f"cuda:{local_rank}")
    return torch.device(device)


def init_distributed(device: str, timeout_s: float = 600.0) -> DistEnv:
    """Initialise the process group if torchrun's variables are set (nccl on CUDA, gloo on CPU).

    ``timeout_s`` bounds every collective, so a dead or stuck rank ends the job with an error
    instead of a hang.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv(device=resolve_device(device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    log.info("DDP rank %d/%d on %s (%s)", rank, world, dev, backend)
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def cleanup(env: DistEnv) -> None:
    """Destroy the process group (safe to call when none exists)."""
    if env.enabled and dist.is_initialized():
        dist.destroy_process_group()


def wrap_ddp(model: nn.Module, env: DistEnv, sync_bn: bool = False) -> nn.Module:
    """Wrap for DDP when running distributed; otherwise return the model unchanged."""
    if not env.enabled:
        return model
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [env.device.index] if env.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model under DDP and torch.compile wrappers (what checkpoints must hold)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def all_reduce_sum(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum a tensor over ranks (in place when distributed); returns it."""
    if env.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj, env: DistEnv):
    """Rank 0's ``obj`` on every rank."""
    if not env.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_tensor(t: torch.Tensor, env: DistEnv) -> list[torch.Tensor]:
    """Gather tensors of possibly different first dimension from every rank (rank order)."""
    if not env.enabled:
        return [t]
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(env.world_size)]
    dist.all_gather(sizes, n)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    out = [torch.zeros_like(padded) for _ in range(env.world_size)]
    dist.all_gather(out, padded)
    return [o[: int(s.item())] for o, s in zip(out, sizes, strict=True)]


def barrier(env: DistEnv) -> None:
    """Wait for every rank."""
    if env.enabled:
        dist.barrier()
