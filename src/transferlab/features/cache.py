"""On-disk feature cache: safetensors files keyed by everything that changes the features.

The key hashes backbone name, a hash of its weights, image size, normalisation, precision,
the data files' md5, the split, and the augmented-view settings. Files are written atomically
(``io.write_atomic``: temp file + fsync + ``os.replace``), so concurrent writers of one key cannot
corrupt it and a full disk leaves no partial file. Each file carries a sha256 of its tensors;
a truncated or garbled file is detected on load, deleted and rebuilt.

Ownership: the cache dir may hold other files (a user's own safetensors models, say). Every
entry we write carries ``format: transferlab-features/1`` in its safetensors metadata, and
``cache clear`` deletes only entries that carry it (and entries of older versions, recognised by
their 24-hex-digit key name plus a verified checksum); everything else is listed as "not ours"
and left alone. Temp files carry io's one marker (``.KEY.safetensors.transferlab-tmp-HOST-PID-X``)
and are swept only when stale (their process on this host is gone, or older than a day).

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
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from transferlab.errors import UserError
from transferlab.io import sweep_stale_temps, write_atomic

log = logging.getLogger(__name__)

ENV_VAR = "TRANSFERLAB_CACHE_DIR"
SUFFIX = ".safetensors"
FORMAT_KEY, FORMAT_TAG = "format", "transferlab-features/1"  # in every entry's metadata
# memos of ours in the cache root: the engine choice (features/engines.py), the extraction
# precision (features/extract.py), the data files' digests (features/content.py)
ENGINE_MEMO, PRECISION_MEMO, DIGEST_MEMO = "engines.json", "precision.json", "file_digests.json"
MEMOS = (ENGINE_MEMO, PRECISION_MEMO, DIGEST_MEMO)
_LEGACY_KEY = re.compile(r"^[0-9a-f]{24}$")  # entries written before the format tag


def cache_root(cache_dir: str) -> Path:
    """Resolve the cache folder (flag, then environment, then ~/.cache)."""
    root = (
        cache_dir
        or os.environ.get(ENV_VAR)
        or str(Path.home() / ".cache" / "transferlab" / "features")
    )
    try:
        return Path(root).expanduser()
    except RuntimeError:  # "~nobody/x": no such user
        raise UserError(
            f"cache dir {root}: no such user for '~'; write the full path (--cache-dir or "
            f"${ENV_VAR})"
        ) from None


def cache_key(parts: dict) -> str:
    """A stable sha256 (first 24 hex digits) of the key parts."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def weights_hash(module: torch.nn.Module) -> str:
    """sha256 of a module's state (names, shapes, bytes): new weights never reuse old features."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(
            t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            if t.numel()
            else b""
        )
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
    info[FORMAT_KEY] = FORMAT_TAG
    data = st_save(tensors, metadata=info)
    path = entry_path(root, key)
    write_atomic(path, data)
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


def _meta_of(path: Path) -> dict:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if not 0 < n < 1 << 24:
            raise ValueError("no safetensors header")
        meta = json.loads(f.read(n)).get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise ValueError("metadata is not a mapping")
    return meta


def is_ours(path: Path, meta: dict) -> bool:
    """An entry we wrote: the format tag, or an older entry (key name + verified checksum)."""
    if meta.get(FORMAT_KEY) == FORMAT_TAG:
        return True
    if not (_LEGACY_KEY.match(path.stem) and {"sha256", "backbone", "split"} <= set(meta)):
        return False
    try:
        return _digest(st_load(path.read_bytes())) == meta["sha256"]
    except (SafetensorError, OSError, ValueError):
        return False


def list_entries(root: Path) -> list[dict]:
    """One dict per file in the cache dir and its ``engines/`` (converted models): key, size in
    bytes, path, ``ours``, and its metadata.

    ``ours`` is False for files we did not write (listed as "not ours", never deleted). Our
    memos (:data:`MEMOS`) are ours, with ``memo: True``. Hidden files (temp files) are not listed.
    """
    out = []
    for path in _visible_files(root) + _visible_files(root / "engines"):
        meta: dict = {}
        if path.parent == root and path.name in MEMOS:
            meta = {"memo": True}
        elif path.suffix == SUFFIX:
            try:
                meta = _meta_of(path)
            except (OSError, ValueError):
                meta = {"error": "unreadable"}
        ours = bool(meta.get("memo")) or (path.suffix == SUFFIX and is_ours(path, meta))
        info = {k: v for k, v in meta.items() if k not in ("key", "bytes", "path", "ours")}
        out.append(
            {
                **info,
                "key": path.stem if path.suffix == SUFFIX else path.name,
                "bytes": path.stat().st_size,
                "path": str(path),
                "ours": ours,
            }
        )
    return out


def _visible_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def clear_entries(root: Path) -> tuple[int, int]:
    """Delete our entries and our stale temp files; returns (files, bytes) freed.

    Files that are not ours stay (see :func:`list_entries`); so do temp files being written.
    """
    swept = {**sweep_stale_temps(root), **sweep_stale_temps(root / "engines")}
    files, freed = len(swept), sum(swept.values())
    for path in [Path(e["path"]) for e in list_entries(root) if e["ours"]]:
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            continue
        freed += size
        files += 1
    return files, freed
