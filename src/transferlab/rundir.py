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
  (unless ``--force``); :func:`write_via_temp` writes a temp file and renames it over the
  target, so an output never goes through a hard link (best.pt and last.pt share an inode).
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

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from transferlab.errors import NothingToDo, UserError

log = logging.getLogger(__name__)

LOCK_NAME = ".transferlab.lock"
# files the tool itself keeps in a run dir that do not make it "non-empty"
INTERNAL_NAMES = frozenset({LOCK_NAME, ".write-test"})
# what a run writes (README "Run files"); an output path onto one of these is refused
RUN_FILES = frozenset(
    {
        "best.pt",
        "last.pt",
        "metrics.csv",
        "summary.json",
        "config.yaml",
        "model_summary.txt",
        "data_manifest.json",
        "test_predictions.npz",
        "curves.png",
        "report.md",
        "report.html",
        LOCK_NAME,
    }
)
# a folder holding one of these is a run (of ours) that --overwrite may replace
RUN_MARKERS = frozenset({"config.yaml", "last.pt", "best.pt", "summary.json", "metrics.csv"})
ASIDE_INFIX = ".old-"  # .RUN.old-<pid>: an old run set aside by --overwrite
TEMP_INFIX = ".transferlab-"  # .NAME.transferlab-<pid>.tmp: our temp files


# ---------------------------------------------------------------------------------------------
# The lock


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode(errors="replace").split()
    except OSError:
        text = []
    if not text:
        return "another process"
    host = f" on {text[1]}" if len(text) > 1 and text[1] != socket.gethostname() else ""
    return f"process {text[0]}{host}"


@dataclass
class RunLock:
    """An exclusive ``flock`` on a file; released on :meth:`release` or process exit."""

    path: Path
    fd: int = -1

    @classmethod
    def acquire(cls, path: Path, what: str) -> RunLock:
        """Lock ``path`` now or raise a UserError naming the holder (never waits)."""
        import fcntl

        for _ in range(5):  # retry if the file was replaced between open and flock
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise UserError(
                    f"cannot write to {what} {path.parent} ({e.strerror or e}); "
                    "choose another location"
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                raise UserError(
                    f"{what} {path.parent} is in use by {holder} (lock {path}); wait for it "
                    "to finish, or choose another --run-dir"
                ) from None
            except OSError as e:  # ENOLCK: a file system without locks (some NFS mounts)
                log.warning(
                    "cannot lock %s (%s); make sure no other process writes %s",
                    path,
                    e.strerror or e,
                    path.parent,
                )
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
                return cls(path, fd)
            os.close(fd)
        raise UserError(f"could not lock {path}: it keeps being replaced by another process")

    def release(self) -> None:
        """Drop the lock (the file stays: deleting it would race with the next writer)."""
        if self.fd >= 0:
            os.close(self.fd)  # closing the last descriptor releases the flock
            self.fd = -1


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
                    "the new run failed before its first checkpoint: the previous run in %s is "
                    "back as it was",
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
        return RunDirHandle(run_dir, RunLock.acquire(run_dir / LOCK_NAME, "run dir"), created=True)
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
    handle = RunDirHandle(run_dir, RunLock.acquire(run_dir / LOCK_NAME, "run dir"), created=created)
    try:
        _take_over(handle, overwrite, data_root)
    except BaseException:
        handle.rollback()
        handle.release()
        raise
    return handle


def _take_over(handle: RunDirHandle, overwrite: bool, data_root: Path | None) -> None:
    """Refuse a non-empty dir unless it is a run and ``overwrite``; then set the old run aside."""
    run_dir = handle.run_dir
    names = [p.name for p in _visible(run_dir)]
    handle.keep = frozenset(names)  # until they are set aside below
    if names and not overwrite:
        raise UserError(
            f"run dir {run_dir} is not empty; pass --overwrite to replace it (the old run is "
            f"kept until the new one has a checkpoint) or --resume {run_dir} to continue"
        )
    if names and not any(n in RUN_MARKERS for n in names):
        raise UserError(
            f"run dir {run_dir} is not empty and holds no transferlab run (no "
            f"{', '.join(sorted(RUN_MARKERS))}); --overwrite only replaces runs: choose "
            "another --run-dir"
        )
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
    if not (run_dir / "last.pt").is_file():
        raise UserError(
            f"cannot resume: {run_dir / 'last.pt'} does not exist (the run never wrote a "
            "checkpoint); start it again without --resume"
        )
    message = finished_message(run_dir, requested_epochs)
    if message:
        raise NothingToDo(message)
    return RunDirHandle(run_dir, RunLock.acquire(run_dir / LOCK_NAME, "run dir"), committed=True)


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
    summary, last = run_dir / "summary.json", run_dir / "last.pt"
    try:
        s = json.loads(summary.read_text())
        newer = summary.stat().st_mtime >= last.stat().st_mtime
    except (OSError, ValueError):
        return ""
    state = s.get("fit_state") if isinstance(s, dict) else None
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
    import yaml

    path = run_dir / "config.yaml"
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


@contextlib.contextmanager
def write_via_temp(path: Path) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success rename it over ``path`` (never through a link).

    The temp name (``.NAME.transferlab-<pid>.tmp``) is ours alone; it is removed on failure.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}{TEMP_INFIX}{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)  # replaces the directory entry: a hard-linked old file keeps its data
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


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
