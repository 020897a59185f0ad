"""The optional extras (pyproject's optional-dependencies): one loader for their packages.

A package that only an extra installs is imported where it is used, through :func:`load_extra`,
never at the top of a module: without the extra the rest of transferlab still imports, and the
command that needs it fails with a one-line :class:`UserError` naming the extra.

Usage:
    ort = load_extra("onnxruntime", "export", "--format onnx")
    if installed("openvino"): ...
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from transferlab.errors import UserError


def installed(package: str) -> bool:
    """True when ``package`` can be imported (without importing it)."""
    return importlib.util.find_spec(package) is not None


def load_extra(package: str, extra: str, needed_for: str) -> ModuleType:
    """``import package``, or a UserError saying that ``needed_for`` needs the extra."""
    if not installed(package):
        raise UserError(f"{needed_for} needs the {extra} extra: pip install 'transferlab[{extra}]'")
    return importlib.import_module(package)
