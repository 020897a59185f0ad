"""How many CPU threads torch uses: the cores other processes leave free, or ``--threads N``.

On a shared CPU, every core for torch is the wrong choice: a parallel region waits for its
slowest thread, and a thread the scheduler parks for another process stalls the whole step.
Measured on the 2-core machine: one torch thread extracted about 4x faster than two beside other
jobs (benchmarks/RESULTS.md, "Threads under contention"), and the seed CNN trained 7x slower
beside one other PyTorch job with all cores than quiet (issue 25).

So at the start of each phase (extraction, training) :func:`use_threads` measures how busy the
CPU is over a quarter second (``/proc/stat`` minus this process's own CPU time and its children's,
such as DataLoader workers; the 1-minute load average where there is no ``/proc/stat``), and uses
the cores left free: at least one, at most the cores this process may run on. During training,
:class:`ThreadWatch` checks again every ``RECHECK_S`` (2) seconds, between batches, with the time
since the last check as the window (no extra sampling), so a neighbour that starts or stops
mid-epoch changes the count within about two seconds.
Each choice, and each change, is logged in one line. The order: ``--threads N``, else
``OMP_NUM_THREADS`` where the user set it (the usual way to pin OpenMP programs; the test suite
pins it so runs repeat bit for bit), else the measurement. OpenMP's own waits (libgomp spins a
few ms before it sleeps) are left as they are: one thread has no workers to spin, and two are
re-checked every two seconds (transferlab/entry.py says why it no longer sets a policy).

Usage:
    n = use_threads(cfg.run.threads, "train")     # logs "threads for train: 1 (...)"
    watch = ThreadWatch(cfg.run.threads, "train")
    watch.tick()                                   # after each batch: logs a change only
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
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

WINDOW_S = 0.25  # seconds of /proc/stat sampling per decision (a phase lasts seconds to hours)
RECHECK_S = 2.0  # during training, the longest a neighbour that starts mid-epoch goes unseen


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


def _own_cpu_s() -> float:
    """CPU seconds of this process and of its live children (DataLoader workers are ours, not
    another job's); children that have ended count through ``os.times``."""
    t = os.times()
    own = t.user + t.system + t.children_user + t.children_system
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return own
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/children") as f:
                pids = f.read().split()
        except OSError:
            continue
        for pid in pids:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rpartition(")")[2].split()
                own += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
            except (OSError, ValueError, IndexError):
                continue
    return own


@dataclass(frozen=True)
class _Mark:
    ticks: tuple[float, float] | None  # (busy, total) of all CPUs, /proc/stat
    own_s: float  # CPU seconds of this process and its children
    wall: float


def _mark() -> _Mark:
    return _Mark(_cpu_ticks(), _own_cpu_s(), time.perf_counter())


def _busy_between(a: _Mark, b: _Mark) -> float | None:
    """Cores kept busy by other processes between two marks; None without /proc/stat."""
    if a.ticks is None or b.ticks is None:
        return None
    busy, total, wall = b.ticks[0] - a.ticks[0], b.ticks[1] - a.ticks[1], b.wall - a.wall
    if total <= 0 or wall <= 0:
        return 0.0
    own = (b.own_s - a.own_s) / wall  # cores
    return max(0.0, busy / total * (os.cpu_count() or 1) - own)


def busy_elsewhere(window_s: float = WINDOW_S) -> float:
    """Cores kept busy by other processes: over ``window_s`` seconds from /proc/stat (minus this
    process's own CPU time), else the 1-minute load average (which counts this process too)."""
    first = _mark()
    if first.ticks is None:
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    time.sleep(window_s)
    busy = _busy_between(first, _mark())
    return 0.0 if busy is None else busy


def free_threads(busy: float, cores: int) -> int:
    """Threads that fit in the cores others leave free: round(cores - busy), within [1, cores]."""
    return max(1, min(cores, math.floor(cores - busy + 0.5)))


def use_threads(requested: int, phase: str) -> int:
    """Set torch's thread count for ``phase`` and log why; ``requested`` > 0 (``--threads``) wins,
    then the user's ``OMP_NUM_THREADS``.

    Without them, the count is the cores free right now (see the module docstring); a DDP rank
    under torchrun shares them with its local peers (``LOCAL_WORLD_SIZE``).
    """
    pinned = _pinned(requested)
    if pinned:
        n, why = pinned
    else:
        busy = busy_elsewhere()
        n, why = _from_busy(busy), _why(busy)
    torch.set_num_threads(n)
    log.info(
        "threads for %s: %d (%s; OpenMP waits %s)",
        phase,
        n,
        why,
        os.environ.get("OMP_WAIT_POLICY", "default").lower(),
    )
    return n


def _pinned(requested: int) -> tuple[int, str] | None:
    """(count, why) where the user fixed it: ``--threads`` first, then OMP_NUM_THREADS."""
    if requested:
        return requested, "--threads"
    env = _env_threads()
    return (env, "OMP_NUM_THREADS") if env else None


def _peers() -> int:
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))


def _from_busy(busy: float) -> int:
    """Threads for this process (or DDP rank) when ``busy`` cores are taken by others."""
    return max(1, free_threads(busy, usable_cores()) // _peers())


def _why(busy: float) -> str:
    why = f"{usable_cores()} cores, {busy:.1f} busy with other processes"
    if _peers() > 1:
        why += f", shared by {_peers()} local ranks"
    return why + "; --threads N to fix it"


class ThreadWatch:
    """Re-checks the free cores during training, from the CPU time other processes used since the
    last check: that time is the window, so a check costs two reads of ``/proc``, no sampling.
    :meth:`tick` runs after every batch and checks once ``every_s`` seconds have passed (else one
    clock read); :meth:`recheck` checks now. Does nothing where the count is pinned
    (``--threads``, OMP_NUM_THREADS) or without ``/proc/stat``.
    """

    def __init__(self, requested: int, phase: str, every_s: float | None = None):
        self.phase = phase
        self.every_s = RECHECK_S if every_s is None else every_s
        self.pinned = _pinned(requested) is not None
        self.last = _mark()

    def tick(self) -> int | None:
        """:meth:`recheck` where ``every_s`` seconds have passed since the last check, else None."""
        if self.pinned or time.perf_counter() - self.last.wall < self.every_s:
            return None
        return self.recheck()

    def recheck(self) -> int | None:
        """The new count where it changed (and is set and logged), else None."""
        if self.pinned:
            return None
        now = _mark()
        busy, self.last = _busy_between(self.last, now), now
        if busy is None:
            return None
        n = _from_busy(busy)
        if n == torch.get_num_threads():
            return None
        log.info(
            "threads for %s: %d -> %d (%s)", self.phase, torch.get_num_threads(), n, _why(busy)
        )
        torch.set_num_threads(n)
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
