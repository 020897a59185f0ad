"""Frozen-backbone extraction on a shared (oversubscribed) CPU: 1 torch thread against 2.

On the 2-core machine with other jobs running, a 2-thread forward waits at every parallel region
for a thread the scheduler has parked; one thread does not. Alternating rounds in one process,
same input, bf16 autocast, channels_last (what the feature extraction uses).

Usage:
    nice -n 5 python benchmarks/threads_contention.py --size 224 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import time

import torch


def main() -> None:
    import timm

    p = argparse.ArgumentParser()
    p.add_argument("--model", default="tf_efficientnet_lite0")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", default="1,2")
    a = p.parse_args()
    m = timm.create_model(a.model, num_classes=0).eval().to(memory_format=torch.channels_last)
    x = torch.randn(a.batch, 3, a.size, a.size).to(memory_format=torch.channels_last)
    counts = [int(t) for t in a.threads.split(",")]
    results: dict[int, list[float]] = {t: [] for t in counts}
    print(f"load average before: {os.getloadavg()}")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for _ in range(a.rounds):
            for t in counts:
                torch.set_num_threads(t)
                m(x)  # warm-up at this thread count
                t0 = time.perf_counter()
                for _ in range(3):
                    m(x)
                results[t].append(3 * a.batch / (time.perf_counter() - t0))
    print(f"load average after: {os.getloadavg()}")
    for t, v in results.items():
        print(f"{a.model}@{a.size} threads {t}: " + ", ".join(f"{s:.1f}" for s in v) + " img/s")


if __name__ == "__main__":
    main()
