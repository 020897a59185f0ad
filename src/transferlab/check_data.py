"""``transferlab check-data DATA``: look at a folder data set before training on it.

Writes data_report.md, data_report.html and data_report.json (``--out``, default the current
folder, never inside the data) and prints one summary line, or the JSON with ``--json``. The
folder is split as a run would split it (``--val-frac``, ``--test-frac``, ``--split-seed``).
Nothing in the data folder is deleted, moved or written.

Usage:
    transferlab check-data photos/ --out checks/
    transferlab check-data folder:photos --json > leaks.json
"""

from __future__ import annotations

import json
import sys

from transferlab.config import DataConfig, OptionSet
from transferlab.data.check import NEAR_METHODS, check_folder
from transferlab.report.data_report import summary_line, write_data_report
from transferlab.rundir import expand_user, refuse_inside

# the DataConfig fields that decide how a folder is split and read, as train's flags
CHECK = OptionSet(only=("val_frac", "test_frac", "split_seed", "max_image_pixels", "num_workers"))


def add_arguments(p) -> None:
    """The arguments of ``transferlab check-data`` (registered in ``cli.COMMANDS``); the split
    flags come from ``CHECK``."""
    p.add_argument("data", metavar="DATA", help="PATH or folder:PATH (as train's --data)")
    p.add_argument("--out", default=".", help="folder for the data_report files (default: .)")
    p.add_argument("--json", action="store_true", help="print the findings as JSON on stdout")
    p.add_argument(
        "--near",
        default="dhash",
        choices=NEAR_METHODS,
        help="near duplicates across splits by a 64-bit dHash (within 4 bits), or by lite0 "
        "feature cosine >= 0.95 (centred; needs the lite0 extra; not calibrated on photos yet)",
    )


def cmd_check_data(args) -> int:
    data = args.data if args.data.startswith("folder:") else f"folder:{args.data}"
    cfg = DataConfig(dataset=data, **CHECK.from_namespace(args).get("data", {}))
    out = expand_user(args.out, "--out")
    refuse_inside(out.resolve(), expand_user(data[len("folder:") :], "DATA").resolve(), "--out")
    result = check_folder(cfg, args.near)
    md, html, js = write_data_report(result, out)
    if args.json:
        sys.stdout.write(json.dumps(result.to_dict(), indent=2) + "\n")
    else:
        sys.stdout.write(f"{summary_line(result)}\nwrote {md}, {html}, {js}\n")
    return 0
