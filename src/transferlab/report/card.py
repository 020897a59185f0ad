"""A run's notebook card: model, accuracies, epochs, size, time and its curves, from summary.json.

Written as Markdown and rendered by the reports' renderer (``report.html``): images inlined, no
style of its own, so the notebook's look applies.

Usage:
    html = run_card_html(summary, Path("runs/cnn-20261128-120000"))   # Run._repr_html_
"""

from __future__ import annotations

import re
from pathlib import Path

from transferlab.report.html import markdown_fragment
from transferlab.rundir import RunDir, Summary


def _md(text: object) -> str:
    """Text as literal Markdown (CommonMark lets every ASCII punctuation be escaped)."""
    return re.sub(r"([\\`*_{}\[\]()#+\-.!|<>~])", r"\\\1", str(text))


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def card_markdown(s: Summary, run_dir: Path) -> str:
    """The card as Markdown: a table of the run's numbers, its curves, its folder."""
    t = s.time_s.get("total")
    rows = [
        ("test acc", _pct(s.test.get("acc"))),
        ("test balanced acc", _pct(s.test.get("balanced_acc"))),
        ("best val acc", _pct(s.fit_state.get("best_val_acc", s.val.get("acc")))),
        ("epochs", f"{s.epochs_run} (best {s.best_epoch}, {s.stop_reason or 'budget'})"),
        (
            "parameters",
            f"{s.params.get('total', 0):,} ({s.params.get('trainable', 0):,} trainable)",
        ),
        ("image size, precision", f"{s.image_size} px, {s.precision}"),
        ("time", "-" if t is None else f"{t:.1f} s"),
    ]
    lines = [
        f"transferlab run: **{_md(s.model)}** ({_md(s.mode)})",
        "",
        "| | |",
        "|---|---|",
        *(f"| {_md(k)} | **{_md(v)}** |" for k, v in rows),
        "",
    ]
    if RunDir(run_dir).curves.is_file():
        lines += [f"![learning curves]({RunDir.CURVES})", ""]
    return "\n".join([*lines, f"`{run_dir}`", ""])


def run_card_html(summary: Summary, run_dir: Path) -> str:
    """The card as an HTML fragment (``Run._repr_html_``), images inlined as data URIs."""
    body = markdown_fragment(card_markdown(summary, run_dir), run_dir)
    return f'<div class="transferlab-run">{body}</div>'
