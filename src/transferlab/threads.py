"""How many CPU threads torch uses: the cores other processes leave free, or ``--threads N``.

On a shared CPU, every core for torch is the wrong choice: a parallel region waits for its
slowest thread, and a thread the scheduler parks for another process stalls the whole step.
Measured on the 2-core machine: one torch thread extracted about 4x faster than two beside other
jobs (benchmarks/RESULTS.md, "Threads under contention"), and the seed CNN trained 7x slower
beside one other PyTorch job with all cores than quiet (issue 25).

So at the start of each phase (extraction, training) :func:`use_threads` measures how busy the
CPU is over a quarter second (``/proc/stat`` minus this process's own CPU time; the 1-minute load
average where there is no ``/proc/stat``), and uses the cores left free: at least one, at most
the cores this process may run on. ``--threads N`` wins over the measurement. Each choice is
logged in one line. The order: ``--threads N``, else ``OMP_NUM_THREADS`` where the user set it (the
usual way to pin OpenMP programs; the test suite pins it so runs repeat bit for bit), else the
measurement. OpenMP's passive waits are the other half (transferlab/entry.py).

Usage:
    n = use_threads(cfg.run.threads, "train")     # logs "threads for train: 1 (...)"
    with threads_restored():                       # a library caller gets its count back
        ...
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Iterator

import torch

log = logging.getLogger(__name__)

WINDOW_S = 0.25  # seconds of /proc/stat sampling per decision (a phase lasts seconds to hours)


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask; all cores where there is none)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _cpu_ticks() -> tuple[float, float] | None:
    """(busy, total) clock ticks of all CPUs since boot, from /proc/stat; None without it."""
    try:
        with open("/proc/stat") as f:
            fields = [float(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    return sum(fields[:8]) - idle, sum(fields[:8])  # guest time is already in user time


def busy_elsewhere(window_s: float = WINDOW_S) -> float:
    """Cores kept busy by other processes: over ``window_s`` seconds from /proc/stat (minus this
    process's own CPU time), else the 1-minute load average (which counts this process too)."""
    first, own0, t0 = _cpu_ticks(), os.times(), time.perf_counter()
    if first is None:
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    time.sleep(window_s)
    last, own1, wall = _cpu_ticks(), os.times(), time.perf_counter() - t0
    busy, total = last[0] - first[0], last[1] - first[1]
    if total <= 0 or wall <= 0:
        return 0.0
    n_cpu = os.cpu_count() or 1
    own = (own1.user + own1.system - own0.user - own0.system) / wall  # cores
    return max(0.0, busy / total * n_cpu - own)


def free_threads(busy: float, cores: int) -> int:
    """Threads that fit in the cores others leave free: round(cores - busy), within [1, cores]."""
    return max(1, min(cores, math.floor(cores - busy + 0.5)))


def use_threads(requested: int, phase: str) -> int:
    """Set torch's thread count for ``phase`` and log why; ``requested`` > 0 (``--threads``) wins,
    then the user's ``OMP_NUM_THREADS``.

    Without them, the count is the cores free right now (see the module docstring); a DDP rank
    under torchrun shares them with its local peers (``LOCAL_WORLD_SIZE``).
    """
    cores = usable_cores()
    pinned = _env_threads()
    if requested:
        n, why = requested, "--threads"
    elif pinned:
        n, why = pinned, "OMP_NUM_THREADS"
    else:
        busy = busy_elsewhere()
        peers = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
        n = max(1, free_threads(busy, cores) // peers)
        why = f"{cores} cores, {busy:.1f} busy with other processes"
        if peers > 1:
            why += f", shared by {peers} local ranks"
        why += "; --threads N to fix it"
    torch.set_num_threads(n)
    log.info(
        "threads for %s: %d (%s; OpenMP waits %s)",
        phase,
        n,
        why,
        os.environ.get("OMP_WAIT_POLICY", "default").lower(),
    )
    return n


def _env_threads() -> int:
    """The user's OMP_NUM_THREADS as a positive int (its first level), else 0."""
    raw = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    return int(raw) if raw.isdigit() and int(raw) > 0 else 0


@contextlib.contextmanager
def threads_restored() -> Iterator[None]:
    """Put torch's thread count back on exit (a run in a library caller's process)."""
    before = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(before)
