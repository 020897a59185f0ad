"""Training beside other jobs on a shared CPU (issue 25 item 4): the old thread policy against
the new one, quiet and loaded, in one script.

Workloads (each a real ``transferlab train`` in a child process):
- ``cnn``: the seed CNN's training img/s over one epoch of ``--images`` CIFAR-100 images
  (metrics.csv ``train_img_s``);
- ``head``: a frozen lite0 head on cached features for ``--head-epochs`` epochs (the sum of
  metrics.csv ``epoch_time_s``; the features are cached by an untimed warm-up run first).

Neighbours, started before the workload and stopped after it:
- ``quiet``: none; ``torch1``/``torch2``: 1 or 2 other PyTorch jobs with default threads (a conv
  forward+backward loop, OpenMP env unset); ``py2``: 2 plain Python busy loops.
``torch1late``: the one PyTorch job starts only once the run has logged its training threads, so
the run chose them on a quiet CPU (the case the per-epoch re-check and the wait policy are for).
Every neighbour stops by itself after ``--load-limit`` seconds, and all are stopped at the end.

Policies:
- ``before``: the old policy: OMP_WAIT_POLICY unset (libgomp spins), torch on every core
  (``--threads`` = the usable cores), the CLI entered without transferlab.entry;
- ``after``: ``python -m transferlab``: threads from the free cores, re-checked every 2 s during
  training, and libgomp's own waits (an idle thread spins ~300,000 iterations, then sleeps);
- ``passive``: ``after`` with ``OMP_WAIT_POLICY=PASSIVE`` (idle threads sleep at once), which the
  entry set until the Zen 5 measurement (RESULTS.md, issue 25);
- ``spinN`` (e.g. ``spin30000``): ``after`` with ``GOMP_SPINCOUNT=N``: an idle OpenMP thread spins
  N iterations (libgomp: roughly 100,000 per ms) before it sleeps.

``--repeats R`` runs the whole grid R times (each round in the same order) and reports medians.

Usage (the real measurement wants a quiet machine: nothing else running):
    python benchmarks/contention.py --data-dir /work/shared/datasets --out /tmp/contention
    python benchmarks/contention.py --data-dir /work/shared/datasets --out /tmp/c --smoke
    python benchmarks/contention.py --policies before,passive,after --images 45000
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

LOADS = {"quiet": (0, 0), "torch1": (1, 0), "torch2": (2, 0), "py2": (0, 2)}  # (torch, python)
LOADS["torch1late"] = LOADS["torch1"]  # starts when the run has chosen its training threads
TORCH_LOOP = """
import time, torch
deadline = time.time() + {limit}
conv = torch.nn.Sequential(torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.ReLU(),
                           torch.nn.Conv2d(64, 64, 3, padding=1))
x = torch.randn(16, 64, 56, 56)
while time.time() < deadline:
    conv(x).sum().backward()
"""
PY_LOOP = "import time\nd = time.time() + {limit}\nwhile time.time() < d:\n    pass\n"
OLD_CLI = "import sys; from transferlab.cli import main; sys.exit(main(sys.argv[1:]))"
OMP_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS", "KMP_BLOCKTIME")


def clean_env() -> dict:
    """This environment without any OpenMP setting (what a user who never heard of it has)."""
    return {k: v for k, v in os.environ.items() if k not in OMP_VARS}


def policy_env(policy: str) -> dict:
    """The environment a policy's run starts with: clean, plus its OpenMP variable."""
    env = clean_env()
    if policy.startswith("spin"):
        env["GOMP_SPINCOUNT"] = str(int(policy[4:]))
    if policy == "passive":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    return env


def start_load(kind: tuple[int, int], limit: float) -> list[subprocess.Popen]:
    """The neighbour processes: n torch loops and m Python busy loops, bounded by ``limit`` s."""
    n_torch, n_py = kind
    procs = []
    for code, n in ((TORCH_LOOP, n_torch), (PY_LOOP, n_py)):
        for _ in range(n):
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", code.format(limit=limit)],
                    env=clean_env(),
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
    return procs


def stop(procs: list[subprocess.Popen]) -> None:
    """Terminate each process we started, by its own handle; kill what does not stop in 10 s."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def cli(policy: str) -> list[str]:
    """The command prefix of a policy."""
    return (
        [sys.executable, "-c", OLD_CLI]
        if policy == "before"
        else [sys.executable, "-m", "transferlab"]
    )


def train_args(a, workload: str, run_dir: Path, policy: str) -> list[str]:
    common = ["train", "--data-dir", a.data_dir, "--run-dir", str(run_dir), "--overwrite"]
    common += ["--device", "cpu", "--no-progress", "--no-report", "--test-subset", str(a.test)]
    common += ["--train-subset", str(a.images), "--cache-dir", str(Path(a.out) / "cache")]
    common += ["--val-size", str(a.val)]
    if policy == "before":
        common += ["--threads", str(len(os.sched_getaffinity(0)))]
    if workload == "cnn":
        return [*common, "--model", "cnn", "--epochs", "1"]
    lite = ["--model", "timm:tf_efficientnet_lite0", "--epochs", str(a.head_epochs)]
    return [*common, *lite, "--engine", "openvino"]


def run_workload(a, workload: str, policy: str, tag: str, late=(0, 0)) -> tuple[float, str]:
    """(img/s for cnn or seconds for head, the run's thread line); ``late`` neighbours start
    once the run logs its training threads, and stop when it ends."""
    run_dir = Path(a.out) / f"{workload}-{policy}-{tag}"
    proc = subprocess.Popen(
        [*cli(policy), *train_args(a, workload, run_dir, policy)],
        env=policy_env(policy),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    timer = threading.Timer(a.run_limit, proc.kill)
    timer.start()
    lines, procs = [], []
    try:
        for line in proc.stderr:
            lines.append(line)
            if "threads for train" in line and not procs:
                procs = start_load(late, a.load_limit)
        proc.wait()
    finally:
        timer.cancel()
        stop([proc, *procs])
    stderr = "".join(lines)
    if proc.returncode != 0:
        raise SystemExit(f"{workload} {policy} {tag} failed:\n{stderr[-3000:]}")
    threads = "; ".join(re.findall(r"threads for train: [^\n]*", stderr)) or "n/a"
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    if workload == "cnn":
        return float(rows[0]["train_img_s"]), threads
    return sum(float(r["epoch_time_s"]) for r in rows), threads


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data-dir", default="/work/shared/datasets")
    p.add_argument("--out", default="/tmp/contention")
    p.add_argument("--images", type=int, default=10_000, help="training images per epoch")
    p.add_argument("--test", type=int, default=1000, help="test images of each run")
    p.add_argument("--val", type=int, default=5000, help="validation images (held out)")
    p.add_argument("--head-epochs", type=int, default=10)
    p.add_argument("--workloads", default="cnn,head")
    p.add_argument("--loads", default=",".join(LOADS))
    p.add_argument("--policies", default="before,passive,after")
    p.add_argument("--settle", type=float, default=3.0, help="s between load start and run")
    p.add_argument("--load-limit", type=float, default=1800.0, help="a neighbour's own limit, s")
    p.add_argument("--run-limit", type=float, default=1800.0, help="one run's limit, s")
    p.add_argument("--repeats", type=int, default=1, help="rounds of the whole grid; medians")
    p.add_argument("--smoke", action="store_true", help="400 images, 2 head epochs, 100 val+test")
    a = p.parse_args()
    # a SIGTERM (timeout, kill) unwinds through the finally blocks: the neighbours stop with us
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if a.smoke:
        a.images, a.head_epochs, a.test, a.val = 400, 2, 100, 100
    Path(a.out).mkdir(parents=True, exist_ok=True)
    shutil.rmtree(Path(a.out) / "cache", ignore_errors=True)
    workloads, loads, policies = a.workloads.split(","), a.loads.split(","), a.policies.split(",")
    print(f"load average at start: {os.getloadavg()}; usable cores {len(os.sched_getaffinity(0))}")
    if "head" in workloads:  # fill the feature cache, untimed and quiet
        run_workload(a, "head", "after", "warmup")
    samples: dict = {}
    for rnd in range(a.repeats):
        for workload in workloads:
            for load in loads:
                for policy in policies:
                    late = load.endswith("late")
                    procs = [] if late else start_load(LOADS[load], a.load_limit)
                    try:
                        time.sleep(a.settle if procs else 0)
                        value, threads = run_workload(
                            a, workload, policy, load, LOADS[load] if late else (0, 0)
                        )
                    finally:
                        stop(procs)
                    samples.setdefault((workload, load, policy), []).append(value)
                    print(
                        f"round {rnd} {workload:5s} {load:7s} {policy:10s} {value:10.1f}  "
                        f"({threads}; load average {os.getloadavg()[0]:.2f})",
                        flush=True,
                    )
    results = {k: statistics.median(v) for k, v in samples.items()}
    print(f"load average at end: {os.getloadavg()}\n")
    for workload in workloads:
        unit = "train img/s" if workload == "cnn" else f"s for {a.head_epochs} head epochs"
        print(f"{workload} ({unit}; in brackets: the slowdown against quiet, same policy)")
        print("| neighbours | " + " | ".join(policies) + " |")
        print("|---|" + "---|" * len(policies))
        for load in loads:
            cells = []
            for policy in policies:
                v, q = results[(workload, load, policy)], results.get((workload, "quiet", policy))
                slow = (q / v if workload == "cnn" else v / q) if q else float("nan")
                cells.append(f"{v:.1f} ({slow:.1f}x)")
            print(f"| {load} | " + " | ".join(cells) + " |")
        print()


if __name__ == "__main__":
    main()
