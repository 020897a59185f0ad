"""DDP throughput: the seed CNN on real CIFAR-100 for one epoch with 1 and with N processes.

Each run is the real CLI under torchrun (gloo on the CPU by default) with the same global
batch; the training img/s is read back from each run dir's ``metrics.csv`` (``train_img_s``,
global images over this epoch's training time, so the numbers compare directly). On a machine
with fewer free cores than processes x threads, more processes cannot be faster: the point is
to measure, not to assume.

Usage:
    python benchmarks/ddp_throughput.py --data-dir ../shared/datasets
    python benchmarks/ddp_throughput.py --data-dir ../shared/datasets --procs 1 2 4 --device cuda
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger("ddp_throughput")


def run_once(procs: int, args: argparse.Namespace, root: Path) -> dict:
    """One epoch with ``procs`` processes; returns img/s, wall time and the command."""
    run_dir = root / f"cnn-{procs}proc"
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        raise SystemExit("torchrun not found on PATH; install torch (it ships torchrun)")
    cmd = [
        torchrun,
        "--standalone",
        "--nproc-per-node",
        str(procs),
        "-m",
        "transferlab",
        "train",
        "--model",
        "cnn",
        "--data-dir",
        args.data_dir,
        "--epochs",
        "1",
        "--batch-size",
        str(args.batch_size),
        "--device",
        args.device,
        "--precision",
        args.precision,
        "--no-progress",
        "--run-dir",
        str(run_dir),
        "--overwrite",
    ]
    # Split the cores between the processes, so N processes do not oversubscribe the machine.
    threads = max(1, (args.threads or os.cpu_count() or 1) // procs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    log.info("%d process(es), %d thread(s) each: %s", procs, threads, " ".join(cmd))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(
            f"{procs}-process run failed (exit {proc.returncode}); see the output above"
        )
    with open(run_dir / "metrics.csv", newline="") as f:
        row = list(csv.DictReader(f))[-1]
    return {
        "procs": procs,
        "threads": threads,
        "train_img_s": float(row["train_img_s"]),
        "epoch_time_s": float(row["epoch_time_s"]),
        "wall_s": wall,
        "cmd": " ".join(cmd),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="../shared/datasets", help="parent of cifar-100-python/")
    p.add_argument(
        "--procs",
        type=int,
        nargs="+",
        default=[1, 2],
        help="process counts to compare (default 1 2)",
    )
    p.add_argument(
        "--batch-size", type=int, default=200, help="global batch (default 200, the seed's)"
    )
    p.add_argument(
        "--device", default="cpu", help="cpu (gloo, default) or cuda (nccl, one GPU per process)"
    )
    p.add_argument("--precision", default="fp32", help="fp32 (default) | bf16 | auto")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads in total, split over processes (default: all)",
    )
    p.add_argument(
        "--out", default="", help="keep the run dirs here (default: a temp dir, removed)"
    )
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="ddp-bench-"))
    try:
        results = [run_once(n, args, root) for n in args.procs]
    finally:
        if not args.out:
            shutil.rmtree(root, ignore_errors=True)
    base = results[0]["train_img_s"]
    lines = [
        f"seed CNN, CIFAR-100, 1 epoch, global batch {args.batch_size}, {args.device}, "
        f"{args.precision}, {os.cpu_count()} CPU(s) visible"
    ]
    for r in results:
        lines.append(
            f"{r['procs']} process(es) x {r['threads']} thread(s): "
            f"{r['train_img_s']:8.1f} train img/s ({r['train_img_s'] / base:.2f}x), "
            f"epoch {r['epoch_time_s']:.1f} s, wall {r['wall_s']:.1f} s"
        )
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
