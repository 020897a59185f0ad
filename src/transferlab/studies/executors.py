"""Where a study's cells run: one interface, ``Executor.run(tasks, stop) -> iterator of outcomes``.

- ``local``: this process, one cell after another (the default). The data set is loaded once.
- ``processes:N``: N cells at a time on this machine, each in a fresh ``spawn``-ed process that
  loads its own data. A process killed mid-cell is retried once in a new process, which resumes
  the cell from its ``last.pt``. Where GPUs exist, slot ``i`` gets GPU ``i mod n``
  (``CUDA_VISIBLE_DEVICES``); ``--gpus-per-cell F`` < 1 packs ``1/F`` cells on one GPU.
- ``ray[:ADDRESS]``: each cell is a Ray task on an existing cluster (``ray.init(address=...)``,
  ADDRESS defaults to ``RAY_ADDRESS``, then ``auto``), with ``max_retries=1`` for a killed worker.
  No cluster reachable: a UserError saying ``ray start --head``. No local cluster is started.

Every task is a picklable spec (``studies.cells``); ``cells.run_task`` runs it in any process.
Adding an executor is one class (``check``, ``create``, ``slots``, ``run``) and its entry in
``EXECUTORS``.

Usage:
    ex = make_executor("processes:2", Resources(cpus=1))
    for outcome in ex.run(specs, stop_requested):
        print(outcome.name, outcome.status)
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import os
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Protocol

import torch

from transferlab.errors import UserError
from transferlab.studies.cells import CellSpec, ExtractSpec, Outcome, run_task

log = logging.getLogger(__name__)

Task = CellSpec | ExtractSpec
ATTEMPTS = 2  # a task whose worker dies is run once more (then recorded failed)
RAY_CONNECT_TIMEOUT_S = 10  # an unreachable address fails within this (the issue asks < 30 s)
RAY_INSTALL = "pip install 'transferlab[ray]'"
STOP_GRACE_S = 60  # a stopped worker's time to checkpoint and exit before it is killed


@dataclass(frozen=True)
class Resources:
    """What one cell asks for: torch threads (CPUs) and a share of a GPU."""

    cpus: int = 0  # torch threads; 0: the local executor leaves the run's own, the others use 1
    gpus: float = 1.0  # of a GPU, for a cell that trains on one (0: none)

    def __post_init__(self):
        cpus, gpus = self.cpus, self.gpus
        if isinstance(cpus, bool) or not isinstance(cpus, int) or cpus < 0:
            raise UserError(f"--cpus-per-cell must be an integer >= 0 (0 = auto); got {cpus!r}")
        if isinstance(gpus, bool) or not isinstance(gpus, int | float) or not 0 <= gpus < 1e6:
            # also refuses nan and inf
            raise UserError(f"--gpus-per-cell must be a number >= 0 (e.g. 0.25); got {gpus!r}")


class Executor(Protocol):
    """Runs tasks and yields one outcome per task, in the order they finish."""

    slots: int  # tasks that run at once (for progress and ETA)

    def run(self, tasks: Sequence[Task], stop_requested: Callable[[], bool]) -> Iterator[Outcome]:
        """Yield each task's outcome. A stop request ends the iteration early: running tasks
        stop (a cell keeps its last.pt) and no new task starts."""
        ...


def _with_threads(task: Task, cpus: int | None) -> Task:
    return dataclasses.replace(task, threads=cpus)


# --- local ---------------------------------------------------------------------------------------


class LocalExecutor:
    """Today's loop: one task after another in this process, with the data loaded once."""

    slots = 1

    def __init__(self, res: Resources, progress: bool = True):
        self.res, self.progress = res, progress

    @staticmethod
    def check(text: str, arg: str | None) -> None:
        if arg is not None:
            raise UserError(f"--executor {text!r}: local takes no argument")

    @classmethod
    def create(cls, arg: str, res: Resources, progress: bool) -> LocalExecutor:
        return cls(res, progress)

    def run(self, tasks: Sequence[Task], stop_requested: Callable[[], bool]) -> Iterator[Outcome]:
        datasets: dict = {}
        for task in tasks:
            if stop_requested():
                return
            yield run_task(
                _with_threads(task, self.res.cpus or None), stop_requested, self.progress, datasets
            )


# --- processes -----------------------------------------------------------------------------------


def _child(task: Task, conn, gpu: str | None, parent: int) -> None:
    """A worker process: one task, its outcome sent back on ``conn``."""
    if gpu is not None:  # before torch touches CUDA in this process
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    logging.basicConfig(level=logging.WARNING, format=f"[{task.name}] %(levelname)s %(message)s")
    stop = {"requested": False}

    def on_signal(signum, frame):
        stop["requested"] = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    def orphan_watch():  # the driver was killed: stop, so that a rerun finds the cell unlocked
        while os.getppid() == parent:
            time.sleep(1.0)
        stop["requested"] = True
        time.sleep(30.0)
        os._exit(1)

    threading.Thread(target=orphan_watch, daemon=True).start()
    outcome = run_task(task, lambda: stop["requested"], progress=False)
    conn.send(outcome)
    conn.close()


@dataclass
class _Running:
    task: Task
    proc: mp.process.BaseProcess
    conn: object
    slot: int


class ProcessExecutor:
    """N tasks at a time, each in a fresh spawned process; a killed process is retried once."""

    def __init__(self, workers: int, res: Resources):
        self.res = Resources(cpus=res.cpus or 1, gpus=res.gpus)
        if self.res.gpus > 1:
            raise UserError(
                f"--gpus-per-cell {self.res.gpus}: processes:N gives a cell one GPU or a share of "
                "one; use --executor ray for cells that span GPUs"
            )
        n_gpus = torch.cuda.device_count()
        self.gpus = n_gpus if self.res.gpus > 0 else 0
        per_gpu = max(1, int(1 / self.res.gpus)) if self.gpus else 1
        if self.gpus and workers > self.gpus * per_gpu:
            log.warning(
                "processes:%d with %d GPU(s) at %s per cell: running %d cells at a time",
                workers,
                self.gpus,
                self.res.gpus,
                self.gpus * per_gpu,
            )
            workers = self.gpus * per_gpu
        self.slots = workers

    @staticmethod
    def check(text: str, arg: str | None) -> None:
        if not (arg and arg.isdigit() and int(arg) >= 1):
            raise UserError(
                f"--executor {text!r}: give the number of worker processes (>= 1), e.g. processes:2"
            )

    @classmethod
    def create(cls, arg: str, res: Resources, progress: bool) -> ProcessExecutor:
        return cls(int(arg), res)

    def _start(self, ctx, task: Task, slot: int) -> _Running:
        recv, send = ctx.Pipe(duplex=False)
        gpu = str(slot % self.gpus) if self.gpus else None
        proc = ctx.Process(
            target=_child,
            args=(_with_threads(task, self.res.cpus), send, gpu, os.getpid()),
            name=f"transferlab-cell-{slot}",
        )
        proc.start()
        send.close()
        return _Running(task, proc, recv, slot)

    def run(self, tasks: Sequence[Task], stop_requested: Callable[[], bool]) -> Iterator[Outcome]:
        ctx = mp.get_context("spawn")
        pending, running = deque(tasks), {}
        attempts: dict[str, int] = {}
        free = list(range(self.slots))
        try:
            while pending or running:
                while pending and free and not stop_requested():
                    task = pending.popleft()
                    attempts[task.key] = attempts.get(task.key, 0) + 1
                    r = self._start(ctx, task, free.pop(0))
                    running[r.proc.sentinel] = r
                if stop_requested():
                    self._stop(running.values())
                    return
                for sentinel in wait(list(running), timeout=0.5):
                    r = running.pop(sentinel)
                    free.append(r.slot)
                    outcome = _receive(r)
                    if outcome is not None:
                        yield outcome
                    elif attempts[r.task.key] < ATTEMPTS:
                        log.warning(
                            "the worker of %s died (exit code %s); retrying it in a new process",
                            r.task.name,
                            r.proc.exitcode,
                        )
                        pending.appendleft(r.task)
                    else:
                        yield Outcome(
                            r.task.key,
                            r.task.name,
                            "failed",
                            f"its worker process died twice (exit code {r.proc.exitcode})",
                            kind=r.task.kind,
                        )
        finally:
            self._stop(running.values(), force=True)

    @staticmethod
    def _stop(running, force: bool = False) -> None:
        """SIGTERM: each cell stops at its next batch (its last.pt kept); SIGKILL after a
        minute, or at once when ``force`` (the driver is leaving)."""
        running = list(running)
        for r in running:
            if r.proc.is_alive():
                r.proc.kill() if force else r.proc.terminate()
        for r in running:
            r.proc.join(timeout=STOP_GRACE_S)
            if r.proc.is_alive():
                r.proc.kill()
                r.proc.join()


def _receive(r: _Running) -> Outcome | None:
    try:
        outcome = r.conn.recv() if r.conn.poll() else None
    except (EOFError, OSError):
        outcome = None
    r.conn.close()
    r.proc.join()
    return outcome


# --- ray -----------------------------------------------------------------------------------------


def load_ray():
    """The ``ray`` module, or a UserError naming the extra to install."""
    try:
        import ray
    except ImportError:
        raise UserError(f"--executor ray needs Ray: {RAY_INSTALL}") from None
    return ray


def _reachable(address: str) -> bool:
    """A TCP connect to HOST:PORT (ray://HOST:PORT too) within the timeout."""
    host, _, port = address.split("://")[-1].rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=RAY_CONNECT_TIMEOUT_S):
            return True
    except (OSError, ValueError):
        return False


def connect_ray(address: str):
    """``ray.init(address=...)`` on an existing cluster only; unreachable -> UserError (exit 2)."""
    ray = load_ray()
    how = (
        "start one with `ray start --head` (and `ray start --address HEAD:6379` on the other "
        "nodes), or give --executor ray:HOST:PORT"
    )
    if ray.is_initialized():  # a caller (a notebook, a test) already connected this process
        return ray
    if address != "auto" and not _reachable(address):
        raise UserError(f"no Ray cluster reachable at {address}; {how}")
    try:
        ray.init(address=address, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"no Ray cluster at {address} ({first}); {how}") from None
    return ray


class RayExecutor:
    """Each task a Ray task on an existing cluster, retried once if its worker dies."""

    def __init__(self, address: str, res: Resources):
        self.ray = connect_ray(address)
        self.res = Resources(cpus=res.cpus or 1, gpus=res.gpus)
        cluster = self.ray.cluster_resources()
        has_gpu = cluster.get("GPU", 0) > 0
        self.gpus = self.res.gpus if has_gpu else 0.0
        by_cpu = int(cluster.get("CPU", 1) // self.res.cpus)
        by_gpu = int(cluster.get("GPU", 0) // self.gpus) if self.gpus else by_cpu
        self.slots = max(1, min(by_cpu, by_gpu))
        self.remote = self.ray.remote(
            num_cpus=self.res.cpus, num_gpus=self.gpus, max_retries=ATTEMPTS - 1
        )(run_task)

    @staticmethod
    def check(text: str, arg: str | None) -> None:
        load_ray()

    @classmethod
    def create(cls, arg: str, res: Resources, progress: bool) -> RayExecutor:
        return cls(arg or os.environ.get("RAY_ADDRESS") or "auto", res)

    def run(self, tasks: Sequence[Task], stop_requested: Callable[[], bool]) -> Iterator[Outcome]:
        ray = self.ray
        refs = {}
        for t in tasks:  # a cell told to run on the CPU asks for no GPU
            gpus = 0 if t.config["run"].get("device") == "cpu" else self.gpus
            ref = self.remote.options(num_gpus=gpus).remote(_with_threads(t, self.res.cpus))
            refs[ref] = t
        try:
            while refs:
                if stop_requested():
                    return
                done, _ = ray.wait(list(refs), num_returns=1, timeout=0.5)
                for ref in done:
                    task = refs.pop(ref)
                    try:
                        yield ray.get(ref)
                    except ray.exceptions.RayError as e:  # the worker died twice, or Ray failed
                        first = str(e).strip().splitlines()[0][:300]
                        yield Outcome(task.key, task.name, "failed", first, kind=task.kind)
        finally:
            for ref in refs:  # stopped: the cells keep their last.pt and resume on the next run
                ray.cancel(ref, force=True)


# --- the registry --------------------------------------------------------------------------------

EXECUTORS: dict[str, type] = {
    "local": LocalExecutor,
    "processes": ProcessExecutor,
    "ray": RayExecutor,
}


def make_executor(text: str, res: Resources, progress: bool = True) -> Executor:
    """``local`` | ``processes:N`` | ``ray[:ADDRESS]`` -> an executor; bad text -> UserError."""
    name, arg = parse_executor(text)
    return EXECUTORS[name].create(arg, res, progress)


def parse_executor(text: str) -> tuple[str, str]:
    """(name, argument) of an --executor value, checked before anything runs (UserError)."""
    name, sep, arg = text.strip().partition(":")
    if name not in EXECUTORS:
        raise UserError(
            f"--executor {text!r}: unknown executor; choose {', '.join(EXECUTORS)} "
            "(local, processes:N, ray[:ADDRESS])"
        )
    EXECUTORS[name].check(text, arg if sep else None)
    return name, arg
