"""The Python face of transferlab: train, compare and load runs from a script or a notebook.

The keyword options are the CLI flags in snake_case (``--image-size`` -> ``image_size=``,
``--no-channels-last`` -> ``no_channels_last=True``), read from ``transferlab.cli.FLAGS``, so
the API and the CLI share one table, the config dataclasses and their defaults.
``progress=False`` turns the progress bars off (``--no-progress``). Bad input raises
:class:`transferlab.UserError` with the CLI's one-line message; nothing here calls ``sys.exit``
or configures the root logger.

Usage:
    import transferlab as tl
    run = tl.train(model="cnn", epochs=2, data_dir="../shared/datasets", train_subset=5000)
    run.metrics.tail()                      # pandas DataFrame of metrics.csv
    run.predict(["cat.jpg"], top_k=3)       # [{"image": "cat.jpg", "class": ..., "top": [...]}]
    run.export("onnx")                      # -> Path of the checked model.onnx
    old = tl.load_run("runs/cnn-20261128-120000")
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
import logging
import os
import tempfile
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from transferlab.errors import UserError

log = logging.getLogger(__name__)

RUN_FILES = ("config.yaml", "summary.json", "metrics.csv")  # what makes a folder a finished run
# ---------------------------------------------------------------- options -> Config


@dataclasses.dataclass(frozen=True)
class Option:
    """One keyword option of the API: the CLI flag it mirrors and the config field it sets."""

    keyword: str  # snake_case of the flag: "no_channels_last"
    flag: str  # "--no-channels-last"
    section: str  # "run"
    field: str  # "channels_last"
    kind: object  # int, float, str, "bool" or "nobool" (as in cli.FLAGS)


def options(skip: Sequence[str] = ()) -> dict[str, Option]:
    """The keyword options, built from ``transferlab.cli.FLAGS`` (the CLI's own table)."""
    from transferlab.cli import FLAGS

    out = {}
    for flag, dest, kind, _ in FLAGS:
        if flag in skip:
            continue
        section, field = dest.split(".")
        keyword = flag[2:].replace("-", "_")
        out[keyword] = Option(keyword, flag, section, field, kind)
    return out


def _check_type(opt: Option, value: Any) -> Any:
    """The value as the config field wants it, or a UserError naming the keyword and the flag."""
    kind = opt.kind
    if kind in ("bool", "nobool"):
        if isinstance(value, bool):
            return value if kind == "bool" else not value
        want = "True or False"
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        want = "an int"
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        want = "a number"
    else:
        if isinstance(value, (str, os.PathLike)):
            return os.fspath(value)
        want = "a string"
    raise UserError(f"{opt.keyword}= (CLI {opt.flag}) must be {want}; got {value!r}")


def _unknown(bad: Sequence[str], valid: Sequence[str]) -> UserError:
    return UserError(
        f"unknown option(s) {', '.join(sorted(bad))}; valid: {', '.join(sorted(valid))}"
    )


def _overrides(kwargs: dict[str, Any], table: dict[str, Option]) -> dict[str, dict[str, Any]]:
    """Nested {section: {field: value}} of the given options (None means "not given")."""
    out: dict[str, dict[str, Any]] = {}
    for keyword, value in kwargs.items():
        if value is None:
            continue
        opt = table[keyword]
        out.setdefault(opt.section, {})[opt.field] = _check_type(opt, value)
    return out


def build_config(
    config=None,
    preset: str | None = None,
    progress: bool | None = None,
    skip: Sequence[str] = (),
    **kwargs,
):
    """A validated Config: defaults < ``config`` (Config, dict, YAML) or ``preset`` < options."""
    from transferlab.config import Config, config_from_dict, config_to_dict, load_yaml, merge_dicts

    table = options(skip)
    bad = [k for k in kwargs if k not in table]
    if bad:
        raise _unknown(bad, [*table, "config", "preset", "progress"])
    if config is not None and preset is not None:
        raise UserError("pass config= or preset=, not both")
    if isinstance(config, Config):
        base = config_to_dict(config)
    elif isinstance(config, dict):
        base = config
    elif isinstance(config, (str, os.PathLike)):
        base = load_yaml(config)
    elif config is None:
        base = {}
        if preset is not None:
            from transferlab.cli import resolve_preset

            base = load_yaml(resolve_preset(preset))
    else:
        raise UserError(
            f"config= must be a Config, a dict or a YAML path; got {type(config).__name__}"
        )
    base = {
        k: v for k, v in base.items() if k != "resolved"
    }  # a run's config.yaml: the plan is derived
    over = _overrides(kwargs, table)
    if progress is not None:
        if not isinstance(progress, bool):
            raise UserError(
                f"progress= (CLI --no-progress) must be True or False; got {progress!r}"
            )
        over.setdefault("run", {})["progress"] = progress
    return config_from_dict(merge_dicts(base, over))


# ---------------------------------------------------------------- Run


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path} ({e}); is the run finished?") from None


class Run:
    """A finished run directory, read from its files (config.yaml, summary.json, metrics.csv)."""

    def __init__(self, path: str | os.PathLike):
        if not isinstance(path, (str, os.PathLike)):
            raise UserError(
                f"load_run needs a run dir path (str or Path); got {type(path).__name__}"
            )
        self.dir = Path(path)
        if not self.dir.is_dir():
            raise UserError(f"{self.dir} is not a folder; pass a run dir such as runs/<name>")
        for name in RUN_FILES:
            if not (self.dir / name).is_file():
                raise UserError(f"{self.dir} is not a finished run: {name} is missing")

    def __repr__(self) -> str:
        s = self.summary
        test_acc = (s.get("test") or {}).get("acc")
        return f"Run({str(self.dir)!r}, model={s.get('model')!r}, test_acc={test_acc})"

    @property
    def config(self) -> dict:
        """config.yaml as a dict (with its ``resolved:`` plan where the run recorded one)."""
        import yaml

        try:
            return yaml.safe_load((self.dir / "config.yaml").read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise UserError(f"cannot read {self.dir / 'config.yaml'} ({e})") from None

    @property
    def summary(self) -> dict:
        """summary.json as a dict."""
        return _read_json(self.dir / "summary.json")

    @property
    def metrics(self):
        """metrics.csv as a pandas DataFrame, one row per epoch."""
        import pandas as pd

        return pd.read_csv(self.dir / "metrics.csv")

    def plot(self):
        """The learning curves (loss, accuracy; train and val per epoch) as a matplotlib Figure."""
        return plot_metrics(
            self.metrics, title=f"{self.summary.get('model')} ({self.summary.get('mode')})"
        )

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
        from transferlab.export import export_run

        out, check = export_run(self.dir, format, Path(path) if path else None, tolerance)
        if not check.ok:
            raise UserError(
                f"export check failed: max abs diff {check.max_abs_diff:.3g} > {check.tolerance:g}"
            )
        return out

    def report(self) -> tuple[Path, Path]:
        """Write (or rewrite) report.md and report.html; returns both paths."""
        from transferlab.report.run_report import write_run_report

        with keep_matplotlib_backend():
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
        from transferlab.explain import explain_images

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
        return run_card_html(self)


def load_run(path: str | os.PathLike) -> Run:
    """A finished run dir as a :class:`Run`; a UserError names the missing file otherwise."""
    return Run(path)


def plot_metrics(df, title: str = ""):
    """Loss and accuracy panels from a metrics DataFrame (no pyplot state: a plain Figure)."""
    import matplotlib.pyplot as plt

    from transferlab.report.plots import CURVES_FIGSIZE, draw_curves

    # made through pyplot (which sets up a notebook's inline display of figures), then released
    # from it: the returned figure is shown once, as the cell's value, and pyplot keeps no state
    fig = plt.figure(figsize=CURVES_FIGSIZE)
    plt.close(fig)
    draw_curves(fig, df["epoch"], df, title)
    return fig


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def run_card_html(run: Run) -> str:
    """A compact HTML card: model, mode, accuracies, epochs, time, and the curves thumbnail."""
    s = run.summary
    fit = s.get("fit_state") or {}
    t = (s.get("time_s") or {}).get("total")
    params = s.get("params") or {}
    rows = [
        ("test acc", _pct((s.get("test") or {}).get("acc"))),
        ("test balanced acc", _pct((s.get("test") or {}).get("balanced_acc"))),
        ("best val acc", _pct(fit.get("best_val_acc", (s.get("val") or {}).get("acc")))),
        (
            "epochs",
            f"{s.get('epochs_run')} (best {s.get('best_epoch')}, "
            f"{s.get('stop_reason') or 'budget'})",
        ),
        (
            "parameters",
            f"{params.get('total', 0):,} ({params.get('trainable', 0):,} trainable)",
        ),
        ("image size, precision", f"{s.get('image_size')} px, {s.get('precision')}"),
        ("time", "-" if t is None else f"{t:.1f} s"),
    ]
    table = "".join(
        f"<tr><td style='padding:1px 10px 1px 0;color:#57606a'>{html.escape(k)}</td>"
        f"<td style='padding:1px 0'><b>{html.escape(str(v))}</b></td></tr>"
        for k, v in rows
    )
    curves = run.dir / "curves.png"
    img = ""
    if curves.is_file():
        uri = base64.b64encode(curves.read_bytes()).decode("ascii")
        img = f"<img style='max-width:420px;margin-left:14px' src='data:image/png;base64,{uri}'>"
    model, mode = html.escape(str(s.get("model"))), html.escape(str(s.get("mode")))
    title = f"{model} <span style='color:#57606a'>({mode})</span>"
    return (
        "<div style='border:1px solid #d0d7de;border-radius:6px;padding:8px 12px;"
        "display:inline-block;"
        "font-family:sans-serif;font-size:13px'>"
        f"<div style='font-size:15px;margin-bottom:4px'>transferlab run: {title}</div>"
        f"<div style='display:flex;align-items:flex-start'><table>{table}</table>{img}</div>"
        f"<div style='color:#57606a;margin-top:4px'><code>{html.escape(str(run.dir))}</code>"
        "</div></div>"
    )


# ---------------------------------------------------------------- predict


def _to_pil(image):
    """A PIL image, or a uint8/float CHW tensor (or HWC array) as a PIL image."""
    import numpy as np
    from PIL import Image

    if isinstance(image, Image.Image):
        return image
    import torch

    t = torch.as_tensor(image).detach().cpu()
    if t.dim() != 3:
        raise ValueError(f"expected one image (C, H, W); got shape {tuple(t.shape)}")
    if t.shape[0] not in (1, 3) and t.shape[-1] in (1, 3):  # HWC array
        t = t.permute(2, 0, 1)
    if t.is_floating_point():  # float in [0, 1], as torchvision's ToTensor gives
        if not torch.isfinite(t).all():  # NaN compares False with every bound below
            raise ValueError("float image holds NaN or infinite values; refusing it")
        if t.min() < 0 or t.max() > 1:
            raise ValueError("float images must be in [0, 1] (pixel / 255)")
        t = (t * 255).round().to(torch.uint8)
    elif t.dtype != torch.uint8:
        raise ValueError(f"integer images must be uint8; got {t.dtype}")
    arr = np.ascontiguousarray(t.permute(1, 2, 0).numpy())
    return Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr)


def _image_list(images) -> list:
    """Flatten a single image, an NCHW batch or a list into a list of images."""
    import torch

    if isinstance(images, (str, os.PathLike)):
        return [images]
    if isinstance(images, torch.Tensor) or type(images).__module__ == "numpy":
        t = torch.as_tensor(images)
        return list(t) if t.dim() == 4 else [t]
    if not isinstance(images, (list, tuple)):
        return [images]  # a PIL image
    return list(images)


@contextmanager
def image_files(images) -> Iterator[list[tuple[str, Path | str]]]:
    """(label, path or error text) per image, for predict and explain.

    Paths stay paths (folders expand to their image files, as on the CLI). PIL images and tensors
    are written as lossless PNGs into a temporary folder for the duration, so they take the very
    decode path of a file; an object that is no image gets its error text instead of a path.
    """
    from transferlab.predict import expand_inputs

    with tempfile.TemporaryDirectory(prefix="transferlab-images-") as tmp:
        out: list[tuple[str, Path | str]] = []
        for i, item in enumerate(_image_list(images)):
            if isinstance(item, (str, os.PathLike)):
                out += [(str(p), Path(p)) for p in expand_inputs([os.fspath(item)])]
                continue
            label = f"<image {i}>"
            try:
                path = Path(tmp) / f"image_{i}.png"
                _to_pil(item).save(path, format="PNG")
                out.append((label, path))
            except Exception as e:  # a wrong shape, dtype or range
                out.append((label, f"{type(e).__name__}: {e}"))
        if not out:
            raise UserError("no images: pass image files, folders, PIL images or tensors")
        yield out


def predict_images(
    run_dir: Path, images, top_k: int = 5, device: str = "cpu", batch_size: int = 64
) -> list[dict]:
    """See :meth:`Run.predict`."""
    from transferlab.distributed import resolve_device
    from transferlab.predict import load_run_model, predict_files

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


# ---------------------------------------------------------------- train / compare / study


@contextmanager
def _stop_flag():
    """Ctrl-C (a notebook's interrupt) checkpoints and stops at the next step, as on the CLI.

    Signal handlers can only be set from the main thread; elsewhere training runs without one.
    """
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    from transferlab.cli import _StopFlag  # the CLI's handler; the lead may make it public

    with _StopFlag() as stop:
        yield stop


@contextmanager
def keep_matplotlib_backend():
    """Give a notebook its plotting backend back after a run.

    report/plots.py (learning curves, written by every run) calls ``matplotlib.use("Agg")``,
    which would switch a notebook's inline backend off for the rest of the session.
    """
    import matplotlib

    before = matplotlib.rcParams["backend"]  # the raw setting: reading it resolves nothing
    try:
        yield
    finally:
        if matplotlib.rcParams["backend"] != before:
            matplotlib.use(before)
            shell = _ipython()
            if shell is not None and "inline" in str(before):
                shell.enable_matplotlib("inline")  # `%matplotlib inline`: its display hooks again


def _ipython():
    """The running IPython shell (a notebook kernel), or None."""
    import sys

    if "IPython" not in sys.modules:
        return None
    from IPython import get_ipython

    return get_ipython()


def train(
    config=None,
    *,
    preset: str | None = None,
    resume: str | os.PathLike | None = None,
    progress: bool | None = None,
    **options_,
) -> Run:
    """Train one model and return its :class:`Run`. Options are the ``transferlab train`` flags
    in snake_case (``model="cnn"``, ``epochs=10``, ``data_dir=...``), or ``config=``
    (a Config, a dict of sections, or a YAML path); options win over ``config``/``preset``.
    ``resume=RUN_DIR`` continues a run; only ``device=``, ``progress=`` and ``epochs=`` (a
    larger budget) may change, as with ``--resume``.
    """
    from transferlab.experiment import run_experiment
    from transferlab.folds import run_training

    epochs = None
    if resume is not None:
        cfg, epochs = _resume_config(resume, progress, options_, config, preset)
    else:
        cfg = build_config(config, preset=preset, progress=progress, **options_)
    with keep_matplotlib_backend(), _stop_flag() as stop:
        if resume is not None:
            summary = run_experiment(cfg, resume=True, stop_requested=stop, resume_epochs=epochs)
        else:
            summary = run_training(cfg, stop_requested=stop)
    return Run(summary.run_dir)  # the run wrote its report and tracking itself (outputs.py)


def _resume_config(resume, progress, given: dict, config, preset):
    """(config that names the run dir and the allowed changes, the new epoch budget or None)."""
    from transferlab.cli import RESUME_FLAGS
    from transferlab.config import Config

    table = options()
    refused = sorted(
        k
        for k, v in given.items()
        if v is not None
        and (k not in table or f"{table[k].section}.{table[k].field}" not in RESUME_FLAGS)
    )
    refused += [k for k, v in (("config", config), ("preset", preset)) if v is not None]
    if refused:
        raise UserError(
            f"resume= continues with the run's saved config; drop {', '.join(refused)} "
            "(only device=, progress= and epochs= may change)"
        )
    cfg = Config()
    cfg.run.run_dir = os.fspath(resume)
    for section, values in _overrides(given, table).items():
        for name, value in values.items():
            setattr(getattr(cfg, section), name, value)
    if progress is not None:
        if not isinstance(progress, bool):
            raise UserError(f"progress= must be True or False; got {progress!r}")
        cfg.run.progress = progress
    return cfg, cfg.optim.epochs if given.get("epochs") is not None else None


class Comparison:
    """A compare dir: the seed study's runs side by side (``.runs``, ``.table()``, ``.report``)."""

    def __init__(self, path: str | os.PathLike):
        self.dir = Path(path)
        found = sorted(p.parent for p in self.dir.glob("*/summary.json"))
        if not found:
            raise UserError(f"{self.dir} holds no run dirs with summary.json: pass a compare dir")
        self.runs = {p.name: Run(p) for p in found}

    def table(self):
        """One row per run: model, mode, epochs, best val acc, test acc, time (pandas)."""
        import pandas as pd

        rows = []
        for name, run in self.runs.items():
            s = run.summary
            rows.append(
                {
                    "run": name,
                    "model": s.get("model"),
                    "mode": s.get("mode"),
                    "epochs": s.get("epochs_run"),
                    "best_val_acc": (s.get("fit_state") or {}).get("best_val_acc"),
                    "test_acc": s["test"]["acc"],
                    "time_s": s["time_s"]["total"],
                }
            )
        return pd.DataFrame(rows).set_index("run")

    @property
    def report(self) -> Path:
        """The compare report (report.md)."""
        return self.dir / "report.md"

    def _repr_html_(self) -> str:
        where = html.escape(str(self.dir))
        table = self.table().to_html()
        return f"<div><b>transferlab comparison</b> <code>{where}</code>{table}</div>"


def compare(
    config=None, *, preset: str | None = None, progress: bool | None = None, **options_
) -> Comparison:
    """The seed study (``transferlab compare``): CNN, frozen backbone, CNN chasing it.

    Options: the compare flags in snake_case: the shared ones of ``train`` (``data_dir=``,
    ``epochs=``, ...) and the fields of ``config.CompareConfig`` (``run_dir=``, ``backbone=``,
    ``chase_max_epochs=``, ``chase_patience=``, ``with_cnn_best=``, ...).
    """
    from transferlab.cli import COMPARE_SKIPS
    from transferlab.comparison import run_compare
    from transferlab.config import CompareConfig

    kinds = {"int": int, "float": float, "str": str, "bool": "bool"}
    fields = {f.name: f for f in dataclasses.fields(CompareConfig)}
    extra = {k: options_.pop(k) for k in list(options_) if k in fields}
    table = options(COMPARE_SKIPS)
    bad = [k for k in options_ if k not in table]
    if bad:
        raise _unknown(bad, [*table, *fields, "config", "preset", "progress"])
    cfg = build_config(config, preset=preset, progress=progress, skip=COMPARE_SKIPS, **options_)
    cc = CompareConfig(
        **{
            k: _check_type(
                Option(k, "--" + k.replace("_", "-"), "", k, kinds[str(fields[k].type)]), v
            )
            for k, v in extra.items()
        }
    )
    with keep_matplotlib_backend(), _stop_flag() as stop:
        summaries = run_compare(cfg, cc, stop_requested=stop)
    return Comparison(Path(next(iter(summaries.values())).run_dir).parent)


class Study:
    """A study dir (``transferlab study``): ``.table()`` is study.csv, one row per cell."""

    def __init__(self, path: str | os.PathLike, failed: Sequence[tuple[str, str]] = ()):
        self.dir = Path(path)
        if not (self.dir / "study.csv").is_file():
            raise UserError(f"{self.dir} is not a study: study.csv is missing")
        self.failed = list(failed)  # (cell, message) of the cells that failed in this call

    def table(self):
        """study.csv as a pandas DataFrame."""
        import pandas as pd

        return pd.read_csv(self.dir / "study.csv")

    @property
    def report(self) -> Path:
        """The study report (report.html)."""
        return self.dir / "report.html"

    def _repr_html_(self) -> str:
        where = html.escape(str(self.dir))
        failed = f", {len(self.failed)} failed cell(s)" if self.failed else ""
        return (
            f"<div><b>transferlab study</b> <code>{where}</code>{failed}"
            f"{self.table().to_html(max_rows=30)}</div>"
        )


def study(
    arms: str | Sequence[str],
    per_class: str | Sequence[str | int] = "all",
    seeds: int = 1,
    *,
    run_dir: str | os.PathLike,
    overwrite: bool = False,
    min_steps: int | None = None,
    patience_epochs: int | None = None,
    progress: bool | None = None,
    **options_,
) -> Study:
    """``transferlab study``: every arm x images per class x seed as a run dir in ``run_dir``.

    ``arms``: ``"cnn:scratch,timm:tf_efficientnet_lite0:frozen"`` or a list; ``per_class``:
    ``"4,16,all"`` or a list. Other options are the study's flags in snake_case, applied to
    every cell. A study dir that is run again reruns no finished cell. Failed cells are logged
    and listed in ``Study.failed``.
    """
    from transferlab.studies import run_study
    from transferlab.studies.cli import _STUDY_SKIP  # the flags a study sets per cell
    from transferlab.studies.grid import DEFAULT_MIN_STEPS, DEFAULT_PATIENCE, make_grid

    table = options(_STUDY_SKIP)
    bad = [k for k in options_ if k not in table]
    if bad:
        extra = [
            "arms",
            "per_class",
            "seeds",
            "run_dir",
            "overwrite",
            "min_steps",
            "patience_epochs",
            "progress",
        ]
        raise _unknown(bad, [*table, *extra])
    over = _overrides(options_, table)
    if progress is not None:
        if not isinstance(progress, bool):
            raise UserError(f"progress= must be True or False; got {progress!r}")
        over.setdefault("run", {})["progress"] = progress
    arm_list = arms.split(",") if isinstance(arms, str) else [str(a) for a in arms]
    sizes = per_class if isinstance(per_class, str) else ",".join(str(x) for x in per_class)
    grid = make_grid(
        arm_list,
        sizes,
        seeds,
        over,
        DEFAULT_MIN_STEPS if min_steps is None else min_steps,
        DEFAULT_PATIENCE if patience_epochs is None else patience_epochs,
    )
    with keep_matplotlib_backend(), _stop_flag() as stop:
        result = run_study(
            grid,
            Path(run_dir),
            overwrite=overwrite,
            stop_requested=stop,
            progress=over.get("run", {}).get("progress", True),
        )
    for name, message in result.failed:
        log.warning("study %s: failed cell %s: %s", run_dir, name, message)
    return Study(run_dir, result.failed)
