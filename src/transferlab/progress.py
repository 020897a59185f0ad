"""Progress bars in images per second (with ETA) over any batch source.

Usage:
    for x, y in progress(loader, "epoch 1", enabled=True):
        ...
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator


def progress(loader: Iterable, desc: str, enabled: bool) -> Iterable:
    """Yield ``loader``'s (x, y) batches; if enabled, show img/s and ETA on stderr (tqdm)."""
    if not enabled:
        return loader
    return _bar(loader, desc)


def _bar(loader: Iterable, desc: str) -> Iterator:
    from tqdm.auto import tqdm

    total = getattr(loader, "num_samples", None)
    if total is None:  # a DataLoader-like source: estimate from batches x batch size
        total = len(loader) * (getattr(loader, "batch_size", None) or 1)
    with tqdm(total=total, desc=desc, unit="img", unit_scale=True, leave=False, dynamic_ncols=True) as bar:
        for x, y in loader:
            yield x, y
            bar.update(int(y.shape[0]))
