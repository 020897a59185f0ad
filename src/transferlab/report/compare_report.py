"""report.md and a self-contained report.html for ``compare``, rebuilt from the run dirs' files
alone (summary.json, metrics.csv).

Tables follow the seed study (train/val/test loss and accuracy, time, parameters); the
observations are generated from the measured numbers, never hard-coded.

Usage:
    write_compare_report(Path("runs/compare-20261128"))
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from transferlab.errors import UserError
from transferlab.io import write_atomic
from transferlab.report.html import write_html
from transferlab.report.plots import intact_png, plot_curves
from transferlab.rundir import RunDir, Summary

TITLES = {
    "cnn": "CNN trained from scratch (seed recipe)",
    "frozen": "Pretrained backbone, frozen, with the seed's head",
    "chase": "CNN trained towards the pretrained model's best validation accuracy",
    "cnn-best": "CNN with the tuned cnn-best recipe",
}


def _kind(run_dir: Path) -> str:
    name = run_dir.name
    if name.endswith("-frozen"):
        return "frozen"
    return {"cnn": "cnn", "cnn-chase": "chase", "cnn-best": "cnn-best"}.get(name, name)


def load_runs(root: Path) -> dict[str, tuple[Path, Summary]]:
    """(run dir, summary) per experiment kind found under ``root``; a damaged one is a UserError."""
    runs = {}
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        summary = RunDir(sub).summary
        if summary.is_file():
            runs[_kind(sub)] = (sub, Summary.read(summary))
    return runs


# what a summary.json or metrics.csv that parses but is not ours (or is truncated) raises
_DAMAGE = (
    KeyError,
    TypeError,
    ValueError,
    IndexError,
    AttributeError,
    ZeroDivisionError,
    csv.Error,
)


def _damaged(run_dir: Path, e: Exception) -> UserError:
    """A summary.json that parses but lacks a field or has one of the wrong type."""
    what = f"no {e}" if isinstance(e, KeyError) else f"{type(e).__name__}: {e}"
    return UserError(
        f"{run_dir}: {RunDir.SUMMARY} or {RunDir.METRICS} is damaged or from another version "
        f"({what}); "
        "rerun that experiment or remove its folder from the compare dir"
    )


def _table(s: Summary) -> str:
    rows = ["**----**|**Loss**|**Accuracy**", ":-----:|:-----:|:-----:"]
    for label, r in (("Train", s.train), ("Validation", s.val), ("Test", s.test)):
        rows.append(f"**{label}**| {r['loss']:.4f}| {r['acc']:.4f}")
    return "\n".join(rows)


def _section(kind: str, run_dir: Path, s: Summary, root: Path) -> str:
    t = s.time_s
    p = s.params
    fc = s.feature_cache or {}
    weights = s.weights
    cache_note = ""
    if fc:
        hits = [k for k in ("train", "val", "test") if (fc.get(k) or {}).get("hit")]
        cache_note = (
            f"- Feature cache: {'hit for ' + ', '.join(hits) if hits else 'extracted'} "
            f"({fc.get('seconds', '?')} s, precision {fc.get('precision', '?')})\n"
        )
    feature_precision = f" (head; features {fc['precision']})" if fc.get("precision") else ""
    if RunDir(run_dir).continued_from.is_file():
        cache_note += (
            "- Continued from experiment 1's last checkpoint (exact resume): with the "
            "same seed its first epochs are experiment 1's, bit for bit, so they were "
            "not computed twice; the wall time counts only the epochs after them\n"
        )
    curves = RunDir(run_dir).curves
    if not curves.is_file() or not intact_png(curves):  # missing or damaged: redrawn
        plot_curves(RunDir(run_dir).metrics, curves, title=s.model)
    return (
        f"## {TITLES.get(kind, kind)}\n\n"
        f"- Model: `{s.model}`, mode `{s.mode}`, weights `{weights}`, "
        f"image size {s.image_size} px, precision {s.precision}{feature_precision}\n"
        f"- Parameters: {p['total']:,} total, {p['trainable']:,} trainable, "
        f"{p['total'] - p['trainable']:,} frozen\n"
        f"- Epochs run: {s.epochs_run} (best epoch {s.best_epoch}; {s.stop_reason})\n"
        f"- Wall time: {t['total']:.1f} s (train {t['train']:.1f} s, eval {t['eval']:.1f} s, "
        f"setup {t['setup']:.1f} s)\n"
        f"{cache_note}\n{_table(s)}\n\n![{kind} loss and accuracy]({curves.relative_to(root)})\n"
    )


def observations(runs: dict[str, tuple[Path, Summary]]) -> list[str]:
    """Plain statements derived from the measured numbers."""
    out = []
    if "cnn" in runs and "frozen" in runs:
        c, f = runs["cnn"][1], runs["frozen"][1]
        diff = f.test["acc"] - c.test["acc"]
        better = "higher" if diff > 0 else "lower"
        versus = f"{abs(diff) * 100:.1f} points {better} than" if diff else "the same as"
        out.append(
            f"The frozen pretrained `{f.model}` reached test accuracy {f.test['acc']:.4f}, "
            f"{versus} the CNN's {c.test['acc']:.4f}."
        )
        ratio = f.time_s["total"] / max(c.time_s["total"], 1e-9)
        out.append(
            f"For the same epoch budget the pretrained model took {f.time_s['total']:.1f} s "
            f"against the CNN's {c.time_s['total']:.1f} s ({ratio:.2f}x)."
        )
        gap_c = c.train["acc"] - c.val["acc"]
        gap_f = f.train["acc"] - f.val["acc"]
        out.append(
            f"Train-minus-validation accuracy gap: CNN {gap_c * 100:.1f} points, "
            f"pretrained {gap_f * 100:.1f} points."
        )
    if "chase" in runs and "frozen" in runs:
        ch, f = runs["chase"][1], runs["frozen"][1]
        target = f.fit_state["best_val_acc"]
        reached = ch.fit_state["best_val_acc"] >= target
        plural = "s" if ch.epochs_run != 1 else ""
        out.append(
            f"Trained towards the pretrained model's best validation accuracy ({target:.4f}), "
            f"the CNN {'reached' if reached else 'did not reach'} it: it stopped after "
            f"{ch.epochs_run} epoch{plural} ({ch.stop_reason}) with best validation "
            f"accuracy {ch.fit_state['best_val_acc']:.4f} and test accuracy "
            f"{ch.test['acc']:.4f}."
        )
    if "cnn-best" in runs and "cnn" in runs:
        b, c = runs["cnn-best"][1], runs["cnn"][1]
        out.append(
            f"The same CNN architecture with the cnn-best recipe reached test accuracy "
            f"{b.test['acc']:.4f} in {b.epochs_run} epochs, against {c.test['acc']:.4f} "
            "with the seed's recipe."
        )
    return out


def write_compare_report(root: Path) -> Path:
    """Write ``root/report.md`` from the runs found under ``root``."""
    runs = load_runs(root)
    if not runs:
        raise UserError(f"no finished runs ({RunDir.SUMMARY}) under {root}")
    parts = ["# Transfer learning vs a CNN from scratch\n"]
    first = next(iter(runs.values()))[1]
    data = first.data
    parts.append(
        f"Data: `{data.get('source')}` ({data.get('classes')} classes), "
        f"split seed {data.get('split_seed')}, md5 {json.dumps(data.get('md5', {}))}. "
        f"Versions: {json.dumps(first.versions)}.\n"
    )
    for kind in ("cnn", "frozen", "chase", "cnn-best"):
        if kind in runs:
            try:
                parts.append(_section(kind, runs[kind][0], runs[kind][1], root))
            except _DAMAGE as e:
                raise _damaged(runs[kind][0], e) from None
    try:
        obs = observations(runs)
    except _DAMAGE as e:
        raise _damaged(root, e) from None
    if obs:
        parts.append("## Observations\n\n" + "\n".join(f"* {o}" for o in obs) + "\n")
    path = write_atomic(root / RunDir.REPORT_MD, "\n".join(parts))
    write_html(path)  # report.html beside it, images inlined (report/html.py)
    return path
