"""Experiment tracking: TensorBoard scalars per epoch, and the ``transferlab runs`` listing.

``--tensorboard`` writes, for each finished epoch, the metrics.csv row as scalars into
``RUN_DIR/tb`` (loss/train, loss/val, acc/train, acc/val, lr, img_per_s/train, epoch_time_s).
The writer is opened, written and closed per epoch: no state lives between epochs, a crash
loses nothing already written, and a resumed run simply appends (TensorBoard merges the
event files of one folder).

Usage:
    log_epoch_scalars(run_dir / "tb", row)          # row = a metrics.csv row (dict of str)
    tensorboard --logdir runs/                      # then compare runs in the browser
    rows = find_runs(Path("runs"))                  # what `transferlab runs` prints
"""

from __future__ import annotations

import logging
from pathlib import Path

from transferlab.errors import UserError
from transferlab.rundir import RunDir, read_json_file, upgrade_summary

log = logging.getLogger(__name__)

# metrics.csv column -> TensorBoard tag
SCALARS = {
    "train_loss": "loss/train",
    "val_loss": "loss/val",
    "train_acc": "acc/train",
    "val_acc": "acc/val",
    "lr": "lr",
    "train_img_s": "img_per_s/train",
    "epoch_time_s": "epoch_time_s",
}


def log_epoch_scalars(tb_dir: Path, row: dict) -> None:
    """Write one epoch's metrics row to TensorBoard event files under ``tb_dir`` (rank 0 only)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError(
            "--tensorboard needs the tensorboard package: pip install 'transferlab[tensorboard]'"
        ) from None
    step = int(row["epoch"])
    writer = SummaryWriter(log_dir=str(tb_dir))
    try:
        for column, tag in SCALARS.items():
            if row.get(column) not in (None, ""):
                writer.add_scalar(tag, float(row[column]), global_step=step)
    finally:
        writer.close()


def _num(v, kind=float):
    """A number from a summary field, or None for anything else (a damaged or foreign file)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    try:
        return kind(v)
    except (ValueError, OverflowError):  # int(nan), int(inf)
        return None


def _text(v) -> str:
    return v if isinstance(v, str) else "?"


def _section(s: dict, key: str) -> dict:
    v = s.get(key)
    return v if isinstance(v, dict) else {}


def find_runs(root: Path) -> list[dict]:
    """One dict per finished run under ``root`` (any depth): what ``transferlab runs`` lists.

    A damaged summary.json (not JSON, not an object, fields of the wrong type) is skipped with a
    one-line warning, or listed with "?" and "-" for the fields it lacks: never a traceback.
    """
    if not root.is_dir():
        raise UserError(
            f"{root} is not a folder; pass the folder that holds your run dirs (default runs/)"
        )
    out = []
    for path in sorted(root.rglob(RunDir.SUMMARY)):
        try:  # lenient on purpose: a damaged file is listed with what it has
            s = upgrade_summary(read_json_file(path, "summary"), path)
        except UserError as e:
            log.warning("skipping %s", e)
            continue
        out.append(
            {
                "run_dir": str(path.parent),
                "model": _text(s.get("model")),
                "mode": _text(s.get("mode")),
                "epochs": _num(s.get("epochs_run"), int),
                "best_val_acc": _num(_section(s, "fit_state").get("best_val_acc")),
                "test_acc": _num(_section(s, "test").get("acc")),
                "time_s": _num(_section(s, "time_s").get("total")),
            }
        )
    return out


def format_runs(rows: list[dict]) -> str:
    """The runs as an aligned text table."""

    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    width = max([len(r["run_dir"]) for r in rows] + [7])
    lines = [
        f"{'run dir':{width}}  {'model':28} {'mode':9} {'epochs':>6} {'best val':>8} "
        f"{'test acc':>8} "
        f"{'time s':>8}"
    ]
    for r in rows:
        lines.append(
            f"{r['run_dir']:{width}}  {r['model']:28} {r['mode']:9} {fmt(r['epochs'], 'd'):>6} "
            f"{fmt(r['best_val_acc'], '.4f'):>8} {fmt(r['test_acc'], '.4f'):>8} "
            f"{fmt(r['time_s'], '.1f'):>8}"
        )
    return "\n".join(lines) + "\n"
