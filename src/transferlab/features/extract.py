"""Feature extraction through a frozen backbone, fast and sharded.

The backbone runs on an engine (features/engines.py: torch, OpenVINO or onnxruntime, chosen by
measurement). Each loader
batch is cut into the engine's batch, and each piece is resized and normalised (batched tensor
ops) just before the engine takes it; an async engine runs the previous pieces meanwhile. Under
DDP each rank extracts the indices r::world_size with its own engine and the full tensor is
reassembled in the original sample order. ``stop_requested()`` is polled before every piece.

Usage:
    choice = resolve_engine("auto", model.backbone, name, 224, dev, root, "auto", True)
    engine = build_engine(choice, model.backbone, 224, dev, root, weights_hash(model.backbone))
    feats, img_s = extract_with_engine(engine, prepare, loader, env, len(split),
                                       stop_requested=stop)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

import torch

from transferlab.distributed import DistEnv, all_gather_tensor
from transferlab.errors import TrainingStopped, UserError
from transferlab.features.engines import Engine
from transferlab.progress import progress as show_progress

log = logging.getLogger(__name__)


def _never() -> bool:
    return False


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
