"""SIGINT/SIGTERM as a stop request: the loop checkpoints and exits cleanly at the next step.

Used by the CLI's train, compare and study, and by the API (a notebook's interrupt is a SIGINT).

Usage:
    with StopFlag() as stop:
        run_experiment(cfg, stop_requested=stop)
"""

from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger("transferlab")


class StopFlag:
    """Set by SIGINT/SIGTERM; a second signal stops at once (KeyboardInterrupt).

    ``exit_code`` is the shell's convention for the signal received (128 + number: SIGINT 130,
    SIGTERM 143); code that stops on the flag raises ``TrainingStopped(..., stop.exit_code)``.
    As a context manager it puts the previous handlers back on exit (for in-process callers:
    tests, notebooks). Signal handlers can only be set from the main thread: elsewhere it
    installs none, and the run goes on until it ends.
    """

    def __init__(self):
        self.requested = False
        self.signal_name = ""
        self.exit_code = 128 + signal.SIGINT
        self._previous: dict = {}

    def __call__(self) -> bool:
        return self.requested

    def install(self) -> None:
        def handler(signum, frame):
            if self.requested:  # second signal: stop now
                raise KeyboardInterrupt
            self.requested = True
            self.signal_name = signal.Signals(signum).name
            self.exit_code = 128 + signum
            log.warning(
                "got %s: stopping at the next batch (a checkpoint is saved when training)",
                self.signal_name,
            )

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
            self.install()
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
