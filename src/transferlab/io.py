"""Atomic file writes: the one home for "write a temp file, fsync, rename over the target".

Checkpoints, feature-cache entries, metrics rewrites, summaries and exports all go through
:func:`atomic_write`, so a crash or a full disk never leaves a half-written file where a good
one was, and a hard-linked target (best.pt and last.pt share an inode) is replaced, never
written through. Temporary files carry the prefix :data:`TMP_PREFIX`, a name only we use.

Usage:
    atomic_write(run_dir / "summary.json", lambda f: f.write(b"{}"))
    atomic_save(state_dict, run_dir / "last.pt")
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import torch

TMP_PREFIX = ".transferlab-tmp."  # temporary files of ours: safe to sweep when stale


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> None:
    """Call ``write(fileobj)`` on a temp file beside ``path``, fsync, then rename over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    """:func:`atomic_write` for a UTF-8 text."""
    atomic_write(path, lambda f: f.write(text.encode()))


def atomic_save(obj: object, path: str | Path) -> None:
    """``torch.save`` atomically."""
    atomic_write(path, lambda f: torch.save(obj, f))


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
