"""CIFAR-100-LT (issue 22): top-1 and balanced accuracy on the balanced test set, per --balance.

Arms (``--arms``, comma-separated; default all): the seed CNN and cnn-best with --balance none
and weights (effective-number weights, and the inverse-frequency variant for the choice of the
default), frozen lite0 with none, weights and sampler. Every run is an ordinary ``transferlab
train`` run under OUT/; a table (Markdown) goes to OUT/cifar100_lt.md and stdout. Published
reference at IR 100, ResNet-32 from scratch (Cao et al., LDAM, NeurIPS 2019, Table 2):
plain cross-entropy about 38.3% top-1, LDAM-DRW about 42.0%.

The frozen lite0 arms share one extraction of the full CIFAR-100 (the LT rows are picked from the
cached train split), so the first one pays the extraction (~3 min at 224 px on 2 cores) and the
others train only the head.

Usage:
    python benchmarks/cifar100_lt.py --data-dir ../shared/datasets --out /tmp/lt100 --ir 100
    python benchmarks/cifar100_lt.py --smoke --out /tmp/lt-smoke     # seconds: a wiring check
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from transferlab.cli import main as cli

LITE0 = ["--model", "timm:tf_efficientnet_lite0", "--mode", "frozen"]
ARMS = {
    "cnn:none": ["--model", "cnn"],
    "cnn:weights": ["--model", "cnn", "--balance", "weights"],
    "cnn:weights-inverse": ["--model", "cnn", "--balance", "weights", "--class-weights", "inverse"],
    "cnn-best:none": ["--model", "cnn", "--preset", "cnn-best"],
    "cnn-best:weights": ["--model", "cnn", "--preset", "cnn-best", "--balance", "weights"],
    "lite0:none": LITE0,
    "lite0:weights": [*LITE0, "--balance", "weights"],
    "lite0:weights-inverse": [*LITE0, "--balance", "weights", "--class-weights", "inverse"],
    "lite0:sampler": [*LITE0, "--balance", "sampler"],
}
PUBLISHED = "ResNet-32 from scratch, IR 100 (Cao et al. 2019): CE 38.3%, LDAM-DRW 42.0%"


def run_arm(name: str, flags: list[str], args) -> dict:
    run = Path(args.out) / name.replace(":", "-")
    argv = [
        "train",
        "--data",
        f"cifar100-lt:{args.ir}",
        "--data-dir",
        args.data_dir,
        "--run-dir",
        str(run),
        "--overwrite",
        "--no-progress",
        *flags,
    ]
    if args.smoke:
        argv += ["--epochs", "1", "--test-subset", "500", "--image-size", "32", "--no-report"]
    if args.epochs:
        argv += ["--epochs", str(args.epochs)]
    t0 = time.perf_counter()
    code = cli(argv)
    if code != 0:
        return {"arm": name, "status": f"exit {code}"}
    s = json.loads((run / "summary.json").read_text())
    return {
        "arm": name,
        "status": "ok",
        "test_acc": s["test"]["acc"],
        "test_balanced_acc": s["test"]["balanced_acc"],
        "macro_f1": s["test"]["macro_f1"],
        "n_train": s["data"]["n"]["train"],
        "epochs": s["epochs_run"],
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default="../shared/datasets")
    ap.add_argument("--out", required=True)
    ap.add_argument("--ir", default="100", help="imbalance ratio (cifar100-lt:IR)")
    ap.add_argument("--arms", default=",".join(ARMS), help=f"subset of {', '.join(ARMS)}")
    ap.add_argument("--epochs", type=int, default=0, help="override every arm's epochs (0: keep)")
    ap.add_argument("--smoke", action="store_true", help="1 epoch, 500 test images, 32 px")
    args = ap.parse_args()
    rows = [run_arm(a, ARMS[a], args) for a in args.arms.split(",")]
    lines = [
        f"CIFAR-100-LT, IR {args.ir}; {platform.processor() or platform.machine()}; "
        f"balanced test set. Reference: {PUBLISHED}.",
        "",
        "| arm | top-1 | balanced | macro-F1 | train images | epochs | wall (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['arm']} | {r['status']} | | | | | |")
            continue
        lines.append(
            f"| {r['arm']} | {100 * r['test_acc']:.2f}% | {100 * r['test_balanced_acc']:.2f}% "
            f"| {100 * r['macro_f1']:.2f}% | {r['n_train']} | {r['epochs']} | {r['wall_s']} |"
        )
    text = "\n".join(lines) + "\n"
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "cifar100_lt.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
