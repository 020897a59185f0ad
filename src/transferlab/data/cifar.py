"""CIFAR-100 in the official "python version" format, read safely into uint8 tensors.

The files are pickles, and a naive ``pickle.load`` runs any code a hostile file carries. We read
them with :class:`RestrictedUnpickler`, which resolves only the globals that numpy arrays need,
so a payload is refused before anything runs.

Usage:
    ds = load_cifar100("../shared/datasets", download=False, split_seed=0, val_size=5000)
    ds.train.images.shape  # torch.Size([45000, 3, 32, 32]), uint8
"""

from __future__ import annotations

import hashlib
import io
import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torchvision.datasets.utils import download_and_extract_archive

from transferlab.errors import UserError

log = logging.getLogger(__name__)

FOLDER = "cifar-100-python"
FILES = ("train", "test", "meta")
N_CLASSES = 100

# The only globals the CIFAR pickles (and numpy arrays inside any pickle) need. Anything else,
# e.g. os.system or builtins.eval in a __reduce__ payload, is refused before it can be called.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),  # how protocol-2 pickles store bytes under latin1
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that builds only dicts, lists, str, bytes, numbers and numpy arrays."""

    def find_class(self, module: str, name: str):  # noqa: D401 - pickle API
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused global {module}.{name}: not allowed in a data file")


def safe_unpickle(path: Path) -> object:
    """Unpickle a data file without executing code; a clear UserError names the bad file."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        return RestrictedUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except pickle.UnpicklingError as e:
        if "refused global" in str(e):
            raise UserError(f"{path} tries to run code ({e}); refusing to load it") from None
        raise UserError(
            f"{path} is corrupt or truncated ({e}); delete it and re-download with --download"
        ) from None
    except Exception as e:  # truncated or garbled bytes raise many kinds of errors
        raise UserError(
            f"{path} is corrupt or truncated ({type(e).__name__}: {e}); delete it and "
            "re-download with --download"
        ) from None


def md5sum(path: Path, chunk: int = 1 << 20) -> str:
    """md5 of a file, recorded in run metadata (we do not trust a fixed official checksum)."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class Split:
    """One split held in memory: uint8 images (N, 3, H, W) and int64 labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class FoldRows:
    """One fold of ``--folds`` on cached features: rows of train + val (pooled, in that order)
    that the fold trains on and validates on (the splits themselves stay whole, so their cache
    keys, and their one extraction, are shared by every fold)."""

    train: torch.Tensor  # int64 indices into cat(train, val)
    val: torch.Tensor


@dataclass
class ImageDataset:
    """Train/val/test splits plus what the run metadata records about them."""

    train: Split
    val: Split
    test: Split
    classes: list[str]
    md5: dict[str, str] = field(default_factory=dict)
    split_seed: int = 0
    source: str = "cifar100"
    fold: FoldRows | None = None  # --folds on cached features (folds.py)


def cifar_paths(data_dir: str | Path) -> dict[str, Path]:
    """Expected paths of the three official files under ``data_dir``."""
    root = Path(data_dir) / FOLDER
    return {name: root / name for name in FILES}


def ensure_cifar100(data_dir: str | Path, download: bool) -> dict[str, Path]:
    """Return the file paths, downloading with torchvision first if asked; else a clear error."""
    paths = cifar_paths(data_dir)
    missing = [p for p in paths.values() if not p.is_file()]
    if missing and download:
        download_cifar100(data_dir)
        missing = [p for p in paths.values() if not p.is_file()]
    if missing:
        raise UserError(
            f"CIFAR-100 not found: expected {missing[0]} (official python format under "
            f"{Path(data_dir) / FOLDER}). Pass --data-dir to point at its parent, or --download "
            "to fetch it."
        )
    return paths


def download_cifar100(data_dir: str | Path) -> None:
    """Fetch and extract the official archive through torchvision's downloader."""
    url = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
    log.info("downloading CIFAR-100 from %s into %s", url, data_dir)
    try:
        download_and_extract_archive(url, str(data_dir), md5="eb9058c3a382ffc7106e4002c42a8d85")
    except Exception as e:  # network errors surface as URLError, OSError, RuntimeError...
        raise UserError(
            f"downloading CIFAR-100 failed ({type(e).__name__}: {e}); copy cifar-100-python/ "
            f"into {data_dir} by hand"
        ) from None


def _read_split(path: Path) -> tuple[np.ndarray, np.ndarray]:
    obj = safe_unpickle(path)
    if not isinstance(obj, dict) or "data" not in obj or "fine_labels" not in obj:
        raise UserError(
            f"{path} is not a CIFAR-100 file: expected a dict with 'data' and 'fine_labels'"
        )
    data, labels = obj["data"], obj["fine_labels"]
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != 3072
    ):
        raise UserError(f"{path}: 'data' must be a uint8 array of shape (N, 3072)")
    labels = np.asarray(labels, dtype=np.int64)
    if (
        labels.shape != (data.shape[0],)
        or labels.min(initial=0) < 0
        or labels.max(initial=0) >= N_CLASSES
    ):
        raise UserError(
            f"{path}: 'fine_labels' must hold {data.shape[0]} ints in 0..{N_CLASSES - 1}"
        )
    return data, labels


def _to_tensor(data: np.ndarray) -> torch.Tensor:
    # Rows are channel-planar: 1024 R, 1024 G, 1024 B, each row-major 32x32 -> (N, 3, 32, 32).
    return torch.from_numpy(np.ascontiguousarray(data.reshape(-1, 3, 32, 32)))


def split_indices(n: int, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded permutation of ``n`` indices into (train, val); val takes ``val_size``."""
    if not 0 < val_size < n:
        raise UserError(f"--val-size must be between 1 and {n - 1}; got {val_size}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[val_size:], perm[:val_size]


def load_cifar100(
    data_dir: str | Path, download: bool, split_seed: int, val_size: int
) -> ImageDataset:
    """Load CIFAR-100 as uint8 tensors with the seeded 45,000/5,000 train/val split."""
    paths = ensure_cifar100(data_dir, download)
    train_x, train_y = _read_split(paths["train"])
    test_x, test_y = _read_split(paths["test"])
    meta = safe_unpickle(paths["meta"])
    if not isinstance(meta, dict) or len(meta.get("fine_label_names", [])) != N_CLASSES:
        raise UserError(
            f"{paths['meta']} is not a CIFAR-100 meta file: expected 100 'fine_label_names'"
        )
    images, labels = _to_tensor(train_x), torch.from_numpy(train_y)
    tr, va = split_indices(len(labels), val_size, split_seed)
    return ImageDataset(
        train=Split(images[tr].contiguous(), labels[tr].contiguous()),
        val=Split(images[va].contiguous(), labels[va].contiguous()),
        test=Split(_to_tensor(test_x), torch.from_numpy(test_y)),
        classes=[str(c) for c in meta["fine_label_names"]],
        md5={name: md5sum(p) for name, p in paths.items()},
        split_seed=split_seed,
        source=str(Path(data_dir) / FOLDER),
    )


def load_cifar100_test(data_dir: str | Path) -> tuple[Split, str]:
    """The test split alone, as uint8 tensors, and its file's md5: what a report's images need,
    without reading (and hashing) the 150 MB training file."""
    paths = ensure_cifar100(data_dir, False)
    test_x, test_y = _read_split(paths["test"])
    return Split(_to_tensor(test_x), torch.from_numpy(test_y)), md5sum(paths["test"])


def write_cifar_like(
    root: str | Path, n_train: int, n_test: int, n_classes: int = N_CLASSES, seed: int = 0
) -> Path:
    """Write tiny synthetic files in the real CIFAR-100 pickle layout (tests, benchmarks).

    Each class gets a distinct mean colour plus noise, so a model can learn it quickly.
    """
    root = Path(root) / FOLDER
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    centres = rng.integers(30, 226, size=(n_classes, 3))

    def make(n: int) -> dict:
        y = np.arange(n) % n_classes
        rng.shuffle(y)
        px = centres[y][:, :, None] + rng.normal(0, 25, size=(n, 3, 1024))
        data = np.clip(px, 0, 255).astype(np.uint8).reshape(n, 3072)
        return {
            "filenames": [f"img_{i}.png" for i in range(n)],
            "batch_label": "synthetic",
            "fine_labels": y.tolist(),
            "coarse_labels": (y % 20).tolist(),
            "data": data,
        }

    for name, n in (("train", n_train), ("test", n_test)):
        with open(root / name, "wb") as f:
            pickle.dump(make(n), f, protocol=2)
    names = [f"class_{i:02d}" for i in range(N_CLASSES)]
    with open(root / "meta", "wb") as f:
        pickle.dump(
            {"fine_label_names": names, "coarse_label_names": [f"c{i}" for i in range(20)]},
            f,
            protocol=2,
        )
    return root.parent
