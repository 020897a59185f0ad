"""Commands a practitioner uses after training: predict, export, report, runs.

Each adds its subparser in :func:`add_subcommands` and its handler to ``COMMANDS``; the
predict and export parsers live beside their code (predict.py, export.py).

Usage:
    transferlab predict runs/lite0 photos/ --top-k 3
    transferlab export runs/lite0 --format onnx
    transferlab report runs/cnn-20261128-120000
    transferlab runs
"""

from __future__ import annotations

import sys
from pathlib import Path


def cmd_predict(args) -> int:
    from transferlab.predict import cmd_predict as run

    return run(args)


def cmd_export(args) -> int:
    from transferlab.export import cmd_export as run

    return run(args)


def cmd_report(args) -> int:
    from transferlab.report.run_report import write_reports
    from transferlab.studies.report import write_study_report
    from transferlab.studies.runner import is_study_dir

    for run_dir in args.run_dirs:
        if is_study_dir(run_dir):  # a study: built from whichever cells exist
            paths = [write_study_report(run_dir)]
        else:
            paths = write_reports(Path(run_dir))
        for path in paths:
            sys.stdout.write(f"wrote {path}\n")
    return 0


def cmd_explain(args) -> int:
    from transferlab.explain import cmd_explain as run

    return run(args)


def cmd_study(args) -> int:
    from transferlab.studies.cli import COMMANDS as study

    return study["study"](args)


def cmd_rank(args) -> int:
    from transferlab.studies.cli import COMMANDS as study

    return study["rank"](args)


def cmd_check_data(args) -> int:
    from transferlab.check_data import cmd_check_data as run

    return run(args)


def cmd_runs(args) -> int:
    from transferlab.report.tracking import find_runs, format_runs

    rows = find_runs(Path(args.root))
    if not rows:
        sys.stdout.write(f"no finished runs (summary.json) under {args.root}\n")
        return 0
    sys.stdout.write(format_runs(rows))
    return 0


COMMANDS: dict = {
    "predict": cmd_predict,
    "export": cmd_export,
    "report": cmd_report,
    "runs": cmd_runs,
    "explain": cmd_explain,
    "study": cmd_study,
    "rank": cmd_rank,
    "check-data": cmd_check_data,
}


def add_subcommands(sub) -> None:
    """Register study, rank, predict, export, explain, report and runs."""
    from transferlab import check_data, explain, export, predict
    from transferlab.studies.cli import add_parsers as add_study_parsers

    add_study_parsers(sub)
    predict.add_parser(sub)
    export.add_parser(sub)
    explain.add_parser(sub)
    check_data.add_parser(sub)
    p = sub.add_parser(
        "report",
        help="rebuild report.md and report.html of runs or compare dirs",
        description="Write report.md and a self-contained report.html for each RUN_DIR (a run "
        "dir, a compare dir holding run dirs, or a study dir), from the saved files "
        "alone.",
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p = sub.add_parser(
        "runs", help="list past runs with model, mode, epochs, best val, test acc and time"
    )
    p.add_argument(
        "root",
        nargs="?",
        default="runs",
        metavar="DIR",
        help="folder searched recursively (default runs/)",
    )
