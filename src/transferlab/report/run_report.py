"""A run's report.md and self-contained report.html, rebuilt from the run dir's files alone.

Reads: summary.json (results, timing, seeds, versions, data md5), metrics.csv (learning curves),
test_predictions.npz (per-class accuracy, confused pairs, misclassified images), config.yaml,
and for the misclassified images the data themselves: the test files listed in
data_manifest.json (folder data) or the CIFAR-100 ``test`` file at the source recorded in
summary.json (read with the safe loader; its md5 is checked against the one recorded).

Sections: results (accuracy, balanced accuracy, macro-F1, top-5), learning curves, per-class
precision/recall/F1 (worst first), a row-normalised confusion matrix (up to 30 classes), the most
confused class pairs, the most confident mistakes as an image grid, Grad-CAM overlays on
those mistakes and on one correct example per most confused class (with ``transferlab[explain]``;
the model is rebuilt from best.pt), timing, data and reproducibility (seeds, versions, md5, config).

Usage:
    write_run_report(Path("runs/lite0"))  # -> report.md, report.html, curves.png, misclassified.png
    write_reports(Path("runs/compare-2026"))    # run dir or compare dir, whichever it is
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from transferlab import explain
from transferlab.classmetrics import class_metrics, confusion_matrix, worst_first
from transferlab.data.cifar import Split, load_cifar100_test
from transferlab.data.folder import load_image
from transferlab.errors import UserError
from transferlab.io import write_atomic
from transferlab.report.compare_report import write_compare_report
from transferlab.report.html import write_html
from transferlab.report.plots import plot_curves, read_metrics
from transferlab.report.predictions import load_predictions
from transferlab.rundir import RunDir, Summary

log = logging.getLogger(__name__)

TOP_N = 10  # rows in the best/worst class tables and the confused-pairs table
GRID_N = 24  # misclassified images shown


def per_class_accuracy(
    true: np.ndarray, pred: np.ndarray, n_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """(test images per class, accuracy per class); accuracy is NaN for a class with no images."""
    n = np.bincount(true, minlength=n_classes)
    correct = np.bincount(true[true == pred], minlength=n_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return n, np.where(n > 0, correct / np.maximum(n, 1), np.nan)


def confused_pairs(
    true: np.ndarray, pred: np.ndarray, n_classes: int, top: int = TOP_N
) -> list[tuple[int, int, int]]:
    """The ``top`` (true, predicted, count) off-diagonal pairs, most frequent first."""
    wrong = true != pred
    if not wrong.any():
        return []
    counts = np.bincount(true[wrong] * n_classes + pred[wrong], minlength=n_classes * n_classes)
    order = np.argsort(-counts, kind="stable")[:top]
    return [
        (int(k // n_classes), int(k % n_classes), int(counts[k])) for k in order if counts[k] > 0
    ]


TestImages = Callable[[np.ndarray, int], tuple[list, str]]


def image_reader(run_dir: Path, summary: Summary) -> TestImages:
    """``read(indices, size)``: uint8 (3, H, W) test images at ``indices`` and '', or [] and why
    they are unavailable. CIFAR's test split is read once per reader (a report asks up to 3
    times), on the first call."""

    @functools.cache
    def cifar_test(source: Path) -> tuple[Split, str] | str:
        try:
            return load_cifar100_test(source.parent)
        except UserError as e:
            return f"CIFAR-100 not readable at {source} ({e})"

    def read(indices: np.ndarray, size: int = 64) -> tuple[list, str]:
        manifest = RunDir(run_dir).manifest
        if manifest.is_file():  # folder data: the test files by index
            return _folder_test_images(manifest, indices, size)
        data = summary.data
        source = Path(str(data.get("source") or ""))
        if source.name != "cifar-100-python":
            return [], f"no {RunDir.MANIFEST} and the source {source} is not a CIFAR-100 folder"
        got = cifar_test(source)
        if isinstance(got, str):
            return [], got
        test, md5 = got
        recorded = (data.get("md5") or {}).get("test")
        if recorded and md5 != recorded:
            return [], f"the CIFAR test file at {source} has md5 {md5}, the run recorded {recorded}"
        return [test.images[int(i)].numpy() for i in indices], ""

    return read


def _folder_test_images(manifest: Path, indices: np.ndarray, size: int) -> tuple[list, str]:
    try:
        paths = json.loads(manifest.read_text())["test"]["paths"]
        paths[0]  # noqa: B018 - a list of at least one path, or damaged
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        log.warning("%s is damaged (%s); no test images in the report", manifest, e)
        return [], f"{manifest} is damaged ({type(e).__name__}); rerun the training"
    images = []
    for i in indices:
        try:
            images.append(load_image(paths[int(i)], size).numpy())
        except Exception as e:  # moved or changed since training
            return [], f"cannot read {paths[int(i)]} ({type(e).__name__})"
    return images, ""


def plot_grid(images: list[np.ndarray], captions: list[str], out_png: Path, cols: int = 6) -> Path:
    """A grid of images (uint8 (3, H, W)) with a caption above each."""
    # a plain Figure, not pyplot: no backend switch (a notebook keeps its inline plots), no state

    rows = (len(images) + cols - 1) // cols
    fig = Figure(figsize=(cols * 1.9, rows * 2.15))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, cap in zip(axes.flat, images, captions, strict=False):
        ax.imshow(np.transpose(img, (1, 2, 0)), interpolation="nearest")
        ax.set_title(cap, fontsize=7.5)
    fig.tight_layout()
    write_atomic(
        out_png, lambda f: fig.savefig(f, format="png", dpi=100, metadata={"Software": None})
    )
    return out_png


def _fmt(x, spec: str = ".4f") -> str:
    return "-" if x is None or (isinstance(x, float) and np.isnan(x)) else format(x, spec)


def _folds_section(s: Summary) -> list[str]:
    """--folds K: every fold, and the mean with its 95% Student-t interval."""
    f = s.folds
    if not f:
        return []
    out = [
        f"## {f['k']}-fold estimate",
        "",
        "| fold | best epoch | val acc | val balanced | test acc | test balanced | time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in f["per_fold"]:
        out.append(
            f"| {p['fold']} | {p['best_epoch']} | {_fmt(p['val_acc'])} "
            f"| {_fmt(p['val_balanced_acc'])} | {_fmt(p['test_acc'])} "
            f"| {_fmt(p['test_balanced_acc'])} | {_fmt(p['time_s'], '.1f')} |"
        )
    out.append("")
    for key, label in (
        ("val_acc", "val accuracy"),
        ("val_balanced_acc", "val balanced accuracy"),
        ("test_acc", "test accuracy"),
        ("test_balanced_acc", "test balanced accuracy"),
    ):
        a = f[key]
        out.append(
            f"- {label}: {a['mean']:.4f} ± {a['half_width_95']:.4f} "
            f"(95% interval over {f['k']} folds: {a['low']:.4f} to {a['high']:.4f})"
        )
    fm = f["final_model"]
    out += [
        "",
        f"The model in this run dir is fold {fm['fold']} (the {fm['choice']}, by {fm['by']}): "
        f"{fm['note']}.",
        "",
    ]
    return out


def _results_section(s: Summary, preds: dict | None) -> list[str]:
    rows = [
        "| split | loss | accuracy | balanced accuracy | macro-F1 | top-5 |",
        "|---|---|---|---|---|---|",
    ]
    for split, m in (("train", s.train), ("val", s.val), ("test", s.test)):
        rows.append(
            f"| {split} | {_fmt(m['loss'])} | {_fmt(m['acc'])} | {_fmt(m.get('balanced_acc'))} "
            f"| {_fmt(m.get('macro_f1'))} | {_fmt(m.get('top5_acc'))} |"
        )
    out = ["## Results", "", *rows, ""]
    out.append(
        "Balanced accuracy is the mean recall over classes: on imbalanced data it shows "
        "a model that neglects the rare classes, which accuracy hides."
    )
    out.append("")
    if preds:
        top5 = (preds["top5"] == preds["true"][:, None]).any(1).mean()
        out.append(
            f"Test top-{preds['top5'].shape[1]} accuracy: {top5:.4f} "
            f"over {len(preds['true'])} images. "
            f"Best epoch {s.best_epoch} of {s.epochs_run} ({s.stop_reason})."
        )
        out.append("")
    return out


MATRIX_MAX_CLASSES = 30  # above this the confusion matrix is unreadable: the top pairs instead


def _class_sections(run_dir: Path, preds: dict, classes: list[str]) -> list[str]:
    true, pred = preds["true"].astype(np.int64), preds["pred"].astype(np.int64)
    cm = confusion_matrix(true, pred, len(classes))
    rows = [r for r in worst_first(class_metrics(cm, classes)["per_class"]) if r["support"] > 0]
    shown = rows[:MATRIX_MAX_CLASSES]
    more = (
        f"; the worst {len(shown)} shown (all in {RunDir.SUMMARY})"
        if len(shown) < len(rows)
        else ""
    )
    out = [
        "## Per-class results (test, worst first)",
        "",
        f"{len(rows)} classes in the test split{more}.",
        "",
        "| class | support | recall | precision | F1 |",
        "|---|---|---|---|---|",
    ]
    out += [
        f"| {r['class']} | {r['support']} | {r['recall']:.3f} | {r['precision']:.3f} "
        f"| {r['f1']:.3f} |"
        for r in shown
    ]
    out.append("")
    if len(classes) <= MATRIX_MAX_CLASSES:
        plot_confusion(cm, classes, RunDir(run_dir).confusion)
        out += [
            "## Confusion matrix",
            "",
            f"![row-normalised test confusion matrix]({RunDir.CONFUSION})",
            "",
        ]
    n, _ = per_class_accuracy(true, pred, len(classes))
    pairs = confused_pairs(true, pred, len(classes))
    out += ["## Most confused class pairs", ""]
    if pairs:
        out += [
            "| true class | predicted as | count | share of the true class |",
            "|---|---|---|---|",
        ]
        out += [f"| {classes[t]} | {classes[p]} | {c} | {c / n[t]:.1%} |" for t, p, c in pairs]
    else:
        out.append("No test image was misclassified.")
    return out + [""]


def plot_confusion(cm: np.ndarray, classes: list[str], out_png: Path) -> Path:
    """A row-normalised confusion matrix (rows: true class; each row sums to 1)."""
    rows = cm.sum(1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0)
    side = max(4.0, 0.35 * len(classes) + 2)
    fig = Figure(figsize=(side, side))
    ax = fig.subplots()
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=7)
    ax.set_yticks(range(len(classes)), classes, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("test confusion (row-normalised)")
    if len(classes) <= 12:
        for (t, p), v in np.ndenumerate(norm):
            if v > 0:
                ax.text(
                    p,
                    t,
                    f"{v:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if v > 0.5 else "black",
                )
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    write_atomic(
        out_png, lambda f: fig.savefig(f, format="png", dpi=100, metadata={"Software": None})
    )
    return out_png


def _misclassified_section(
    run_dir: Path, test_images: TestImages, preds: dict, classes: list[str]
) -> list[str]:
    wrong = np.flatnonzero(preds["true"] != preds["pred"])
    out = ["## Misclassified test images", ""]
    if len(wrong) == 0:
        return out + ["None.", ""]
    pick = wrong[np.argsort(-preds["prob"][wrong], kind="stable")][
        :GRID_N
    ]  # most confident mistakes
    images, why = test_images(preds["index"][pick], 64)
    if not images:
        return out + [f"Images not shown: {why}.", ""]
    captions = [
        f"true: {classes[preds['true'][i]]}\n"
        f"pred: {classes[preds['pred'][i]]} ({preds['prob'][i]:.2f})"
        for i in pick
    ]
    plot_grid(images, captions, RunDir(run_dir).misclassified)
    return out + [
        f"The {len(pick)} most confident of {len(wrong)} mistakes (true label, predicted label and "
        "its probability).",
        "",
        f"![misclassified test images]({RunDir.MISCLASSIFIED})",
        "",
    ]


def _gradcam_section(
    run_dir: Path, test_images: TestImages, preds: dict, classes: list[str]
) -> list[str]:
    """Grad-CAM overlays on the most confident mistakes and on one correct example per most
    confused class (explain.py), when the ``explain`` extra is installed."""
    head = ["## Why the model decides (Grad-CAM)", ""]
    if not explain.available():
        return head + [
            "Not drawn: `pip install 'transferlab[explain]'`, then `transferlab report "
            f"{run_dir}`.",
            "",
        ]
    if not RunDir(run_dir).best.is_file():
        return head + [f"Not drawn: the run dir has no {RunDir.BEST}.", ""]
    true, pred = preds["true"].astype(np.int64), preds["pred"].astype(np.int64)
    pairs = confused_pairs(true, pred, len(classes))
    try:
        return explain.report_figures(run_dir, preds, classes, pairs, test_images)
    except Exception as e:  # the overlays are an extra: the rest of the report still gets written
        log.warning("Grad-CAM overlays for %s failed: %s: %s", run_dir, type(e).__name__, e)
        return head + [
            f"Not drawn: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}.",
            "",
        ]


def _timing_section(s: Summary, rows: list[dict]) -> list[str]:
    t = s.time_s
    other = t["total"] - t["train"] - t["eval"] - t["setup"]
    out = [
        "## Timing",
        "",
        "| part | seconds |",
        "|---|---|",
        f"| total | {t['total']:.1f} |",
        f"| setup (loaders, feature extraction) | {t['setup']:.1f} |",
        f"| training | {t['train']:.1f} |",
        f"| evaluation | {t['eval']:.1f} |",
        f"| other (data load, model build, files) | {other:.1f} |",
        "",
    ]
    fc = s.feature_cache or {}
    if fc:
        hits = [k for k in ("train", "val", "test") if (fc.get(k) or {}).get("hit")]
        out += [
            f"Feature cache: {fc.get('seconds', '?')} s "
            f"({'hit for ' + ', '.join(hits) if hits else 'extracted'}, "
            f"precision {fc.get('precision', '?')}).",
            "",
        ]
    if rows:
        ep = [r.get("epoch_time_s", 0.0) for r in rows]
        ips = [r.get("train_img_s", 0.0) for r in rows]
        out += [
            f"Per epoch ({RunDir.METRICS}): {np.mean(ep):.2f} s mean, "
            f"training throughput {np.mean(ips):.0f} img/s mean.",
            "",
        ]
    return out


def _data_section(run_dir: Path, s: Summary) -> list[str]:
    d = s.data
    out = [
        "## Data and reproducibility",
        "",
        f"- Data: `{d.get('source')}`, {d.get('classes')} classes, "
        f"split seed {d.get('split_seed')}",
        f"- Data md5: `{json.dumps(d.get('md5', {}))}`",
        f"- Seed {s.seed}, image size {s.image_size} px, "
        f"precision {s.precision}, "
        f"world size {s.world_size}",
        f"- Versions: `{json.dumps(s.versions)}`",
    ]
    folder = d.get("folder") or {}
    if folder:
        counts = folder.get("class_counts", {})
        sizes = {k: sum(v.values()) for k, v in counts.items()}
        out.append(
            f"- Folder layout `{folder.get('layout')}`: "
            f"{sizes.get('train')}/{sizes.get('val')}/{sizes.get('test')} "
            f"train/val/test images, imbalance {folder.get('imbalance_ratio')}x, "
            f"{folder.get('bad_images', 0)} bad file(s) skipped"
        )
        if folder.get("bad_image_paths"):
            out.append("- Bad files: " + ", ".join(f"`{p}`" for p in folder["bad_image_paths"]))
    out.append("")
    cfg = RunDir(run_dir).config
    if cfg.is_file():
        out += [
            f"Resolved config ({RunDir.CONFIG}):",
            "",
            "```yaml",
            cfg.read_text().rstrip(),
            "```",
            "",
        ]
    return out


def write_run_report(run_dir: Path) -> tuple[Path, Path]:
    """Write run_dir/report.md and run_dir/report.html; returns both paths."""
    summary_path = RunDir(run_dir).summary
    if not summary_path.is_file():
        raise UserError(f"{summary_path} not found: pass a finished run dir")
    s = Summary.read(summary_path)
    try:
        return _write_run_report(run_dir, s)
    except (KeyError, TypeError, ValueError) as e:  # parses, but not a summary of this version
        what = f"no {e}" if isinstance(e, KeyError) else f"{type(e).__name__}: {e}"
        raise UserError(
            f"{summary_path} is damaged or from another version ({what}); rerun the "
            "training to rewrite it"
        ) from None


def _write_run_report(run_dir: Path, s: Summary) -> tuple[Path, Path]:
    files = RunDir(run_dir)
    rows = read_metrics(files.metrics)
    parts = [
        f"# {s.model} ({s.mode})",
        "",
        f"Run dir `{run_dir}`."
        f" {s.params['total']:,} parameters, {s.params['trainable']:,} trainable.",
        "",
    ]
    preds, no_preds = None, f"No {RunDir.PREDICTIONS} in the run dir (written by newer runs)"
    if files.predictions.is_file():
        try:
            preds = load_predictions(files.predictions)
        except UserError as e:  # the report rebuilds what it can, and says what it could not
            log.warning("%s", e)
            no_preds = f"{RunDir.PREDICTIONS} is damaged (rerun the training to rewrite it)"
    parts += _folds_section(s)
    parts += _results_section(s, preds)
    parts += ["## Learning curves", ""]
    if plot_curves(files.metrics, files.curves, title=f"{s.model} ({s.mode})"):
        parts += [f"![loss and accuracy per epoch]({RunDir.CURVES})", ""]
    else:
        parts += [f"No {RunDir.METRICS} rows.", ""]
    if preds is not None:
        classes = [str(c) for c in preds["classes"]]
        parts += _class_sections(run_dir, preds, classes)
        test_images = image_reader(run_dir, s)
        parts += _misclassified_section(run_dir, test_images, preds, classes)
        parts += _gradcam_section(run_dir, test_images, preds, classes)
    else:
        parts += [f"{no_preds}: no per-class results.", ""]
    parts += _timing_section(s, rows)
    parts += _data_section(run_dir, s)
    md = write_atomic(files.report_md, "\n".join(parts))
    return md, write_html(md)


def write_reports(path: Path) -> list[Path]:
    """Reports for a run dir, or for a compare dir (a folder of run dirs)."""
    if RunDir(path).summary.is_file():
        return list(write_run_report(path))
    if path.is_dir() and any(p.is_file() for p in path.glob(f"*/{RunDir.SUMMARY}")):
        md = write_compare_report(path)
        html = md.with_suffix(".html")
        return [md, html] if html.is_file() else [md, write_html(md)]
    raise UserError(
        f"{path} holds no {RunDir.SUMMARY} (nor sub-folders with one): "
        "pass a finished run dir or a compare dir"
    )
