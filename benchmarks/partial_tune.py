"""Issue 21's table: frozen, frozen + --tune, and partial fine-tuning on real CIFAR-100, on a CPU.

Rows (lite0 unless --models says more):
- ``frozen``: the frozen backbone and the default head, as today;
- ``tune30``: frozen + ``--tune 30`` (an Optuna head search, scored on val);
- ``layers3``: frozen + ``--feature-layers 3`` (Head2Toe's multi-layer features, the default
  head); ``frozenlin`` and ``layers3lin``: frozen and frozen + ``--feature-layers 3`` under a
  linear head;
- ``p1v1``, ``p1v2``, ``p2v1``, ``p2v2``: ``--mode partial --train-stages K`` with V cached views
  (AdamW, backbone at lr/10, one-cycle, label smoothing 0.1, 15 epochs, a linear head: the
  issue's first measurement; BatchNorm on batch statistics, the default ``--partial-bn train``);
  ``p1v1bnfrozen``: p1v1 with ``--partial-bn frozen`` (the pretrained statistics), to compare.

Each cell is one ``transferlab train`` process (per class N, seed s), so the wall time is end to
end. Every row has its own cache dir: its first cell extracts (cold), the others read the cache;
the table's ``cold min`` is a cell's wall time with the row's extraction added when the cell
itself found the cache warm. Small sizes get at least 300 optimiser steps (the study's rule:
epochs raised to ``ceil(300 / steps per epoch)``). The load average is sampled before and after
each cell.

Output: OUT/cells.jsonl (one line per cell, appended: a rerun skips cells already there) and
OUT/table.md (the rows, regenerated from cells.jsonl).

Usage (the real run; hours on the 2-core CPU, run it when the CPU is quiet):
    nice -n 5 python benchmarks/partial_tune.py --data-dir /work/shared/datasets \\
        --sizes 4,16,64,all --seeds 3 --out /tmp/partial_tune
    python benchmarks/partial_tune.py --data-dir /work/shared/datasets --models lite2 \\
        --rows p1v2 --sizes all --seeds 1 --out /tmp/partial_tune     # the best row on lite2
Smoke (minutes: 300 training images, 200 val, 200 test, one epoch, --tune 2, torch engine):
    python benchmarks/partial_tune.py --data-dir /work/shared/datasets --smoke --out /tmp/pt-smoke
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODELS = {"lite0": "timm:tf_efficientnet_lite0", "lite2": "timm:tf_efficientnet_lite2"}
PARTIAL = [
    "--mode",
    "partial",
    "--optimizer",
    "adamw",
    "--schedule",
    "onecycle",
    "--label-smoothing",
    "0.1",
    "--head",
    "linear",
]
ROWS = {  # name: (flags, epochs)
    "frozen": ([], 10),
    "tune30": (["--tune", "30"], 10),
    # Head2Toe in the tool: the last 3 stages' pooled outputs beside the final features
    "layers3": (["--feature-layers", "3"], 10),
    "frozenlin": (["--head", "linear"], 10),
    "layers3lin": (["--feature-layers", "3", "--head", "linear"], 10),
    "p1v1": ([*PARTIAL, "--train-stages", "1", "--feature-views", "1"], 15),
    "p1v2": ([*PARTIAL, "--train-stages", "1", "--feature-views", "2"], 15),
    "p2v1": ([*PARTIAL, "--train-stages", "2", "--feature-views", "1"], 15),
    "p2v2": ([*PARTIAL, "--train-stages", "2", "--feature-views", "2"], 15),
    # BatchNorm of the trained stage on its pretrained statistics, against the default batch ones
    "p1v1bnfrozen": (
        [*PARTIAL, "--train-stages", "1", "--feature-views", "1", "--partial-bn", "frozen"],
        15,
    ),
}
MIN_STEPS = 300  # studies/grid.py's DEFAULT_MIN_STEPS: every cell gets at least this many steps
BATCH = 200  # the default global batch
TRAIN_IMAGES = 45_000  # CIFAR-100's training split after the 5,000 validation images


def epochs_for(per_class: int, n_train: int, epochs: int, min_steps: int = MIN_STEPS) -> int:
    """The recipe's epochs, raised so that a small subset still gets ``min_steps`` steps."""
    n = per_class * 100 if per_class else n_train
    steps = math.ceil(n / BATCH)
    return max(epochs, math.ceil(min_steps / steps))


def run_cell(args, model: str, row: str, per_class: int, seed: int) -> dict:
    """One ``transferlab train`` process; its summary's numbers, wall time and load."""
    flags, epochs = ROWS[row]
    n_train = args.train_subset or TRAIN_IMAGES
    if per_class == 0 and args.epochs_all and row != "frozen":
        epochs = args.epochs_all
    epochs = 1 if args.smoke else epochs_for(per_class, n_train, epochs, args.min_steps)
    if args.smoke and "--tune" in flags:
        flags = [*flags[: flags.index("--tune")], "--tune", "2"]
    label = f"{model}-{row}-{per_class or 'all'}-s{seed}"
    run_dir = args.out / "runs" / label
    cmd = [
        sys.executable,
        "-m",
        "transferlab",
        "train",
        "--data-dir",
        args.data_dir,
        "--model",
        MODELS[model],
        *flags,
        "--epochs",
        str(epochs),
        "--seed",
        str(seed),
        "--subset-seed",
        str(seed),
        "--cache-dir",
        str(args.out / f"cache-{model}-{row}"),
        "--run-dir",
        str(run_dir),
        "--engine",
        args.engine,
        "--overwrite",
        "--no-progress",
        "--no-report",
    ]
    if per_class:
        cmd += ["--per-class", str(per_class)]
        if args.extract_subset:  # extract only the rows of the seeds' subsets, as a study does
            cmd += ["--extract-per-class", str(per_class), "--extract-seeds", str(args.seeds)]
    if args.train_subset:
        cmd += ["--train-subset", str(args.train_subset)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.smoke:
        cmd += ["--val-size", "200", "--test-subset", "200"]
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{label} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    s = json.loads((run_dir / "summary.json").read_text())
    fc = s.get("feature_cache") or {}
    return {
        "model": model,
        "row": row,
        "per_class": per_class,
        "seed": seed,
        "epochs": epochs,
        "test_acc": s["test"]["acc"],
        "val_acc": s["val"]["acc"],
        "wall_s": round(wall, 1),
        "setup_s": s["time_s"]["setup"],
        "cold": not all(fc.get(k, {}).get("hit") for k in ("train", "val", "test")),
        "load": [round(load0, 2), round(os.getloadavg()[0], 2)],
        "command": " ".join(cmd[1:]),
    }


def table(cells: list[dict]) -> str:
    """The issue's table: a row per (model, row), a column pair per size."""
    sizes = sorted({c["per_class"] for c in cells}, key=lambda k: (k == 0, k))
    head = "| model | row | " + " | ".join(f"{k or 'all'}/class: test % (cold min)" for k in sizes)
    lines = [head + " |", "|---|---|" + "---|" * len(sizes)]
    for model, row in sorted({(c["model"], c["row"]) for c in cells}):
        mine = [c for c in cells if (c["model"], c["row"]) == (model, row)]
        cold = [c["setup_s"] for c in mine if c["cold"]]
        extract = max(cold) if cold else 0.0  # the row's extraction, paid by its first cell
        out = []
        for k in sizes:
            cs = [c for c in mine if c["per_class"] == k]
            if not cs:
                out.append("")
                continue
            accs = [100 * c["test_acc"] for c in cs]
            sd = f" ± {statistics.stdev(accs):.1f}" if len(accs) > 1 else ""
            mins = statistics.mean((c["wall_s"] + (0.0 if c["cold"] else extract)) / 60 for c in cs)
            out.append(f"{statistics.mean(accs):.2f}{sd} ({mins:.1f})")
        lines.append(f"| {model} | {row} | " + " | ".join(out) + " |")
    loads = [x for c in cells for x in c["load"]]
    lines.append("")
    lines.append(
        f"{len(cells)} cells; load average (1 min) during the cells: min {min(loads):.2f}, "
        f"max {max(loads):.2f}"
    )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True, help="parent of cifar-100-python/")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--models", default="lite0", help="comma list of " + ", ".join(MODELS))
    p.add_argument("--rows", default=",".join(ROWS), help="comma list of " + ", ".join(ROWS))
    p.add_argument("--sizes", default="4,16,64,all", help="images per class (all = 450)")
    p.add_argument("--seeds", type=int, default=3, help="seeds of the sizes below 'all'")
    p.add_argument("--train-subset", type=int, default=0, help="a seeded pool instead of 45,000")
    p.add_argument("--engine", default="auto", help="extraction engine (auto measures them)")
    p.add_argument(
        "--extract-subset",
        action="store_true",
        help="sizes below all: extract only the training rows of the seeds' subsets "
        "(--extract-per-class), not all 45,000",
    )
    p.add_argument("--smoke", action="store_true", help="a tiny check that every row runs")
    p.add_argument("--threads", type=int, default=0, help="--threads of each cell (0 = auto)")
    p.add_argument("--min-steps", type=int, default=MIN_STEPS, help="raise small sizes' epochs")
    p.add_argument("--epochs-all", type=int, default=0, help="partial/tune rows' epochs at all")
    args = p.parse_args()
    if args.smoke:
        args.sizes, args.seeds, args.train_subset = "all", 1, args.train_subset or 300
        args.engine = "torch"  # no engine probe per row
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "cells.jsonl"
    cells = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    done = {(c["model"], c["row"], c["per_class"], c["seed"]) for c in cells}
    sizes = [0 if s == "all" else int(s) for s in args.sizes.split(",")]
    for model in args.models.split(","):
        for row in args.rows.split(","):
            for k in sizes:
                for seed in range(1 if k == 0 else args.seeds):
                    if (model, row, k, seed) in done:
                        continue
                    cell = run_cell(args, model, row, k, seed)
                    print(json.dumps(cell), flush=True)
                    with path.open("a") as f:
                        f.write(json.dumps(cell) + "\n")
                    cells.append(cell)
    (args.out / "table.md").write_text(table(cells))
    print(table(cells))


if __name__ == "__main__":
    main()
