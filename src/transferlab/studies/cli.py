"""``transferlab study`` and ``transferlab rank``: parsers and handlers for the main CLI.

The main CLI's ``COMMANDS`` registers them: their own arguments (``add_study_arguments``,
``add_rank_arguments``), their config flags (``STUDY``, ``RANK``) and their handlers.

Usage:
    transferlab study --arms cnn:scratch,timm:tf_efficientnet_lite0:frozen \\
        --per-class 4,16,64,all \\
        --seeds 3 --data-dir ../shared/datasets --run-dir /tmp/study
    transferlab study --arms ... --plan    # one JSON line per cell: its `transferlab train` command
    transferlab rank --candidates timm:tf_efficientnet_lite0@128,timm:tf_efficientnet_lite2@260 \\
        --per-class 20 --data-dir ../shared/datasets
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transferlab.config import (
    OptionSet,
    opt,
)
from transferlab.errors import UserError
from transferlab.rundir import StudyDir
from transferlab.stopflag import StopFlag
from transferlab.studies.cells import cell_spec, train_argv
from transferlab.studies.executors import Resources, parse_executor
from transferlab.studies.grid import (
    DEFAULT_MIN_STEPS,
    DEFAULT_PATIENCE,
    Grid,
    make_grid,
    plan_cells,
)
from transferlab.studies.rank import format_rank_table, parse_candidates, rank_candidates
from transferlab.studies.runner import load_study_data, run_study

log = logging.getLogger(__name__)

# the train options a study sets per cell itself (or reads as its own), as keywords


@dataclass
class StudyConfig:
    """``transferlab study`` (and ``tl.study``): the grid and where it runs."""

    arms: str = opt(
        "",
        "comma-separated MODEL:MODE[:PRESET], e.g. cnn:scratch,cnn:scratch:cnn-best,"
        "timm:tf_efficientnet_lite0:frozen,resnet18:finetune; the best CPU arm measured beyond "
        "frozen: timm:tf_efficientnet_lite0:partial:lite-partial",
    )
    per_class: str = opt(
        "4,16,64,all",
        "images per class (4,16,64,all) or fractions of the smallest class (0.01,0.1,all)",
    )
    seeds: int = opt(3, "replicates per size: seeds 0..N-1 draw the subset and seed the run")
    run_dir: str = opt("", "the study directory (one run dir per cell inside)")
    overwrite: bool = opt(False, "rerun cells whose config changed (a different grid)")
    min_steps: int = opt(
        DEFAULT_MIN_STEPS,
        "optimiser steps every cell gets at least: epochs are raised for small subsets",
    )
    patience_epochs: int = opt(
        DEFAULT_PATIENCE,
        "early stop of a cell whose epochs were raised, after N epochs without val gain",
    )
    executor: str = opt(
        "local",
        "where the cells run: local (this process, one at a time), processes:N (N worker "
        "processes on this machine) or ray[:ADDRESS] (an existing Ray cluster; ADDRESS defaults "
        "to $RAY_ADDRESS, then auto)",
    )
    cpus_per_cell: int = opt(
        0,
        "CPUs per cell: the cell's torch threads and Ray's num_cpus (0 = 1 for processes and "
        "ray; local keeps the run's own --threads)",
    )
    gpus_per_cell: float = opt(
        1.0,
        "GPUs per cell where cells train on a GPU; below 1 packs several cells on one GPU "
        "(0.25: four), 0 gives the cells none",
    )

    def __post_init__(self) -> None:
        if not self.run_dir.strip():
            raise UserError("a study needs --run-dir (run_dir=): the folder of its cells")
        parse_executor(self.executor)  # bad input: one line before any data is read
        self.resources()

    def resources(self) -> Resources:
        """What each cell asks for (checked: a negative count is a UserError)."""
        return Resources(cpus=self.cpus_per_cell, gpus=self.gpus_per_cell)


# the train options a study sets per cell itself, and the study's own
STUDY = OptionSet(
    skip=(
        "model",
        "mode",
        "per_class",
        "subset_seed",
        "seed",
        "run_dir",
        "overwrite",
        "max_epochs",
        "extract_per_class",  # a study sets which rows its frozen arms extract
        "extract_seeds",
        "require_feature_cache",
    ),
    own=(("study", StudyConfig),),
)
# rank also fixes the probe (L-BFGS on a linear head, one pass) and the input
RANK = OptionSet(
    skip=STUDY.skip
    + (
        "epochs",
        "patience",
        "target_val_acc",
        "head",
        "head_hidden",
        "solver",
        "image_size",
        "feature_views",
        "crop_padding",
        "flip",
        "cutout",
    )
)


def add_study_arguments(p: argparse.ArgumentParser) -> None:
    """The study's CLI-only argument (the others come from ``STUDY``)."""
    p.add_argument(
        "--plan",
        action="store_true",
        help="print one JSON line per cell with its `transferlab train` "
        "command, and run nothing (for a cluster scheduler)",
    )


def study_grid(overrides: dict[str, dict[str, Any]]) -> tuple[StudyConfig, Grid]:
    """The study's own options and its grid, from ``STUDY.overrides`` (CLI and API alike)."""
    over = dict(overrides)
    sc = StudyConfig(**over.pop("study", {}))
    grid = make_grid(
        sc.arms.split(","), sc.per_class, sc.seeds, over, sc.min_steps, sc.patience_epochs
    )
    return sc, grid


def add_rank_arguments(p: argparse.ArgumentParser) -> None:
    """Rank's own arguments (the config flags come from ``RANK``)."""
    p.add_argument(
        "--candidates",
        required=True,
        help="comma-separated MODEL[@SIZE], e.g. "
        "timm:tf_efficientnet_lite0@128,timm:tf_efficientnet_lite2@260",
    )
    p.add_argument(
        "--per-class",
        type=int,
        default=20,
        help="training images per class in the subsample (default 20)",
    )
    p.add_argument("--subset-seed", type=int, default=0, help="seed of the subsample (default 0)")
    p.add_argument("--json", action="store_true", help="print the table as JSON")


def cmd_study(args) -> int:
    """Run (or --plan) a study; exit 1 listing failed cells, 2 on bad input."""
    sc, grid = study_grid(STUDY.from_namespace(args))
    study_dir = Path(sc.run_dir)
    if args.plan:
        _, counts = load_study_data(grid)
        for cell in plan_cells(grid, counts, study_dir):  # the cell's spec and its train command
            spec = cell_spec(cell, threads=sc.cpus_per_cell or None)
            argv = train_argv(spec)
            line = {**spec.to_dict(), "argv": argv[1:], "command": shlex.join(argv)}
            sys.stdout.write(json.dumps(line) + "\n")
        return 0
    with StopFlag() as stop:
        result = run_study(
            grid,
            study_dir,
            overwrite=sc.overwrite,
            stop_requested=stop,
            progress=grid.overrides.get("run", {}).get("progress", True),
            executor=sc.executor,
            resources=sc.resources(),
        )
    log.info(
        "study %s: %d cells run, %d already done, %d failed, %.0f s; report %s",
        study_dir,
        len(result.ran),
        len(result.skipped),
        len(result.failed),
        result.seconds,
        StudyDir(study_dir).report_html,
    )
    if result.failed:
        for name, message in result.failed:
            sys.stderr.write(f"transferlab: failed cell: {name}: {message}\n")
        return 1
    return 0


def cmd_rank(args) -> int:
    """Rank candidate backbones on a subsample: a table (or JSON) sorted by LogME."""
    candidates = parse_candidates(args.candidates)
    rows = rank_candidates(
        candidates, RANK.from_namespace(args), per_class=args.per_class, seed=args.subset_seed
    )
    if args.json:
        sys.stdout.write(json.dumps([r.to_dict() for r in rows], indent=2) + "\n")
    else:
        sys.stdout.write(format_rank_table(rows))
    return 0
