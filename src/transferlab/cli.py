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
from transferlab.errors import NothingToDo, TrainingStopped, UserError, describe_failure

log = logging.getLogger("transferlab")

PRESET_DIR = Path(__file__).parent / "presets"

# flag, config path, type, help. Types: int, float, str, "bool" (store_true), "nobool" (store_false).
FLAGS: list[tuple[str, str, object, str]] = [
    ("--data", "data.dataset", str, "cifar100 (default) or folder:PATH (PATH/{train,val,test}/<class>/ or PATH/<class>/)"),
    ("--data-dir", "data.data_dir", str, "parent folder of cifar-100-python/ (default: data)"),
    ("--download", "data.download", "bool", "download CIFAR-100 with torchvision if the files are missing"),
    ("--split-seed", "data.split_seed", int, "seed of the train/val split (default 0)"),
    ("--val-size", "data.val_size", int, "CIFAR validation images held out of the 50,000 (default 5000)"),
    ("--val-frac", "data.val_frac", float, "folder data without val/: stratified validation fraction (default 0.1)"),
    ("--test-frac", "data.test_frac", float, "folder data without test/: stratified test fraction (default 0.1)"),
    ("--train-subset", "data.train_subset", int, "train on a seeded subset of this many images (default: all)"),
    ("--image-size", "data.image_size", int, "input side in px (default: the model's own, 32 for cnn, 224 pretrained)"),
    ("--crop-padding", "data.crop_padding", int, "random crop with this padding in px (default 0 = off)"),
    ("--flip", "data.flip", "bool", "random horizontal flips"),
    ("--cutout", "data.cutout", int, "cutout square side in px (default 0 = off)"),
    ("--per-class", "data.per_class", int, "train on a stratified subset of N images per class (default: all)"),
    ("--subset-seed", "data.subset_seed", int, "seed of the --per-class draw (default 0)"),
    ("--test-subset", "data.test_subset", int, "evaluate on a seeded subset of N test images (default: all)"),
    ("--max-image-pixels", "data.max_image_pixels", int, "skip images with more pixels (default 89478485, PIL's)"),
    ("--on-bad-image", "data.on_bad_image", str, "folder data: skip (default, warn and count) or error"),
    ("--num-workers", "data.num_workers", int, "DataLoader workers for folder data (default 2)"),
    ("--model", "model.name", str, "cnn, a torchvision classifier (resnet18, ...), or timm:<name> (see `transferlab models`)"),
    ("--weights", "model.weights", str, "imagenet (default), none, or PATH to a local state dict"),
    ("--mode", "model.mode", str, "frozen | finetune | gradual | scratch (default: scratch for cnn, frozen otherwise)"),
    ("--head-hidden", "model.head_hidden", int, "hidden units of the head (default 256, the seed's; 0 = linear)"),
    ("--head", "model.head", str, "mlp (default) or linear"),
    ("--head-dropout", "model.head_dropout", float, "dropout in the head (default 0, as in the seed)"),
    ("--drop-path", "model.drop_path", float, "stochastic depth rate of the backbone when it trains (default 0)"),
    ("--solver", "model.solver", str, "sgd (default: the --optimizer) or lbfgs (linear probe on cached features)"),
    ("--freeze-epochs", "model.freeze_epochs", int, "gradual: epochs frozen before unfreezing (default 1)"),
    ("--backbone-lr-div", "model.backbone_lr_div", float, "finetune/gradual: backbone lr = lr / this (default 10)"),
    ("--sync-bn", "model.sync_bn", "bool", "SyncBatchNorm under DDP"),
    ("--optimizer", "optim.optimizer", str, "adam (default, the seed's) | adamw | sgd (Nesterov)"),
    ("--lr", "optim.lr", float, "learning rate of the head / whole model (default 1e-3)"),
    ("--weight-decay", "optim.weight_decay", float, "weight decay, never on norms and biases (default 0)"),
    ("--momentum", "optim.momentum", float, "SGD momentum (default 0.9)"),
    ("--schedule", "optim.schedule", str, "none (default) | cosine | onecycle"),
    ("--warmup-epochs", "optim.warmup_epochs", float, "linear warm-up in epochs (default 0)"),
    ("--label-smoothing", "optim.label_smoothing", float, "label smoothing (default 0)"),
    ("--batch-size", "optim.batch_size", int, "global batch size, split across processes (default 200)"),
    ("--eval-batch-size", "optim.eval_batch_size", int, "evaluation batch size (default 500)"),
    ("--epochs", "optim.epochs", int, "epoch budget (default 10); --max-epochs is the same"),
    ("--max-epochs", "optim.epochs", int, argparse.SUPPRESS),
    ("--patience", "optim.patience", int, "early stop after N epochs without val-acc gain (default off)"),
    ("--target-val-acc", "optim.target_val_acc", float, "stop once val accuracy reaches this (default off)"),
    ("--grad-clip", "optim.grad_clip", float, "clip gradient norm (default off)"),
    ("--run-dir", "run.run_dir", str, "run directory (default runs/<model>-<timestamp>)"),
    ("--device", "run.device", str, "auto (default) | cpu | cuda | cuda:N"),
    ("--seed", "run.seed", int, "seed for init, shuffling and augmentation (default 0)"),
    ("--precision", "run.precision", str, "auto (default) | fp32 | bf16 | fp16"),
    ("--no-channels-last", "run.channels_last", "nobool", "keep NCHW memory layout"),
    ("--compile", "run.compile", "bool", "torch.compile the model"),
    ("--no-feature-cache", "run.feature_cache", "nobool", "frozen mode: run the backbone live every epoch"),
    ("--cache-dir", "run.cache_dir", str, "feature cache dir (default $TRANSFERLAB_CACHE_DIR or ~/.cache/transferlab/features)"),
    ("--feature-views", "run.feature_views", int, "cache K augmented views per training image (default 1)"),
    ("--ckpt-every-steps", "run.ckpt_every_steps", int, "also checkpoint every N steps (default: per epoch)"),
    ("--nan-patience", "run.nan_patience", int, "non-finite losses skipped before stopping (default 0)"),
    ("--overwrite", "run.overwrite", "bool", "reuse a non-empty run dir"),
    ("--tensorboard", "run.tensorboard", "bool", "write TensorBoard scalars to the run dir"),
    ("--track", "run.track", str, "log the run to MLflow: mlflow or mlflow:URI (default URI ./mlruns)"),
    ("--engine", "run.engine", str, "frozen-feature extraction engine: auto (default) | torch | openvino | onnxruntime"),
    ("--no-report", "run.report", "nobool", "do not write report.md/report.html at the end of the run"),
    ("--no-progress", "run.progress", "nobool", "no progress bars"),
]


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (exit code 2) instead of the usage dump."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"transferlab: error: {message} (see `{self.prog} --help`)\n")


def _add_config_flags(p: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    p.add_argument("--preset", help="preset name (cnn-best, ...) or path to a YAML config; flags win over it")
    for flag, dest, kind, help_ in FLAGS:
        if flag in skip:
            continue
        dest_name = "cfg:" + dest
        if kind == "bool":
            p.add_argument(flag, dest=dest_name, action="store_const", const=True, default=None, help=help_)
        elif kind == "nobool":
            p.add_argument(flag, dest=dest_name, action="store_const", const=False, default=None, help=help_)
        else:
            p.add_argument(flag, dest=dest_name, type=kind, default=None, help=help_, metavar=flag[2:].upper().replace("-", "_"))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="transferlab", description="Transfer learning for image classification, measured: "
                     "how much does a pretrained network buy you over a CNN trained from scratch?")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true",
                        help="show the Python traceback of a failure (also TRANSFERLAB_DEBUG=1)")
    parser.add_argument("--version", action="version", version=f"transferlab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("compare", help="the seed study: CNN vs frozen pretrained backbone, with report.md",
                       description="Run the seed study's three experiments and write report.md: (1) the CNN for "
                       "--epochs, (2) a frozen pretrained backbone for --epochs (through the feature cache), "
                       "(3) the CNN until it reaches (2)'s best val accuracy, with patience 5.")
    _add_config_flags(p, skip=("--model", "--mode", "--patience", "--target-val-acc", "--max-epochs", "--run-dir"))
    p.add_argument("--run-dir", default="", help="folder for the three runs and report.md (default runs/compare-<timestamp>)")
    p.add_argument("--backbone", default="resnet18", help="pretrained backbone of experiment 2 (default resnet18)")
    p.add_argument("--chase-max-epochs", type=int, default=50, help="epoch cap of experiment 3 (default 50)")
    p.add_argument("--chase-patience", type=int, default=5, help="patience of experiment 3 (default 5, the seed's)")
    p.add_argument("--with-cnn-best", action="store_true", help="also train the CNN with the cnn-best preset")

    p = sub.add_parser("train", help="train one experiment", description="Train one model; writes a run dir.")
    _add_config_flags(p)
    p.add_argument("--resume", metavar="RUN_DIR", help="continue RUN_DIR from its last checkpoint")

    p = sub.add_parser("cache", help="list or clear the feature cache")
    p.add_argument("action", choices=("list", "clear"))
    p.add_argument("--cache-dir", default="", help="cache dir (default $TRANSFERLAB_CACHE_DIR or ~/.cache/transferlab/features)")

    p = sub.add_parser("models", help="list backbones and which have weights usable offline")
    p.add_argument("--timm", metavar="PATTERN", help="list timm models matching PATTERN (e.g. '*resnet*')")

    from transferlab import tools

    tools.add_subcommands(sub)
    return parser


def config_from_args(args: argparse.Namespace):
    """Defaults < preset < flags, validated into a Config."""
    from transferlab.config import config_from_dict, load_yaml, merge_dicts

    base: dict = {}
    if getattr(args, "preset", None):
        base = load_yaml(resolve_preset(args.preset))
    overrides: dict = {}
    for key, value in vars(args).items():
        if key.startswith("cfg:") and value is not None:
            section, field = key[4:].split(".")
            overrides.setdefault(section, {})[field] = value
    return config_from_dict(merge_dicts(base, overrides))


def resolve_preset(name: str) -> Path:
    """A preset name from the package's presets/ folder, or a YAML path."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    builtin = PRESET_DIR / f"{name}.yaml"
    if builtin.is_file():
        return builtin
    names = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
    raise UserError(f"unknown preset {name!r}; choices: {', '.join(names)} or a path to a .yaml file")


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
            log.warning("got %s: stopping at the next batch (a checkpoint is saved when training)",
                        self.signal_name)

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)

    def __enter__(self) -> _StopFlag:
        self._previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        self.install()
        return self

    def __exit__(self, *exc) -> None:  # an in-process caller (tests, notebooks) gets its handlers back
        for s, h in self._previous.items():
            signal.signal(s, h)


def cmd_train(args) -> int:
    from transferlab.config import Config
    from transferlab.experiment import run_experiment

    with _StopFlag() as stop:
        if args.resume:
            allowed = ("cfg:run.device", "cfg:run.progress")
            given = {"cfg:" + dest: flag for flag, dest, _, _ in reversed(FLAGS)}
            ignored = sorted({given[k] for k, v in vars(args).items() if k in given and v is not None and k not in allowed})
            if ignored or args.preset:
                raise UserError(f"--resume continues with the run's saved config; drop {', '.join(ignored) or '--preset'} "
                                "(only --device and --no-progress may change)")
            cfg = Config()
            cfg.run.run_dir = args.resume
            for key in allowed:
                if vars(args).get(key) is not None:
                    setattr(cfg.run, key.split(".")[1], vars(args)[key])
            summary = run_experiment(cfg, resume=True, stop_requested=stop)
        else:
            summary = run_experiment(config_from_args(args), stop_requested=stop)
    log.info("test loss %.4f, test acc %.4f; run dir %s", summary["test"]["loss"], summary["test"]["acc"], summary["run_dir"])
    return 0


def cmd_compare(args) -> int:
    from transferlab.compare import run_compare

    with _StopFlag() as stop:
        run_compare(config_from_args(args), args, stop_requested=stop)
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
            out.write(f"  {e['key']}  {e['bytes'] / 1e6:8.1f} MB  {e.get('backbone', '?')}  "
                      f"split={e.get('split', '?')}  n={e.get('n', '?')}  views={e.get('views', '?')}  "
                      f"{e.get('image_size', '?')}px  {e.get('precision', '?')}\n")
    if foreign:
        out.write(f"not ours, left alone ({len(foreign)}): "
                  + ", ".join(Path(e["path"]).name for e in foreign[:20])
                  + (f", ... and {len(foreign) - 20} more" if len(foreign) > 20 else "") + "\n")
    return 0


def cmd_models(args) -> int:
    from transferlab.models import registry

    if args.timm is not None:
        names = registry.timm_names(args.timm)
        if not names:
            hint = f" (patterns are globs: try '*{args.timm.strip('*')}*')" if "*" not in args.timm else ""
            sys.stdout.write(f"no timm model matches {args.timm!r}{hint}\n")
        for name in names:
            sys.stdout.write(f"timm:{name}\n")
        return 0
    sys.stdout.write("name                          offline weights\n")
    sys.stdout.write(f"{'cnn':30s}n/a (trains from scratch)\n")
    for name in registry.torchvision_names() + ["timm:tf_efficientnet_lite0"]:
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
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")


def _log_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """``warnings.showwarning`` for a run: third-party warnings (PIL, matplotlib glyphs, torch
    deprecations) become one DEBUG log line (see them with -v), never raw text on stderr."""
    text = (str(message).strip().splitlines() or [""])[0][:300]
    logging.getLogger("py.warnings").debug("%s: %s (%s:%s)", category.__name__, text, filename, lineno)


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
        code, line = 1, (f"internal error ({type(e).__name__}: {first}); this is a bug in transferlab: "
                         f"rerun with --debug (or {DEBUG_ENV}=1) for the traceback and report it")
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
    commands = {"train": cmd_train, "compare": cmd_compare, "cache": cmd_cache, "models": cmd_models}
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
