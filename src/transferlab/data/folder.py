"""Your own images as a dataset: ``--data folder:PATH``.

Two layouts are accepted:

* ``PATH/train/<class>/*.png`` (plus optional ``PATH/val/<class>/`` and ``PATH/test/<class>/``):
  the given splits are used as they are; a missing val or test split is carved out of train
  with a seeded, stratified split (``--val-frac``, ``--test-frac``, ``--split-seed``).
* ``PATH/<class>/*.png``: one tree, split three ways the same seeded, stratified way.

Every file is decoded once at load time (in parallel, over ``--num-workers`` processes), so an
unreadable or non-image file fails here, not in epoch 7. ``--on-bad-image skip`` (the default)
drops such files with a warning that lists them and records their count in summary.json;
``--on-bad-image error`` stops with a UserError that lists them. Hidden files (``.DS_Store``)
are ignored. The imbalance ratio is recorded (the run suggests --balance above 10x).

Image size: loading needs no size. The run sets the plan's eval transform (resize, centre crop
by the weights' ``crop_pct``) with :meth:`FolderDataset.set_preprocessing`
once the model is known (``--image-size``, else the model's own input size), and the loader's
workers decode each image straight to that size: shorter side resized to floor(S / crop_pct)
(PIL, with the weights' interpolation), then a centre crop of S x S, returned as uint8
(3, S, S), exactly as timm's ``create_transform`` / torchvision's weight transforms do.
Normalisation happens later, on the device. ``transferlab predict`` uses the same
:func:`load_image`. Every decode goes through :func:`decode_rgb`, which applies the EXIF
orientation (a phone's portrait photo is stored sideways with a tag saying so).

Usage:
    ds = load_folder_dataset(DataConfig(dataset="folder:/data/flowers"))
    ds.set_preprocessing(plan.preprocessing)
    loader = folder_loader(ds.train, 64, True, torch.device("cpu"), seed=0, env=DistEnv())
    for x_uint8, y in loader:  # (64, 3, 224, 224) uint8, (64,) int64
        ...
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps
from torch import Tensor
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from transferlab.config import DEFAULT_MAX_IMAGE_PIXELS, DataConfig
from transferlab.data.cifar import ImageDataset
from transferlab.data.preprocess import eval_transform
from transferlab.distributed import DistEnv, augment_seed, shard_order
from transferlab.errors import UserError
from transferlab.io import write_json
from transferlab.plan import square_preprocessing

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".gif",
    ".webp",
    ".tif",
    ".tiff",
    ".ppm",
    ".pgm",
)
SPLITS = ("train", "val", "test")


@dataclass
class FolderSplit:
    """One split of a folder dataset: file paths, int64 labels, and the decode size."""

    paths: list[str]
    labels: Tensor  # int64 (N,)
    preprocessing: object = None  # plan.Preprocessing: the decode transform, set by the plan
    num_workers: int = 2  # DataLoader decode processes (--num-workers)
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS  # --max-image-pixels

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, idx: Tensor) -> FolderSplit:
        """The samples at ``idx`` (for --train-subset)."""
        keep = idx.tolist()
        return FolderSplit(
            [self.paths[i] for i in keep],
            self.labels[idx].clone(),
            self.preprocessing,
            self.num_workers,
            self.max_pixels,
        )


@dataclass
class FolderDataset(ImageDataset):
    """An :class:`ImageDataset` of :class:`FolderSplit` s, plus what loading found."""

    info: dict = field(default_factory=dict)  # layout, class counts, bad images (-> summary.json)

    def set_preprocessing(self, pre) -> None:
        """Decode every split with the plan's eval transform (``plan.Preprocessing``)."""
        for split in (self.train, self.val, self.test):
            split.preprocessing = pre

    def write_manifest(self, path: Path) -> None:
        """Which file went into which split, with its label (reports read the test paths)."""
        out = {
            "root": self.source,
            "classes": self.classes,
            **{
                name: {"paths": s.paths, "labels": s.labels.tolist()}
                for name, s in (("train", self.train), ("val", self.val), ("test", self.test))
            },
        }
        write_json(path, out, indent=None)


# ---------------------------------------------------------------------------------------------
# Decoding


def check_regular_file(path: str | Path) -> None:
    """Raise ValueError unless ``path`` is a regular file (after symlinks); never opens it.

    A FIFO would block the read forever and a device file could be endless, so both are refused
    before ``open``; ``predict`` reports the error per file like any unreadable image.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        kind = "a broken symbolic link" if os.path.islink(path) else "missing"
        raise ValueError(f"{kind}: no file at {path}") from None
    except OSError as e:  # a symbolic link loop (ELOOP), a name too long, no permission
        raise ValueError(f"{path} cannot be opened: {e.strerror or e}") from None
    if not stat.S_ISREG(mode):
        kind = (
            "a FIFO"
            if stat.S_ISFIFO(mode)
            else "a device file"
            if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "a socket"
            if stat.S_ISSOCK(mode)
            else "a folder"
            if stat.S_ISDIR(mode)
            else "not a file"
        )
        raise ValueError(f"{path} is {kind}, not a regular file; refusing to read it")


@contextlib.contextmanager
def _pil_limit(max_pixels: int):
    """Open images with PIL's own bomb check off: we apply ``max_pixels`` ourselves, with one line
    of our own instead of PIL's DecompressionBombWarning/Error."""
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def _open(path: str | Path, max_pixels: int):
    """PIL image of ``path`` (header read only), refused when over ``max_pixels``."""
    check_regular_file(path)
    im = Image.open(path)
    w, h = im.size
    if w * h > max_pixels:
        im.close()
        raise ValueError(f"{w}x{h} = {w * h:,} pixels is above --max-image-pixels {max_pixels:,}")
    return im


def to_rgb8(im):
    """A PIL image as 8-bit RGB, scaling high-bit-depth modes to 0..255 (not clipping them).

    16-bit integer modes (``I;16*``, and ``I`` as PIL opens 16-bit PNGs) are divided by 257
    (65535 -> 255); float images (``F``) must hold values in [0, 1] and are multiplied by 255.
    Values outside those ranges cannot be mapped faithfully: ValueError (the file is skipped).
    """
    mode = im.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(im)
        if mode == "F":
            finite = np.isfinite(arr).all()
            if not finite or arr.min() < 0 or arr.max() > 1:
                raise ValueError(
                    "float image with values outside [0, 1]: no faithful 8-bit mapping"
                )
            arr8 = np.round(arr * 255.0)
        else:
            if arr.min() < 0 or arr.max() > 65535:
                raise ValueError(
                    f"{mode} image with values outside 0..65535: no faithful 8-bit mapping"
                )
            arr8 = np.round(arr.astype(np.float64) / 257.0)
        return Image.fromarray(arr8.astype(np.uint8), "L").convert("RGB")
    if mode not in _CONVERTIBLE:
        raise ValueError(f"image mode {mode} cannot be converted to RGB faithfully")
    return im.convert("RGB")


# PIL modes whose convert("RGB") is exact or the usual meaning (alpha dropped, palette applied)
_CONVERTIBLE = ("1", "L", "P", "RGB", "RGBA", "RGBX", "RGBa", "LA", "La", "PA", "CMYK", "YCbCr")


def load_image(path: str | Path, pre, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Tensor:
    """Decode an image file to uint8 (3, H, W) as the run evaluated its images.

    ``pre`` is a ``plan.Preprocessing``, or an int S for a plain "shorter side to S, centre crop"
    (report thumbnails). The weights' eval transform (shorter side to ``pre.resize``, centre
    crop ``pre.crop``) gives (3, S, S). A run on in-memory images (``pre.on_device_resize``,
    CIFAR) saw the whole image resized to S x S on the device, with no crop: the whole image is
    returned (an image larger than S is first shrunk to S x S with PIL, antialiased), and
    ``to_float_normalized(x, ..., size=S)`` does the rest exactly as the run did.
    Only regular files are opened (:func:`check_regular_file`); images over ``max_pixels`` and
    modes :func:`to_rgb8` cannot convert raise ValueError.

    Raises OSError/ValueError (PIL's errors) for unreadable files; callers decide the policy.
    """
    if isinstance(pre, int):
        pre = square_preprocessing(pre)
    img = decode_rgb(path, max_pixels, draft=pre.resize)
    if not pre.on_device_resize:
        return eval_transform(img, pre)
    if max(img.size) > pre.crop:  # a photo, not a 32 px image: antialiased, not aliased
        mode = InterpolationMode(pre.interpolation)
        img = TF.resize(img, [pre.crop, pre.crop], interpolation=mode, antialias=True)
    return TF.pil_to_tensor(img).contiguous()


def decode_rgb(path: str | Path, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, draft: int = 0):
    """The one decoder of an image file: an 8-bit RGB PIL image, upright as people took it.

    The EXIF orientation is applied (``ImageOps.exif_transpose``: a phone's portrait JPEG is
    stored sideways with an orientation tag); train, predict, explain, reports and check-data
    all decode through here. ``draft`` > 0 lets a JPEG decode at a reduced scale that still
    covers ``draft`` x ``draft`` pixels (rotation-invariant: the box is square). Only regular
    files are opened; over ``max_pixels``, a mode :func:`to_rgb8` cannot convert, or a damaged
    EXIF block: ValueError; unreadable: PIL's OSError (and others: callers decide the policy).
    """
    with _pil_limit(max_pixels), _open(path, max_pixels) as im:
        if draft:
            im.draft("RGB", (draft, draft))  # JPEG: decode at a reduced scale when enough
        try:
            orientation = im.getexif().get(ExifTags.Base.Orientation, 1)
        except Exception as e:  # a damaged EXIF block: PIL raises many types here
            raise ValueError(f"damaged EXIF data ({type(e).__name__}: {e})") from None
        return to_rgb8(ImageOps.exif_transpose(im) if orientation != 1 else im)


def check_image(path: str, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> str:
    """'' if ``path`` decodes (and converts to 8-bit RGB) as an image, else why it does not."""
    try:
        decode_rgb(path, max_pixels, draft=64)  # a JPEG still decodes every block
        return ""
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, struct.error...
        return f"{type(e).__name__}: {e}"


class _CheckFiles(torch.utils.data.Dataset):
    def __init__(self, paths: list[str], max_pixels: int):
        self.paths = paths
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> str:
        return check_image(self.paths[i], self.max_pixels)


def find_bad_images(
    paths: list[str], num_workers: int, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
) -> dict[str, str]:
    """{path: reason} for every file that does not decode; checked in ``num_workers`` processes."""
    if not paths:
        return {}
    dl = torch.utils.data.DataLoader(
        _CheckFiles(paths, max_pixels), batch_size=64, num_workers=num_workers, collate_fn=list
    )
    reasons = [r for batch in dl for r in batch]
    return {p: r for p, r in zip(paths, reasons, strict=True) if r}


# ---------------------------------------------------------------------------------------------
# Listing and splitting


def _is_image_name(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTENSIONS


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _list_class_files(split_dir: Path) -> dict[str, list[Path]]:
    """{class name: sorted entries} for the class sub-folders of ``split_dir`` (hidden: skipped).

    Every non-folder entry is listed, broken symlinks and special files (FIFOs, devices)
    included, so the screen counts and lists them as bad files instead of dropping them unseen.
    """
    _log_hidden_dirs(split_dir)
    return {
        c.name: sorted(f for f in c.rglob("*") if not f.name.startswith(".") and not f.is_dir())
        for c in _visible_dirs(split_dir)
    }


def _log_hidden_dirs(split_dir: Path) -> None:
    """Say which folders are not classes because their name starts with '.' (``...``, ``.git``):
    a warning when one holds image files (a class the user meant), else an info line."""
    hidden = sorted(p for p in split_dir.iterdir() if p.is_dir() and p.name.startswith("."))
    for d in hidden:
        near = (*d.glob("*"), *d.glob("*/*"))  # two levels: a .git tree is not walked whole
        has_images = any(_is_image_name(f) for f in near)
        (log.warning if has_images else log.info)(
            "%s: folder %r is not a class (its name starts with '.')%s",
            split_dir,
            d.name,
            "; it holds images: rename it to use them" if has_images else "",
        )


def stratified_split(labels: list[int], fracs: tuple[float, ...], seed: int) -> list[list[int]]:
    """Split indices into ``len(fracs) + 1`` parts per class: the fractions, then the rest.

    Per class, a permutation seeded by ``seed`` takes round(n * frac) indices for each part (at
    least one once a class has 3 or more samples, so small classes still reach val and test).
    Deterministic for the same labels, fractions and seed; each part is returned sorted.
    """
    g = torch.Generator().manual_seed(seed)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    parts: list[list[int]] = [[] for _ in range(len(fracs) + 1)]
    for y in sorted(by_class):
        idx = by_class[y]
        perm = [idx[j] for j in torch.randperm(len(idx), generator=g).tolist()]
        start = 0
        for k, frac in enumerate(fracs):
            take = round(len(idx) * frac)
            if len(idx) >= 3 and frac > 0:
                take = max(take, 1)
            parts[k] += perm[start : start + take]
            start += take
        parts[-1] += perm[start:]
    return [sorted(p) for p in parts]


def detect_layout(root: Path) -> tuple[str, str]:
    """("splits" or "tree", the reason). Splits only when the tree really is one.

    Class names can be split names (CIFAR-100 has a class ``train``), so a ``train/`` folder
    alone does not make a split layout: every top-level folder must be train, val or test, and
    ``train/`` must hold class folders and no image files of its own.
    """
    if not root.is_dir():
        raise UserError(
            f"--data folder:{root}: no such folder; expected PATH/<class>/*.jpg or "
            "PATH/train/<class>/"
        )
    top = [p.name for p in _visible_dirs(root)]
    if "train" not in top:
        return "tree", "no train/ folder: each sub-folder is a class"
    others = [n for n in top if n not in SPLITS]
    if others:
        return "tree", (
            f"train/ sits beside other folders ({', '.join(others[:3])}"
            f"{', ...' if len(others) > 3 else ''}), so it is a class"
        )
    train = root / "train"
    direct = [f.name for f in train.iterdir() if not f.is_dir() and _is_image_name(f)]
    if direct or not _visible_dirs(train):
        return "tree", "train/ holds images itself (no class folders), so it is a class"
    return (
        "splits",
        f"only {'/'.join(n for n in SPLITS if n in top)} folders, with class folders inside",
    )


def _collect(root: Path, layout: str) -> tuple[list[str], dict[str, dict[str, list[Path]]]]:
    """Class names and {split or 'all': {class: files}}."""
    if layout == "tree":
        found = {"all": _list_class_files(root)}
        classes = list(found["all"])
    else:
        found = {s: _list_class_files(root / s) for s in SPLITS if (root / s).is_dir()}
        classes = list(found["train"])
        for s, per_class in found.items():
            extra = sorted(set(per_class) - set(classes))
            if extra:
                raise UserError(
                    f"{root / s} has class folder(s) {extra} that {root / 'train'} lacks; "
                    "every class needs training images"
                )
    if len(classes) < 2:
        where = root if layout == "tree" else root / "train"
        raise UserError(
            f"{where} has {len(classes)} class folder(s); need at least 2 (one sub-folder per "
            "class)"
        )
    return classes, found


def _entry_problem(path: Path) -> str:
    """Why a listed entry cannot be an image before opening it: a broken link, a FIFO, a name."""
    try:
        check_regular_file(path)
    except ValueError as e:
        return str(e).replace(f"{path} is ", "").replace(f": no file at {path}", "")
    return "" if _is_image_name(path) else "not an image file extension"


def _screen(
    found: dict, on_bad: str, num_workers: int, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
) -> tuple[dict, dict[str, str]]:
    """Drop non-image and undecodable files (skip) or fail listing them (error)."""
    all_files = [
        str(f) for per_class in found.values() for files in per_class.values() for f in files
    ]
    bad = {f: why for f in all_files if (why := _entry_problem(Path(f)))}
    candidates = [f for f in all_files if f not in bad]
    log.info("checking %d image files (%d workers)", len(candidates), num_workers)
    bad.update(find_bad_images(candidates, num_workers, max_pixels))
    if bad:
        listing = "; ".join(f"{p} ({r})" for p, r in sorted(bad.items())[:20])
        more = f"; ... and {len(bad) - 20} more" if len(bad) > 20 else ""
        if on_bad == "error":
            raise UserError(
                f"{len(bad)} unreadable or non-image file(s): {listing}{more}. "
                "Remove or fix them, or pass --on-bad-image skip to leave them out"
            )
        log.warning("skipping %d unreadable or non-image file(s): %s%s", len(bad), listing, more)
    kept = {
        s: {c: [f for f in files if str(f) not in bad] for c, files in per_class.items()}
        for s, per_class in found.items()
    }
    return kept, bad


def _md5_of_files(paths: list[str]) -> str:
    """md5 over the sorted (path, size) list: changes when a file is added, removed or resized."""
    h = hashlib.md5()
    for p in sorted(paths):
        h.update(f"{p}\t{Path(p).stat().st_size}\n".encode())
    return h.hexdigest()


def _build_splits(
    root: Path, classes: list[str], kept: dict, d: DataConfig
) -> dict[str, FolderSplit]:
    index = {c: i for i, c in enumerate(classes)}

    def flat(per_class: dict[str, list[Path]]) -> tuple[list[str], list[int]]:
        pairs = [(str(f), index[c]) for c in classes for f in per_class.get(c, [])]
        return [p for p, _ in pairs], [y for _, y in pairs]

    given = {s: flat(kept[s]) for s in kept if s != "all"}
    pool_paths, pool_labels = flat(kept["all"]) if "all" in kept else given["train"]
    want = [s for s in ("val", "test") if s not in given]  # splits to carve out of the pool
    fracs = tuple(d.val_frac if s == "val" else d.test_frac for s in want)
    parts = stratified_split(pool_labels, fracs, d.split_seed)
    carved = dict(zip([*want, "train"], parts, strict=True))
    splits = {}
    for s in SPLITS:
        if s in given and s != "train":
            paths, labels = given[s]
        else:
            paths = [pool_paths[i] for i in carved[s]]
            labels = [pool_labels[i] for i in carved[s]]
        if not paths:
            raise UserError(
                f"folder data {root}: the {s} split is empty; add images"
                + (" or lower --val-frac/--test-frac" if s == "train" else f" or raise --{s}-frac")
            )
        splits[s] = FolderSplit(
            paths,
            torch.tensor(labels, dtype=torch.int64),
            num_workers=d.num_workers,
            max_pixels=d.max_image_pixels,
        )
    return splits


def _class_counts(split: FolderSplit, classes: list[str]) -> dict[str, int]:
    counts = torch.bincount(split.labels, minlength=len(classes)).tolist()
    return dict(zip(classes, counts, strict=True))


def folder_root(dataset: str) -> Path:
    """PATH of ``folder:PATH``; an empty PATH or an unknown ``~user`` is a UserError."""
    raw = dataset[len("folder:") :]
    if not raw.strip():
        raise UserError("--data folder: needs a path, e.g. --data folder:/data/flowers")
    try:
        return Path(raw).expanduser()
    except RuntimeError:
        raise UserError(f"--data folder:{raw}: no such user for '~'; write the full path") from None


def load_folder_dataset(d: DataConfig) -> FolderDataset:
    """Load ``d.dataset == 'folder:PATH'``: list, screen, split; only paths are kept in memory.

    Runs set the decode transform later with ``set_preprocessing``.
    """
    root = folder_root(d.dataset)
    layout, why = detect_layout(root)
    log.info("folder data %s: %s layout (%s)", root, layout, why)
    classes, found = _collect(root, layout)
    kept, bad = _screen(found, d.on_bad_image, d.num_workers, d.max_image_pixels)
    splits = _build_splits(root, classes, kept, d)
    counts = {s: _class_counts(splits[s], classes) for s in SPLITS}
    total = {c: sum(counts[s][c] for s in SPLITS) for c in classes}
    empty = [c for c, n in counts["train"].items() if n == 0]
    if empty:
        raise UserError(
            f"class(es) {empty} have no usable training images under {root}; add images or remove "
            "the folder(s)"
        )
    ratio = max(total.values()) / max(min(total.values()), 1)  # the run warns (data.balance)
    md5 = {"files": _md5_of_files([p for s in splits.values() for p in s.paths])}
    md5.update({s: _md5_of_files(splits[s].paths) for s in SPLITS})
    info = {
        "layout": layout,
        "layout_reason": why,
        "class_counts": counts,
        "imbalance_ratio": round(ratio, 2),
        "bad_images": len(bad),
        "bad_image_paths": sorted(bad)[:20],
        "on_bad_image": d.on_bad_image,
    }
    log.info(
        "folder data %s (%s layout): %d classes, %d/%d/%d train/val/test images, %d bad file(s) %s",
        root,
        layout,
        len(classes),
        len(splits["train"]),
        len(splits["val"]),
        len(splits["test"]),
        len(bad),
        "skipped" if bad else "",
    )
    ds = FolderDataset(
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        classes=classes,
        md5=md5,
        split_seed=d.split_seed,
        source=str(root.resolve()),
        info=info,
    )
    return ds


# ---------------------------------------------------------------------------------------------
# Loading batches


@dataclass(frozen=True)
class _Undecodable:
    """What a worker returns for a file that no longer decodes: the main process raises."""

    path: str
    reason: str


class _Decode(torch.utils.data.Dataset):
    """Decodes one file to uint8 (3, S, S) in a DataLoader worker."""

    def __init__(self, split: FolderSplit):
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor] | _Undecodable:
        path = self.split.paths[i]
        try:
            x = load_image(path, self.split.preprocessing, self.split.max_pixels)
        except Exception as e:  # a file that changed since load time; raised in the main process,
            return _Undecodable(
                path, f"{type(e).__name__}: {e}"
            )  # not wrapped in a worker traceback
        return x, self.split.labels[i]


def _collate(items: list) -> tuple[Tensor, Tensor] | _Undecodable:
    bad = next((it for it in items if isinstance(it, _Undecodable)), None)
    return bad if bad is not None else torch.utils.data.default_collate(items)


def shard_indices(
    n: int,
    shuffle: bool,
    seed: int,
    epoch: int,
    rank: int,
    world_size: int,
    weights: Tensor | None = None,
) -> list[int]:
    """This rank's sample order: the one DDP shard order (``distributed.shard_order``)."""
    return shard_order(n, shuffle, seed, epoch, rank, world_size, weights=weights).tolist()


class _EpochSampler(torch.utils.data.Sampler):
    """Yields the owner's current shard (its epoch's order)."""

    def __init__(self, owner: FolderLoader):
        self.owner = owner

    def __iter__(self) -> Iterator[int]:
        return iter(self.owner.indices())

    def __len__(self) -> int:
        return self.owner.num_samples


class FolderLoader:
    """Batches ``(x_uint8 (B, 3, S, S), y int64 (B,))`` of a :class:`FolderSplit` on ``device``.

    Files are decoded in ``num_workers`` DataLoader processes; ``augment(x, generator)`` runs per
    batch on the device, its generator seeded from ``(seed + epoch, rank)`` at each pass.
    """

    def __init__(  # noqa: PLR0913 - TensorLoader's signature (the two loaders are interchangeable)
        self,
        split: FolderSplit,
        batch_size: int,
        shuffle: bool,
        device: torch.device,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        augment: Callable[[Tensor, torch.Generator], Tensor] | None = None,
        num_workers: int = 2,
        sample_weights: Tensor | None = None,
    ):
        if split.preprocessing is None:
            raise ValueError(
                "FolderSplit.preprocessing is unset: call "
                "FolderDataset.set_preprocessing(plan.preprocessing) first"
            )
        self.split, self.batch_size, self.shuffle = split, batch_size, shuffle
        self.device, self.seed, self.rank, self.world_size = (
            torch.device(device),
            seed,
            rank,
            world_size,
        )
        self.augment, self.num_workers = augment, num_workers
        self.sample_weights = sample_weights  # (N,): draw with replacement (--balance sampler)
        self.labels = split.labels
        self.epoch = 0
        self._generator = torch.Generator(device=self.device) if augment is not None else None

    def set_epoch(self, epoch: int) -> None:
        """Use the permutation and augmentation seeds of ``epoch``."""
        self.epoch = epoch

    def indices(self) -> list[int]:
        """This rank's sample indices for the current epoch."""
        return shard_indices(
            len(self.split),
            self.shuffle,
            self.seed,
            self.epoch,
            self.rank,
            self.world_size,
            self.sample_weights,
        )

    @property
    def num_samples(self) -> int:
        n, ws = len(self.split), self.world_size
        return math.ceil(n / ws) if self.shuffle else len(range(self.rank, n, ws))

    @property
    def drops_single_tail(self) -> bool:
        """Training passes drop a last batch of exactly one sample: BatchNorm in train mode
        cannot normalise one value per channel (it raises), and one sample adds little."""
        return self.shuffle and self.num_samples % self.batch_size == 1 and self.num_samples > 1

    def __len__(self) -> int:
        return (
            self.num_samples // self.batch_size
            if self.drops_single_tail
            else math.ceil(self.num_samples / self.batch_size)
        )

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        if self._generator is not None:
            self._generator.manual_seed(augment_seed(self.seed, self.epoch, self.rank))
        # A fresh DataLoader per pass: its workers exit when the pass ends. (Persistent workers
        # would idle between passes, one set per loader, and forked workers of a later loader
        # would inherit a live iterator of an earlier one.)
        loader = torch.utils.data.DataLoader(
            _Decode(self.split),
            batch_size=self.batch_size,
            sampler=_EpochSampler(self),
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=4 if self.num_workers > 0 else None,
            collate_fn=_collate,
            drop_last=self.drops_single_tail,  # the remainder is 1: only that sample is dropped
        )
        for batch in loader:
            if isinstance(batch, _Undecodable):
                raise UserError(
                    f"cannot decode {batch.path} ({batch.reason}); it passed the check at load "
                    "time, so it changed since: fix or remove it and rerun"
                )
            x, y = batch
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            if self.augment is not None:
                x = self.augment(x, self._generator)
            yield x, y

    def eval_view(self, batch_size: int | None = None) -> FolderLoader:
        """The same split in order, without augmentation, sharded r::world_size."""
        return FolderLoader(
            self.split,
            batch_size or self.batch_size,
            False,
            self.device,
            self.seed,
            self.rank,
            self.world_size,
            None,
            self.num_workers,
        )


def folder_loader(
    split: FolderSplit,
    batch_size: int,
    shuffle: bool,
    device: torch.device,
    seed: int,
    env: DistEnv,
    augment=None,
    sample_weights: Tensor | None = None,
) -> FolderLoader:
    """A :class:`FolderLoader` for this process's rank (what experiment.make_loader calls)."""
    return FolderLoader(
        split,
        batch_size,
        shuffle,
        device,
        seed,
        env.rank,
        env.world_size,
        augment,
        split.num_workers,
        sample_weights,
    )
