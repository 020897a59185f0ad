"""What does keying the feature cache on content cost? The digest of a folder's bytes vs extraction.

For a folder data set (e.g. CIFAR-100 written as 60,000 PNGs by ``benchmarks/cifar_folder.py``),
this times ``features.content.content_digest`` over every image file three ways: cold (no memo:
every file's bytes are read and hashed), warm (the per-file (size, mtime_ns, ctime_ns, inode)
memo answers: only stat calls), and after one repainted file (one file hashed again; the
digest must change). It then times the frozen backbone's extraction on ``--sample`` of the
images (decode + eval transform + forward, torch, the model's own precision choice skipped:
fp32 or --precision) and extrapolates to the whole folder, to report digest / extraction.
The OS page cache is warm for the cold digest if the files were just written: say so.

Usage:
    python benchmarks/cifar_folder.py --data-dir ../shared/datasets --out /tmp/c100 --classes 100
    python benchmarks/content_digest.py --folder /tmp/c100 [--sample 256] [--extract-img-s 60]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from transferlab.config import ModelConfig
from transferlab.data.folder import IMAGE_EXTENSIONS, load_image
from transferlab.data.preprocess import to_float_normalized
from transferlab.features import content
from transferlab.models.registry import build_model, weights_crop_pct
from transferlab.plan import make_preprocessing
from transferlab.precision import autocast


def image_files(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)


def time_digest(paths: list[str], memo: Path) -> tuple[float, str, int]:
    """(seconds, digest, files hashed)."""
    hashed = []
    real = content.file_sha256
    content.file_sha256 = lambda p: hashed.append(p) or real(p)
    try:
        t0 = time.perf_counter()
        digest = content.content_digest(paths, memo)
        return time.perf_counter() - t0, digest, len(hashed)
    finally:
        content.file_sha256 = real


def repaint(path: str) -> None:
    """Invert the image's colours at the same size (a repaint a stat-only key cannot see)."""
    with Image.open(path) as im:
        img = im.convert("RGB")
    Image.eval(img, lambda v: 255 - v).save(path)


@torch.inference_mode()
def extraction_img_s(paths: list[str], model_name: str, precision: str) -> float:
    """Images/s of decode + eval transform + backbone forward on the CPU (batches of 32)."""
    cfg = ModelConfig(name=model_name, mode="frozen")
    model = build_model(cfg, num_classes=100).eval()
    size = model.preprocess.input_size
    crop_pct = weights_crop_pct(cfg.name, cfg.weights, model.backbone)
    pre = make_preprocessing(model, crop_pct, size, on_device_resize=False)
    model = model.to(memory_format=torch.channels_last)
    batches = [paths[i : i + 32] for i in range(0, len(paths), 32)]
    t0 = time.perf_counter()
    for batch in batches:
        x = torch.stack([load_image(p, pre) for p in batch])
        x = to_float_normalized(x, pre.mean, pre.std, None, pre.interpolation, channels_last=True)
        with autocast(precision, torch.device("cpu")):
            model.backbone(x)
    return len(paths) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folder", required=True, help="a folder data set (PATH/<class>/*.png ...)")
    ap.add_argument("--sample", type=int, default=256, help="images timed through extraction")
    ap.add_argument("--model", default="timm:tf_efficientnet_lite0")
    ap.add_argument("--precision", default="fp32", help="fp32 or bf16 (extraction's autocast)")
    ap.add_argument(
        "--extract-img-s",
        type=float,
        default=0.0,
        help="use this extraction speed (img/s) instead of timing --sample images",
    )
    a = ap.parse_args()
    paths = image_files(Path(a.folder))
    print(f"{len(paths):,} image files, {sum(Path(p).stat().st_size for p in paths) / 1e6:.1f} MB")
    with tempfile.TemporaryDirectory() as tmp:
        memo = Path(tmp) / "file_digests.json"
        cold, d1, n1 = time_digest(paths, memo)
        warm, d2, n2 = time_digest(paths, memo)
        repaint(paths[len(paths) // 2])
        after, d3, n3 = time_digest(paths, memo)
    assert d1 == d2 and d3 != d1, "the digest must be stable, and change on a repaint"
    print(f"digest cold (no memo): {cold:.2f} s, {n1:,} files hashed")
    print(f"digest warm (memo):    {warm:.2f} s, {n2:,} files hashed")
    print(f"after one repaint:     {after:.2f} s, {n3:,} file hashed, digest changed: {d3 != d1}")
    img_s = a.extract_img_s or extraction_img_s(paths[: a.sample], a.model, a.precision)
    extract = len(paths) / img_s
    source = "given" if a.extract_img_s else f"timed on {a.sample} images, {a.precision}"
    print(f"extraction {a.model}: {img_s:.1f} img/s ({source}) -> {extract:.0f} s for the folder")
    print(f"digest / extraction: cold {cold / extract:.4f}, warm {warm / extract:.5f}")


if __name__ == "__main__":
    main()
