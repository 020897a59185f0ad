"""Memory layout of the seed CNN's train step: NCHW against channels_last, side by side.

Builds two identical seed CNNs (one NCHW, one channels_last) and alternates timed rounds of the
same train step (Adam, cross-entropy, the chosen precision) on random tensors already on the
device, so machine noise hits both alike. Prints img/s per round, the medians and their ratio.
This measurement is why `transferlab train` uses channels_last for the 32 px CNN on the CPU.

Usage:
    python benchmarks/channels_last.py                       # bf16 if the CPU has it, batch 200
    python benchmarks/channels_last.py --precision fp32 --batch-size 512 --rounds 6
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from train_pipeline import make_step  # the same step the pipelines benchmark times
from transferlab.config import ModelConfig, OptimConfig
from transferlab.distributed import resolve_device
from transferlab.models.registry import build_model
from transferlab.precision import resolve_precision
from transferlab.training.optim import build_optimizer


def fresh_step(channels_last: bool, precision: str, device: torch.device):
    """A seed CNN in the given layout and its train step (train_pipeline.make_step)."""
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = build_model(ModelConfig(name="cnn"), 100).to(device).train().to(memory_format=fmt)
    return make_step(model, build_optimizer(model, OptimConfig(), 10.0), precision, device, fmt)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=200)
    p.add_argument("--steps", type=int, default=15, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto")
    args = p.parse_args()
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    x = torch.randn(args.batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, 100, (args.batch_size,), device=device)
    steps = {
        "NCHW": fresh_step(False, precision, device),
        "channels_last": fresh_step(True, precision, device),
    }
    rates: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            for _ in range(2):  # warm-up (allocator, oneDNN primitive cache)
                step(x, y)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(x, y)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            rates[name].append(args.steps * args.batch_size / (time.perf_counter() - t0))
    print(
        f"seed CNN train step, batch {args.batch_size}, {precision}, {device}, "
        f"{torch.get_num_threads()} threads"
    )
    for name, r in rates.items():
        print(
            f"{name:14s} median {statistics.median(r):7.0f} img/s   "
            f"rounds: {' '.join(f'{v:.0f}' for v in r)}"
        )
    ratio = statistics.median(rates["channels_last"]) / statistics.median(rates["NCHW"])
    print(f"channels_last / NCHW = {ratio:.2f}")


if __name__ == "__main__":
    main()
