"""Test-set predictions saved in the run dir, so reports need no model and no re-run.

``test_predictions.npz`` (numpy, loadable with ``allow_pickle=False``) holds, in test-set order:
``index`` (int64, position in the test split), ``true`` and ``pred`` (int64 class ids), ``prob``
(float32 softmax probability of ``pred``), ``top5`` (int64 (N, k) class ids, best first) and
``classes`` (str). For folder data the test files are listed in ``data_manifest.json``; for
CIFAR the index is the position in the official ``test`` file.

Usage:
    loss, acc, preds = collect_predictions(test_forward, test_loader, ctx)
    save_predictions(run_dir / "test_predictions.npz", preds, classes)
    p = load_predictions(run_dir / "test_predictions.npz")
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from transferlab.distributed import all_gather_tensor
from transferlab.errors import UserError
from transferlab.train.loop import StepContext, predict_logits

FILENAME = "test_predictions.npz"


@torch.inference_mode()
def collect_predictions(forward: Callable[[torch.Tensor], torch.Tensor], loader, ctx: StepContext,
                        topk: int = 5) -> tuple[float, float, dict[str, np.ndarray]]:
    """Loss, accuracy and per-sample predictions over the whole (possibly sharded) eval loader.

    The loader must shard evaluation as r::world_size in order (TensorLoader and FolderLoader
    do), so the gathered rows are put back at their sample index.
    """
    logits, y = predict_logits(forward, loader, ctx)  # this rank's samples r::ws, CPU
    parts = all_gather_tensor(torch.cat([logits, y[:, None].float()], 1).to(ctx.device), ctx.env)
    n = sum(p.shape[0] for p in parts)
    ws = ctx.env.world_size
    full = torch.empty((n, logits.shape[1] + 1), dtype=torch.float32)
    for r, part in enumerate(parts):
        full[r::ws] = part.cpu()
    logits, y = full[:, :-1], full[:, -1].long()
    if n == 0:
        return math.nan, math.nan, {}
    loss = F.cross_entropy(logits, y, reduction="sum").item() / n
    probs = logits.softmax(1)
    k = min(topk, logits.shape[1])
    top_p, top_i = probs.topk(k, dim=1)
    pred = top_i[:, 0]
    acc = (pred == y).float().mean().item()
    preds = {"index": np.arange(n, dtype=np.int64), "true": y.numpy(), "pred": pred.numpy(),
             "prob": top_p[:, 0].numpy().astype(np.float32), "top5": top_i.numpy()}
    return loss, acc, preds


def save_predictions(path: Path, preds: dict[str, np.ndarray], classes: list[str]) -> None:
    """Write the predictions (and class names) as an npz without pickled objects."""
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, classes=np.array(classes, dtype=str), **preds)
    tmp.replace(path)


def load_predictions(path: Path) -> dict[str, np.ndarray]:
    """Read ``test_predictions.npz`` (never unpickles); a clear error when it is missing."""
    if not path.is_file():
        raise UserError(f"{path} not found: it is written at the end of a run by this version of transferlab; "
                        "rerun the training to get per-class results")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is unreadable ({e}); rerun the training to rewrite it") from None
