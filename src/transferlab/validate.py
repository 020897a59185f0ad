"""Checks that need only the config, the model's name and the environment: run before any data loads.

Every check here raises :class:`~transferlab.errors.UserError` (exit code 2) with a message that
says what to do. ``check_before_data`` is called once per run, right after the config is
resolved and before the data set is read, so a bad flag never costs a data load.

Usage:
    check_before_data(cfg, env)
"""

from __future__ import annotations

from transferlab.config import Config
from transferlab.distributed import DistEnv


def check_before_data(cfg: Config, env: DistEnv) -> None:
    """All config-only checks, in one place."""
