"""The ``transferlab`` command's entry point: OpenMP's wait policy first, then the CLI.

torch's Linux wheels run their parallel regions on GNU OpenMP (libgomp), whose idle threads spin
for about 300,000 iterations before they sleep. On a CPU shared with other jobs those spins take
the cores the other threads need: the seed CNN trained 7x slower beside one other PyTorch job
(issue 25). ``OMP_WAIT_POLICY=PASSIVE`` makes idle threads sleep at once (GOMP_SPINCOUNT then
defaults to 0). libgomp reads it once, when torch loads it, so it must be in the environment
before anything imports torch.

That is why this module is the one exception to "imports at the top": it sets the variable,
then imports the CLI (and so torch). It is also the only place that changes the process
environment: the console script and ``python -m transferlab`` come here, a library user's
``import transferlab`` does not. A value the user set is kept.

Usage:
    transferlab train ...              # [project.scripts] transferlab = transferlab.entry:main
    OMP_WAIT_POLICY=ACTIVE transferlab train ...      # the user's choice wins
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

PASSIVE_WAITS = {"OMP_WAIT_POLICY": "PASSIVE"}  # idle OpenMP threads sleep instead of spinning


def set_passive_waits(environ: MutableMapping[str, str]) -> dict[str, str]:
    """Set :data:`PASSIVE_WAITS` in ``environ`` where the user has not; returns what was set."""
    added = {k: v for k, v in PASSIVE_WAITS.items() if k not in environ}
    environ.update(added)
    return added


def main(argv: list[str] | None = None) -> int:
    """``transferlab``: passive OpenMP waits, then :func:`transferlab.cli.main`."""
    set_passive_waits(os.environ)
    from transferlab.cli import main as cli_main  # noqa: PLC0415 - torch loads after the env is set

    return cli_main(argv)
