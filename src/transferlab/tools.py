"""Commands a practitioner uses after training: predict, export, report, runs.

Each adds its subparser in :func:`add_subcommands` and its handler to ``COMMANDS``.

Usage:
    transferlab report runs/cnn-20261128-120000
"""

from __future__ import annotations

COMMANDS: dict = {}


def add_subcommands(sub) -> None:
    """Register the subcommands (none yet)."""
