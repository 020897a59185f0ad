"""Does predict on the chosen engine agree with the torch path? Top-1 on the CIFAR-100 test set.

For a finished frozen-feature run (its plan names the extraction engine and precision), the
10,000 test images go through the run's preprocessing once, then through the backbone three
ways: the plan's engine (what ``transferlab predict`` uses on the CPU), torch in fp32, and torch
under the plan's precision. The head is the run's. Prints the top-1 agreement of the engine path
with each torch path, and each path's test accuracy.

Usage:
    python benchmarks/predict_agreement.py RUN_DIR --data-dir ../shared/datasets [--n 10000]
"""

from __future__ import annotations

import argparse
import time

import torch

from transferlab.data.cifar import load_cifar100
from transferlab.data.preprocess import to_float_normalized
from transferlab.precision import autocast
from transferlab.predict import load_run_model


@torch.inference_mode()
def logits_of(forward, images: torch.Tensor, pre, size: int, batch: int = 250) -> torch.Tensor:
    out = []
    for i in range(0, len(images), batch):
        x = to_float_normalized(images[i : i + batch], pre.mean, pre.std, size, pre.interpolation)
        out.append(forward(x).float())
    return torch.cat(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--n", type=int, default=10_000, help="test images (default: all 10,000)")
    a = p.parse_args()
    rm = load_run_model(a.run_dir, "cpu")
    import yaml

    plan = yaml.safe_load(open(f"{a.run_dir}/config.yaml"))["resolved"]
    prec = plan["extract"]["precision"]
    ds = load_cifar100(a.data_dir, False, 0, 5000)
    images, labels = ds.test.images[: a.n], ds.test.labels[: a.n]
    model, size = rm.model.eval(), rm.image_size

    def torch_at(precision):
        def fwd(x):
            with autocast(precision, torch.device("cpu")):
                f = model.backbone(x)
            return model.head(f.float())

        return fwd

    paths = {
        f"engine ({plan['extract']['engine']} {prec})": rm.logits,
        "torch fp32": torch_at("fp32"),
        f"torch {prec}": torch_at(prec),
    }
    preds = {}
    for name, fwd in paths.items():
        t0 = time.perf_counter()
        logits = logits_of(fwd, images, rm.preprocessing, size)
        preds[name] = logits.argmax(1)
        acc = (preds[name] == labels).float().mean().item()
        speed = len(images) / (time.perf_counter() - t0)
        print(f"{name:28s} test acc {acc:.4f}  ({speed:.0f} img/s)")
    engine = next(iter(preds))
    for name in list(preds)[1:]:
        agree = (preds[engine] == preds[name]).float().mean().item()
        print(f"top-1 agreement, {engine} vs {name}: {100 * agree:.2f}% of {len(images)}")


if __name__ == "__main__":
    main()
