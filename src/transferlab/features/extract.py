"""Feature extraction through a frozen backbone, fast and sharded.

Batched in-memory resize and normalise, ``inference_mode``, channels_last, and a precision
chosen by measuring fp32 against bf16 once per backbone and device (the choice is remembered
in the cache folder, so the cache key stays stable). Under DDP each rank extracts the indices
r::world_size and the full tensor is reassembled in the original sample order.

Usage:
    prec = choose_precision(model, size=224, device=dev, cache_root=root, requested="auto")
    feats = extract_features(model.features, prepare, loader, dev, prec, env, n_total=len(split))
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from transferlab.distributed import DistEnv, all_gather_tensor
from transferlab.errors import UserError
from transferlab.progress import progress as show_progress
from transferlab.train.precision import autocast, cpu_has_fast_bf16, resolve_precision

log = logging.getLogger(__name__)


@torch.inference_mode()
def extract_features(
    features: Callable[[torch.Tensor], torch.Tensor],
    prepare: Callable[[torch.Tensor], torch.Tensor],
    loader: Iterable,
    device: torch.device,
    precision: str,
    env: DistEnv,
    n_total: int,
    progress: bool = True,
    desc: str = "extract",
) -> tuple[torch.Tensor, float]:
    """Features (n_total, D) float32 on the CPU, in sample order; and the img/s achieved."""
    if n_total < env.world_size:  # a rank with no samples could not tell the others its feature size
        raise UserError(f"{desc}: {n_total} sample(s) cannot be sharded over {env.world_size} processes; "
                        "use fewer processes or a larger split (--val-size)")
    outs = []
    t0 = time.perf_counter()
    it = show_progress(loader, desc, progress and env.is_main)
    for x, _ in it:
        with autocast(precision, device):
            f = features(prepare(x))
        outs.append(f.float())
    local = torch.cat(outs) if outs else torch.zeros(0)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    parts = all_gather_tensor(local.to(device), env)  # rank r holds samples r::world_size
    full = torch.empty((n_total, local.shape[1]), dtype=torch.float32)
    for r, part in enumerate(parts):
        full[r::env.world_size] = part.cpu()
    return full, n_total / max(seconds, 1e-9)


def _bench(fn: Callable[[], torch.Tensor], device: torch.device, reps: int = 2) -> float:
    fn()  # warm-up (oneDNN/cuDNN pick kernels on the first call)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / reps


@torch.inference_mode()
def choose_precision(
    features: Callable[[torch.Tensor], torch.Tensor],
    arch: str,
    size: int,
    device: torch.device,
    cache_root: Path,
    requested: str,
    channels_last: bool,
) -> str:
    """Resolve the extraction precision; ``auto`` measures fp32 vs bf16 once and remembers it.

    bf16 autocast is ~3x fp32 for ResNet-18 on AMX CPUs, but depthwise-heavy nets gain less, so
    we measure rather than assume. On CUDA auto means bf16 (or fp16 without bf16 support).
    """
    if requested != "auto" or device.type == "cuda" or not cpu_has_fast_bf16():
        return resolve_precision(requested, device)
    memo = cache_root / "precision.json"
    tag = f"{arch}@{size}px/{device.type}/{torch.__version__}"
    try:
        known = json.loads(memo.read_text())
    except (OSError, ValueError):
        known = {}
    if tag in known and known[tag] in ("fp32", "bf16"):
        return known[tag]
    x = torch.randn(16, 3, size, size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    timings = {}
    for prec in ("fp32", "bf16"):
        def run(prec=prec):
            with autocast(prec, device):
                return features(x)
        timings[prec] = _bench(run, device)
    best = min(timings, key=timings.get)
    log.info("extraction precision for %s: fp32 %.3fs, bf16 %.3fs per 16 images -> %s",
             tag, timings["fp32"], timings["bf16"], best)
    known[tag] = best
    try:
        cache_root.mkdir(parents=True, exist_ok=True)
        memo.write_text(json.dumps(known, indent=1))
    except OSError:
        pass
    return best
