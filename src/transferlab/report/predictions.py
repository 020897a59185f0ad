"""Test-set predictions saved in the run dir, so reports need no model and no re-run.

``test_predictions.npz`` (numpy, loadable with ``allow_pickle=False``) holds, in test-set order:
``index`` (int64, position in the test split), ``true`` and ``pred`` (int64 class ids), ``prob``
(float32 softmax probability of ``pred``), ``top5`` (int64 (N, k) class ids, best first) and
``classes`` (str). For folder data the test files are listed in ``data_manifest.json``; for
CIFAR the index is the position in the official ``test`` file.

Written by ``transferlab.training.predictions`` at the end of a run.

Usage:
    p = load_predictions(RunDir(run_dir).predictions)
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from transferlab.errors import UserError

KEYS = ("index", "true", "pred", "prob", "top5", "classes")  # what every reader may use


def load_predictions(path: Path) -> dict[str, np.ndarray]:
    """Read ``test_predictions.npz`` (never unpickles); a clear error when it is missing."""
    if not path.is_file():
        raise UserError(
            f"{path} not found: it is written at the end of a run by this version of transferlab; "
            "rerun the training to get per-class results"
        )
    try:
        with np.load(path, allow_pickle=False) as z:
            preds = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # truncated, not an npz
        raise UserError(
            f"{path} is damaged ({type(e).__name__}: {e}); rerun the training to rewrite it"
        ) from None
    missing = sorted(set(KEYS) - set(preds))
    lengths = {len(preds[k]) for k in KEYS if k in preds and k != "classes"}
    if missing or len(lengths) > 1:
        why = f"no {', '.join(missing)}" if missing else "arrays of different lengths"
        raise UserError(f"{path} is damaged ({why}); rerun the training to rewrite it")
    return preds
