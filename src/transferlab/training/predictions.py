"""Test-set predictions of a run: collected after training, saved in the run dir.

The file format is described in ``transferlab.report.predictions`` (which reads it).

Usage:
    loss, acc, preds = collect_predictions(test_forward, test_loader, ctx)
    save_predictions(RunDir(run_dir).predictions, preds, classes)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from transferlab.distributed import gather_in_sample_order
from transferlab.io import write_atomic
from transferlab.training.loop import StepContext, predict_logits


@torch.inference_mode()
def collect_predictions(
    forward: Callable[[torch.Tensor], torch.Tensor], loader, ctx: StepContext, topk: int = 5
) -> tuple[float, float, dict[str, np.ndarray]]:
    """Loss, accuracy and per-sample predictions over the whole (possibly sharded) eval loader.

    The loader must shard evaluation as r::world_size in order (TensorLoader and FolderLoader
    do), so the gathered rows are put back at their sample index.
    """
    logits, y = predict_logits(forward, loader, ctx)  # this rank's samples r::ws, CPU
    local = torch.cat([logits, y[:, None].float()], 1).to(ctx.device)
    full = gather_in_sample_order(local, ctx.env)
    n = full.shape[0]
    logits, y = full[:, :-1], full[:, -1].long()
    if n == 0:
        return math.nan, math.nan, {}
    loss = F.cross_entropy(logits, y, reduction="sum").item() / n
    probs = logits.softmax(1)
    k = min(topk, logits.shape[1])
    top_p, top_i = probs.topk(k, dim=1)
    pred = top_i[:, 0]
    acc = (pred == y).float().mean().item()
    preds = {
        "index": np.arange(n, dtype=np.int64),
        "true": y.numpy(),
        "pred": pred.numpy(),
        "prob": top_p[:, 0].numpy().astype(np.float32),
        "top5": top_i.numpy(),
    }
    return loss, acc, preds


def save_predictions(path: Path, preds: dict[str, np.ndarray], classes: list[str]) -> None:
    """Write the predictions (and class names) as an npz without pickled objects."""
    classes = np.array(classes, dtype=str)
    write_atomic(path, lambda f: np.savez_compressed(f, classes=classes, **preds))
