"""``transferlab check-data``'s report: data_report.md, a self-contained .html, and .json.

Every leaked pair (a test or val file that is an exact or near copy of another split's file) is
named; so are unreadable files, unusual modes, duplicates within a split, and copies filed under
two classes. Nothing in the data folder is changed.

Usage:
    md, html, js = write_data_report(check_folder(cfg), Path("."))
"""

from __future__ import annotations

from pathlib import Path

from transferlab.data.check import CheckResult, Pair
from transferlab.io import write_atomic, write_json
from transferlab.report.html import write_html

MD_NAME, JSON_NAME = "data_report.md", "data_report.json"


def _pairs_table(pairs: list[Pair]) -> list[str]:
    rows = ["| kind | file | split/class | file | split/class | near score |", "|---" * 6 + "|"]
    rows += [
        f"| {p.kind} | `{p.a}` | {p.a_split}/{p.a_class} | `{p.b}` | {p.b_split}/{p.b_class} "
        f"| {p.distance if p.kind == 'near' else '-'} |"
        for p in pairs
    ]
    return rows


def summary_line(r: CheckResult) -> str:
    """One line: files, classes, imbalance, bad files, duplicates and leaks."""
    n = sum(sum(per.values()) for per in r.counts.values())
    exact = sum(p.kind == "exact" for p in r.leaks)
    return (
        f"{n} images in {len(r.classes)} classes (imbalance {r.imbalance_ratio:g}x), "
        f"{len(r.bad)} unusable file(s), {len(r.exact_within)} exact duplicate pair(s) within "
        f"a split, {len(r.leaks)} leaked pair(s) across splits ({exact} exact, "
        f"{len(r.leaks) - exact} near), {len(r.label_conflicts)} copy pair(s) under two classes"
    )


def data_report_md(r: CheckResult) -> str:
    """The Markdown report."""
    splits = list(r.counts)
    out = [
        f"# Data check: `{r.root}`",
        "",
        summary_line(r) + ".",
        "",
        f"Layout `{r.layout}`. Near duplicates: {r.near_method}. Nothing was deleted or moved.",
        "",
        "## Class counts",
        "",
        "| class | " + " | ".join(s or "(unsplit)" for s in splits) + " | total |",
        "|---" * (len(splits) + 2) + "|",
    ]
    for c in r.classes:
        per = [r.counts[s][c] for s in splits]
        out.append(f"| {c} | " + " | ".join(map(str, per)) + f" | {sum(per)} |")
    out += ["", f"Imbalance ratio (largest / smallest class): {r.imbalance_ratio:g}x.", ""]
    out += ["## Leaks across splits", ""]
    if r.leaks:
        out += [f"{len(r.leaks)} pair(s): the same picture in two splits inflates the scores.", ""]
        out += _pairs_table(r.leaks)
    else:
        out.append("None found.")
    out += ["", "## Exact duplicates within a split", ""]
    out += _pairs_table(r.exact_within) if r.exact_within else ["None found."]
    out += ["", "## The same file under two classes", ""]
    out += _pairs_table(r.label_conflicts) if r.label_conflicts else ["None found."]
    out += ["", "## Unreadable or non-image files", ""]
    if r.bad:
        out += ["| file | why |", "|---|---|"]
        out += [f"| `{p}` | {why} |" for p, why in sorted(r.bad.items())]
    else:
        out.append("None.")
    w, h = r.size_range["width"], r.size_range["height"]
    out += [
        "",
        "## Sizes and modes",
        "",
        f"Width {w[0]}-{w[1]} px, height {h[0]}-{h[1]} px. Most common sizes: "
        + ", ".join(f"{s} ({n})" for s, n in r.sizes.items()),
        "",
    ]
    if r.modes:
        out += ["| mode | files | examples |", "|---|---|---|"]
        out += [
            f"| {m} | {len(fs)} | " + ", ".join(f"`{f}`" for f in fs[:3]) + " |"
            for m, fs in r.modes.items()
        ]
        out += ["", "Training converts every image to 8-bit RGB (16-bit scaled, alpha dropped)."]
    else:
        out.append("Every image is 8-bit RGB (or JPEG YCbCr).")
    return "\n".join(out) + "\n"


def write_data_report(r: CheckResult, out_dir: Path) -> tuple[Path, Path, Path]:
    """data_report.md, .html and .json in ``out_dir``, written atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md, js = out_dir / MD_NAME, out_dir / JSON_NAME
    write_atomic(md, data_report_md(r))
    write_json(js, r.to_dict())
    return md, write_html(md), js
