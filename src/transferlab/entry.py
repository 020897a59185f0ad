"""The ``transferlab`` command's entry point: the process's settings first, then the CLI.

glibc's allocator (:func:`reuse_freed_memory`) is the one process-wide setting: freed memory
stays in the heap. Frozen-backbone activations are tens of MB per layer, above glibc's mmap
threshold, so each one was mapped fresh and returned on free; measured on lite0 bf16 at 224 px:
~1.2M minor faults and 2 s of system time per 400 images, ~1.8x slower extraction
(benchmarks/RESULTS.md, issue 13). The command's process is short-lived and ours; a notebook's
is not, so the library never calls it. It is set before the CLI (and so torch) is imported, so
that nothing is allocated under the old thresholds; that is why this module is the one
exception to "imports at the top". A library user's ``import transferlab`` does not come here.

OpenMP's wait policy is left to libgomp (its idle threads spin ~300,000 iterations, a few ms,
then sleep) or to the user's ``OMP_WAIT_POLICY`` / ``GOMP_SPINCOUNT``. This module used to set
``OMP_WAIT_POLICY=PASSIVE``: measured on a Zen 5 (RESULTS.md, issue 25), passive waits cost the
seed CNN 0.72-0.78x of its quiet speed (many short parallel regions, each paying a wake-up),
and what they protected against, threads spinning on cores a neighbour needs, is now handled by
the thread count (transferlab/threads.py): one thread where a neighbour runs (no OpenMP workers
to spin), re-checked every 2 s during training and torch extraction.

Usage:
    transferlab train ...              # [project.scripts] transferlab = transferlab.entry:main
    OMP_WAIT_POLICY=PASSIVE transferlab train --threads 2 ...   # pinned threads on a shared CPU
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys


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
    """``transferlab``: the heap tuning, then :func:`transferlab.cli.main`."""
    reuse_freed_memory()
    from transferlab.cli import main as cli_main  # noqa: PLC0415 - torch loads after mallopt

    return cli_main(argv)
