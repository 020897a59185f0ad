"""Learning curves drawn from ``metrics.csv`` alone, so any past run can be re-plotted.

Usage:
    plot_curves(Path("runs/cnn/metrics.csv"), Path("runs/cnn/curves.png"), title="cnn")
"""

from __future__ import annotations

import csv
from pathlib import Path

from matplotlib.figure import Figure
from PIL import Image

from transferlab.errors import UserError
from transferlab.io import write_atomic


def read_metrics(path: Path) -> list[dict[str, float]]:
    """Rows of metrics.csv as floats (empty list if the file is missing)."""
    if not path.is_file():
        return []
    try:
        with open(path, newline="") as f:
            return [
                {k: float(v) for k, v in row.items() if v not in (None, "")}
                for row in csv.DictReader(f)
            ]
    except (ValueError, TypeError, csv.Error, UnicodeDecodeError) as e:
        raise UserError(
            f"{path} is damaged ({type(e).__name__}: {e}); it holds one row per "
            "epoch of numbers: restore it or rerun the training"
        ) from None


CURVES_FIGSIZE = (10, 4)


def draw_curves(fig, epochs, series, title: str = "") -> None:
    """Loss and accuracy panels, train and validation per epoch, drawn onto ``fig``.

    ``series`` maps ``train_loss``, ``val_loss``, ``train_acc`` and ``val_acc`` to one value per
    epoch (a dict of lists, or a metrics DataFrame).
    """
    ax_loss, ax_acc = fig.subplots(1, 2)
    for ax, metric in ((ax_loss, "loss"), (ax_acc, "acc")):
        ax.plot(epochs, series[f"train_{metric}"], "o-", label="train")
        ax.plot(epochs, series[f"val_{metric}"], "s-", label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss" if metric == "loss" else "accuracy")
        ax.grid(alpha=0.3)
        ax.legend()
    ax_loss.set_title("Loss")
    ax_acc.set_title("Accuracy")
    if title:
        fig.suptitle(title)
    fig.tight_layout()


def intact_png(path: Path) -> bool:
    """``path`` is a whole PNG (a truncated or garbled curves.png is redrawn, not embedded)."""
    try:
        with Image.open(path) as im:
            im.load()  # verify() misses a truncated image data stream; decoding does not
        return True
    except Exception:  # noqa: BLE001 - PIL raises many types for a damaged file
        return False


def plot_curves(metrics_csv: Path, out_png: Path, title: str = "") -> Path | None:
    """Loss panel and accuracy panel, train and val, per epoch (as in the seed's plots)."""
    rows = read_metrics(metrics_csv)
    if not rows:
        return None
    # a bare Figure draws off-screen without pyplot's global state, so a notebook's own
    # backend (inline plots) is left as it was

    keys = ("train_loss", "val_loss", "train_acc", "val_acc")
    fig = Figure(figsize=CURVES_FIGSIZE)
    draw_curves(fig, [r["epoch"] for r in rows], {k: [r[k] for r in rows] for k in keys}, title)
    write_atomic(out_png, lambda f: fig.savefig(f, format="png", dpi=100))
    return out_png
