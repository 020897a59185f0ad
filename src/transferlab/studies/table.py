"""A study's table: one row per cell, read from its run dir, and the study's files, read back.

``study.csv`` is rebuilt from the cells' run dirs (``cell_row``), never kept by hand; the study
report and the runner both read a study through this module, so the report needs nothing of the
runner (which writes the report at the end of a study).

Usage:
    grid, cells, costs = study_cells(Path("runs/study"))
    write_study_csv(Path("runs/study"), [cell_row(c, costs) for c in cells])
"""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path
from typing import Any

from transferlab.errors import UserError
from transferlab.io import write_atomic
from transferlab.rundir import RunDir, StudyDir, Summary
from transferlab.studies.cells import check_subset, run_state
from transferlab.studies.grid import Arm, Cell, Grid, make_grid, plan_cells, size_label

log = logging.getLogger(__name__)


CSV_COLUMNS = (
    "arm",
    "model",
    "mode",
    "preset",
    "per_class",
    "n_train",
    "seed",
    "status",
    "message",
    "test_acc",
    "test_balanced_acc",  # mean per-class recall (issue 22)
    "val_acc",
    "best_epoch",
    "epochs",
    "wall_s",
    "extract_s",
    "cache",
    "extract_img_s",
    "train_s",
    "eval_s",
    "params_trainable",
    "params_total",
    "macs",
    "infer_img_s",
    "run_dir",
)


def is_study_dir(path: str | Path) -> bool:
    """True when ``path`` holds a study (its study.json)."""
    return StudyDir(path).study.is_file()


def read_study_file(path: Path, key: str, what_to_do: str) -> Any:
    """``json[key]`` of one of the study's files, never trusted: a missing, empty, truncated or
    foreign file is a one-line UserError that names it and says ``what_to_do``."""
    try:
        data = json.loads(path.read_text())
        value = data[key]
    except FileNotFoundError:
        raise UserError(f"{path} is missing; {what_to_do}") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        why = e.strerror if isinstance(e, OSError) else f"{type(e).__name__}: {e}"
        raise UserError(f"{path} is damaged ({why}); {what_to_do}") from None
    return value


def cell_state(cell: Cell) -> str:
    """done | resume | new: what a (re)started study does with this cell."""
    return run_state(cell.run_dir, cell.config)


def read_costs(path: Path) -> dict[str, dict]:
    """costs.json, or {} when missing; a damaged one is measured again (a warning says so)."""
    if not path.is_file():
        return {}
    try:
        costs = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        costs = e
    if isinstance(costs, dict) and all(isinstance(v, dict) for v in costs.values()):
        return costs
    log.warning("%s is damaged; the costs are measured again", path)
    return {}


def _cache_status(hits: list) -> str:
    """hit (every split read from the cache), miss (every split extracted), partial, or ""."""
    if not hits:
        return ""
    return "hit" if all(hits) else ("miss" if not any(hits) else "partial")


def _mean_speed(fc: dict) -> float | str:
    speeds = [
        v["img_s"]
        for k, v in fc.items()
        if k in ("train", "val", "test") and isinstance(v, dict) and v.get("img_s")
    ]
    return round(sum(speeds) / len(speeds), 1) if speeds else ""


def cell_row(cell: Cell, costs: dict[str, dict]) -> dict[str, Any]:
    """The study.csv row of one cell, read from its run dir."""
    arm: Arm = cell.arm
    cost = costs.get(arm.spec, {})
    row: dict[str, Any] = {
        "arm": arm.spec,
        "model": arm.model,
        "mode": arm.mode,
        "preset": arm.preset,
        "per_class": size_label(cell.per_class),
        "n_train": cell.n_train,
        "seed": cell.seed,
        "status": "pending",
        "message": "",
        "macs": cost.get("macs", ""),
        "infer_img_s": cost.get("img_s", ""),
        "run_dir": str(cell.run_dir),
    }
    files = RunDir(cell.run_dir)
    if cell_state(cell) == "done":
        s = Summary.read(files.summary)
        fc = s.feature_cache or {}
        hit = [fc[k].get("hit") for k in ("train", "val", "test") if isinstance(fc.get(k), dict)]
        t = s.time_s
        row.update(
            status="ok",
            test_acc=s.test["acc"],
            test_balanced_acc=s.test.get("balanced_acc", ""),  # runs before issue 22: none
            val_acc=s.val["acc"],
            best_epoch=s.best_epoch,
            epochs=s.epochs_run,
            wall_s=t.get("total"),
            train_s=t.get("train"),
            eval_s=t.get("eval"),
            extract_s=fc.get("seconds", ""),
            cache=_cache_status(hit),
            extract_img_s=_mean_speed(fc),
            params_trainable=s.params["trainable"],
            params_total=s.params["total"],
        )
        try:
            check_subset(cell.n_train, cell.per_class, s)
        except UserError as e:
            row.update(status="failed", message=str(e))
    elif files.failed.is_file():
        try:
            row.update(status="failed", message=json.loads(files.failed.read_text())["message"])
        except (OSError, ValueError, KeyError):
            row.update(status="failed", message=f"{RunDir.FAILED} unreadable")
    return row


def write_study_csv(study_dir: Path, rows: list[dict[str, Any]]) -> Path:
    """study.csv with one row per cell (written whole, atomically)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return write_atomic(StudyDir(study_dir).csv, buf.getvalue())


def study_cells(study_dir: Path) -> tuple[Grid, list[Cell], dict[str, dict]]:
    """The grid, cells and costs of an existing study (no data load: sizes from the run dirs)."""
    files = StudyDir(study_dir)
    again = "rerun the same `transferlab study` command to rebuild it"
    saved = read_study_file(files.study, "grid", again)
    if not isinstance(saved, dict):
        raise UserError(f"{files.study} is damaged (no grid); {again}")
    try:
        grid = make_grid(
            saved["arms"],
            ",".join(saved["sizes"]),
            saved["seeds"],
            saved.get("overrides") or {},
            saved.get("min_steps", 0),
            saved.get("patience", 1),
        )
    except (KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{files.study} is damaged ({type(e).__name__}: {e}); {again}") from None
    costs = read_costs(files.costs)
    if not files.cells.is_file():
        return grid, [], costs
    raw = read_study_file(files.cells, "class_counts", again)
    try:
        counts = {int(k): int(v) for k, v in raw.items()}
    except (AttributeError, TypeError, ValueError):
        raise UserError(f"{files.cells} is damaged (class_counts); {again}") from None
    return grid, plan_cells(grid, counts, study_dir), costs
