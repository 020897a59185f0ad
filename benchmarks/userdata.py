"""Users' own data (issue 22): an imbalanced folder and a k-fold estimate, from real CIFAR-100.

``imbalanced``: OUT/data/{train,val,test}/<class>/*.png from the first --classes CIFAR-100
classes; the first half get --common training images each, the rest (the rare classes) --rare
(4 by default); val gets --val images per class, test the class's 100 official test images
(balanced). Then ``transferlab train`` with --balance none, weights (effective-number and
inverse-frequency weights: the measurement behind the default) and sampler (all with
--select-by val_balanced_acc), and a table of test top-1 and balanced accuracy.

``folds``: a small folder (--per-class images per class in train+val) trained once and with
--folds K: the K-fold mean and 95% interval of test accuracy against the single run's number,
and the wall time of each.

``planted``: the imbalanced folder's images (--common/--rare per class, as ``imbalanced``) with
--plant leaks planted into val and test under new names, a third of each kind: exact copies of
training images, copies resized to 48 px and saved as JPEG (quality 75), and copies with
brightness +8% saved as PNG; then ``transferlab check-data --json`` (dHash): which planted pairs
it finds, and which pairs it reports that were not planted (each checked: the same pixels, or a
dHash distance within the threshold, means a real duplicate already in CIFAR-100).

Usage:
    python benchmarks/userdata.py imbalanced --data-dir ../shared/datasets --out /tmp/imb
    python benchmarks/userdata.py folds --data-dir ../shared/datasets --out /tmp/k5 --folds 5
    python benchmarks/userdata.py planted --data-dir ../shared/datasets --out /tmp/plant
    python benchmarks/userdata.py imbalanced --out /tmp/imb-smoke --smoke
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import random
import time
from pathlib import Path

from PIL import Image, ImageEnhance

from transferlab.cli import main as cli
from transferlab.data.cifar import load_cifar100

LITE0 = ["--model", "timm:tf_efficientnet_lite0", "--mode", "frozen"]


def write_folder(args, counts: dict[int, int], n_val: int, n_test: int) -> Path:
    """OUT/data/{train,val,test}/<class>/<n>.png; ``counts``: training images per class id."""
    ds = load_cifar100(args.data_dir, False, 0, 5000)
    root = Path(args.out) / "data"
    pool = [(ds.train, "train", counts), (ds.val, "val", dict.fromkeys(counts, n_val))]
    pool.append((ds.test, "test", dict.fromkeys(counts, n_test)))
    for split, name, want in pool:
        seen = dict.fromkeys(want, 0)
        for img, y in zip(split.images, split.labels.tolist(), strict=True):
            if y not in want or seen[y] >= want[y]:
                continue
            folder = root / name / ds.classes[y]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{seen[y]}.png")
            seen[y] += 1
    return root


def train(args, data: Path, name: str, *flags: str) -> dict:
    run = Path(args.out) / name
    argv = ["train", "--data", f"folder:{data}", "--run-dir", str(run), "--overwrite"]
    argv += ["--no-progress", "--num-workers", "0", *args.model_flags, *flags]
    if args.smoke:
        argv += ["--epochs", "1", "--no-report"]
    t0 = time.perf_counter()
    if cli(argv) != 0:
        raise SystemExit(f"{name} failed")
    s = json.loads((run / "summary.json").read_text())
    s["wall_s"] = round(time.perf_counter() - t0, 1)
    return s


def imbalanced(args) -> str:
    half = args.classes // 2
    counts = {c: (args.common if c < half else args.rare) for c in range(args.classes)}
    data = write_folder(args, counts, args.val, 100 if not args.smoke else 10)
    lines = [
        f"{args.classes} CIFAR-100 classes: {half} with {args.common} training images, "
        f"{args.classes - half} with {args.rare}; balanced test ({'10' if args.smoke else '100'} "
        f"per class); model {' '.join(args.model_flags)}.",
        "",
        "| --balance | test top-1 | test balanced | rare-class recall (mean) | wall (s) |",
        "|---|---|---|---|---|",
    ]
    arms = {
        "none": ["--balance", "none"],
        "weights (effective, beta 0.999)": ["--balance", "weights"],
        "weights (inverse frequency)": ["--balance", "weights", "--class-weights", "inverse"],
        "sampler": ["--balance", "sampler"],
    }
    for balance, flags in arms.items():
        name = "balance-" + balance.split()[0] + ("-inverse" if "inverse" in balance else "")
        s = train(args, data, name, *flags, "--select-by", "val_balanced_acc")
        rare = [r["recall"] for r in s["test"]["per_class"][half:]]
        lines.append(
            f"| {balance} | {100 * s['test']['acc']:.2f}% | "
            f"{100 * s['test']['balanced_acc']:.2f}% | {100 * sum(rare) / len(rare):.2f}% "
            f"| {s['wall_s']} |"
        )
    return "\n".join(lines) + "\n"


def folds(args) -> str:
    n_train = args.per_class - args.val
    counts = dict.fromkeys(range(args.classes), n_train)
    data = write_folder(args, counts, args.val, 100 if not args.smoke else 10)
    one = train(args, data, "single")
    k = train(args, data, f"folds{args.folds}", "--folds", str(args.folds))
    f = k["folds"]
    acc, bal = f["test_acc"], f["test_balanced_acc"]
    return (
        f"{args.classes} classes x {args.per_class} images (train+val), model "
        f"{' '.join(args.model_flags)}\n\n"
        f"| | test top-1 | test balanced | wall (s) |\n|---|---|---|---|\n"
        f"| single split | {100 * one['test']['acc']:.2f}% | "
        f"{100 * one['test']['balanced_acc']:.2f}% | {one['wall_s']} |\n"
        f"| {f['k']}-fold mean ± 95% | {100 * acc['mean']:.2f} ± {100 * acc['half_width_95']:.2f}%"
        f" | {100 * bal['mean']:.2f} ± {100 * bal['half_width_95']:.2f}% | {k['wall_s']} |\n"
    )


def planted(args) -> str:
    """Plant exact and near copies of training images into val/test; score check-data on them."""
    half = args.classes // 2
    counts = {c: (args.common if c < half else args.rare) for c in range(args.classes)}
    data = write_folder(args, counts, args.val, 100 if not args.smoke else 10)
    train_files = sorted((data / "train").rglob("*.png"))
    rng = random.Random(0)
    sources = rng.sample(train_files, args.plant)
    planted_pairs = {}
    for i, src in enumerate(sources):
        kind = ("exact", "jpeg48", "brighter")[i % 3]
        split = ("val", "test")[i % 2]
        dst_dir = data / split / src.parent.name
        img = Image.open(src).convert("RGB")
        if kind == "exact":
            dst = dst_dir / f"planted-{i}.png"
            dst.write_bytes(src.read_bytes())
        elif kind == "jpeg48":
            dst = dst_dir / f"planted-{i}.jpg"
            img.resize((48, 48), Image.BICUBIC).save(dst, quality=75)
        else:
            dst = dst_dir / f"planted-{i}.png"
            ImageEnhance.Brightness(img).enhance(1.08).save(dst)
        planted_pairs[frozenset((str(src), str(dst)))] = kind
    buf = io.StringIO()
    t0 = time.perf_counter()
    argv = ["check-data", str(data), "--json", "--out", str(Path(args.out) / "report")]
    with contextlib.redirect_stdout(buf):
        code = cli(argv)
    wall = time.perf_counter() - t0
    if code not in (0, 1):
        raise SystemExit(f"check-data exited {code}")
    report = json.loads(buf.getvalue())

    def full(path: str) -> str:  # the report's paths may be relative to its root
        q = Path(path)
        return str((q if q.is_absolute() else Path(report["root"]) / q).resolve())

    found = {}
    for pair in report["leaks"]:
        pair["a"], pair["b"] = full(pair["a"]), full(pair["b"])
        found[frozenset((pair["a"], pair["b"]))] = pair
    planted_resolved = {
        frozenset(str(Path(f).resolve()) for f in k): v for k, v in planted_pairs.items()
    }
    hit = {k: v for k, v in planted_resolved.items() if k in found}
    extra = [found[k] for k in found if k not in planted_resolved]
    by_kind = {
        kind: (
            sum(1 for v in hit.values() if v == kind),
            sum(1 for v in planted_resolved.values() if v == kind),
        )
        for kind in ("exact", "jpeg48", "brighter")
    }
    lines = [
        f"{len(train_files)} training images ({args.classes} CIFAR-100 classes), "
        f"{args.plant} planted leaks in val/test; check-data (dHash) in {wall:.1f}s",
        "",
        "| planted kind | found / planted |",
        "|---|---|",
        *[f"| {k} | {h} / {n} |" for k, (h, n) in by_kind.items()],
        f"| **all** | **{len(hit)} / {len(planted_resolved)}** |",
        "",
        f"Reported but not planted: {len(extra)}",
    ]
    for pair in extra:
        a, b = Image.open(pair["a"]).convert("RGB"), Image.open(pair["b"]).convert("RGB")
        same = a.size == b.size and a.tobytes() == b.tobytes()
        lines.append(
            f"- {pair['kind']} {pair['a']} ~ {pair['b']} (distance {pair.get('distance', 0)}; "
            f"{'identical pixels' if same else 'pixels differ: look at them'})"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("imbalanced", "folds", "planted"))
    ap.add_argument("--data-dir", default="../shared/datasets")
    ap.add_argument("--out", required=True)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--common", type=int, default=200, help="imbalanced: images of common classes")
    ap.add_argument("--rare", type=int, default=4, help="imbalanced: images of rare classes")
    ap.add_argument("--val", type=int, default=10, help="val images per class")
    ap.add_argument("--per-class", type=int, default=40, help="folds: train+val images per class")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--plant", type=int, default=30, help="planted: leaks to plant")
    ap.add_argument("--model", default="lite0", choices=("lite0", "cnn"))
    ap.add_argument("--smoke", action="store_true", help="cnn, 1 epoch, 10 test images per class")
    args = ap.parse_args()
    if args.smoke:
        args.model = "cnn"
    args.model_flags = LITE0 if args.model == "lite0" else ["--model", "cnn"]
    text = {"imbalanced": imbalanced, "folds": folds, "planted": planted}[args.what](args)
    (Path(args.out) / f"{args.what}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
