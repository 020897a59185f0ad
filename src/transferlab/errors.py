"""User-facing errors and how the CLI maps any failure to one line and an exit code.

Exit codes (``transferlab.cli.main``):

* 2: a :class:`UserError`: bad input or environment the user can fix (flags, files, paths,
  permissions, environment variables). The message says what was wrong and what to do.
* 1: a :class:`RunFailure`: the run itself failed on a resource (disk full, out of memory,
  a read-only file system); the message names the file or the resource.
* :class:`TrainingStopped` carries its own code (130 SIGINT, 143 SIGTERM, 1 otherwise).

:func:`describe_failure` turns the exceptions that the standard library and torch raise for
those resources (``OSError`` with an errno, ``MemoryError``, ``torch.OutOfMemoryError``,
``RuntimeError("... not enough memory ...")``) into ``(exit code, one line)``, so every
command shares one policy instead of catching them one by one.

Usage:
    raise UserError(f"data file not found: {path}. Pass --download to fetch CIFAR-100.")
    err = OSError(errno.ENOSPC, "No space left on device", "runs/x/last.pt")
    code, line = describe_failure(err)
    # -> (1, "no space left on device writing runs/x/last.pt; free disk space ...")
"""

from __future__ import annotations

import errno
import sys

EXIT_USER = 2  # bad input or environment: fix it and rerun
EXIT_FAILURE = 1  # the run failed on a resource (disk, memory) or a check


class UserError(Exception):
    """Bad input (data, flags, files). Printed as one line by the CLI, exit code 2."""


class RunFailure(Exception):
    """A run-time failure on a resource (disk full, out of memory). One line, exit code 1."""


class NothingToDo(Exception):
    """The command has nothing to do (e.g. resuming a finished run): message on stdout, exit 0."""


class TrainingStopped(Exception):
    """Training stopped early for a reason the user must see (NaN loss, disk full, signal)."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


# errno -> (exit code, what happened, what to do). Resource exhaustion and read-only file
# systems are run-time failures (1); the rest are paths or permissions the user chose (2).
_ERRNO: dict[int, tuple[int, str, str]] = {
    errno.ENOSPC: (
        EXIT_FAILURE,
        "no space left on device",
        "free disk space and rerun (or --resume)",
    ),
    errno.EDQUOT: (EXIT_FAILURE, "disk quota exceeded", "free space in your quota and rerun"),
    errno.EROFS: (EXIT_FAILURE, "read-only file system", "choose a writable location"),
    errno.EFBIG: (EXIT_FAILURE, "file too large for the file system", "choose another location"),
    errno.EIO: (EXIT_FAILURE, "input/output error", "check the disk"),
    errno.ENOMEM: (EXIT_FAILURE, "out of memory", "lower --batch-size or --num-workers"),
    errno.EACCES: (
        EXIT_USER,
        "permission denied",
        "choose a path you may write, or fix its permissions",
    ),
    errno.EPERM: (EXIT_USER, "operation not permitted", "choose another path"),
    errno.ENOENT: (EXIT_USER, "no such file or folder", "check the path"),
    errno.ENOTDIR: (EXIT_USER, "a part of the path is a file, not a folder", "check the path"),
    errno.EISDIR: (EXIT_USER, "is a folder, not a file", "give a file path"),
    errno.ENAMETOOLONG: (EXIT_USER, "file name too long", "use a shorter path"),
    errno.ELOOP: (EXIT_USER, "too many levels of symbolic links", "check the path"),
    errno.EEXIST: (EXIT_USER, "already exists", "choose another path"),
}

_OOM_MARKERS = (
    "out of memory",
    "not enough memory",
    "can't allocate memory",
    "cannot allocate memory",
    "failed to allocate",
    "DefaultCPUAllocator",
)


def _first_line(text: str, limit: int = 240) -> str:
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    return (lines[0] if lines else "")[:limit]


def describe_oserror(e: OSError) -> tuple[int, str]:
    """(exit code, one line naming the file) for an ``OSError``."""
    where = " ".join(f"{p}" for p in (e.filename, e.filename2) if p is not None)
    code, what, todo = _ERRNO.get(
        e.errno or -1, (EXIT_FAILURE, e.strerror or type(e).__name__, "check it")
    )
    target = f" ({where})" if where else ""
    return code, f"{what}{target}; {todo}"


def is_out_of_memory(e: BaseException) -> bool:
    """True for host or device allocation failures (MemoryError, torch OOM, allocator errors)."""
    if isinstance(e, MemoryError):
        return True
    oom = _torch_oom_type()
    if oom is not None and isinstance(e, oom):
        return True
    return isinstance(e, RuntimeError) and any(m in str(e) for m in _OOM_MARKERS)


def _torch_oom_type():
    torch = sys.modules.get("torch")  # no import here: torch may not be loaded (models --help)
    return getattr(torch, "OutOfMemoryError", None) if torch is not None else None


def describe_failure(e: BaseException) -> tuple[int, str] | None:
    """(exit code, one line) for an expected failure, or None for a bug (show a traceback)."""
    if isinstance(e, UserError):
        return EXIT_USER, _first_line(str(e), 2000)
    if isinstance(e, RunFailure):
        return EXIT_FAILURE, _first_line(str(e), 2000)
    if isinstance(e, TrainingStopped):
        return e.exit_code, _first_line(str(e), 2000)
    if is_out_of_memory(e):
        detail = _first_line(str(e), 160)
        return EXIT_FAILURE, (
            f"out of memory ({type(e).__name__}: {detail}); lower --batch-size, "
            "--eval-batch-size, --image-size or --num-workers"
        )
    if isinstance(e, OSError) and e.errno is not None:
        return describe_oserror(e)
    if is_torch_write_failure(e):
        detail = _first_line(str(e), 120)
        return EXIT_FAILURE, (
            f"writing a file failed inside torch.save ({detail}): the disk is "
            "most likely full; free space and rerun (or --resume)"
        )
    return None


# torch.save's zip writer reports a short write (ENOSPC, EDQUOT) as a RuntimeError, not OSError
_TORCH_WRITE_MARKERS = ("PytorchStreamWriter failed writing", "unexpected pos", "file write failed")


def is_torch_write_failure(e: BaseException) -> bool:
    """True for torch.save's RuntimeError on a failed write (a full disk, mostly)."""
    return isinstance(e, RuntimeError) and any(m in str(e) for m in _TORCH_WRITE_MARKERS)
