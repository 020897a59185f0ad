"""transferlab: how much does a pretrained network buy you over a CNN trained from scratch?

The public Python API lives in ``transferlab.api`` and is loaded lazily (``import transferlab``
imports no torch and has no side effects). ``train``, ``compare`` and ``study`` are reached as
``transferlab.api.train`` etc.: the names ``transferlab.train``, ``transferlab.compare`` and
``transferlab.study`` are taken by the subpackages/modules of the same names, which replace a
package attribute whenever they are imported.

Usage:
    from transferlab import api as tl
    run = tl.train(model="cnn", epochs=10, data_dir="../shared/datasets")
    run.metrics, run.plot(), run.predict(["photo.jpg"]), run.export("onnx")
    transferlab.load_run("runs/cnn-20261128-120000")

    $ transferlab compare --data-dir ../shared/datasets
    $ python -m transferlab train --model cnn --epochs 10
"""

__version__ = "0.1.0"

# public name -> module that defines it (imported on first access, PEP 562)
_LAZY = {
    "api": "transferlab",
    "load_run": "transferlab.api",
    "Run": "transferlab.api",
    "Comparison": "transferlab.api",
    "Study": "transferlab.api",
    "UserError": "transferlab.errors",
    "TrainingStopped": "transferlab.errors",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        if name == "api":
            return importlib.import_module("transferlab.api")
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'transferlab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
