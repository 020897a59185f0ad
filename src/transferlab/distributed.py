"""Everything DDP lives here: init from the torchrun environment, reductions, rank-0 gating.

torchrun is the engine (one or many GPUs, one or many nodes): it launches the processes, runs
the rendezvous and sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT. DDP all-reduces
gradients. Our code shards the data (TensorLoader), reduces metrics, and lets only rank 0
write. Without torchrun's variables this module describes a single process, and every
helper is a no-op. See docs/distributed.md.

Failure policy: every collective has a timeout (``TRANSFERLAB_DIST_TIMEOUT`` seconds, default
600), so a dead or stuck rank ends the job with an error, never a hang; errors a user can fix
(:class:`UserError`, :class:`TrainingStopped`) raised on one rank inside :func:`run_checked`
are raised on every rank, so all ranks exit with the same one-line message.

Usage:
    dist_env = init_distributed(device="auto")
    model = wrap_ddp(model, dist_env)
    totals = all_reduce_sum(torch.tensor([loss_sum, correct, count]), dist_env)
    run_checked(lambda: write_files(), dist_env, main_only=True)   # rank 0 writes, all see errors
    cleanup(dist_env)
"""

from __future__ import annotations

import datetime
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

from transferlab.errors import TrainingStopped, UserError

log = logging.getLogger(__name__)

T = TypeVar("T")

TIMEOUT_ENV = "TRANSFERLAB_DIST_TIMEOUT"  # seconds every collective may wait (default 600)
FAIL_RANK_ENV = "TRANSFERLAB_FAIL_RANK"  # debugging aid: this rank raises right after joining
DEFAULT_TIMEOUT_S = 600.0


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
        return (
            torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
        )
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(
                f"--device {device} asked for, but no CUDA GPU is available; use --device cpu"
            )
        if device == "cuda":
            if local_rank >= torch.cuda.device_count():
                raise UserError(
                    f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible); "
                    "start at most that many processes per node (--nproc-per-node)"
                )
            return torch.device(f"cuda:{local_rank}")
    if device != "cpu" and not device.startswith("cuda:"):
        raise UserError(f"--device must be auto, cpu, cuda or cuda:N; got {device!r}")
    try:
        return torch.device(device)
    except RuntimeError:  # e.g. "cuda:x"
        raise UserError(f"--device must be auto, cpu, cuda or cuda:N; got {device!r}") from None


def dist_timeout_s(default: float = DEFAULT_TIMEOUT_S) -> float:
    """Collective timeout in seconds: ``$TRANSFERLAB_DIST_TIMEOUT`` or ``default``."""
    raw = os.environ.get(TIMEOUT_ENV, "")
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise UserError(
            f"{TIMEOUT_ENV}={raw!r} is not a positive number of seconds; e.g. {TIMEOUT_ENV}=600"
        )
    return value


def init_distributed(device: str, timeout_s: float | None = None) -> DistEnv:
    """Initialise the process group if torchrun's variables are set (nccl on CUDA, gloo on CPU).

    ``timeout_s`` (default: :func:`dist_timeout_s`) bounds every collective, so a dead or stuck
    rank ends the job with an error instead of a hang.

    Example:
        >>> init_distributed("cpu").world_size   # without torchrun: one process, no group
        1
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv(device=resolve_device(device))
    if "RANK" not in os.environ or "MASTER_ADDR" not in os.environ:
        raise UserError(
            "WORLD_SIZE is set but RANK/MASTER_ADDR are not; start the job with torchrun "
            "(torchrun --nproc-per-node N -m transferlab ...) or unset WORLD_SIZE"
        )
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    timeout = timeout_s if timeout_s is not None else dist_timeout_s()
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout))
    env = DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=dev)
    log.info(
        "DDP rank %d/%d on %s (%s, collective timeout %.0f s)", rank, world, dev, backend, timeout
    )
    if os.environ.get(FAIL_RANK_ENV, "") == str(rank):
        raise RuntimeError(
            f"rank {rank}: failure injected by {FAIL_RANK_ENV}={rank} (testing teardown)"
        )
    return env


def cleanup(env: DistEnv | None = None) -> None:
    """Destroy the process group (safe to call when none exists).

    Every rank first meets at a barrier: a rank that tears its group down (rank 0 hosts the
    rendezvous store) while another is still finishing could abort that one (seen as gloo's
    "terminate called without an active exception"). A barrier that fails (a rank already gone)
    is ignored: the group is torn down regardless.
    """
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        except Exception as e:  # noqa: BLE001 - teardown must not raise over the real outcome
            log.warning("barrier before leaving the process group failed (%s); leaving anyway", e)
        dist.destroy_process_group()


def wrap_ddp(model: nn.Module, env: DistEnv, sync_bn: bool = False) -> nn.Module:
    """Wrap for DDP when running distributed; otherwise return the model unchanged.

    DDP registers the parameters that require grad *now*: after freezing or unfreezing, call
    :func:`rewrap_ddp`. ``sync_bn`` converts BatchNorm layers in place to SyncBatchNorm (batch
    statistics over the global batch, as one process would compute them).
    """
    if not env.enabled:
        return model
    if sync_bn:
        if env.device.type != "cuda":  # DDP refuses SyncBatchNorm on CPU modules
            raise UserError(
                "--sync-bn needs CUDA GPUs (PyTorch's SyncBatchNorm is GPU-only); drop --sync-bn "
                "on CPU, where each process normalises with its own share of the batch"
            )
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [env.device.index] if env.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def rewrap_ddp(module: nn.Module, env: DistEnv) -> nn.Module:
    """A fresh DDP (and torch.compile, if it had one) around the same bare module.

    Needed whenever ``requires_grad`` changes (gradual unfreezing): a DDP built while the
    backbone was frozen would never all-reduce the backbone's gradients, and the ranks' weights
    would silently drift apart.
    """
    compiled = hasattr(module, "_orig_mod")
    inner = module._orig_mod if compiled else module
    if not env.enabled or not isinstance(inner, nn.parallel.DistributedDataParallel):
        return module
    ids = [env.device.index] if env.device.type == "cuda" else None
    fresh = nn.parallel.DistributedDataParallel(inner.module, device_ids=ids)
    return torch.compile(fresh) if compiled else fresh


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


def broadcast_object(obj: T, env: DistEnv) -> T:
    """Rank 0's ``obj`` (any picklable value, None included) on every rank."""
    if not env.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@torch.no_grad()
def broadcast_module(module: nn.Module, env: DistEnv, buffers_only: bool = False) -> None:
    """Copy rank 0's parameters and buffers (or only buffers) into ``module`` on every rank.

    Used to share the best weights rank 0 loaded, a frozen backbone's weights before feature
    extraction, and BatchNorm running statistics before evaluation (each rank's last training
    forward updated its own; rank 0's are the ones its checkpoint holds).
    """
    if not env.enabled:
        return
    tensors = list(module.buffers()) if buffers_only else list(module.state_dict().values())
    for t in tensors:
        dist.broadcast(t, src=0)


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


# Multiplier that spreads (seed + epoch) apart before adding the rank, so that rank r of epoch e
# never shares an augmentation stream with rank r' of epoch e'.
_RANK_STRIDE = 1_000_003


def shard_order(
    n: int,
    shuffle: bool,
    seed: int,
    epoch: int,
    rank: int,
    world_size: int,
    drop_last: bool = False,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """This rank's sample indices for one epoch (int64, CPU): the one DDP shard order.

    shuffle: one permutation seeded by ``seed + epoch`` (same on every rank), wrap-padded to a
    multiple of ``world_size`` (or trimmed when ``drop_last``); rank r takes positions
    r::world_size, so shards are equal and disjoint (as DistributedSampler), and the shards of a
    global batch are the single-process batch. No shuffle (evaluation): r::world_size in order,
    each sample exactly once across ranks (shard sizes may differ by one). ``weights`` (N,)
    (``--balance sampler``): the epoch's n samples are drawn with replacement in proportion to
    them instead of permuted, from the same seed on every rank.
    """
    if not shuffle:
        return torch.arange(rank, n, world_size)
    g = torch.Generator().manual_seed(seed + epoch)
    if weights is not None:
        order = torch.multinomial(weights.double().cpu(), n, replacement=True, generator=g)
    else:
        order = torch.randperm(n, generator=g)
    per_rank = n // world_size if drop_last else math.ceil(n / world_size)
    total = per_rank * world_size
    if total > n:  # wrap-pad with the permutation's start (repeat covers n < world_size)
        order = order.repeat(math.ceil(total / n))
    return order[:total][rank:total:world_size]


def augment_seed(seed: int, epoch: int, rank: int) -> int:
    """Seed of a rank's augmentation stream for one epoch (distinct per (seed + epoch, rank))."""
    return (seed + epoch) * _RANK_STRIDE + rank


def gather_in_sample_order(
    local: torch.Tensor, env: DistEnv, n_total: int | None = None
) -> torch.Tensor:
    """Reassemble per-rank rows (rank r holds samples r::world_size) into sample order, on the CPU.

    The inverse of the evaluation shard order, shared by feature extraction and predictions.
    """
    parts = all_gather_tensor(local, env)
    n_total = sum(p.shape[0] for p in parts) if n_total is None else n_total
    full = torch.empty((n_total, *local.shape[1:]), dtype=local.dtype)
    for r, part in enumerate(parts):
        full[r :: env.world_size] = part.cpu()
    return full


def all_ranks_true(flag: bool, env: DistEnv) -> bool:
    """True on every rank iff ``flag`` is true on every rank (one tiny all-reduce)."""
    if not env.enabled:
        return flag
    t = torch.tensor([0.0 if flag else 1.0], device=env.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.item() == 0


def run_checked(fn: Callable[[], T], env: DistEnv, main_only: bool = False) -> T | None:
    """Call ``fn`` (on rank 0 only if ``main_only``); a user-facing error on any rank is raised
    on all.

    Rank 0 checking the run dir, or one node missing the data, would otherwise leave the other
    ranks waiting in their next collective until the timeout. Also acts as a barrier.

    Example:
        run_checked(lambda: prepare_run_dir(run_dir, resume, overwrite), env, main_only=True)
    """
    if not env.enabled:
        return fn()
    result, err = None, None
    if env.is_main or not main_only:
        try:
            result = fn()
        except UserError as e:
            err = ("user", str(e), 2)
        except TrainingStopped as e:
            err = ("stopped", str(e), e.exit_code)
    errors = [None] * env.world_size
    dist.all_gather_object(errors, err)
    for rank, e in enumerate(errors):
        if e is not None:
            kind, msg, code = e
            msg = msg if rank == env.rank else f"rank {rank}: {msg}"
            raise UserError(msg) if kind == "user" else TrainingStopped(msg, code)
    return result


def describe_dist_error(e: BaseException) -> str | None:
    """A one-line explanation if ``e`` comes from a failed collective, else None."""
    if not (dist.is_available() and dist.is_initialized()):
        return None  # a single process: no peers to lose
    dist_errors = tuple(c for c in (getattr(dist, "DistError", None),) if c is not None)
    text = str(e)
    markers = (
        "Connection closed by peer",
        "Connection reset by peer",
        "timed out",
        "Timed out",
        "Socket Timeout",
        "NCCL",
        "gloo",
        "ProcessGroup",
        "Broken pipe",
    )
    if not (
        isinstance(e, dist_errors)
        or (isinstance(e, RuntimeError) and any(m in text for m in markers))
    ):
        return None
    first = text.strip().splitlines()[0][:300] if text.strip() else type(e).__name__
    return (
        "lost contact with the other processes of this distributed job "
        f"({type(e).__name__}: {first}). "
        "Another rank failed (see its error above) or did not answer within the collective timeout "
        f"(${TIMEOUT_ENV}, default {DEFAULT_TIMEOUT_S:.0f} s); fix that rank's problem and "
        "restart, "
        "or resume with --resume RUN_DIR"
    )


def barrier(env: DistEnv) -> None:
    """Wait for every rank."""
    if env.enabled:
        dist.barrier()
