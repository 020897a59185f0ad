"""Run-directory safety: one writer per run, an ``--overwrite`` that can be undone, owned outputs.

Rules (issue 16), one function each:

* :func:`prepare_run_dir` takes an exclusive advisory lock (``fcntl.flock`` on
  ``RUN/.transferlab.lock``) for the whole run, resume included: a second writer fails at once
  with a one-line :class:`UserError` naming the process that holds it. With ``--overwrite`` the
  old run's files are moved aside (``.RUN.old-<pid>/``, a sibling on the same file system) and
  are deleted only by :meth:`RunDirHandle.commit`, which the run calls once its first checkpoint
  is written. :meth:`RunDirHandle.rollback` (any failure before that) removes the new files and
  puts the old ones back, and removes a run dir this call created, so a failed run leaves no
  empty folder behind.
* :func:`unique_run_dir` claims ``runs/<stem>-<YYYYmmdd-HHMMSS>[-N]`` with an atomic ``mkdir``:
  two runs started in the same second get two folders.
* :func:`refuse_inside` keeps run and cache dirs out of the data root (a run dir inside a
  ``folder:`` tree would be read as a class on the next run).
* Resume: :func:`check_resume_arg` (no empty ``--resume``), :func:`finished_message` (a finished
  run is left untouched, exit 0), :func:`config_hash` / :func:`check_config_unchanged`
  (``config.yaml`` edited since the run started is refused, naming what differs).
* Outputs: :func:`check_output_path` refuses a run's own files and files we did not create
  (unless ``--force``); outputs are written through ``io.write_atomic``/``io.temp_path``, so an
  output never goes through a hard link (best.pt and last.pt share an inode).
* :func:`read_json_file`: a damaged summary.json is one line, not a traceback.

Usage:
    handle = prepare_run_dir(Path("runs/x"), resume=False, overwrite=True,
                             data_root=Path("data/cifar-100-python"))
    try:
        ...                       # config, data, model, first checkpoint
        handle.commit()           # now the old run (moved aside) is deleted
        ...                       # train
    except BaseException:
        handle.rollback()         # before commit(): new files gone, old run back; after: no-op
        raise
    finally:
        handle.release()
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import socket
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import ClassVar

import yaml
from filelock import FileLock, Timeout

from transferlab.errors import NothingToDo, UserError
from transferlab.io import sweep_stale_temps, write_json

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# The layout: every file name of a run dir and of a study dir


@dataclass(frozen=True)
class _OurDir:
    """A folder of ours with a marker file: the path, its ``/`` and the marker's read and write
    (RunDir and StudyDir differ only in their file names and marker tag)."""

    path: Path

    MARKER: ClassVar[str] = ""
    MARKER_FORMAT: ClassVar[str] = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def marker(self) -> Path:
        return self.path / self.MARKER

    def write_marker(self) -> None:
        """Mark the folder as ours (``--overwrite`` replaces only marked folders)."""
        write_marker(self.marker, self.MARKER_FORMAT)

    @classmethod
    def is_ours(cls, path: Path | str) -> bool:
        """True when ``path`` holds this kind's marker."""
        return read_marker(Path(path) / cls.MARKER) == cls.MARKER_FORMAT


@dataclass(frozen=True)
class RunDir(_OurDir):
    """The files of one run dir (README "Run files"): the one place that spells their names."""

    path: Path

    CONFIG: ClassVar[str] = "config.yaml"
    SUMMARY: ClassVar[str] = "summary.json"
    METRICS: ClassVar[str] = "metrics.csv"
    LAST: ClassVar[str] = "last.pt"
    BEST: ClassVar[str] = "best.pt"
    MODEL_SUMMARY: ClassVar[str] = "model_summary.txt"
    PREDICTIONS: ClassVar[str] = "test_predictions.npz"
    MANIFEST: ClassVar[str] = "data_manifest.json"
    CURVES: ClassVar[str] = "curves.png"
    CONFUSION: ClassVar[str] = "confusion.png"
    MISCLASSIFIED: ClassVar[str] = "misclassified.png"
    GRADCAM_MISTAKES: ClassVar[str] = "gradcam_mistakes.png"
    GRADCAM_CORRECT: ClassVar[str] = "gradcam_correct.png"
    REPORT_MD: ClassVar[str] = "report.md"
    REPORT_HTML: ClassVar[str] = "report.html"
    TENSORBOARD: ClassVar[str] = "tb"
    TUNE_DB: ClassVar[str] = "tune.db"  # --tune: Optuna's SQLite storage
    TUNE: ClassVar[str] = "tune.json"  # --tune: the search's outcome
    MLFLOW: ClassVar[str] = "mlflow.json"
    CONTINUED_FROM: ClassVar[str] = "continued_from.json"  # a chase that resumed experiment 1
    FAILED: ClassVar[str] = "failed.json"  # a study cell that failed, with its message
    FOLD: ClassVar[str] = "fold-{}"  # --folds K: RUN/fold-1 ... fold-K, each a run dir
    LOCK: ClassVar[str] = ".transferlab.lock"
    MARKER: ClassVar[str] = ".transferlab-run"  # written first: this folder is a run of ours
    MARKER_FORMAT: ClassVar[str] = "transferlab-run"
    FINISHED: ClassVar[tuple[str, ...]] = (CONFIG, SUMMARY, METRICS)  # a finished run has these

    config = property(lambda self: self.path / self.CONFIG)
    summary = property(lambda self: self.path / self.SUMMARY)
    metrics = property(lambda self: self.path / self.METRICS)
    last = property(lambda self: self.path / self.LAST)
    best = property(lambda self: self.path / self.BEST)
    model_summary = property(lambda self: self.path / self.MODEL_SUMMARY)
    predictions = property(lambda self: self.path / self.PREDICTIONS)
    manifest = property(lambda self: self.path / self.MANIFEST)
    curves = property(lambda self: self.path / self.CURVES)
    confusion = property(lambda self: self.path / self.CONFUSION)
    misclassified = property(lambda self: self.path / self.MISCLASSIFIED)
    gradcam_mistakes = property(lambda self: self.path / self.GRADCAM_MISTAKES)
    gradcam_correct = property(lambda self: self.path / self.GRADCAM_CORRECT)
    report_md = property(lambda self: self.path / self.REPORT_MD)
    report_html = property(lambda self: self.path / self.REPORT_HTML)
    tensorboard = property(lambda self: self.path / self.TENSORBOARD)
    tune_db = property(lambda self: self.path / self.TUNE_DB)
    tune = property(lambda self: self.path / self.TUNE)
    mlflow = property(lambda self: self.path / self.MLFLOW)
    continued_from = property(lambda self: self.path / self.CONTINUED_FROM)
    failed = property(lambda self: self.path / self.FAILED)
    lock = property(lambda self: self.path / self.LOCK)

    def fold(self, i: int) -> Path:
        """The run dir of fold ``i`` (1-based) of a ``--folds`` run."""
        return self.path / self.FOLD.format(i)

    def is_finished(self) -> bool:
        """summary.json exists: the run went through its last epoch and its test."""
        return self.summary.is_file()


@dataclass(frozen=True)
class StudyDir(_OurDir):
    """The files of a study dir (its cells are run dirs below it): their one place."""

    path: Path

    STUDY: ClassVar[str] = "study.json"  # the grid, compared on every later start
    CELLS: ClassVar[str] = "cells.json"  # class counts and the planned cells
    COSTS: ClassVar[str] = "costs.json"  # per arm: MACs, parameters, inference img/s
    CSV: ClassVar[str] = "study.csv"  # one row per cell
    REPORT_MD: ClassVar[str] = "report.md"
    REPORT_HTML: ClassVar[str] = "report.html"
    EFFICIENCY_PNG: ClassVar[str] = "data_efficiency.png"
    COST_PNG: ClassVar[str] = "accuracy_vs_cost.png"
    MARKER: ClassVar[str] = ".transferlab-study"
    MARKER_FORMAT: ClassVar[str] = "transferlab-study"

    study = property(lambda self: self.path / self.STUDY)
    cells = property(lambda self: self.path / self.CELLS)
    costs = property(lambda self: self.path / self.COSTS)
    csv = property(lambda self: self.path / self.CSV)
    report_md = property(lambda self: self.path / self.REPORT_MD)
    report_html = property(lambda self: self.path / self.REPORT_HTML)
    efficiency_png = property(lambda self: self.path / self.EFFICIENCY_PNG)
    cost_png = property(lambda self: self.path / self.COST_PNG)


MARKER_VERSION = 1


def write_marker(path: Path, fmt: str) -> None:
    """``{"format": fmt, "version": 1}`` at ``path`` (atomically)."""
    write_json(path, {"format": fmt, "version": MARKER_VERSION}, newline=True)


def read_marker(path: Path) -> str | None:
    """The ``format`` tag of a marker file; None if it is missing or not one of ours."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data.get("format") if isinstance(data, dict) else None


LOCK_NAME = RunDir.LOCK
# files the tool itself keeps in a run dir that do not make it "non-empty"
INTERNAL_NAMES = frozenset({LOCK_NAME, ".write-test"})
# what a run writes (README "Run files"); an output path onto one of these is refused
RUN_FILES = frozenset(
    {
        RunDir.BEST,
        RunDir.LAST,
        RunDir.METRICS,
        RunDir.SUMMARY,
        RunDir.CONFIG,
        RunDir.MODEL_SUMMARY,
        RunDir.MANIFEST,
        RunDir.PREDICTIONS,
        RunDir.CURVES,
        RunDir.CONFUSION,
        RunDir.TUNE_DB,
        RunDir.TUNE,
        RunDir.REPORT_MD,
        RunDir.REPORT_HTML,
        RunDir.MARKER,
        LOCK_NAME,
    }
)
ASIDE_INFIX = ".old-"  # .RUN.old-<pid>: an old run set aside by --overwrite


# ---------------------------------------------------------------------------------------------
# summary.json


SUMMARY_VERSION = 1  # 1: the "version" field itself (0: the files written before it)


@dataclass(frozen=True)
class Summary:
    """summary.json: a finished run's results, times, data and versions (written once, at the end).

    ``train`` is ``{"loss", "acc"}``; ``val``/``test`` add ``balanced_acc``, ``macro_f1``,
    ``top5_acc`` and ``per_class`` (``outputs.split_metrics``: precision, recall, F1, support);
    ``params`` is ``{"total", "trainable"}``; ``time_s`` is seconds ``{"total", "train", "eval",
    "setup"}``. Read older files through
    :meth:`read` (or :meth:`from_dict`), which upgrades them with :func:`upgrade_summary`.
    """

    model: str
    mode: str
    run_dir: str
    weights: str
    params: dict
    train: dict
    val: dict
    test: dict
    best_epoch: int
    epochs_run: int
    stop_reason: str
    time_s: dict
    data: dict
    precision: str | None = None
    image_size: int | None = None
    plan: dict | None = None
    feature_cache: dict | None = None
    probe: dict | None = None
    seed: int | None = None
    world_size: int = 1
    versions: dict = field(default_factory=dict)
    fit_state: dict = field(default_factory=dict)
    folds: dict | None = None  # --folds K: per fold, mean and 95% interval, the final model
    version: int = SUMMARY_VERSION

    def to_dict(self) -> dict:
        """The JSON object, keys in field order."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def write(self, path: Path) -> None:
        """Write summary.json atomically (``path``: the file or its run dir)."""
        path = Path(path)
        write_json(path / RunDir.SUMMARY if path.is_dir() else path, self.to_dict())

    @classmethod
    def from_dict(cls, raw: dict, path: Path | None = None) -> Summary:
        """A Summary from a parsed summary.json (at ``path``) of any version; damage: UserError."""
        where = str(path or RunDir.SUMMARY)
        d = upgrade_summary(raw, path)
        names = {f.name for f in fields(cls)}
        required = [
            f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING
        ]
        missing = [k for k in required if k not in d]
        unknown = sorted(k for k in d if k not in names)  # never dropped silently
        if missing or unknown:
            what = "; ".join(
                [f"no {', '.join(missing)}"] * bool(missing)
                + [f"unknown {', '.join(map(str, unknown))}"] * bool(unknown)
            )
            raise UserError(
                f"{where} is damaged or from another version ({what}); rerun the training to "
                "rewrite it"
            )
        s = cls(**d)
        bad = [
            k
            for k in ("params", "train", "val", "test", "time_s", "data")
            if not isinstance(getattr(s, k), dict)
        ]
        if bad:
            raise UserError(
                f"{where} is damaged or from another version ({', '.join(bad)} not an object); "
                "rerun the training to rewrite it"
            )
        return s

    @classmethod
    def read(cls, path: Path) -> Summary:
        """Read summary.json (``path``: the file or its run dir); any damage is one UserError."""
        path = Path(path)
        if path.is_dir():
            path = path / RunDir.SUMMARY
        return cls.from_dict(read_json_file(path, "summary"), path)


def upgrade_summary(raw: dict, path: Path | None = None) -> dict:
    """A summary.json object (read from ``path``) of any version as the current version's dict.

    The one place that knows older files. Version 0 (no ``version`` field): early runs nested the
    per-split feature-cache info under ``feature_cache.splits``, and had no ``weights`` field
    (read from the run's config.yaml instead).
    """
    where = str(path or RunDir.SUMMARY)
    d = dict(raw)
    version = d.get("version", 0)
    if not isinstance(version, int) or version > SUMMARY_VERSION:
        raise UserError(
            f"{where} is from a newer transferlab (summary version {version!r}, this one reads "
            f"up to {SUMMARY_VERSION}); upgrade transferlab"
        )
    if version == 0:
        fc = d.get("feature_cache")
        if isinstance(fc, dict) and isinstance(fc.get("splits"), dict):
            fc = {k: v for k, v in fc.items() if k != "splits"}
            fc.update(raw["feature_cache"]["splits"])
            d["feature_cache"] = fc
        if not d.get("weights"):
            d["weights"] = _weights_from_config(path.parent) if path else "?"
        d["version"] = SUMMARY_VERSION
    return d


def _weights_from_config(run_dir: Path) -> str:
    """Weights of a run whose summary.json predates the field, from its config.yaml ("?")."""
    try:
        model = yaml.safe_load((run_dir / RunDir.CONFIG).read_text())["model"]
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return "?"
    return "n/a (scratch)" if model.get("mode") == "scratch" else str(model.get("weights", "?"))


# ---------------------------------------------------------------------------------------------
# The lock


def _holder(path: Path) -> str:
    """Who holds the lock, from the "PID HOST" line its holder wrote into the lock file."""
    try:
        text = path.read_text(errors="replace").split()
    except OSError:
        text = []
    if not text:
        return "another process"
    host = f" on {text[1]}" if len(text) > 1 and text[1] != socket.gethostname() else ""
    return f"process {text[0]}{host}"


@dataclass
class RunLock:
    """An exclusive ``filelock.FileLock`` (``flock`` on Unix) on a file; the kernel frees it when
    its holder exits, killed or not. Released on :meth:`release` or process exit."""

    path: Path
    lock: FileLock | None = None  # None: the file system has no locks (warned)

    @classmethod
    def acquire(cls, path: Path, what: str) -> RunLock:
        """Lock ``path`` now or raise a UserError naming the holder (never waits)."""
        lock = FileLock(path, timeout=0, mode=0o644)
        try:
            lock.acquire()
        except Timeout:
            raise UserError(
                f"{what} {path.parent} is in use by {_holder(path)} (lock {path}); wait for it "
                "to finish, or choose another --run-dir"
            ) from None
        except OSError as e:
            if e.errno != errno.ENOLCK:
                raise UserError(
                    f"cannot write to {what} {path.parent} ({e.strerror or e}); "
                    "choose another location"
                ) from None
            # a file system without locks (some NFS mounts): go on, and say so
            log.warning(
                "cannot lock %s (%s); make sure no other process writes %s",
                path,
                e.strerror or e,
                path.parent,
            )
            return cls(path, None)
        try:  # for the message of the next process that tries (the lock keeps this inode)
            with open(path, "r+") as f:
                f.truncate(0)
                f.write(f"{os.getpid()} {socket.gethostname()}\n")
        except OSError:
            pass
        return cls(path, lock)

    def release(self) -> None:
        """Drop the lock (the file stays: deleting it would race with the next writer)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None


# ---------------------------------------------------------------------------------------------
# Creating, overwriting and rolling back a run dir


def make_output_dir(path: Path, flag: str) -> Path:
    """``mkdir -p path``, or a UserError naming ``flag`` (the option that chose the path)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        why = e.strerror or e
        raise UserError(f"cannot create {path} ({why}); choose another {flag}") from None
    return path


def unique_run_dir(root: Path, stem: str, now: datetime | None = None) -> Path:
    """Create and return ``root/<stem>-<YYYYmmdd-HHMMSS>`` (``-2``, ``-3``, ... if taken)."""
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    stem = stem.replace(":", "-").replace("/", "-")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {root} ({e.strerror or e}); pass --run-dir") from None
    for n in range(1, 10_000):
        path = root / (f"{stem}-{stamp}" if n == 1 else f"{stem}-{stamp}-{n}")
        try:
            path.mkdir()  # atomic: exactly one process gets each name
            return path
        except FileExistsError:
            continue
        except OSError as e:
            raise UserError(f"cannot create {path} ({e.strerror or e}); pass --run-dir") from None
    raise UserError(f"no free run dir name for {stem}-{stamp} under {root}; pass --run-dir")


def _visible(run_dir: Path) -> list[Path]:
    return sorted(p for p in run_dir.iterdir() if p.name not in INTERNAL_NAMES)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


@dataclass
class RunDirHandle:
    """A locked run dir; ``commit``/``rollback`` decide the fate of an ``--overwrite``'s old run."""

    run_dir: Path
    lock: RunLock
    created: bool = False  # this call created run_dir (rollback removes it)
    aside: Path | None = None  # the old run's files, moved here by --overwrite
    committed: bool = False
    moved: list[str] = field(default_factory=list)  # names moved aside
    keep: frozenset[str] = frozenset()  # names that were there before and stay (never removed)

    def commit(self) -> None:
        """The new run has its first checkpoint: delete the old run set aside (if any)."""
        if self.committed:
            return
        self.committed = True
        if self.aside is not None:
            try:
                shutil.rmtree(self.aside)
                log.info("--overwrite: removed the previous run's files (%d)", len(self.moved))
            except OSError as e:
                log.warning(
                    "could not remove the previous run's files in %s (%s); delete it by hand",
                    self.aside,
                    e.strerror or e,
                )
            self.aside = None

    def rollback(self) -> None:
        """Before commit: remove what the new run wrote and put the old run back. Never raises."""
        if self.committed:
            return
        self.committed = True
        try:
            for p in _visible(self.run_dir):
                if p.name not in self.keep:
                    _remove(p)
            if self.aside is not None:
                for name in self.moved:
                    os.rename(self.aside / name, self.run_dir / name)
                self.aside.rmdir()
                log.warning(
                    "the new run stopped before its first epoch was done: the previous run in %s "
                    "is back as it was",
                    self.run_dir,
                )
                self.aside = None
            elif self.created and not self.keep:
                (self.run_dir / LOCK_NAME).unlink(missing_ok=True)
                self.run_dir.rmdir()  # a failed run leaves no empty run dir behind
        except OSError as e:
            where = f"; the previous run's files are in {self.aside}" if self.aside else ""
            log.error(
                "could not undo the failed run in %s (%s)%s", self.run_dir, e.strerror or e, where
            )

    def release(self) -> None:
        """Release the lock (call last, after commit or rollback)."""
        self.lock.release()

    def __enter__(self) -> RunDirHandle:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.rollback()
        else:
            self.commit()
        self.release()


def _warn_stale_asides(run_dir: Path) -> None:
    for p in sorted(run_dir.parent.glob(f".{run_dir.name}{ASIDE_INFIX}*")):
        log.warning(
            "found %s: the files of an earlier run set aside by an --overwrite that was killed; "
            "move them back into %s or delete the folder",
            p,
            run_dir,
        )


def _set_aside(run_dir: Path, names: list[str]) -> Path:
    aside = run_dir.parent / f".{run_dir.name}{ASIDE_INFIX}{os.getpid()}"
    n = 1
    while aside.exists():
        n += 1
        aside = run_dir.parent / f".{run_dir.name}{ASIDE_INFIX}{os.getpid()}-{n}"
    aside.mkdir()
    done = []
    try:
        for name in names:
            os.rename(run_dir / name, aside / name)
            done.append(name)
    except OSError as e:
        for name in done:  # put back what already moved
            os.rename(aside / name, run_dir / name)
        aside.rmdir()
        raise UserError(
            f"--overwrite: cannot move the old files of {run_dir} aside ({e.strerror or e}); "
            "nothing was changed"
        ) from None
    return aside


def prepare_run_dir(
    run_dir: Path | str | None,
    resume: bool,
    overwrite: bool,
    *,
    data_root: Path | None = None,
    stem: str = "run",
    runs_root: Path = Path("runs"),
    requested_epochs: int | None = None,
) -> RunDirHandle:
    """Lock (and create) the run dir; with ``overwrite``, move the old run aside (undoable).

    ``run_dir`` None or "" claims a unique ``runs_root/<stem>-<time>``. Resume needs
    ``last.pt`` and raises :class:`NothingToDo` for a finished run, before touching anything.
    ``data_root``: refuse a run dir inside it before anything is written.
    """
    if run_dir is not None and str(run_dir) != "":
        run_dir = Path(run_dir).expanduser()
        if data_root is not None:
            refuse_inside(run_dir, data_root, "run dir")
    elif resume:
        check_resume_arg("")
    else:
        if data_root is not None:
            refuse_inside(runs_root, data_root, "run dir")
        run_dir = unique_run_dir(runs_root, stem)
        handle = RunDirHandle(
            run_dir, RunLock.acquire(run_dir / LOCK_NAME, "run dir"), created=True
        )
        try:
            _mark(handle)
        except BaseException:
            handle.rollback()
            handle.release()
            raise
        return handle
    if resume:
        return _prepare_resume(run_dir, requested_epochs)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"run dir {run_dir} is a file, not a folder; choose another --run-dir")
    created = False
    try:
        run_dir.mkdir(parents=True)
        created = True
    except FileExistsError:
        pass
    except OSError as e:
        raise UserError(
            f"cannot create run dir {run_dir} ({e.strerror or e}); choose another --run-dir"
        ) from None
    if not created:  # refused before the lock: a refusal leaves no lock file in a user's folder
        _refuse_foreign(run_dir, [p.name for p in _visible(run_dir)], overwrite)
    handle = RunDirHandle(run_dir, RunLock.acquire(run_dir / LOCK_NAME, "run dir"), created=created)
    try:
        _take_over(handle, overwrite, data_root)
        _mark(handle)
    except BaseException:
        handle.rollback()
        handle.release()
        raise
    return handle


def _mark(handle: RunDirHandle) -> None:
    """Write the run marker first, so that a run dir of ours is recognisable from its start."""
    try:
        RunDir(handle.run_dir).write_marker()
    except OSError as e:
        raise UserError(
            f"cannot write to run dir {handle.run_dir} ({e.strerror or e}); choose another "
            "--run-dir"
        ) from None


def _take_over(handle: RunDirHandle, overwrite: bool, data_root: Path | None) -> None:
    """Refuse a non-empty dir unless it is a run and ``overwrite``; then set the old run aside."""
    run_dir = handle.run_dir
    sweep_stale_temps(run_dir)  # the temp files of a killed writer (we hold the lock now)
    names = [p.name for p in _visible(run_dir)]
    handle.keep = frozenset(names)  # until they are set aside below
    _refuse_foreign(run_dir, names, overwrite)  # again, under the lock
    if names and data_root is not None and _inside(Path(data_root), run_dir):
        raise UserError(
            f"run dir {run_dir} holds the data root {data_root}; --overwrite would move "
            "your data: choose another --run-dir"
        )
    _probe_writable(run_dir)
    _warn_stale_asides(run_dir)
    if names:
        handle.aside = _set_aside(run_dir, names)
        handle.moved, handle.keep = names, frozenset()
        log.info(
            "--overwrite: the previous run's %d file(s) are set aside in %s until the new "
            "run has its first checkpoint",
            len(names),
            handle.aside,
        )


def _refuse_foreign(run_dir: Path, names: list[str], overwrite: bool) -> None:
    """A non-empty dir needs --overwrite, and --overwrite replaces only a run of ours."""
    if names and not overwrite:
        raise UserError(
            f"run dir {run_dir} is not empty; pass --overwrite to replace it (the old run is "
            f"kept until the new one has finished an epoch) or --resume {run_dir} to continue"
        )
    if names and not RunDir.is_ours(run_dir):  # a config.yaml, .git or a thesis is not a run
        raise UserError(
            f"run dir {run_dir} holds {_listing(names)} and no {RunDir.MARKER} marker: it is "
            "not a transferlab run, and --overwrite only replaces runs. Choose another "
            "--run-dir (or empty it yourself)"
        )


def _listing(names: list[str], show: int = 4) -> str:
    """'.git, config.yaml, notes.txt and 3 more': what a folder holds, for a refusal."""
    found = sorted(names)
    shown = found[:show]
    more = f" and {len(found) - show} more" if len(found) > show else ""
    return ", ".join(shown) + more


def _probe_writable(run_dir: Path) -> None:
    probe = run_dir / ".write-test"
    try:
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(
            f"cannot write to run dir {run_dir} ({e.strerror or e}); choose another --run-dir"
        ) from None


def _prepare_resume(run_dir: Path, requested_epochs: int | None) -> RunDirHandle:
    if not run_dir.is_dir():
        raise UserError(f"cannot resume: {run_dir} is not a folder; pass the run dir to continue")
    files = RunDir(run_dir)
    if not files.last.is_file():
        raise UserError(
            f"cannot resume: {files.last} does not exist (the run never wrote a "
            "checkpoint); start it again without --resume"
        )
    message = finished_message(run_dir, requested_epochs)
    if message:
        raise NothingToDo(message)
    handle = RunDirHandle(run_dir, RunLock.acquire(files.lock, "run dir"), committed=True)
    try:
        sweep_stale_temps(run_dir)
        if not RunDir.is_ours(run_dir):  # a run from before the marker
            _mark(handle)
    except BaseException:
        handle.release()
        raise
    return handle


# ---------------------------------------------------------------------------------------------
# Resume rules


def check_resume_arg(value: str | None) -> Path:
    """The run dir named by ``--resume``; an empty or blank value is an error."""
    if value is None or not str(value).strip():
        raise UserError(
            "--resume needs the run dir to continue, e.g. --resume runs/cnn-20261129-120000; "
            "got an empty string"
        )
    return Path(value).expanduser()


def finished_message(run_dir: Path, requested_epochs: int | None = None) -> str:
    """A message if ``run_dir`` is a finished run with nothing left to do, else "".

    Finished: summary.json (written after the last epoch and the test) is newer than last.pt and
    records a stop reason, and no larger ``--epochs`` than it ran is asked for.
    """
    files = RunDir(run_dir)
    try:  # only the fit state matters here: a summary damaged elsewhere does not block a resume
        state = upgrade_summary(read_json_file(files.summary), files.summary).get("fit_state")
        newer = files.summary.stat().st_mtime >= files.last.stat().st_mtime
    except (OSError, UserError):
        return ""
    if not newer or not isinstance(state, dict) or not state.get("stop_reason"):
        return ""
    epochs = int(state.get("epoch") or 0)
    if requested_epochs is not None and requested_epochs > epochs:
        return ""
    return (
        f"{run_dir} is finished ({epochs} epochs, {state['stop_reason']}); nothing to resume, "
        f"files untouched. To train longer: transferlab train --resume {run_dir} --epochs N "
        f"with N > {epochs}"
    )


def config_hash(path: Path) -> str:
    """sha256 of a file's bytes (store ``config_hash(run_dir / "config.yaml")`` in checkpoints)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _flatten(d: object, prefix: str = "") -> dict[str, object]:
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    out: dict[str, object] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}."))
    return out


def check_config_unchanged(run_dir: Path, saved_hash: str | None, saved_config: dict) -> None:
    """Refuse a resume whose ``config.yaml`` was edited since the run started (names what differs).

    ``saved_hash``: the checkpoint's config hash (None for checkpoints older than the hash: no
    check). ``saved_config``: the checkpoint's config dict, to say what differs.
    """
    path = run_dir / RunDir.CONFIG
    if not saved_hash:
        return
    if not path.is_file():
        log.warning("%s is missing; the checkpoint's own config is used", path)
        return
    if config_hash(path) == saved_hash:
        return
    try:
        now = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError):
        now = None
    if not isinstance(now, dict):
        raise UserError(
            f"{path} was edited since the run started and is no longer a valid config; restore it "
            "(the run resumes with its checkpoint's config), or start a new run"
        )
    # the config sections the checkpoint holds; config.yaml may carry more (a resolved: record)
    a = _flatten(saved_config)
    b = _flatten({k: v for k, v in now.items() if k in saved_config})
    diffs = [
        f"{k}: {a.get(k, '(absent)')!r} -> {b.get(k, '(absent)')!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
    ]
    what = "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "")
    raise UserError(
        f"{path} was edited since the run started ({what or 'formatting or a derived section'}); "
        "a resume continues with the run's own config: undo the edit, or start a new run "
        "(--preset on the edited file)"
    )


# ---------------------------------------------------------------------------------------------
# Data roots and outputs


def data_root(dataset: str, data_dir: str) -> Path | None:
    """The folder the data is read from: ``folder:PATH`` -> PATH, CIFAR -> DIR/cifar-100-python."""
    if dataset.startswith("folder:"):
        path = dataset[len("folder:") :]
        return expand_user(path, "--data folder:") if path.strip() else None
    return expand_user(data_dir, "--data-dir") / "cifar-100-python"


def expand_user(path: str | Path, what: str) -> Path:
    """``Path(path).expanduser()``; an unknown ``~user`` is a UserError, not a RuntimeError."""
    try:
        return Path(path).expanduser()
    except RuntimeError:
        raise UserError(f"{what} {path}: no such user for '~'; write the full path") from None


def resolve_path(path: Path, what: str) -> Path:
    """``path.resolve()``; a symbolic link loop is a UserError (Python raises RuntimeError)."""
    try:
        return path.resolve()
    except (RuntimeError, OSError) as e:
        raise UserError(f"{what} {path}: cannot resolve it ({e}); fix or remove the link") from None


def _inside(path: Path, root: Path, what: str = "path") -> bool:
    p, r = resolve_path(path, what), resolve_path(root, "data root")
    return p == r or r in p.parents


def refuse_inside(path: Path, root: Path, what: str) -> None:
    """UserError if ``path`` is (inside) the data root ``root``: it would be read as data."""
    if _inside(Path(path), Path(root), what):
        raise UserError(
            f"{what} {path} is inside the data root {root}: its files would be read as data "
            f"by later runs; choose a {what} outside {root}"
        )


def check_output_path(
    path: Path, run_dir: Path | None, force: bool, is_ours: Callable[[Path], bool] = lambda p: False
) -> None:
    """Refuse to write ``path`` onto a run's own file or a file we did not create, unless ``force``.

    ``is_ours(path)`` says whether an existing ``path`` is an earlier output of the same command
    (e.g. an export with its sidecar JSON): those are replaced without --force.
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"output {path} is a folder; give a file path")
    if force:
        return
    if run_dir is not None and _is_run_file(path, Path(run_dir)):
        raise UserError(
            f"output {path} is one of the run's own files; choose another --output "
            "(or --force to replace it anyway)"
        )
    if (path.exists() or path.is_symlink()) and not is_ours(path):
        raise UserError(
            f"output {path} exists and was not written by this command; choose another --output "
            "or pass --force to replace it"
        )


def _is_run_file(path: Path, run_dir: Path) -> bool:
    if not run_dir.is_dir():
        return False
    candidates = [run_dir / name for name in RUN_FILES]
    if path.parent.resolve() == run_dir.resolve() and path.name in RUN_FILES:
        return True
    if not path.exists():
        return False
    return any(
        c.exists() and os.path.samefile(c, path) for c in candidates
    )  # a hard or soft link to one


def read_json_file(path: Path, what: str = "") -> dict:
    """A JSON object from ``path``; a missing, damaged or non-object file: a one-line UserError."""
    name = what or path.name
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{path} not found: pass a finished run dir") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path} ({getattr(e, 'strerror', None) or e})") from None
    except ValueError as e:
        raise UserError(
            f"{name} {path} is damaged (not valid JSON: {e}); rerun or restore it"
        ) from None
    if not isinstance(data, dict):
        raise UserError(f"{name} {path} is damaged (holds a {type(data).__name__}, not an object)")
    return data
