"""Per-class metrics from a confusion matrix: what one top-1 number hides on imbalanced data.

Everything derives from one (C, C) confusion matrix (rows: true class, columns: predicted),
which the evaluation loop sums on the device and all-reduces over DDP ranks, plus the count of
top-5 hits. Definitions follow scikit-learn's (not a dependency):

* precision_c = TP_c / predicted_c, recall_c = TP_c / support_c, F1_c = 2PR / (P + R); a 0/0 is 0
  (sklearn's ``zero_division=0``);
* balanced accuracy = the mean recall over the classes present in the labels
  (``sklearn.metrics.balanced_accuracy_score``);
* macro-F1 = the mean F1 over the classes present in the labels or the predictions
  (``f1_score(average="macro")``), so a class never predicted counts as F1 0.

Usage:
    cm = confusion_matrix(labels, preds, num_classes=3)
    m = class_metrics(cm, ["cat", "dog", "eel"], top5_correct=9)
    m["balanced_acc"], m["macro_f1"], m["per_class"][0]["recall"]
"""

from __future__ import annotations

import math
from statistics import mean, stdev

import numpy as np
import torch
from scipy.stats import t as student_t


def confusion_matrix(labels, preds, num_classes: int) -> np.ndarray:
    """(C, C) int64 counts; entry [t, p] counts samples of true class t predicted as p."""
    y = torch.as_tensor(labels).long().reshape(-1)
    p = torch.as_tensor(preds).long().reshape(-1)
    flat = torch.bincount(y * num_classes + p, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes).cpu().numpy().astype(np.int64)


def confusion_update(cm: torch.Tensor, y: torch.Tensor, logits: torch.Tensor) -> None:
    """Add a batch to a running (C, C) confusion tensor on the device (no host sync)."""
    c = cm.shape[0]
    cm += torch.bincount(y * c + logits.argmax(1), minlength=c * c).reshape(c, c)


def topk_correct(logits: torch.Tensor, y: torch.Tensor, k: int = 5) -> torch.Tensor:
    """Samples whose true class is among the ``k`` highest logits (a device scalar)."""
    k = min(k, logits.shape[1])
    return (logits.topk(k, dim=1).indices == y[:, None]).any(1).sum()


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.divide(a, b, out=np.zeros_like(a, dtype=np.float64), where=b > 0)


def class_metrics(
    confusion: np.ndarray, classes: list[str], top5_correct: float | None = None
) -> dict:
    """acc, balanced_acc, macro_f1, top5_acc and a per-class list from one confusion matrix.

    ``per_class`` rows are ``{class, precision, recall, f1, support}`` in class order.
    """
    cm = np.asarray(confusion, dtype=np.float64)
    tp = np.diag(cm)
    support, predicted = cm.sum(1), cm.sum(0)
    precision, recall = _safe_div(tp, predicted), _safe_div(tp, support)
    f1 = _safe_div(2 * precision * recall, precision + recall)
    n = cm.sum()
    present = support > 0
    seen = present | (predicted > 0)
    out = {
        "acc": float(tp.sum() / n) if n else float("nan"),
        "balanced_acc": float(recall[present].mean()) if present.any() else float("nan"),
        "macro_f1": float(f1[seen].mean()) if seen.any() else float("nan"),
        "top5_acc": float(top5_correct / n) if (top5_correct is not None and n) else None,
        "per_class": [
            {
                "class": name,
                "precision": round(float(precision[i]), 6),
                "recall": round(float(recall[i]), 6),
                "f1": round(float(f1[i]), 6),
                "support": int(support[i]),
            }
            for i, name in enumerate(classes)
        ],
    }
    return out


def balanced_accuracy(confusion) -> float:
    """Mean recall over the classes present in the labels (from a numpy or torch matrix)."""
    cm = torch.as_tensor(confusion, dtype=torch.float64)
    support = cm.sum(1)
    present = support > 0
    if not bool(present.any()):
        return float("nan")
    return float((cm.diagonal()[present] / support[present]).mean())


def most_confused(confusion: np.ndarray, classes: list[str], k: int = 20) -> list[dict]:
    """The ``k`` largest off-diagonal cells as ``{true, pred, count, rate}`` (rate: of the row)."""
    cm = np.asarray(confusion, dtype=np.float64)
    off = cm.copy()
    np.fill_diagonal(off, 0)
    rows = cm.sum(1, keepdims=True)
    rate = _safe_div(off, np.broadcast_to(rows, off.shape).copy())
    order = np.argsort(-off, axis=None, kind="stable")[:k]
    out = []
    for flat in order:
        t, p = divmod(int(flat), cm.shape[1])
        if off[t, p] <= 0:
            break
        out.append(
            {
                "true": classes[t],
                "pred": classes[p],
                "count": int(off[t, p]),
                "rate": round(float(rate[t, p]), 6),
            }
        )
    return out


def worst_first(per_class: list[dict]) -> list[dict]:
    """Per-class rows sorted by recall, then F1, worst first (ties: class order)."""
    return sorted(per_class, key=lambda r: (r["recall"], r["f1"]))


def t_interval(values: list[float]) -> tuple[float, float]:
    """(mean, 95% half-width) with Student's t (k-fold and seed intervals); 0 for one value."""
    m = mean(values)
    if len(values) < 2:
        return m, 0.0
    return m, float(student_t.ppf(0.975, len(values) - 1) * stdev(values) / math.sqrt(len(values)))
