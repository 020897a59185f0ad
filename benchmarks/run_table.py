"""Table of the `transferlab train` runs a benchmark script made: wall time, img/s, accuracy.

Reads OUT/walls.txt (one line per run: name, start and end epoch seconds, as written by
benchmarks/gpu.sh and benchmarks/gpu_finetune.sh), each run's summary.json and metrics.csv, and
OUT/pipeline.json when the pipeline benchmark ran.

Usage:
    python benchmarks/run_table.py OUT_DIR
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path


def main(out: Path) -> None:
    walls = {}
    for line in (out / "walls.txt").read_text().splitlines():
        name, start, end = line.split()
        walls[name] = float(end) - float(start)
    print(
        f"\n{'experiment':24s} {'wall s':>8s} {'run s':>8s} {'setup s':>8s} {'train img/s':>12s} "
        f"{'epochs':>6s} {'val acc':>8s} {'test acc':>8s}"
    )
    for name, wall in walls.items():
        s = json.loads((out / name / "summary.json").read_text())
        with open(out / name / "metrics.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        ips = max(float(r["train_img_s"]) for r in rows) if rows else 0.0
        fc = s.get("feature_cache") or {}
        extra = (
            f"  extract {fc['train']['img_s']} img/s"
            if fc and fc.get("train", {}).get("img_s")
            else ""
        )
        print(
            f"{name:24s} {wall:8.1f} {s['time_s']['total']:8.1f} {s['time_s']['setup']:8.1f} "
            f"{ips:12.0f} {s['epochs_run']:6d} {s['val']['acc']:8.4f} "
            f"{s['test']['acc']:8.4f}{extra}"
        )
    p = out / "pipeline.json"
    if p.exists():
        r = json.loads(p.read_text())
        print(
            f"\npipeline (cnn, batch 200): naive {r['naive']:.0f} img/s, ours {r['ours']:.0f}, "
            f"bare {r['bare']:.0f}; b/bare {r['b_over_bare']:.2f}, b/a {r['b_over_a']:.2f}"
        )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
