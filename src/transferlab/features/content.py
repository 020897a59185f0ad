"""Content digest of a folder data set's files: the feature cache keys on the images' bytes.

The folder's ``md5`` (paths and sizes) changes when a file is added, removed or resized, but not
when an image is repainted at the same size; the feature cache then served the old features
(issue 24). :func:`content_digest` hashes every file's bytes (sha256, in 1 MiB chunks) and
remembers each file's digest in ``cache_root/file_digests.json`` next to its
(size, mtime_ns, ctime_ns, inode): a file whose stat differs in any of them is hashed again, so a
warm run reads no image bytes, and any change (a repaint, a copy over it, ``touch``) misses.
A file modified within the last 2 s is hashed but not remembered (git's "racy" rule: a write in
the same timestamp tick would leave its stat unchanged).

Usage:
    digest = content_digest(split.paths, cache_root("") / DIGEST_MEMO)  # features/cache.py
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

from transferlab.io import write_json

log = logging.getLogger(__name__)

CHUNK = 1 << 20  # bytes read at a time
RACY_S = 2.0  # a file written this recently may change again within its mtime tick


def file_sha256(path: str) -> str:
    """sha256 of one file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def _stat_tag(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _read_memo(memo: Path) -> dict:
    try:
        known = json.loads(memo.read_text())
    except (OSError, ValueError):  # missing or damaged: rebuilt from the files
        return {}
    return known if isinstance(known, dict) else {}


def content_digest(paths: list[str], memo: Path) -> str:
    """sha256 over (path, sha256 of its bytes) in the given order, memoised per file by stat.

    Raises OSError when a file cannot be read (the data changed under the run).
    """
    known = _read_memo(memo)
    now_ns = time.time_ns()
    h = hashlib.sha256()
    hashed = 0
    for p in paths:
        st = os.stat(p)
        tag = _stat_tag(st)
        entry = known.get(p)
        if isinstance(entry, list) and len(entry) == 2 and entry[0] == tag:
            digest = entry[1]
        else:
            digest = file_sha256(p)
            hashed += 1
            if now_ns - max(st.st_mtime_ns, st.st_ctime_ns) > RACY_S * 1e9:
                known[p] = [tag, digest]
            else:
                known.pop(p, None)
        h.update(f"{p}\t{digest}\n".encode())
    if hashed:
        log.info(
            "hashed %d of %d data files (the others: unchanged, digest remembered)",
            hashed,
            len(paths),
        )
        try:
            memo.parent.mkdir(parents=True, exist_ok=True)
            write_json(memo, known, indent=None)
        except OSError as e:
            log.warning("could not remember the file digests in %s (%s)", memo, e.strerror or e)
    return h.hexdigest()
