"""The study report: report.md and a self-contained report.html, built from the cells that exist.

It reads only the study's files (study.json, cells.json, costs.json and each cell's run dir),
rewrites study.csv, and holds:

- a data-efficiency plot: test accuracy against images per class (log axis), one line per arm,
  mean and 95% interval (Student t) over seeds;
- a gain table per pretrained arm against each scratch arm: paired by seed (the same subset),
  the mean difference in points with its 95% interval, at every size;
- the size where the scratch arm catches up (its mean reaches the pretrained arm's), or "never
  within the grid";
- accuracy against cost (wall time to the result, extraction included once; forward MACs per
  image) with the Pareto front marked;
- a verdict computed from the numbers.

Usage:
    write_study_report(Path("/tmp/study"))   # -> report.md, report.html, study.csv, *.png
"""

from __future__ import annotations

import csv
import html as htmllib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from statistics import mean

from markdown_it import MarkdownIt
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from transferlab.classmetrics import t_interval
from transferlab.errors import UserError
from transferlab.io import write_atomic
from transferlab.report.html import CSS, data_uri
from transferlab.rundir import StudyDir
from transferlab.studies.table import (
    cell_row,
    is_study_dir,
    read_study_file,
    study_cells,
    write_study_csv,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Point:
    """One arm at one size: mean and 95% half-interval over the seeds that finished."""

    arm: str
    per_class: str  # "4" ... or "all"
    x: float  # images per class (the full per-class mean for "all")
    mean: float
    half: float  # 95% half-width (0 with one seed)
    n: int
    cost_s: float  # mean time to this result here, the arm's cold extraction included once
    macs: float


def read_rows(study_dir: Path) -> list[dict]:
    """Rows of study.csv, rebuilt from the run dirs first when the study's cells are known."""
    _, cells, costs = study_cells(study_dir)
    if cells:
        write_study_csv(study_dir, [cell_row(c, costs) for c in cells])
    path = StudyDir(study_dir).csv
    if not path.is_file():
        return []
    try:
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(
            f"{path} is damaged ({type(e).__name__}); rerun the same `transferlab study` command "
            "to rebuild it"
        ) from None


def _f(v) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def points(rows: list[dict], metric: str = "test_acc") -> list[Point]:
    """Aggregate the ok rows over seeds into one Point per (arm, size), on ``metric`` (a
    study.csv column: test_acc or test_balanced_acc)."""
    ok = [r for r in rows if r["status"] == "ok" and r.get(metric) not in (None, "")]
    extract = {}  # arm -> its cold extraction seconds (the largest over its cells)
    for r in ok:
        if r.get("cache") in ("miss", "partial"):
            extract[r["arm"]] = max(extract.get(r["arm"], 0.0), _f(r["extract_s"]) or 0.0)
    out = []
    for arm in dict.fromkeys(r["arm"] for r in ok):
        for size in dict.fromkeys(r["per_class"] for r in ok if r["arm"] == arm):
            rs = [r for r in ok if r["arm"] == arm and r["per_class"] == size]
            m, h = t_interval([float(r[metric]) for r in rs])
            own = [(_f(r["wall_s"]) or 0.0) - (_f(r["extract_s"]) or 0.0) for r in rs]
            classes = max(1, round(int(rs[0]["n_train"]) / int(size))) if size != "all" else None
            x = float(size) if size != "all" else int(rs[0]["n_train"]) / _n_classes(rows, classes)
            out.append(
                Point(
                    arm,
                    size,
                    x,
                    m,
                    h,
                    len(rs),
                    mean(own) + extract.get(arm, 0.0),
                    _f(rs[0]["macs"]) or float("nan"),
                )
            )
    return out


def _n_classes(rows: list[dict], fallback: int | None) -> int:
    for r in rows:
        if r["per_class"] != "all":
            return max(1, round(int(r["n_train"]) / int(r["per_class"])))
    return fallback or 1


def paired_gain(
    rows: list[dict], arm: str, base: str, size: str
) -> tuple[float, float, int] | None:
    """(mean, 95% half-width, seeds) of arm minus base in points, paired by seed; None if no
    pair."""
    acc = {
        (r["arm"], r["seed"]): float(r["test_acc"])
        for r in rows
        if r["status"] == "ok" and r["per_class"] == size and r["arm"] in (arm, base)
    }
    diffs = [
        100 * (acc[(arm, s)] - acc[(base, s)]) for (a, s) in acc if a == arm and (base, s) in acc
    ]
    if not diffs:
        return None
    m, h = t_interval(diffs)
    return m, h, len(diffs)


def pareto(pts: list[tuple[float, float]]) -> list[int]:
    """Indices of points (cost, accuracy) that no other point beats on both (lower cost, higher
    accuracy)."""
    front = []
    for i, (c, a) in enumerate(pts):
        if not any(
            (c2 <= c and a2 >= a) and (c2 < c or a2 > a) for j, (c2, a2) in enumerate(pts) if j != i
        ):
            front.append(i)
    return front


def _color(pts: list[Point], arm: str) -> str:
    """One colour per arm (matplotlib's tab10 in arm order), the same in every plot."""
    arms = list(dict.fromkeys(p.arm for p in pts))
    return f"C{arms.index(arm) % 10}"


def plot_efficiency(pts: list[Point], path: Path) -> None:
    # a bare Figure: no pyplot state, so a notebook keeps its backend

    fig = Figure(figsize=(7.5, 4.8))
    ax = fig.subplots()
    for arm in dict.fromkeys(p.arm for p in pts):
        ps = sorted((p for p in pts if p.arm == arm), key=lambda p: p.x)
        xs, ms = [p.x for p in ps], [100 * p.mean for p in ps]
        lo, hi = [100 * (p.mean - p.half) for p in ps], [100 * (p.mean + p.half) for p in ps]
        color = _color(pts, arm)
        ax.plot(xs, ms, marker="o", label=arm, color=color)
        ax.fill_between(xs, lo, hi, color=color, alpha=0.2)
    ax.set_xscale("log")
    ax.set_xlabel("training images per class (log)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Data efficiency: mean and 95% interval over seeds")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=110))


def plot_cost(pts: list[Point], path: Path) -> None:
    fig = Figure(figsize=(11, 4.6))
    axes = fig.subplots(1, 2)
    largest = {}
    for p in pts:
        if p.arm not in largest or p.x > largest[p.arm].x:
            largest[p.arm] = p
    panels = (
        (
            axes[0],
            pts,
            lambda p: p.cost_s,
            "wall time to the result here (s, log)",
            "every arm x size",
        ),
        (
            axes[1],
            list(largest.values()),
            lambda p: p.macs,
            "forward MACs per image (log)",
            "each arm at its largest size",
        ),
    )
    for ax, ps, cost, xlabel, title in panels:
        ps = [p for p in ps if cost(p) and math.isfinite(cost(p))]
        front = set(pareto([(cost(p), p.mean) for p in ps]))
        seen: set[str] = set()
        for i, p in enumerate(ps):
            ax.scatter(
                cost(p),
                100 * p.mean,
                color=_color(pts, p.arm),
                s=60 if i in front else 25,
                edgecolors="black" if i in front else "none",
                zorder=3,
                label=None if p.arm in seen else _short(p.arm),  # colours: one legend entry
            )
            seen.add(p.arm)
            if i in front:  # labels on the front only: the rest overlap where arms cluster
                ax.annotate(
                    f"{_short(p.arm)} {p.per_class}",
                    (cost(p), 100 * p.mean),
                    fontsize=7,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
        fx = sorted((cost(ps[i]), 100 * ps[i].mean) for i in front)
        if fx:
            ax.step(
                [c for c, _ in fx],
                [a for _, a in fx],
                where="post",
                color="black",
                lw=1,
                label="Pareto front",
            )
        ax.legend(fontsize=7)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # labelled minor ticks overlapped
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=110))


def _short(arm: str) -> str:
    return (
        arm.replace("timm:tf_efficientnet_", "")
        .replace(":frozen", " frozen")
        .replace(":scratch", "")
    )


def _dur(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else (f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h")


def catch_up(pts: list[Point], arm: str, base: str) -> str:
    """The first size where ``base``'s mean reaches ``arm``'s, or "never within the grid"."""
    mine = {p.per_class: p for p in pts if p.arm == arm}
    theirs = sorted((p for p in pts if p.arm == base and p.per_class in mine), key=lambda p: p.x)
    for p in theirs:
        if p.mean >= mine[p.per_class].mean:
            return f"at {p.per_class} images per class"
    if not theirs:
        return "no common size"
    last = theirs[-1]
    return (
        f"never within the grid (at {_size_words(last.per_class)} it is still "
        f"{100 * (mine[last.per_class].mean - last.mean):.1f} points behind)"
    )


def verdict(rows: list[dict], pts: list[Point]) -> str:
    """A plain sentence from the numbers: best pretrained vs best scratch at the smallest and
    largest size."""
    arms = {r["arm"]: r["mode"] for r in rows}
    scratch = [a for a in arms if arms[a] == "scratch"]
    pre = [a for a in arms if arms[a] != "scratch"]
    if not scratch or not pre or not pts:
        return "No verdict: the study needs a finished scratch arm and a finished pretrained arm."
    sizes = sorted(
        {p.per_class for p in pts}, key=lambda s: (s == "all", float(s) if s != "all" else 0)
    )
    by = {(p.arm, p.per_class): p for p in pts}
    parts = []
    for size in (sizes[0], sizes[-1]) if len(sizes) > 1 else (sizes[0],):
        cand_pre = [by[(a, size)] for a in pre if (a, size) in by]
        cand_scr = [by[(a, size)] for a in scratch if (a, size) in by]
        if not cand_pre or not cand_scr:
            continue
        bp, bs = max(cand_pre, key=lambda p: p.mean), max(cand_scr, key=lambda p: p.mean)
        g = paired_gain(rows, bp.arm, bs.arm, size)
        gain = _pm(g[0], g[1], g[2]) if g else f"{100 * (bp.mean - bs.mean):+.1f}"
        label = f"{size} images per class" if size != "all" else f"all {bp.x:.0f} images per class"
        parts.append(
            f"with {label}, {bp.arm} reaches {100 * bp.mean:.1f}% against {100 * bs.mean:.1f}% "
            "for the best "
            f"scratch arm ({bs.arm}): {gain} points, and costs {_dur(bp.cost_s)} here against "
            f"{_dur(bs.cost_s)}"
        )
    if not parts:
        return "No verdict: no size has both a finished scratch arm and a finished pretrained arm."
    best_pre = max(pre, key=lambda a: max((p.mean for p in pts if p.arm == a), default=0))
    best_scr = max(scratch, key=lambda a: max((p.mean for p in pts if p.arm == a), default=0))
    text = "; ".join(parts)
    caught = catch_up(pts, best_pre, best_scr)
    if caught.startswith("never"):
        rest = caught[len("never within the grid") :]
        end = f"{best_scr} does not catch up with {best_pre} within the grid{rest}"
    else:
        end = f"{best_scr} catches up with {best_pre} {caught}"
    cheaper = cheaper_alternative(pts, pre, sizes[-1])
    return f"{text[0].upper()}{text[1:]}. The scratch arm {end}.{cheaper}"


NEAR_POINTS = 1.0  # "about as accurate": a mean within this many points of the best arm's


def cheaper_alternative(pts: list[Point], arms: list[str], size: str) -> str:
    """A sentence naming the cheapest of ``arms`` within NEAR_POINTS of the best at ``size``
    when it is not the best itself (else ""): the arm most users should pick."""
    at = [p for p in pts if p.arm in arms and p.per_class == size]
    if len(at) < 2:
        return ""
    best = max(at, key=lambda p: p.mean)
    near = [p for p in at if 100 * (best.mean - p.mean) <= NEAR_POINTS]
    cheap = min(near, key=lambda p: p.cost_s)
    if cheap.arm == best.arm or cheap.cost_s >= best.cost_s:
        return ""
    return (
        f" {cheap.arm} is within {100 * (best.mean - cheap.mean):.1f} points of {best.arm} "
        f"with {_size_words(size)} ({100 * cheap.mean:.1f}%) and costs {_dur(cheap.cost_s)} "
        f"here against {_dur(best.cost_s)}."
    )


def _size_words(s: str) -> str:
    return "all images per class" if s == "all" else f"{s} images per class"


def _pm(m: float, half: float, n: int, sign: bool = True) -> str:
    """ "+25.0 ± 1.2" over n >= 2 seeds, "+25.0 (1 seed)" otherwise."""
    v = f"{m:+.1f}" if sign else f"{m:.1f}"
    return f"{v} ± {half:.1f}" if n >= 2 else f"{v} (1 seed)"


def _size_head(s: str) -> str:
    return "all" if s == "all" else f"{s}/class"


def _means_table(pts: list[Point]) -> list[str]:
    sizes = sorted(
        {p.per_class for p in pts}, key=lambda s: (s == "all", float(s) if s != "all" else 0)
    )
    lines = [
        "| arm | " + " | ".join(_size_head(s) for s in sizes) + " |",
        "|---" * (len(sizes) + 1) + "|",
    ]
    by = {(p.arm, p.per_class): p for p in pts}
    for arm in dict.fromkeys(p.arm for p in pts):
        cells = []
        for s in sizes:
            p = by.get((arm, s))
            cells.append("" if p is None else _pm(100 * p.mean, 100 * p.half, p.n, sign=False))
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return lines


def _balanced_table(rows: list[dict]) -> list[str]:
    """The means table on balanced accuracy (mean per-class recall), beside accuracy's."""
    pts = points(rows, "test_balanced_acc")
    if not pts:
        return []
    return [
        "Test balanced accuracy (%, mean per-class recall), mean ± 95% interval over seeds:",
        "",
        *_means_table(pts),
        "",
    ]


def _gain_tables(rows: list[dict], pts: list[Point]) -> list[str]:
    arms = {r["arm"]: r["mode"] for r in rows}
    scratch = [a for a in arms if arms[a] == "scratch"]
    pre = [a for a in arms if arms[a] != "scratch"]
    sizes = sorted(
        {p.per_class for p in pts}, key=lambda s: (s == "all", float(s) if s != "all" else 0)
    )
    out = []
    for base in scratch:
        out += [
            f"Against **{base}** (points of test accuracy, pretrained minus scratch, paired by "
            "seed, "
            "mean ± 95% interval):",
            "",
            "| pretrained arm | "
            + " | ".join(_size_head(s) for s in sizes)
            + " | scratch catches up |",
            "|---" * (len(sizes) + 2) + "|",
        ]
        for arm in pre:
            cells = []
            for s in sizes:
                g = paired_gain(rows, arm, base, s)
                cells.append("" if g is None else _pm(*g))
            out.append(f"| {arm} | " + " | ".join(cells) + f" | {catch_up(pts, arm, base)} |")
        out.append("")
    return out


def _cost_table(rows: list[dict]) -> list[str]:
    out = [
        "| arm | MACs/image | params (total) | inference img/s here | extraction img/s | "
        "cold extraction | mean cell time (excl. extraction) |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm in dict.fromkeys(r["arm"] for r in rows):
        rs = [r for r in rows if r["arm"] == arm and r["status"] == "ok"]
        if not rs or _f(rs[0]["macs"]) is None:
            out.append(f"| {arm} | | | | | | |")
            continue
        cold = [r for r in rs if r.get("cache") in ("miss", "partial")]
        ext = max((_f(r["extract_s"]) or 0.0 for r in cold), default=0.0)
        partial = any(r.get("cache") == "partial" for r in cold)
        speeds = [_f(r.get("extract_img_s")) for r in cold if _f(r.get("extract_img_s"))]
        own = [(_f(r["wall_s"]) or 0) - (_f(r["extract_s"]) or 0) for r in rs]
        note = " (some splits were cached before)" if partial else ""
        ext_text = "-" if not ext else _dur(ext) + note
        out.append(
            f"| {arm} | {_f(rs[0]['macs']) / 1e6:.0f} M | {rs[0]['params_total']} | "
            f"{rs[0]['infer_img_s']} | {f'{mean(speeds):.1f}' if speeds else '-'} | {ext_text} | "
            f"{_dur(mean(own))} |"
        )
    return out


def _protocol(study_dir: Path) -> list[str]:
    grid = read_study_file(
        StudyDir(study_dir).study, "grid", "rerun the same `transferlab study` command"
    )
    data = (grid.get("overrides") or {}).get("data") or {}
    val = data.get("val_size", 5000)
    test = (
        f"the first {data['test_subset']:,} test images (--test-subset)"
        if data.get("test_subset")
        else "the full test split"
    )
    pool = (
        f"; the training pool is a seeded {data['train_subset']:,}-image subset of the training "
        "split (--train-subset), and 'all' means all of it"
        if data.get("train_subset")
        else ""
    )
    return [
        f"Grid: arms {', '.join(grid['arms'])}; sizes {', '.join(grid['sizes'])} images per class; "
        f"{grid['seeds']} seed(s). Seed s draws the nested stratified subset (the 4-per-class "
        "subset lies "
        "inside the 16-per-class one) and seeds the run.",
        "",
        f"Protocol: every cell trains for at least {grid['min_steps']} optimiser steps (the "
        "recipe's epochs "
        "are raised for small subsets, a warm-up stretched with them); a raised cell without a "
        "schedule stops "
        f"early after {grid['patience']} epochs without a validation gain; every cell is scored "
        "on test with "
        "its best-validation weights.",
        "",
        f"Validation is the full validation split ({val:,} images for CIFAR-100) and test {test}, "
        f"the same for every cell; only the training images shrink{pool}.",
    ]


def write_study_report(study_dir: str | Path) -> Path:
    """Write report.md and report.html (images inlined) for the study in ``study_dir``."""
    study_dir = Path(study_dir)
    if not is_study_dir(study_dir):
        raise UserError(
            f"{study_dir} is not a study dir (no {StudyDir.STUDY}); run `transferlab study` first"
        )
    rows = read_rows(study_dir)
    pts = points(rows)
    if pts:
        plot_efficiency(pts, StudyDir(study_dir).efficiency_png)
        plot_cost(pts, StudyDir(study_dir).cost_png)
    status = {s: sum(r["status"] == s for r in rows) for s in ("ok", "failed", "pending")}
    md = [
        f"# Study: {study_dir.name}",
        "",
        f"Cells: {status['ok']} finished, {status['failed']} failed, "
        f"{status['pending']} not run (of {len(rows)}).",
        "",
        "## Verdict",
        "",
        verdict(rows, pts),
        "",
        "## Setup",
        "",
        *_protocol(study_dir),
        "",
        "## Data efficiency",
        "",
    ]
    if pts:
        md += [
            f"![data efficiency]({StudyDir.EFFICIENCY_PNG})",
            "",
            "Test accuracy (%), mean ± 95% interval over seeds:",
            "",
            *_means_table(pts),
            "",
            *_balanced_table(rows),
            "## What pretraining buys",
            "",
            *_gain_tables(rows, pts),
            "## Accuracy against cost",
            "",
            f"![accuracy vs cost]({StudyDir.COST_PNG})",
            "",
            "Time to a result = the cell's own time plus its backbone's cold feature extraction, "
            "counted once "
            "(frozen cells after the first read the cache). Pareto front: no other point is both "
            "cheaper and "
            "more accurate.",
            "",
            *_cost_table(rows),
            "",
        ]
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        md += (
            ["## Failed cells", ""]
            + [
                f"- {r['arm']} @ {r['per_class']}/class, seed {r['seed']}: {r['message']}"
                for r in failed
            ]
            + [""]
        )
    md += [
        "Every cell's numbers: `study.csv`; every cell is a run dir (`transferlab report "
        "CELL_DIR`).",
        "",
    ]
    path = write_atomic(StudyDir(study_dir).report_md, "\n".join(md))
    write_html(path, f"Study {study_dir.name}")
    log.info("wrote %s and %s", path, StudyDir(study_dir).report_html)
    return path


def write_html(md_path: Path, title: str) -> Path:
    """report.md -> report.html with markdown-it-py; images inlined as data URIs."""
    md = MarkdownIt("commonmark").enable("table")
    tokens = md.parse(md_path.read_text())
    for tok in tokens:
        for child in tok.children or []:
            if child.type == "image":
                uri = data_uri(md_path.parent / str(child.attrGet("src")))
                if uri is not None:
                    child.attrSet("src", uri)
    body = md.renderer.render(tokens, md.options, {})
    out = md_path.with_suffix(".html")
    write_atomic(
        out,
        f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{htmllib.escape(title)}</title>"
        f"<style>{CSS}</style></head><body>\n{body}</body></html>\n",
    )
    return out
