"""Multi-layer features under one head (Head2Toe's idea, Evci et al., ICML 2022), issue 21.

One forward pass of lite0 (real ImageNet weights, 224 px, torch fp32) over a seeded
N-per-class subset of CIFAR-100's training split, --val validation and --test test images; from
that pass, the average-pooled output of ``blocks[4]``, ``blocks[5]`` and ``blocks[6]`` and the
usual final features (``conv_head -> bn2 -> pool``, 1,280). Then the same head recipe on each
feature set:

- ``final``: the 1,280 final features (what ``--mode frozen`` trains on);
- ``final+b6``: with the last stage's 320 pooled channels;
- ``final+b6+b5``: with 320 + 192;
- ``final+b6+b5+b4``: with 320 + 192 + 112.

Every set is standardised per dimension on the training rows (each layer's scale differs). The
head is linear (and, with ``--hidden 256``, the default MLP), AdamW with a seeded small grid of
(lr, weight decay) scored on val; the test accuracy is read at the best val epoch of the best
setting. The extraction is shared, so "per minute" is the head's cost plus the same pass: the
printed table gives both.

Usage (minutes on 2 cores; a quiet CPU for the timings):
    python benchmarks/head2toe.py --data-dir /work/shared/datasets --per-class 64 --out /tmp/h2t
    python benchmarks/head2toe.py --smoke --out /tmp/h2t-smoke
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from transferlab.config import ModelConfig
from transferlab.data.cifar import load_cifar100
from transferlab.data.preprocess import to_float_normalized
from transferlab.models.registry import build_model

TAPS = (4, 5, 6)  # blocks whose pooled outputs join the final features
SETS = {
    "final": (),
    "final+b6": (6,),
    "final+b6+b5": (6, 5),
    "final+b6+b5+b4": (6, 5, 4),
}
GRID = [(lr, wd) for lr in (1e-3, 3e-3) for wd in (1e-4, 1e-2)]


def per_class_rows(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for c in labels.unique():
        idx = (labels == c).nonzero().flatten()
        rows.append(idx[torch.randperm(len(idx), generator=g)[:n]])
    return torch.cat(rows)


@torch.inference_mode()
def extract(model, images: torch.Tensor, batch: int) -> dict[str, torch.Tensor]:
    """{'final': (N, 1280), 'b4'/'b5'/'b6': (N, C)}: one pass, pooled taps by forward hooks."""
    bb, pp = model.backbone, model.preprocess
    taps: dict[int, torch.Tensor] = {}
    hooks = [
        bb.blocks[i].register_forward_hook(lambda m, a, out, i=i: taps.__setitem__(i, out))
        for i in TAPS
    ]
    out: dict[str, list[torch.Tensor]] = {}
    try:
        for x in images.split(batch):
            x = to_float_normalized(x, pp.mean, pp.std, 224, pp.interpolation)
            x = x.contiguous(memory_format=torch.channels_last)
            out.setdefault("final", []).append(bb(x).float())
            for i in TAPS:
                out.setdefault(f"b{i}", []).append(taps[i].float().mean((2, 3)))
    finally:
        for h in hooks:
            h.remove()
    return {k: torch.cat(v) for k, v in out.items()}


def feature_set(f: dict[str, torch.Tensor], layers: tuple[int, ...]) -> torch.Tensor:
    return torch.cat([f["final"], *[f[f"b{i}"] for i in layers]], 1)


def train_head(xs, ys, hidden: int, epochs: int, seed: int) -> dict:
    """The best (lr, wd) by val accuracy; test accuracy at that setting's best val epoch."""
    (x_tr, x_va, x_te), (y_tr, y_va, y_te) = xs, ys
    mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-6
    x_tr, x_va, x_te = ((x - mu) / sd for x in (x_tr, x_va, x_te))
    best = {"val": -1.0}
    for lr, wd in GRID:
        torch.manual_seed(seed)
        d = x_tr.shape[1]
        head = (
            nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, 100))
            if hidden
            else nn.Linear(d, 100)
        )
        opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=wd)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
        g = torch.Generator().manual_seed(seed)
        for epoch in range(epochs):
            head.train()
            for idx in torch.randperm(len(x_tr), generator=g).split(200):
                opt.zero_grad()
                F.cross_entropy(head(x_tr[idx]), y_tr[idx], label_smoothing=0.1).backward()
                opt.step()
            sched.step()
            head.eval()
            with torch.no_grad():
                val = (head(x_va).argmax(1) == y_va).float().mean().item()
                if val > best["val"]:
                    test = (head(x_te).argmax(1) == y_te).float().mean().item()
                    best = {"val": val, "test": test, "lr": lr, "wd": wd, "epoch": epoch + 1}
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="/work/shared/datasets")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--per-class", type=int, default=64)
    p.add_argument("--val", type=int, default=1000, help="validation images (of the 5,000)")
    p.add_argument("--test", type=int, default=10000, help="test images (of the 10,000)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--hidden", default="0,256", help="head widths (0 = linear)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--smoke", action="store_true", help="4 per class, 200 val, 200 test")
    args = p.parse_args()
    if args.smoke:
        args.per_class, args.val, args.test, args.epochs = 4, 200, 200, 2
    args.out.mkdir(parents=True, exist_ok=True)
    ds = load_cifar100(os.path.join(args.data_dir), download=False, split_seed=0, val_size=5000)
    tr = per_class_rows(ds.train.labels, args.per_class, args.seed)
    splits = {
        "train": (ds.train.images[tr], ds.train.labels[tr]),
        "val": (ds.val.images[: args.val], ds.val.labels[: args.val]),
        "test": (ds.test.images[: args.test], ds.test.labels[: args.test]),
    }
    model = build_model(ModelConfig(name="timm:tf_efficientnet_lite0", weights="imagenet"), 100)
    model = model.eval().to(memory_format=torch.channels_last)
    t0 = time.perf_counter()
    feats = {k: extract(model, x, args.batch) for k, (x, _) in splits.items()}
    extract_s = time.perf_counter() - t0
    n_img = sum(len(x) for x, _ in splits.values())
    print(f"extracted {n_img} images in {extract_s:.0f}s ({n_img / extract_s:.1f} img/s)")
    ys = tuple(y for _, y in splits.values())
    rows = []
    for hidden in [int(h) for h in args.hidden.split(",")]:
        for name, layers in SETS.items():
            xs = tuple(feature_set(feats[k], layers) for k in splits)
            t = time.perf_counter()
            best = train_head(xs, ys, hidden, args.epochs, args.seed)
            rows.append(
                {
                    "head": f"mlp{hidden}" if hidden else "linear",
                    "features": name,
                    "dim": xs[0].shape[1],
                    "test_acc": round(100 * best["test"], 2),
                    "val_acc": round(100 * best["val"], 2),
                    "best": f"lr {best['lr']:g} wd {best['wd']:g} epoch {best['epoch']}",
                    "head_s": round(time.perf_counter() - t, 1),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    out = {
        "per_class": args.per_class,
        "n_val": args.val,
        "n_test": args.test,
        "extract_s": round(extract_s, 1),
        "images": n_img,
        "threads": torch.get_num_threads(),
        "load_avg": os.getloadavg(),
        "rows": rows,
    }
    (args.out / "head2toe.json").write_text(json.dumps(out, indent=1))
    lines = ["| head | features | dim | test % | val % | best setting | head s |"]
    lines.append("|---|---|---|---|---|---|---|")
    lines += [
        f"| {r['head']} | {r['features']} | {r['dim']} | {r['test_acc']} | {r['val_acc']} | "
        f"{r['best']} | {r['head_s']} |"
        for r in rows
    ]
    (args.out / "head2toe.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
