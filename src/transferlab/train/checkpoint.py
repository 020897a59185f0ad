"""Atomic, complete checkpoints.

A checkpoint holds everything a resume needs: the unwrapped model, optimiser, scheduler,
scaler, epoch and step counters, RNG states, the resolved config, and the early-stopping state.
Writes go to a temporary file in the same folder, are fsynced, then ``os.replace``d over the old
file, so a crash or a full disk never leaves a half-written checkpoint where a good one was.
Loads use ``weights_only=True``: a pickle payload is refused, never run.

Usage:
    atomic_save(state, run_dir / "last.pt")
    state = load_checkpoint(run_dir / "last.pt")
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import torch

from transferlab.errors import UserError
from transferlab.models.weights import safe_torch_load


def atomic_write(path: str | Path, write) -> None:
    """Call ``write(fileobj)`` on a temp file beside ``path``, fsync, then rename over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
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


def atomic_save(obj: object, path: str | Path) -> None:
    """``torch.save`` atomically."""
    atomic_write(path, lambda f: torch.save(obj, f))


# What a resume reads from last.pt (``fit.checkpoint_state`` writes these and more).
RESUME_KEYS = ("model", "optimizer", "scheduler", "scaler", "fit_state", "rng", "config")


def load_checkpoint(path: str | Path, require: tuple[str, ...] = ("model", "config")) -> dict:
    """Load a checkpoint safely; a corrupt, hostile or incomplete file is a UserError naming it."""
    obj = safe_torch_load(path)
    if not isinstance(obj, dict):
        raise UserError(f"{path} is not a transferlab checkpoint (it holds a {type(obj).__name__}, not a dict)")
    missing = [k for k in require if k not in obj]
    if missing:
        raise UserError(f"{path} is not a complete transferlab checkpoint (no {', '.join(map(repr, missing))} entries)")
    return obj


def rng_state() -> dict:
    """Every RNG the training loop touches (torch CPU/CUDA and Python's)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` saved."""
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
