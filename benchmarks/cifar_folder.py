"""Write CIFAR-100 out as a PNG folder dataset, to try ``--data folder:PATH`` on real images.

Layout: OUT/{train,val,test}/<class>/<n>.png from the seeded 45,000/5,000 train/val split and
the official test set (read with the safe loader), plus OUT_holdout/<class>_<n>.png: the last
``--holdout`` test images per class, kept out of OUT for ``transferlab predict``.
``--bad`` also drops a truncated PNG and a text file into train/ (to see ``--on-bad-image``).

Usage:
    python benchmarks/cifar_folder.py --data-dir ../shared/datasets --out /tmp/folder10 --classes 10
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from transferlab.data.cifar import load_cifar100


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default="../shared/datasets")
    ap.add_argument("--out", required=True)
    ap.add_argument("--classes", type=int, default=10, help="the first N CIFAR-100 classes")
    ap.add_argument("--holdout", type=int, default=5, help="test images per class kept for predict")
    ap.add_argument(
        "--bad", action="store_true", help="add a corrupt PNG and a text file to train/"
    )
    args = ap.parse_args()
    ds = load_cifar100(args.data_dir, False, 0, 5000)
    out, hold = Path(args.out), Path(args.out + "_holdout")
    hold.mkdir(parents=True, exist_ok=True)
    for name, split in (("train", ds.train), ("val", ds.val), ("test", ds.test)):
        seen: dict[int, int] = {}
        for img, y in zip(split.images, split.labels.tolist(), strict=True):
            if y >= args.classes:
                continue
            cls = ds.classes[y]
            k = seen[y] = seen.get(y, 0) + 1
            if name == "test" and k <= args.holdout:
                dest = hold / f"{cls}_{k}.png"
            else:
                dest = out / name / cls / f"{k:04d}.png"
                dest.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(dest)
    if args.bad:
        first = out / "train" / ds.classes[0]
        (first / "truncated.png").write_bytes((first / "0001.png").read_bytes()[:60])
        (first / "notes.txt").write_text("not an image")
    print(f"wrote {out} and {hold}")


if __name__ == "__main__":
    main()
