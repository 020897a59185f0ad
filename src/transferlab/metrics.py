"""The metrics row: one row per epoch in ``metrics.csv``, the one file reports and plots read.

Training (``training/fit.py``) and the linear probe (``features/probe.py``) both write their rows
through :func:`epoch_row` and :func:`append_metrics`; a resume cuts rows past its checkpoint
with :func:`truncate_metrics`; TensorBoard gets the same row as scalars.

Usage:
    row = epoch_row(1, train=(2.3, 0.4), val=(2.1, 0.45), lr=1e-3, seconds=12.5, img_s=3600.0,
                    val_balanced_acc=0.41)
    append_metrics(RunDir(run_dir).metrics, row)
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from transferlab.errors import TrainingStopped, UserError
from transferlab.io import write_atomic

COLUMNS = [
    "epoch",
    "train_loss",
    "train_acc",
    "val_loss",
    "val_acc",
    "val_balanced_acc",
    "lr",
    "epoch_time_s",
    "train_img_s",
]
# metrics.csv column -> TensorBoard tag
SCALARS = {
    "train_loss": "loss/train",
    "val_loss": "loss/val",
    "train_acc": "acc/train",
    "val_acc": "acc/val",
    "val_balanced_acc": "balanced_acc/val",
    "lr": "lr",
    "train_img_s": "img_per_s/train",
    "epoch_time_s": "epoch_time_s",
}


def epoch_row(
    epoch: int,
    train: tuple[float, float],
    val: tuple[float, float],
    lr: float,
    seconds: float,
    img_s: float,
    val_balanced_acc: float = float("nan"),
) -> dict[str, str]:
    """One formatted row: (loss, acc) pairs for train and val, lr, epoch seconds, train img/s,
    and the val balanced accuracy (mean per-class recall)."""
    return {
        "epoch": epoch,
        "train_loss": f"{train[0]:.6f}",
        "train_acc": f"{train[1]:.6f}",
        "val_loss": f"{val[0]:.6f}",
        "val_acc": f"{val[1]:.6f}",
        "val_balanced_acc": f"{val_balanced_acc:.6f}",
        "lr": f"{lr:.6g}",
        "epoch_time_s": f"{seconds:.3f}",
        "train_img_s": f"{img_s:.1f}",
    }


def append_metrics(path: Path, row: dict) -> None:
    """Append one row to metrics.csv and flush it to disk (a crash never loses it)."""
    size = path.stat().st_size if path.exists() else 0
    try:
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            if size == 0:
                w.writeheader()
            w.writerow(row)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        try:  # a full disk may have taken half the row: cut it off so the file stays valid CSV
            os.truncate(path, size)
        except OSError:
            pass
        raise TrainingStopped(
            f"could not append to {path} ({e.strerror or e}); earlier rows are intact"
        ) from None


def truncate_metrics(path: Path, last_epoch: int) -> None:
    """Keep only rows up to ``last_epoch`` (rows after the resumed checkpoint are redone)."""
    if not path.exists():
        return
    with open(path, newline="") as f:
        rows = [
            r
            for r in csv.DictReader(f)
            if str(r.get("epoch", "")).isdigit() and int(r["epoch"]) <= last_epoch
        ]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS)
    w.writeheader()
    w.writerows(rows)
    write_atomic(path, buf.getvalue())


def load_tensorboard():
    """TensorBoard's SummaryWriter class; without the extra a one-line UserError (validate calls
    this before the run dir is touched, so a missing extra never costs an --overwrite's run)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError(
            "--tensorboard needs the tensorboard package: pip install 'transferlab[tensorboard]'"
        ) from None
    return SummaryWriter


def log_epoch_scalars(tb_dir: Path, row: dict) -> None:
    """Write one epoch's metrics row to TensorBoard event files under ``tb_dir`` (rank 0 only)."""
    writer = load_tensorboard()(log_dir=str(tb_dir))
    try:
        for column, tag in SCALARS.items():
            if row.get(column) not in (None, ""):
                writer.add_scalar(tag, float(row[column]), global_step=int(row["epoch"]))
    finally:
        writer.close()
