"""Run a study: every cell of the grid as an ordinary run directory, resumable, with study.csv.

Layout of a study directory::

    STUDY/study.json                      the grid (compared on every later start)
    STUDY/costs.json                      per arm: forward MACs/image, parameters, inference img/s
    STUDY/<arm key>/pc<size>-s<seed>/     one run dir per cell (config.yaml, summary.json, ...)
    STUDY/study.csv                       one row per cell, rebuilt from the run dirs

A cell is done when its ``summary.json`` exists and its ``config.yaml`` matches the cell's config:
a restarted study reruns nothing finished, resumes a cell that has ``last.pt`` through
``run_experiment(..., resume=True)``, and starts the others. A cell that fails (a NaN, a bad
input) is recorded as failed with its message (``failed.json`` in its dir); the study goes on.

Usage:
    result = run_study(grid, Path("/tmp/study"))
    result.failed                          # cells that failed, with their messages
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transferlab.config import config_from_dict, config_to_dict, merge_dicts
from transferlab.data.load import load_data
from transferlab.data.subsets import class_counts
from transferlab.errors import TrainingStopped, UserError
from transferlab.io import write_json
from transferlab.models.registry import build_model
from transferlab.plan import use_channels_last, uses_feature_cache
from transferlab.precision import resolve_precision
from transferlab.rundir import (
    LOCK_NAME,
    RunDir,
    RunLock,
    StudyDir,
    data_root,
    refuse_inside,
)
from transferlab.studies.cells import (
    CellSpec,
    ExtractSpec,
    Outcome,
    cell_spec,
    comparable,
    extract_spec,
)
from transferlab.studies.costs import model_cost
from transferlab.studies.executors import (
    Executor,
    LocalExecutor,
    Resources,
    make_executor,
    parse_executor,
)
from transferlab.studies.grid import (
    Cell,
    Grid,
    _arm_base,
    data_fields,
    plan_cells,
)
from transferlab.studies.report import write_study_report
from transferlab.studies.table import (
    cell_row,
    cell_state,
    read_costs,
    read_study_file,
    write_study_csv,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StudyResult:
    """What ``run_study`` did: rows of study.csv, cells run now, cells that failed."""

    rows: list[dict[str, Any]]
    ran: list[str]
    skipped: list[str]
    failed: list[tuple[str, str]]  # (cell name, message)
    seconds: float


def _grid_comparable(d: dict[str, Any]) -> dict[str, Any]:
    out = dict(d)
    out["overrides"] = comparable(d.get("overrides") or {})
    return out


def _saved_grid(path: Path) -> dict:
    grid = read_study_file(path, "grid", "pass --overwrite to start the study again")
    if not isinstance(grid, dict) or not isinstance(grid.get("arms"), list):
        raise UserError(f"{path} is damaged (no grid of arms); pass --overwrite to start again")
    return grid


def check_study_dir(study_dir: Path, grid: Grid, overwrite: bool) -> None:
    """A study dir may hold this grid's study (or another with --overwrite), or nothing.

    A damaged study.json is refused (one line), or rewritten under --overwrite; --overwrite of a
    non-empty folder needs our study marker (or a readable study.json from before the marker).
    """
    path = StudyDir(study_dir).study
    saved = None
    try:
        saved = _saved_grid(path) if path.is_file() else None
    except UserError:
        if not overwrite:
            raise
        log.warning("%s is damaged; --overwrite: writing it again", path)
    if saved is not None:
        if _grid_comparable(saved) != _grid_comparable(grid.to_dict()) and not overwrite:
            raise UserError(
                f"{study_dir} holds a different study grid (see {path}); use another --run-dir or "
                "pass --overwrite to rerun the cells whose config changed"
            )
    elif study_dir.exists() and any(p.name != LOCK_NAME for p in study_dir.iterdir()):
        if not overwrite:
            raise UserError(
                f"{study_dir} is not empty and is not a study; choose another --run-dir or pass "
                "--overwrite"
            )
        if not StudyDir.is_ours(study_dir):
            found = ", ".join(sorted(p.name for p in study_dir.iterdir())[:4])
            raise UserError(
                f"{study_dir} holds {found} and no {StudyDir.MARKER} marker: it is not a "
                "transferlab study, and --overwrite only replaces studies. Choose another --run-dir"
            )


def lock_study_dir(study_dir: Path) -> RunLock:
    """Create the study dir and lock it for this driver: a second study there fails at once,
    naming the holder, before it touches any cell."""
    try:
        study_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(
            f"cannot write the study dir {study_dir} ({e.strerror or e}); choose another --run-dir"
        ) from None
    return RunLock.acquire(study_dir / LOCK_NAME, "study dir")


def prepare_study_dir(study_dir: Path, grid: Grid, overwrite: bool) -> None:
    """Check the study dir (``check_study_dir``), create it, write study.json and our marker."""
    check_study_dir(study_dir, grid, overwrite)
    write_study_file(study_dir, grid)


def write_study_file(study_dir: Path, grid: Grid) -> None:
    """study.json: the grid, compared on every later start."""
    try:
        study_dir.mkdir(parents=True, exist_ok=True)
        write_json(StudyDir(study_dir).study, {"grid": grid.to_dict(), "version": 1})
        StudyDir(study_dir).write_marker()
    except OSError as e:
        raise UserError(
            f"cannot write the study dir {study_dir} ({e.strerror or e}); choose another --run-dir"
        ) from None


def load_study_data(grid: Grid):
    """(dataset, class counts): the data the driver plans the cells with, loaded once."""
    cfgs = [
        config_from_dict(
            merge_dicts(_arm_base(arm, grid), {"model": {"name": arm.model, "mode": arm.mode}})
        )
        for arm in grid.arms
    ]
    if len({data_fields(c) for c in cfgs}) > 1:
        raise UserError(
            "the arms' presets load different data (dataset, split or subset); a study "
            "compares arms on one dataset: give those flags to the study instead"
        )
    ds = load_data(
        dataclasses.replace(cfgs[0], data=dataclasses.replace(cfgs[0].data, per_class=0))
    )
    return ds, class_counts(ds.train.labels)


class Progress:
    """Cells done, running and failed with an ETA; one log line per finished cell."""

    def __init__(self, total: int, slots: int):
        self.total, self.slots = total, slots
        self.done = self.failed = 0
        self.t0 = time.perf_counter()

    def finished(self, outcome: Outcome) -> None:
        if outcome.status == "ok":
            self.done += 1
        else:
            self.failed += 1
        n = self.done + self.failed
        left = self.total - n
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / n * left  # wall time per finished cell, concurrency included
        what = (
            f"test acc {outcome.test_acc:.4f}"
            if outcome.test_acc is not None
            else (outcome.message or outcome.status)
        )
        log.info(
            "cell %d/%d %s: %s in %.0f s | %d done, %d running, %d failed, ETA %s",
            n,
            self.total,
            outcome.name,
            what,
            outcome.seconds,
            self.done,
            min(self.slots, left),
            self.failed,
            _duration(eta),
        )


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def extraction_tasks(cells: Sequence[Cell]) -> dict[str, ExtractSpec]:
    """One extraction task per frozen arm that has cells to run (keyed by the arm's spec)."""
    tasks = {}
    for cell in cells:
        if uses_feature_cache(cell.config) and cell.arm.spec not in tasks:
            tasks[cell.arm.spec] = extract_spec(cell)
    return tasks


def run_cells(
    cells: list[Cell],
    executor: Executor | None = None,
    stop_requested: Callable[[], bool] = lambda: False,
) -> tuple[list[str], list[str], list[tuple[str, str]]]:
    """Run every cell that is not done on ``executor``; returns (ran, skipped, failed).

    Each frozen arm's splits are extracted first, as one task per arm; its cells then require
    the cache. A cell that fails (or whose arm's extraction failed) is recorded in failed.json.
    """
    executor = executor or LocalExecutor(Resources())
    todo = [c for c in cells if cell_state(c) != "done"]
    skipped = [c.name for c in cells if c not in todo]
    ran: list[str] = []
    failed: list[tuple[str, str]] = []
    extract = extraction_tasks(todo)
    broken: dict[str, str] = {}  # arm spec -> why its extraction failed
    if extract:
        log.info("extracting the features of %d frozen arm(s) first", len(extract))
        for outcome in executor.run(list(extract.values()), stop_requested):
            if outcome.status == "failed":
                log.warning("%s failed: %s", outcome.name, outcome.message)
                broken[outcome.key.removeprefix("extract ")] = outcome.message
    by_key = {str(c.run_dir): c for c in todo}
    specs: list[CellSpec] = []
    for c in todo:
        if c.arm.spec in broken:
            message = f"the arm's feature extraction failed: {broken[c.arm.spec]}"
            write_failed(c, message)
            failed.append((c.name, message))
        else:
            specs.append(cell_spec(c, require_cache=c.arm.spec in extract))
    progress = Progress(len(specs), executor.slots)
    if specs:
        log.info(
            "%d cells to run (%d done before), %d at a time",
            len(specs),
            len(skipped),
            executor.slots,
        )
    finished = set()
    for outcome in executor.run(specs, stop_requested):
        cell = by_key[outcome.key]
        if outcome.status == "stopped":  # the cell resumes from its checkpoint next time
            continue
        finished.add(outcome.key)
        progress.finished(outcome)
        if outcome.status == "ok":
            ran.append(cell.name)
        else:
            log.warning("cell %s failed: %s", cell.name, outcome.message)
            write_failed(cell, outcome.message)
            failed.append((cell.name, outcome.message))
    if stop_requested():
        left = [s.name for s in specs if s.key not in finished]
        where = f"before {left[0]}" if left else "after the last cell"
        raise TrainingStopped(
            f"stopped {where}; rerun the same `transferlab study` command to go on (finished "
            "cells are kept, a stopped one resumes from its checkpoint)",
            exit_code=getattr(stop_requested, "exit_code", 130),
        )
    return ran, skipped, failed


def write_failed(cell: Cell, message: str) -> None:
    """The cell's failed.json: its message (study.csv shows it) and config."""
    try:
        cell.run_dir.mkdir(parents=True, exist_ok=True)
        write_json(
            RunDir(cell.run_dir).failed,
            {"message": message, "config": config_to_dict(cell.config)},
        )
    except OSError as e:
        log.warning("could not record the failure of %s (%s)", cell.name, e)


# inference img/s is timed at the batch each device runs best: 16 is what the CPU engine probe
# picks for lite0 (larger batches were no faster on 2 cores); an H200 timed at 16 reported lite0 at
# 517 img/s, a launch-bound figure far below its ~22,000 img/s extraction at batch 256
COST_BATCH_CPU, COST_BATCH_GPU = 16, 256


def arm_costs(study_dir: Path, cells: list[Cell], n_classes: int) -> dict[str, dict]:
    """MACs, parameters and inference img/s per arm, measured once and kept in costs.json."""
    path = StudyDir(study_dir).costs
    costs = read_costs(path)
    for cell in cells:
        if cell.arm.spec in costs:
            continue
        cfg = cell.config
        try:  # the architecture's cost does not depend on its weights: no download for this
            model = build_model(
                dataclasses.replace(cfg.model, weights="none"), num_classes=n_classes
            )
            size = cfg.data.image_size or model.preprocess.input_size
            device = next(model.parameters()).device
            precision = resolve_precision(cfg.run.precision, device)
            layout = use_channels_last(cfg.run.channels_last, size, device)
            batch = COST_BATCH_CPU if device.type == "cpu" else COST_BATCH_GPU
            costs[cell.arm.spec] = model_cost(
                model, size, batch, precision=precision, channels_last=layout
            ).to_dict()
        except Exception as e:  # noqa: BLE001 - a bad arm fails in its cells, with its own message
            log.warning(
                "could not measure the cost of %s (%s: %s)", cell.arm.spec, type(e).__name__, e
            )
            costs[cell.arm.spec] = {}
            continue
        log.info(
            "%s: %.3g MACs/image, %d params, %.1f img/s (%s)",
            cell.arm.spec,
            costs[cell.arm.spec]["macs"],
            costs[cell.arm.spec]["params_total"],
            costs[cell.arm.spec]["img_s"],
            precision,
        )
        path.write_text(json.dumps(costs, indent=2))
    return costs


def refuse_study_in_data(study_dir: Path, grid: Grid) -> None:
    """A study dir inside the data root would be read as data (a ``folder:`` class of runs)."""
    data = config_from_dict({"data": grid.overrides.get("data") or {}}).data
    root = data_root(data.dataset, data.data_dir)
    if root is not None:
        refuse_inside(study_dir, root, "study dir")


def run_study(  # noqa: PLR0913 - the study's options, each with its default
    grid: Grid,
    study_dir: str | Path,
    overwrite: bool = False,
    stop_requested: Callable[[], bool] = lambda: False,
    progress: bool = True,
    write_report: bool = True,
    executor: str = "local",
    resources: Resources | None = None,
) -> StudyResult:
    """Run (or resume) every cell of ``grid`` in ``study_dir``; write study.csv and the report.

    ``executor``: local | processes:N | ray[:ADDRESS] (see studies.executors); ``resources``:
    CPUs (torch threads) and GPUs per cell. Bad input (unknown arm or executor, a size above the
    smallest class, a different grid in the dir, a study dir in use) raises UserError before any
    cell runs. Failed cells are listed in the result.
    """
    t0 = time.perf_counter()
    study_dir = Path(study_dir)
    resources = resources or Resources()
    parse_executor(executor)  # a bad --executor: before the data is read
    refuse_study_in_data(study_dir, grid)  # before anything is read or written, as train does
    ds, counts = load_study_data(grid)
    cells = plan_cells(grid, counts, study_dir)  # size checks: before the dir is touched
    n_classes = len(ds.classes)
    del ds  # the cells load their own data
    check_study_dir(study_dir, grid, overwrite)
    ex = make_executor(executor, resources, progress)  # e.g. no Ray cluster: nothing written
    lock = lock_study_dir(study_dir)
    try:
        write_study_file(study_dir, grid)
        _write_cells_file(study_dir, counts, cells)
        costs = arm_costs(study_dir, cells, n_classes)
        try:
            ran, skipped, failed = run_cells(cells, ex, stop_requested)
        finally:
            rows = [cell_row(c, costs) for c in cells]
            write_study_csv(study_dir, rows)
        if write_report:
            write_study_report(study_dir)
    finally:
        lock.release()
    return StudyResult(rows, ran, skipped, failed, time.perf_counter() - t0)


def _write_cells_file(study_dir: Path, counts: dict[int, int], cells: list[Cell]) -> None:
    planned = [
        {"arm": c.arm.spec, "per_class": c.per_class, "seed": c.seed, "run_dir": str(c.run_dir)}
        for c in cells
    ]
    write_json(StudyDir(study_dir).cells, {"class_counts": counts, "cells": planned}, indent=None)
