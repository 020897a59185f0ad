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

CURVES = "curves.png"  # written by every run (outputs.py)


def _md(text: object) -> str:
    """Text as literal Markdown (CommonMark lets every ASCII punctuation be escaped)."""
    return re.sub(r"([\\`*_{}\[\]()#+\-.!|<>~])", r"\\\1", str(text))


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def card_markdown(s: dict, run_dir: Path) -> str:
    """The card as Markdown: a table of the run's numbers, its curves, its folder."""
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
        ("parameters", f"{params.get('total', 0):,} ({params.get('trainable', 0):,} trainable)"),
        ("image size, precision", f"{s.get('image_size')} px, {s.get('precision')}"),
        ("time", "-" if t is None else f"{t:.1f} s"),
    ]
    lines = [
        f"transferlab run: **{_md(s.get('model'))}** ({_md(s.get('mode'))})",
        "",
        "| | |",
        "|---|---|",
        *(f"| {_md(k)} | **{_md(v)}** |" for k, v in rows),
        "",
    ]
    if (run_dir / CURVES).is_file():
        lines += [f"![learning curves]({CURVES})", ""]
    return "\n".join([*lines, f"`{run_dir}`", ""])


def run_card_html(summary: dict, run_dir: Path) -> str:
    """The card as an HTML fragment (``Run._repr_html_``), images inlined as data URIs."""
    body = markdown_fragment(card_markdown(summary, run_dir), run_dir)
    return f'<div class="transferlab-run">{body}</div>'
