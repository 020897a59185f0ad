"""Keep the calling thread's alternate signal stack across native code that replaces it.

OpenVINO's CPU plugin (2026.4, here) installs its own alternate signal stack on the thread that
calls ``compile_model`` and unmaps that memory later, when the compiled model is freed, without
putting the previous stack back. Python's signal handlers and faulthandler run on the alternate
stack (``SA_ONSTACK``), so the next signal the main thread took (SIGINT, SIGTERM, even the
SIGCHLD of a finished child process) ran on unmapped or reused memory: the process died with
SIGSEGV and no traceback. Found as the test suite dying at 60-70% in one process, always while
a test sent itself a signal or reaped a child; a run stopped with Ctrl-C after an engine probe
was exposed the same way.

Usage:
    with keep_signal_stack():
        compiled = core.compile_model(model, "CPU")
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import sys
from collections.abc import Iterator

log = logging.getLogger(__name__)


class StackT(ctypes.Structure):
    """``stack_t`` of sigaltstack(2) (Linux)."""

    _fields_ = [
        ("ss_sp", ctypes.c_void_p),
        ("ss_flags", ctypes.c_int),
        ("ss_size", ctypes.c_size_t),
    ]

    def key(self) -> tuple:
        return (self.ss_sp, self.ss_flags, self.ss_size)


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def current_signal_stack() -> StackT | None:
    """The calling thread's alternate signal stack, or None where it cannot be read."""
    libc = _libc()
    st = StackT()
    if libc is None or libc.sigaltstack(None, ctypes.byref(st)) != 0:
        return None
    return st


@contextlib.contextmanager
def keep_signal_stack() -> Iterator[None]:
    """Run the block, then put back the thread's alternate signal stack if the block changed it."""
    before = current_signal_stack()
    try:
        yield
    finally:
        after = current_signal_stack()
        if before is not None and after is not None and after.key() != before.key():
            libc = _libc()
            if libc.sigaltstack(ctypes.byref(before), None) == 0:
                log.debug("restored the alternate signal stack that native code replaced")
            else:
                log.warning(
                    "could not restore the alternate signal stack (errno %d); a signal after "
                    "the engine is freed may crash the process",
                    ctypes.get_errno(),
                )
