"""Issue 20's figures: a study on ``processes:2`` against ``local``, and a small grid's cold
extraction with and without "extract only the rows the grid needs".

1. ``executors``: 8 small CNN cells (``cnn:scratch`` x 16,64 per class x 4 seeds) on CIFAR-100,
   run once with ``--executor local`` (the process's own torch threads) and once with
   ``--executor processes:2 --cpus-per-cell 1``, each into its own study dir; prints the wall
   times, their ratio, and whether the two study.csv files agree.
2. ``extraction``: the frozen lite0 arm of a 4,16-per-class grid with 3 seeds, extracted into a
   cold cache twice: every training image (what a study did before) and only the union of the
   grid's subsets plus val and test (``data.extract_per_class``); prints the images extracted
   and the seconds of each.

Run it on a quiet machine (``uptime`` load near 0), and record the output with its command:

    python benchmarks/study_executors.py --data-dir /work/shared/datasets
    python benchmarks/study_executors.py --data-dir /work/shared/datasets --only extraction
    python benchmarks/study_executors.py --smoke      # tiny synthetic data: checks the script

Study dirs and feature caches go to a temp dir (``--work DIR`` keeps them), never to the user's
cache.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import tempfile
import time
from pathlib import Path

from transferlab.config import config_from_dict
from transferlab.data.cifar import write_cifar_like
from transferlab.experiment import extract_features
from transferlab.features import cache as fcache
from transferlab.studies import run_study
from transferlab.studies.executors import Resources
from transferlab.studies.grid import make_grid

LITE0 = "timm:tf_efficientnet_lite0"


def _accs(study: Path) -> dict:
    with open(study / "study.csv") as f:
        return {(r["arm"], r["per_class"], r["seed"]): r["test_acc"] for r in csv.DictReader(f)}


def bench_executors(data_dir: str, work: Path, smoke: bool) -> dict:
    """Wall time of the same 8-cell CNN study on local and on processes:2."""
    over = {
        "data": {"data_dir": data_dir, **({"val_size": 20} if smoke else {})},
        "optim": {"epochs": 1 if smoke else 10},
        "run": {"progress": False, "cache_dir": str(work / "cache"), "device": "cpu"},
    }
    sizes = "2,4" if smoke else "16,64"
    grid = make_grid(["cnn:scratch"], sizes, 4, over, min_steps=4 if smoke else 300)
    out = {}
    for name, res in (("local", Resources()), ("processes:2", Resources(cpus=1))):
        study = work / ("study-" + name.replace(":", "-"))
        t0 = time.perf_counter()
        result = run_study(grid, study, executor=name, resources=res, write_report=False)
        out[name] = {"wall_s": round(time.perf_counter() - t0, 1), "failed": len(result.failed)}
        out[name]["accs"] = _accs(study)
    same = out["local"]["accs"] == out["processes:2"]["accs"]
    ratio = out["local"]["wall_s"] / out["processes:2"]["wall_s"]
    return {
        "cells": 8,
        "local_s": out["local"]["wall_s"],
        "processes2_s": out["processes:2"]["wall_s"],
        "speedup": round(ratio, 2),
        "same_test_acc": same,  # local runs at the measured thread count: equal only by chance
        "failed": out["local"]["failed"] + out["processes:2"]["failed"],
    }


def bench_extraction(data_dir: str, work: Path, smoke: bool) -> dict:
    """Images extracted and seconds for a 4,16-per-class grid's frozen arm, cold cache."""
    sizes, seeds = (2, 4) if smoke else (4, 16), 3
    out = {}
    for label, rows in (("every_row", 0), ("grid_rows", max(sizes))):
        cache = work / f"cache-{label}"
        cfg = config_from_dict(
            {
                "data": {
                    "data_dir": data_dir,
                    "per_class": min(sizes),
                    "extract_per_class": rows,
                    "extract_seeds": seeds,
                    **({"val_size": 20, "image_size": 32} if smoke else {}),
                },
                "model": {"name": LITE0, "mode": "frozen"},
                "run": {"progress": False, "cache_dir": str(cache), "device": "cpu"},
            }
        )
        t0 = time.perf_counter()
        extract_features(cfg)
        seconds = time.perf_counter() - t0
        n = {e["split"]: int(e["n"]) for e in fcache.list_entries(cache) if e.get("split")}
        out[label] = {"images": sum(n.values()), "by_split": n, "seconds": round(seconds, 1)}
    out["time_ratio"] = round(out["every_row"]["seconds"] / out["grid_rows"]["seconds"], 2)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="/work/shared/datasets")
    p.add_argument("--only", choices=("executors", "extraction"))
    p.add_argument("--work", help="keep the study and cache dirs here (default: a temp dir)")
    p.add_argument("--smoke", action="store_true", help="tiny synthetic data, seconds")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        data_dir = args.data_dir
        if args.smoke:
            data_dir = str(write_cifar_like(work / "cifar", n_train=120, n_test=40, n_classes=4))
        load = os.getloadavg()
        result = {"load_avg_before": [round(x, 2) for x in load], "cpus": os.cpu_count()}
        if args.only in (None, "executors"):
            result["executors"] = bench_executors(data_dir, work, args.smoke)
        if args.only in (None, "extraction"):
            result["extraction"] = bench_extraction(data_dir, work, args.smoke)
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
