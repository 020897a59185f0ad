"""Per-class metrics against a hand-computed example (classmetrics.py)."""

import math

import numpy as np
import pytest
import torch

from transferlab.classmetrics import (
    balanced_accuracy,
    class_metrics,
    confusion_matrix,
    confusion_update,
    most_confused,
    topk_correct,
    worst_first,
)

# 10 samples, 4 classes (class "d" has no sample and is never predicted)
LABELS = [0, 0, 0, 0, 1, 1, 2, 2, 2, 2]
PREDS = [0, 0, 1, 2, 1, 1, 2, 0, 2, 2]
CLASSES = ["a", "b", "c", "d"]


def test_hand_computed_example():
    cm = confusion_matrix(LABELS, PREDS, 4)
    assert cm.tolist() == [[2, 1, 1, 0], [0, 2, 0, 0], [1, 0, 3, 0], [0, 0, 0, 0]]
    m = class_metrics(cm, CLASSES, top5_correct=10)
    # a: P = 2/3, R = 2/4, F1 = 4/7; b: P = 2/3, R = 1, F1 = 4/5; c: P = R = F1 = 3/4
    a, b, c, d = m["per_class"]
    assert (a["precision"], a["recall"], a["f1"], a["support"]) == pytest.approx(
        (2 / 3, 0.5, 4 / 7, 4), abs=1e-6
    )
    assert (b["precision"], b["recall"], b["f1"], b["support"]) == pytest.approx(
        (2 / 3, 1.0, 0.8, 2), abs=1e-6
    )
    assert (c["precision"], c["recall"], c["f1"]) == pytest.approx((0.75, 0.75, 0.75), abs=1e-6)
    assert d == {"class": "d", "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["acc"] == pytest.approx(0.7)
    assert m["balanced_acc"] == pytest.approx((0.5 + 1 + 0.75) / 3)  # "d" is absent: not counted
    assert m["macro_f1"] == pytest.approx((4 / 7 + 0.8 + 0.75) / 3)
    assert m["top5_acc"] == 1.0
    assert balanced_accuracy(cm) == pytest.approx(0.75)
    assert balanced_accuracy(torch.as_tensor(cm)) == pytest.approx(0.75)


def test_never_predicted_class_counts_zero_in_macro_f1():
    m = class_metrics(confusion_matrix([0, 0, 1, 1], [0, 0, 0, 0], 2), ["x", "y"])
    assert m["balanced_acc"] == 0.5 and m["acc"] == 0.5
    # x: P = 1/2, R = 1, F1 = 2/3; y: F1 = 0 (present, never predicted)
    assert m["macro_f1"] == pytest.approx(1 / 3)
    assert m["top5_acc"] is None


def test_empty_matrix_is_nan():
    m = class_metrics(np.zeros((2, 2)), ["x", "y"])
    assert math.isnan(m["acc"]) and math.isnan(m["balanced_acc"])


def test_device_update_and_topk_match():
    logits = torch.tensor([[3.0, 1, 0, 2], [0, 5, 1, 2], [1, 0, 0.5, 3]])
    y = torch.tensor([0, 2, 1])
    cm = torch.zeros(4, 4, dtype=torch.int64)
    confusion_update(cm, y, logits)
    assert cm.numpy().tolist() == confusion_matrix(y, logits.argmax(1), 4).tolist()
    assert int(topk_correct(logits, y, k=2)) == 1  # only sample 0 has its class in its top 2
    assert int(topk_correct(logits, y, k=5)) == 3  # k above C: every sample


def test_worst_first_and_most_confused():
    cm = confusion_matrix(LABELS, PREDS, 4)
    m = class_metrics(cm, CLASSES)
    order = [r["class"] for r in worst_first(m["per_class"])]
    assert order == ["d", "a", "c", "b"]
    pairs = most_confused(cm, CLASSES, k=10)
    assert [(p["true"], p["pred"], p["count"]) for p in pairs] == [
        ("a", "b", 1),
        ("a", "c", 1),
        ("c", "a", 1),
    ]
    assert pairs[0]["rate"] == pytest.approx(0.25)
