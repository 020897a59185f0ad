"""Feature extraction through a frozen backbone, fast and sharded.

The backbone runs on an engine (features/engines.py: torch, OpenVINO or onnxruntime, chosen by
measurement) or, with the old signature, as a plain callable under torch autocast. Each loader
batch is cut into the engine's batch, and each piece is resized and normalised (batched tensor
ops) just before the engine takes it; an async engine runs the previous pieces meanwhile. Under
DDP each rank extracts the indices r::world_size with its own engine and the full tensor is
reassembled in the original sample order. ``stop_requested()`` is polled before every piece.

Usage:
    choice = resolve_engine("auto", model.backbone, name, 224, dev, root, "auto", True)
    engine = build_engine(choice, model.backbone, 224, dev, root, weights_hash(model.backbone))
    feats, img_s = extract_features(engine, prepare, loader, env=env, n_total=len(split),
                                    stop_requested=stop)
    # old form, still supported: a callable and its precision
    prec = choose_precision(model.features, name, 224, dev, root, "auto", channels_last=True)
    feats, img_s = extract_features(model.features, prepare, loader, dev, prec, env, len(split))
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from transferlab.distributed import DistEnv, all_gather_tensor
from transferlab.errors import TrainingStopped, UserError
from transferlab.features import cache as fcache
from transferlab.features.engines import GPU_BATCH as DEFAULT_GPU_BATCH
from transferlab.features.engines import Engine, EngineChoice, TorchEngine, reuse_freed_memory
from transferlab.progress import progress as show_progress
from transferlab.training.precision import autocast, cpu_has_fast_bf16, resolve_precision

log = logging.getLogger(__name__)

DEFAULT_CPU_BATCH = 32  # images per forward of a plain callable on the CPU (see engines.py)


def _never() -> bool:
    return False


def _as_engine(features, device: torch.device, precision: str) -> Engine:
    """An Engine as is; a plain ``features`` callable becomes a torch engine (old signature)."""
    if hasattr(features, "map") and hasattr(features, "choice"):
        return features
    if device.type == "cpu":
        reuse_freed_memory()
    batch = DEFAULT_CPU_BATCH if device.type == "cpu" else DEFAULT_GPU_BATCH
    return TorchEngine(features, EngineChoice("torch", precision, batch), device)


def _stop_error(desc: str, stop_requested: Callable[[], bool]) -> TrainingStopped:
    return TrainingStopped(
        f"{desc}: stopped on request; nothing of this split was cached. "
        "Rerun the same command to continue (splits already cached are reused)",
        exit_code=getattr(stop_requested, "exit_code", 130),
    )


def extract_with_engine(
    engine: Engine,
    prepare: Callable[[torch.Tensor], torch.Tensor],
    loader: Iterable,
    env: DistEnv,
    n_total: int,
    progress: bool = True,
    desc: str = "extract",
    stop_requested: Callable[[], bool] = _never,
) -> tuple[torch.Tensor, float]:
    """Features (n_total, D) float32 on the CPU, in sample order; and the img/s achieved.

    Each loader batch (uint8, this rank's samples r::world_size) is cut into pieces of
    ``engine.choice.batch_size`` images, each prepared (resize + normalise) just before the engine
    takes it: no full-batch float copy at the model size is made. ``stop_requested()`` is checked
    before every piece; when true, TrainingStopped is raised and nothing is returned.
    """
    if n_total < env.world_size:  # a rank with no samples could not tell the others its size
        raise UserError(
            f"{desc}: {n_total} sample(s) cannot be sharded over {env.world_size} "
            "processes; use fewer processes or a larger split (--val-size)"
        )
    chunk = engine.choice.batch_size
    t0 = time.perf_counter()
    it = show_progress(loader, desc, progress and env.is_main)

    def prepared():  # consumed by the engine; an async engine runs earlier pieces meanwhile
        for x, _ in it:
            for part in x.split(chunk):
                if stop_requested():
                    raise _stop_error(desc, stop_requested)
                yield prepare(part)

    with torch.inference_mode():
        local = _fill(engine.map(prepared()), len(range(env.rank, n_total, env.world_size)))
    if env.device.type == "cuda":
        torch.cuda.synchronize(env.device)
    seconds = time.perf_counter() - t0
    parts = all_gather_tensor(local.to(env.device), env)  # rank r holds samples r::world_size
    full = torch.empty((n_total, local.shape[1]), dtype=torch.float32)
    for r, part in enumerate(parts):
        full[r :: env.world_size] = part.cpu()
    return full, n_total / max(seconds, 1e-9)


def _fill(feature_batches: Iterable[torch.Tensor], n_expected: int) -> torch.Tensor:
    """Concatenate batches into one buffer allocated once (no list of parts, no final cat)."""
    out, pos = None, 0
    for f in feature_batches:
        n = f.shape[0]
        if out is None:
            out = torch.empty((max(n_expected, n), f.shape[1]), dtype=torch.float32)
        if pos + n > out.shape[0]:  # a loader that pads its shard: grow
            out = torch.cat([out, out.new_empty((pos + n - out.shape[0], out.shape[1]))])
        out[pos : pos + n] = f
        pos += n
    return out[:pos] if out is not None else torch.zeros(0)


def extract_features(  # noqa: PLR0913 - the pre-engine signature, kept for its callers
    features: Engine | Callable[[torch.Tensor], torch.Tensor],
    prepare: Callable[[torch.Tensor], torch.Tensor],
    loader: Iterable,
    device: torch.device,
    precision: str,
    env: DistEnv,
    n_total: int,
    progress: bool = True,
    desc: str = "extract",
    stop_requested: Callable[[], bool] = _never,
) -> tuple[torch.Tensor, float]:
    """:func:`extract_with_engine` for an Engine, or for a plain ``features`` callable run by
    torch under ``precision`` autocast in pieces of DEFAULT_CPU_BATCH (CPU) images."""
    engine = _as_engine(features, device, precision)
    return extract_with_engine(
        engine, prepare, loader, env, n_total, progress, desc, stop_requested
    )


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
    memo = cache_root / fcache.PRECISION_MEMO
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
    log.info(
        "extraction precision for %s: fp32 %.3fs, bf16 %.3fs per 16 images -> %s",
        tag,
        timings["fp32"],
        timings["bf16"],
        best,
    )
    known[tag] = best
    try:
        cache_root.mkdir(parents=True, exist_ok=True)
        memo.write_text(json.dumps(known, indent=1))
    except OSError:
        pass
    return best
