"""Atomic file writes: the one home for "write a temp file, fsync, rename over the target".

Every run file, checkpoint, feature-cache entry, study file, report and export goes through
:func:`write_atomic` (bytes, text, or a writer called with the open file), :func:`write_json` or
:func:`write_torch`, so a crash or a full disk never leaves a half-written file where a good one
was, and a hard-linked target (best.pt and last.pt share an inode) is replaced, never written
through. A writer that needs a path rather than a file (``torch.onnx.export``) uses
:func:`temp_path`, and one that writes several files (OpenVINO) :func:`temp_dir`.

Temporary files are named ``.NAME`` + :data:`TMP_MARK` + ``HOST-PID-XXXXXXXX``: the one marker
that only we use. :func:`is_temp` recognises it, and :func:`sweep_stale_temps` (called by
``cache clear`` and when a run dir is locked) removes the ones whose writer is gone.

Usage:
    write_atomic(path, "text")                     # or bytes
    write_atomic(path, lambda f: np.savez(f, x=x))  # a writer that takes a binary file
    write_json(path, {"a": 1})
    write_torch(path, state_dict)
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import torch

TMP_MARK = ".transferlab-tmp-"  # .NAME.transferlab-tmp-HOST-PID-XXXXXXXX: temp files of ours
STALE_TEMP_S = 24 * 3600  # a temp file older than this is stale even if its process lives


def write_atomic(path: str | Path, data: bytes | str | Callable[[BinaryIO], object]) -> Path:
    """Write ``data`` (bytes, UTF-8 text, or ``data(fileobj)``) to a temp file, fsync, rename.

    The temp file sits beside ``path`` (same file system) and is removed if anything fails.
    """
    path = Path(path)
    if isinstance(data, str):
        data = data.encode()
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
        with os.fdopen(fd, "wb") as f:
            if isinstance(data, bytes):
                f.write(data)
            else:
                data(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def write_json(
    path: str | Path, obj: object, indent: int | None = 2, newline: bool = False
) -> Path:
    """``json.dumps(obj, indent=indent, default=str)`` (plus "\\n" if ``newline``), atomically."""
    return write_atomic(
        path, json.dumps(obj, indent=indent, default=str) + ("\n" if newline else "")
    )


def write_torch(path: str | Path, obj: object) -> Path:
    """``torch.save(obj)`` atomically."""
    return write_atomic(path, lambda f: torch.save(obj, f))


@contextlib.contextmanager
def temp_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside ``path`` (our marker); on success rename it over ``path``.

    For writers that want a file name (``torch.onnx.export``, ``torch.jit.save`` with extras).
    The temp file is removed on failure; the target is replaced, never written through a link.
    """
    path = Path(path)
    tmp = path.with_name(f"{_temp_prefix(path)}{os.urandom(4).hex()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def temp_dir(path: str | Path) -> tempfile.TemporaryDirectory:
    """A temporary folder beside ``path`` with our marker (for tools that write several files)."""
    path = Path(path)
    return tempfile.TemporaryDirectory(prefix=_temp_prefix(path), dir=path.parent)


def is_temp(path: str | Path) -> bool:
    """True for a temp file of ours (a hidden name with :data:`TMP_MARK`)."""
    name = Path(path).name
    return name.startswith(".") and TMP_MARK in name


def is_stale_temp(path: Path, now: float | None = None) -> bool:
    """A temp file of ours whose writer is gone (same host, dead pid) or that is a day old."""
    if not is_temp(path):
        return False
    rest = path.name.split(TMP_MARK, 1)[1]  # HOST-PID-XXXX (the host may contain '-')
    host, _, tail = rest.rpartition("-")[0].rpartition("-")
    pid = int(tail) if tail.isdigit() else -1
    try:
        age = (time.time() if now is None else now) - path.stat().st_mtime
    except OSError:
        return False
    if age > STALE_TEMP_S:
        return True
    if host != socket.gethostname() or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, another user's
        return False
    return False


def sweep_stale_temps(folder: Path) -> dict[Path, int]:
    """Delete the stale temp files of ours directly in ``folder``; returns {path: bytes freed}."""
    removed = {}
    now = time.time()
    for p in Path(folder).glob(f".*{TMP_MARK}*"):
        if is_stale_temp(p, now):
            with contextlib.suppress(FileNotFoundError):
                if p.is_dir() and not p.is_symlink():
                    size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
                    shutil.rmtree(p)
                else:
                    size = p.stat().st_size
                    p.unlink()
                removed[p] = size
    return removed


def _temp_prefix(path: Path) -> str:
    return f".{path.name}{TMP_MARK}{socket.gethostname()}-{os.getpid()}-"


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (best effort: some file systems refuse a directory fsync)."""
    try:
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
