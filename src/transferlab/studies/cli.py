"""``transferlab study`` and ``transferlab rank``: parsers and handlers for the main CLI.

The main CLI registers them with ``add_parsers(subparsers)`` and dispatches through ``COMMANDS``.

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
from pathlib import Path
from typing import Any

from transferlab.errors import UserError
from transferlab.rundir import StudyDir
from transferlab.studies.grid import DEFAULT_MIN_STEPS, DEFAULT_PATIENCE

log = logging.getLogger(__name__)

# config flags a study sets per cell itself (or reads as its own options)
_STUDY_SKIP = (
    "--model",
    "--mode",
    "--per-class",
    "--subset-seed",
    "--seed",
    "--run-dir",
    "--overwrite",
    "--max-epochs",
)
_RANK_SKIP = _STUDY_SKIP + (
    "--epochs",
    "--patience",
    "--target-val-acc",
    "--head",
    "--head-hidden",
    "--solver",
    "--image-size",
    "--feature-views",
    "--crop-padding",
    "--flip",
    "--cutout",
)


def add_parsers(sub) -> None:
    """Add the ``study`` and ``rank`` subcommands to the main parser's subparsers."""
    from transferlab.cli import _add_config_flags

    p = sub.add_parser(
        "study",
        help="a grid of arms x data sizes x seeds, with study.csv and a report",
        description="Train every cell (arm x images per class x seed) as a run dir inside "
        "--run-dir, "
        "write study.csv and report.md/html. A restarted study reruns no finished cell.",
    )
    p.add_argument(
        "--arms",
        required=True,
        help="comma-separated MODEL:MODE[:PRESET], e.g. cnn:scratch,"
        "cnn:scratch:cnn-best,timm:tf_efficientnet_lite0:frozen,resnet18:finetune",
    )
    p.add_argument(
        "--per-class",
        default="4,16,64,all",
        help="images per class (4,16,64,all) or fractions of the "
        "smallest class (0.01,0.1,all); default 4,16,64,all",
    )
    p.add_argument(
        "--seeds",
        type=int,
        default=3,
        help="replicates per size: seeds 0..N-1 draw the subset and seed the run (default 3)",
    )
    p.add_argument(
        "--run-dir", required=True, help="the study directory (one run dir per cell inside)"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="rerun cells whose config changed (a different grid)",
    )
    p.add_argument(
        "--plan",
        action="store_true",
        help="print one JSON line per cell with its `transferlab train` "
        "command, and run nothing (for a cluster scheduler)",
    )
    p.add_argument(
        "--min-steps",
        type=int,
        default=DEFAULT_MIN_STEPS,
        help="optimiser steps every cell gets at "
        f"least: epochs are raised for small subsets (default {DEFAULT_MIN_STEPS})",
    )
    p.add_argument(
        "--patience-epochs",
        type=int,
        default=DEFAULT_PATIENCE,
        help="early stop of a cell whose "
        f"epochs were raised, after N epochs without val gain (default {DEFAULT_PATIENCE})",
    )
    _add_config_flags(p, skip=_STUDY_SKIP)

    p = sub.add_parser(
        "rank",
        help="rank backbones (and input sizes) for this data before full training",
        description="Per candidate: features of a stratified train subsample and of the validation "
        "split (through the feature cache), LogME score, L-BFGS probe on the subsample scored on "
        "validation, extraction img/s, MACs, parameters, estimated full extraction time.",
    )
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
    _add_config_flags(p, skip=_RANK_SKIP)


def _overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    if getattr(args, "preset", None):
        raise UserError("a study takes presets per arm (cnn:scratch:cnn-best); drop --preset")
    out: dict[str, dict[str, Any]] = {}
    for key, value in vars(args).items():
        if key.startswith("cfg:") and value is not None:
            section, field = key[4:].split(".")
            out.setdefault(section, {})[field] = value
    return out


def train_argv(cell, grid) -> list[str]:
    """The ``transferlab train`` arguments that reproduce ``cell``'s config."""
    from transferlab.cli import FLAGS
    from transferlab.config import config_from_dict, config_to_dict, load_yaml, resolve_preset

    del grid  # the study's own flags differ from the preset's values, so they are emitted below
    base = config_to_dict(
        config_from_dict(load_yaml(resolve_preset(cell.arm.preset)) if cell.arm.preset else {})
    )
    want = config_to_dict(cell.config)
    flag_of = {}
    for flag, dest, kind, help_ in FLAGS:
        if help_ is not argparse.SUPPRESS:
            flag_of.setdefault(dest, (flag, kind))
    argv = ["transferlab", "train"] + (["--preset", cell.arm.preset] if cell.arm.preset else [])
    for section, fields in want.items():
        for name, value in fields.items():
            dest = f"{section}.{name}"
            if dest in ("run.overwrite", "run.progress") or dest not in flag_of:
                continue
            if value == base[section][name] and dest not in (
                "model.name",
                "model.mode",
                "run.run_dir",
                "run.seed",
            ):
                continue
            flag, kind = flag_of[dest]
            if kind == "bool":
                argv += [flag] if value else []
            elif kind == "nobool":
                argv += [] if value else [flag]
            else:
                argv += [flag, str(value)]
    return argv


def cmd_study(args) -> int:
    """Run (or --plan) a study; exit 1 listing failed cells, 2 on bad input."""
    from transferlab.cli import _StopFlag
    from transferlab.studies.grid import make_grid, plan_cells
    from transferlab.studies.runner import load_study_data, run_study

    grid = make_grid(
        args.arms.split(","),
        args.per_class,
        args.seeds,
        _overrides(args),
        args.min_steps,
        args.patience_epochs,
    )
    study_dir = Path(args.run_dir)
    if args.plan:
        _, counts = load_study_data(grid)
        for cell in plan_cells(grid, counts, study_dir):
            argv = train_argv(cell, grid)
            sys.stdout.write(
                json.dumps(
                    {
                        "arm": cell.arm.spec,
                        "per_class": cell.per_class,
                        "seed": cell.seed,
                        "run_dir": str(cell.run_dir),
                        "argv": argv[1:],
                        "command": shlex.join(argv),
                    }
                )
                + "\n"
            )
        return 0
    with _StopFlag() as stop:
        result = run_study(
            grid,
            study_dir,
            overwrite=args.overwrite,
            stop_requested=stop,
            progress=grid.overrides.get("run", {}).get("progress", True),
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
    from transferlab.studies.rank import format_rank_table, parse_candidates, rank_candidates

    candidates = parse_candidates(args.candidates)
    rows = rank_candidates(
        candidates, _overrides(args), per_class=args.per_class, seed=args.subset_seed
    )
    if args.json:
        sys.stdout.write(json.dumps([r.to_dict() for r in rows], indent=2) + "\n")
    else:
        sys.stdout.write(format_rank_table(rows))
    return 0


COMMANDS = {"study": cmd_study, "rank": cmd_rank}
