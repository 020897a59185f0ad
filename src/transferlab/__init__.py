"""transferlab: how much does a pretrained network buy you over a CNN trained from scratch?

The public Python API (``transferlab.api``) is loaded lazily: ``import transferlab`` imports no
torch and has no side effects. The CLI is a thin layer over the same config dataclasses.

Usage:
    import transferlab
    run = transferlab.train(model="cnn", epochs=10, data_dir="../shared/datasets")
    run.metrics, run.plot(), run.predict(["photo.jpg"]), run.export("onnx")
    cmp = transferlab.compare(data_dir="../shared/datasets", backbone="timm:tf_efficientnet_lite0")
    old = transferlab.load_run("runs/cnn-20261128-120000")

    $ transferlab compare --data-dir ../shared/datasets
    $ python -m transferlab train --model cnn --epochs 10
"""

__version__ = "0.1.0"

# public name -> module that defines it (imported on first access, PEP 562). The internal
# packages are named training/, comparison.py and studies/, so that importing them never
# replaces the functions train, compare and study on this package.
_LAZY = {
    "api": "transferlab",
    "train": "transferlab.api",
    "compare": "transferlab.api",
    "study": "transferlab.api",
    "load_run": "transferlab.api",
    "Run": "transferlab.results",
    "Comparison": "transferlab.results",
    "Study": "transferlab.results",
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
