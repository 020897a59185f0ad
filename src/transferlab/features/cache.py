"""On-disk feature cache: safetensors files keyed by everything that changes the features.

The key hashes backbone name, a hash of its weights, image size, normalisation, precision,
the data files' md5, the split, and the augmented-view settings. Files are written atomically
(temp file + fsync + ``os.replace``), so concurrent writers of one key cannot corrupt it and a
full disk leaves no partial file. Each file carries a sha256 of its tensors; a truncated or
garbled file is detected on load, deleted and rebuilt.

Location: ``--cache-dir``, else ``$TRANSFERLAB_CACHE_DIR``, else ``~/.cache/transferlab/features``.

Usage:
    root = cache_root("")
    key = cache_key({"backbone": "resnet18", ...})
    hit = load_entry(root, key)          # None on a miss (or a corrupt file, now removed)
    save_entry(root, key, {"features": f, "labels": y}, meta={"split": "train"})
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from transferlab.train.checkpoint import atomic_write

log = logging.getLogger(__name__)

ENV_VAR = "TRANSFERLAB_CACHE_DIR"
SUFFIX = ".safetensors"


def cache_root(cache_dir: str) -> Path:
    """Resolve the cache folder (flag, then environment, then ~/.cache)."""
    root = cache_dir or os.environ.get(ENV_VAR) or str(Path.home() / ".cache" / "transferlab" / "features")
    return Path(root).expanduser()


def cache_key(parts: dict) -> str:
    """A stable sha256 (first 24 hex digits) of the key parts."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def weights_hash(module: torch.nn.Module) -> str:
    """sha256 of a module's state (names, shapes, bytes), so new weights never reuse old features."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:24]


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def entry_path(root: Path, key: str) -> Path:
    return root / f"{key}{SUFFIX}"


def save_entry(root: Path, key: str, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write one entry atomically; returns its path."""
    root.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    info = {k: str(v) for k, v in meta.items()}
    info["sha256"] = _digest(tensors)
    data = st_save(tensors, metadata=info)
    path = entry_path(root, key)
    atomic_write(path, lambda f: f.write(data))
    return path


def load_entry(root: Path, key: str) -> tuple[dict[str, torch.Tensor], dict] | None:
    """Read and verify an entry; None on a miss. A corrupt entry is deleted with a warning."""
    path = entry_path(root, key)
    if not path.is_file():
        return None
    try:
        raw = path.read_bytes()
        tensors = st_load(raw)
        meta = _read_meta(raw)
        if meta.get("sha256") != _digest(tensors):
            raise ValueError("checksum mismatch")
    except (SafetensorError, ValueError, OSError, json.JSONDecodeError) as e:
        log.warning("feature cache file %s is corrupt (%s); deleting it and re-extracting", path, e)
        path.unlink(missing_ok=True)
        return None
    return tensors, meta


def _read_meta(raw: bytes) -> dict:
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    return header.get("__metadata__", {}) or {}


def list_entries(root: Path) -> list[dict]:
    """One dict per cache file: key, size in bytes, and its metadata (without verifying data)."""
    out = []
    for path in sorted(root.glob(f"*{SUFFIX}")):
        try:
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                meta = json.loads(f.read(n)).get("__metadata__", {}) if 0 < n < 1 << 24 else {}
        except (OSError, ValueError):
            meta = {"error": "unreadable"}
        out.append({"key": path.stem, "bytes": path.stat().st_size, "path": str(path), **meta})
    return out


def clear_entries(root: Path) -> tuple[int, int]:
    """Delete every cache file (and stale temp files); returns (files, bytes) freed."""
    files = freed = 0
    for path in list(root.glob(f"*{SUFFIX}")) + list(root.glob(".*.tmp")):
        freed += path.stat().st_size
        path.unlink(missing_ok=True)
        files += 1
    return files, freed
