"""The ``transferlab`` command's entry point: the process's settings first, then the CLI.

torch's Linux wheels run their parallel regions on GNU OpenMP (libgomp), whose idle threads spin
for about 300,000 iterations before they sleep. On a CPU shared with other jobs those spins take
the cores the other threads need: the seed CNN trained 7x slower beside one other PyTorch job
(issue 25). ``OMP_WAIT_POLICY=PASSIVE`` makes idle threads sleep at once (GOMP_SPINCOUNT then
defaults to 0). libgomp reads it once, when torch loads it, so it must be in the environment
before anything imports torch.

glibc's allocator (:func:`reuse_freed_memory`) is the other process-wide setting: freed memory
stays in the heap. Frozen-backbone activations are tens of MB per layer, above glibc's mmap
threshold, so each one was mapped fresh and returned on free; measured on lite0 bf16 at 224 px:
~1.2M minor faults and 2 s of system time per 400 images, ~1.8x slower extraction
(benchmarks/RESULTS.md, issue 13). The command's process is short-lived and ours; a notebook's
is not, so the library never calls it.

That is why this module is the one exception to "imports at the top": it sets the variable,
then imports the CLI (and so torch). It is also the only place that changes the process
environment: the console script and ``python -m transferlab`` come here, a library user's
``import transferlab`` does not. A value the user set is kept.

Usage:
    transferlab train ...              # [project.scripts] transferlab = transferlab.entry:main
    OMP_WAIT_POLICY=ACTIVE transferlab train ...      # the user's choice wins
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from collections.abc import MutableMapping

PASSIVE_WAITS = {"OMP_WAIT_POLICY": "PASSIVE"}  # idle OpenMP threads sleep instead of spinning


def set_passive_waits(environ: MutableMapping[str, str]) -> dict[str, str]:
    """Set :data:`PASSIVE_WAITS` in ``environ`` where the user has not; returns what was set."""
    added = {k: v for k, v in PASSIVE_WAITS.items() if k not in environ}
    environ.update(added)
    return added


def reuse_freed_memory() -> bool:
    """Keep freed memory in the process heap (glibc): no mmap/munmap + page faults per batch.

    Process-wide and idempotent; False where it does not apply (not glibc).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    ok = mallopt(m_mmap_threshold, 1 << 30) == 1  # blocks up to 1 GiB come from the heap
    return bool(mallopt(m_trim_threshold, (1 << 31) - 1) == 1 and ok)  # and are never trimmed


def main(argv: list[str] | None = None) -> int:
    """``transferlab``: passive OpenMP waits, the heap tuning, then :func:`transferlab.cli.main`."""
    set_passive_waits(os.environ)
    reuse_freed_memory()
    from transferlab.cli import main as cli_main  # noqa: PLC0415 - torch loads after the env is set

    return cli_main(argv)
