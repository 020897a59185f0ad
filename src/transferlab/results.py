"""What the API returns: a finished run (``Run``), a compare dir, a study dir, read from files.

Each reads its directory's files on demand (config.yaml, summary.json, metrics.csv, study.csv),
so a run from another day or machine reads the same as one just trained. A notebook shows a
``Run`` as a card (``report.card``) and the others as tables.

Usage:
    run = Run("runs/cnn-20261128-120000")
    run.metrics.tail()                      # pandas DataFrame of metrics.csv
    run.predict(["cat.jpg"], top_k=3)       # [{"image": "cat.jpg", "class": ..., "top": [...]}]
    run.export("onnx")                      # -> Path of the checked model.onnx
"""

from __future__ import annotations

import html
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import yaml

from transferlab.distributed import resolve_device
from transferlab.errors import UserError
from transferlab.explain import explain_images
from transferlab.export import export_run
from transferlab.predict import load_run_model, predict_files
from transferlab.report.card import run_card_html
from transferlab.report.plots import CURVES_FIGSIZE, draw_curves
from transferlab.report.run_report import write_run_report
from transferlab.rundir import RunDir, StudyDir, Summary
from transferlab.user_images import image_files

log = logging.getLogger(__name__)


def _pandas():
    """pandas, for the tables (an optional dependency: a one-line error names the install)."""
    try:
        import pandas
    except ImportError:
        raise UserError(
            "the API's tables (Run.metrics, .table()) need pandas: pip install pandas"
        ) from None
    return pandas


class Run:
    """A finished run directory, read from its files (config.yaml, summary.json, metrics.csv)."""

    def __init__(self, path: str | os.PathLike):
        if not isinstance(path, (str, os.PathLike)):
            raise UserError(
                f"load_run needs a run dir path (str or Path); got {type(path).__name__}"
            )
        self.dir = Path(path)
        self.files = RunDir(self.dir)
        if not self.dir.is_dir():
            raise UserError(f"{self.dir} is not a folder; pass a run dir such as runs/<name>")
        for name in RunDir.FINISHED:
            if not (self.files / name).is_file():
                raise UserError(f"{self.dir} is not a finished run: {name} is missing")

    def __repr__(self) -> str:
        s = self.summary
        return f"Run({str(self.dir)!r}, model={s.model!r}, test_acc={s.test.get('acc')})"

    @property
    def config(self) -> dict:
        """config.yaml as a dict (with its ``resolved:`` plan where the run recorded one)."""
        try:
            return yaml.safe_load(self.files.config.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise UserError(f"cannot read {self.files.config} ({e})") from None

    @property
    def summary(self) -> Summary:
        """summary.json as a :class:`~transferlab.rundir.Summary` (older files upgraded)."""
        return Summary.read(self.files.summary)

    @property
    def metrics(self):
        """metrics.csv as a pandas DataFrame, one row per epoch."""
        return _pandas().read_csv(self.files.metrics)

    def plot(self):
        """The learning curves (loss, accuracy; train and val per epoch) as a matplotlib Figure."""
        return plot_metrics(self.metrics, title=f"{self.summary.model} ({self.summary.mode})")

    def predict(
        self, images, top_k: int = 5, device: str = "cpu", batch_size: int = 64
    ) -> list[dict]:
        """Top-k classes for image paths, PIL images or uint8/float tensors (CHW or NCHW).

        One dict per image, in order: ``{"image", "class", "index", "probability", "top": [...]}``
        (top-1 flattened, ``top`` the k best as ``{"class", "index", "probability"}``), or
        ``{"image", "error"}`` for an image that cannot be read. Same model, preprocessing and
        probabilities as ``transferlab predict``.
        """
        return predict_images(self.dir, images, top_k=top_k, device=device, batch_size=batch_size)

    def export(
        self, format: str, path: str | os.PathLike | None = None, tolerance: float = 1e-4
    ) -> Path:
        """Export to ``onnx`` or ``torchscript``, checked against PyTorch; returns the file."""
        out, check = export_run(self.dir, format, Path(path) if path else None, tolerance)
        if not check.ok:
            raise UserError(
                f"export check failed: max abs diff {check.max_abs_diff:.3g} > {check.tolerance:g}"
            )
        return out

    def report(self) -> tuple[Path, Path]:
        """Write (or rewrite) report.md and report.html; returns both paths."""
        return write_run_report(self.dir)

    def explain(
        self,
        images,
        out_dir: str | os.PathLike | None = None,
        target: str | None = None,
        device: str = "cpu",
    ) -> list[Path]:
        """Grad-CAM overlays (``<name>_gradcam.png`` in ``out_dir``, default RUN_DIR/explain) for
        paths, PIL images or tensors: the predicted class, and ``target`` when given. Needs
        ``transferlab[explain]``; unusable images are skipped with a warning."""
        out = Path(out_dir) if out_dir else self.dir / "explain"
        with image_files(images) as items:
            for label, x in items:
                if isinstance(x, str):  # an object that is not an image: its error text
                    log.warning("cannot use %s: %s", label, x)
            good = [(label, x) for label, x in items if not isinstance(x, str)]
            names = [x.stem for _, x in good]
            return explain_images(
                self.dir, [x for _, x in good], out, target=target, device=device, names=names
            )

    def _repr_html_(self) -> str:
        return run_card_html(self.summary, self.dir)


def load_run(path: str | os.PathLike) -> Run:
    """A finished run dir as a :class:`Run`; a UserError names the missing file otherwise."""
    return Run(path)


def plot_metrics(df, title: str = ""):
    """Loss and accuracy panels from a metrics DataFrame (no pyplot state: a plain Figure)."""
    # made through pyplot (which sets up a notebook's inline display of figures), then released
    # from it: the returned figure is shown once, as the cell's value, and pyplot keeps no state
    fig = plt.figure(figsize=CURVES_FIGSIZE)
    plt.close(fig)
    draw_curves(fig, df["epoch"], df, title)
    return fig


def predict_images(
    run_dir: Path, images, top_k: int = 5, device: str = "cpu", batch_size: int = 64
) -> list[dict]:
    """See :meth:`Run.predict`."""
    if not isinstance(top_k, int) or top_k < 1 or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError("top_k and batch_size must be ints >= 1")
    dev = resolve_device(device)
    rm = load_run_model(run_dir, dev)
    with image_files(images) as items:
        good = [x for _, x in items if not isinstance(x, str)]
        rows = iter(predict_files(rm, good, top_k, batch_size, dev) if good else [])
    index = {c: i for i, c in enumerate(rm.classes)}
    out = []
    for label, x in items:
        row = {"error": x} if isinstance(x, str) else next(rows)
        if "error" in row:
            out.append({"image": label, "error": row["error"]})
            continue
        top = [
            {"class": t["class"], "index": index[t["class"]], "probability": t["prob"]}
            for t in row["top"]
        ]
        out.append({"image": label, **top[0], "top": top})
    return out


class Comparison:
    """A compare dir: the seed study's runs side by side (``.runs``, ``.table()``, ``.report``)."""

    def __init__(self, path: str | os.PathLike):
        self.dir = Path(path)
        found = sorted(p.parent for p in self.dir.glob(f"*/{RunDir.SUMMARY}"))
        if not found:
            raise UserError(
                f"{self.dir} holds no run dirs with {RunDir.SUMMARY}: pass a compare dir"
            )
        self.runs = {p.name: Run(p) for p in found}

    def table(self):
        """One row per run: model, mode, epochs, best val acc, test acc, time (pandas)."""
        rows = []
        for name, run in self.runs.items():
            s = run.summary
            rows.append(
                {
                    "run": name,
                    "model": s.model,
                    "mode": s.mode,
                    "epochs": s.epochs_run,
                    "best_val_acc": s.fit_state.get("best_val_acc"),
                    "test_acc": s.test["acc"],
                    "time_s": s.time_s["total"],
                }
            )
        return _pandas().DataFrame(rows).set_index("run")

    @property
    def report(self) -> Path:
        """The compare report (report.md)."""
        return self.dir / RunDir.REPORT_MD

    def _repr_html_(self) -> str:
        where = html.escape(str(self.dir))
        table = self.table().to_html()
        return f"<div><b>transferlab comparison</b> <code>{where}</code>{table}</div>"


class Study:
    """A study dir (``transferlab study``): ``.table()`` is study.csv, one row per cell."""

    def __init__(self, path: str | os.PathLike, failed: Sequence[tuple[str, str]] = ()):
        self.dir = Path(path)
        self.files = StudyDir(self.dir)
        if not self.files.csv.is_file():
            raise UserError(f"{self.dir} is not a study: {StudyDir.CSV} is missing")
        self.failed = list(failed)  # (cell, message) of the cells that failed in this call

    def table(self):
        """study.csv as a pandas DataFrame."""
        return _pandas().read_csv(self.files.csv)

    @property
    def report(self) -> Path:
        """The study report (report.html)."""
        return self.files.report_html

    def _repr_html_(self) -> str:
        where = html.escape(str(self.dir))
        failed = f", {len(self.failed)} failed cell(s)" if self.failed else ""
        return (
            f"<div><b>transferlab study</b> <code>{where}</code>{failed}"
            f"{self.table().to_html(max_rows=30)}</div>"
        )
