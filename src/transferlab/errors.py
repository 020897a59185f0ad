"""User-facing errors.

A :class:`UserError` is bad input the user can fix: the CLI prints its message on one line
and exits with code 2, without a traceback. Messages say what was wrong and what to do.

Usage:
    raise UserError(f"data file not found: {path}. Pass --download to fetch CIFAR-100.")
"""


class UserError(Exception):
    """Bad input (data, flags, files). Printed as one line by the CLI, exit code 2."""


class TrainingStopped(Exception):
    """Training stopped early for a reason the user must see (NaN loss, disk full, signal)."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code
