"""Atomic, complete checkpoints.

A checkpoint holds everything a resume needs: the unwrapped model, optimiser, scheduler,
scaler, epoch and step counters, RNG states, the resolved config, and the early-stopping state.
Writes go through ``transferlab.io.write_torch`` (temp file in the same folder, fsync,
``os.replace``), so a crash or a full disk never leaves a half-written checkpoint where a good
one was.
Loads use ``weights_only=True``: a pickle payload is refused, never run.

Usage:
    write_torch(RunDir(run_dir).last, state)
    state = load_checkpoint(RunDir(run_dir).last)
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from transferlab.errors import UserError
from transferlab.models.weights import safe_torch_load

# What a resume reads from last.pt (``fit.checkpoint_state`` writes these and more).
RESUME_KEYS = ("model", "optimizer", "scheduler", "scaler", "fit_state", "rng", "config")


def load_checkpoint(path: str | Path, require: tuple[str, ...] = ("model", "config")) -> dict:
    """Load a checkpoint safely; a corrupt, hostile or incomplete file is a UserError naming it."""
    obj = safe_torch_load(path)
    if not isinstance(obj, dict):
        raise UserError(
            f"{path} is not a transferlab checkpoint (it holds a {type(obj).__name__}, not a dict)"
        )
    missing = [k for k in require if k not in obj]
    if missing:
        raise UserError(
            f"{path} is not a complete transferlab checkpoint "
            f"(no {', '.join(map(repr, missing))} entries)"
        )
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
