"""Progress in images per second (with ETA) over any batch source.

On a terminal: a tqdm bar on stderr. When stderr is not a terminal (a log file, CI, a batch
scheduler), a bar would write hundreds of carriage-return updates into the file, so we log a
plain line instead: one every :data:`PLAIN_EVERY_S` seconds and one when the pass ends.

Usage:
    for x, y in progress(loader, "epoch 1", enabled=True):
        ...
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator

from tqdm.auto import tqdm

log = logging.getLogger(__name__)

PLAIN_EVERY_S = 30.0  # seconds between plain progress lines when stderr is not a terminal


def progress(loader: Iterable, desc: str, enabled: bool, tty: bool | None = None) -> Iterable:
    """Yield ``loader``'s (x, y) batches; if enabled, report img/s and ETA.

    ``tty``: force the bar (True) or plain lines (False); default: whether stderr is a terminal.
    """
    if not enabled:
        return loader
    if tty is None:
        tty = _stderr_is_tty()
    return _bar(loader, desc) if tty else _plain(loader, desc, PLAIN_EVERY_S)


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


def _total(loader: Iterable) -> int:
    total = getattr(loader, "num_samples", None)
    if total is None:  # a DataLoader-like source: estimate from batches x batch size
        total = len(loader) * (getattr(loader, "batch_size", None) or 1)
    return int(total)


def _bar(loader: Iterable, desc: str) -> Iterator:
    with tqdm(
        total=_total(loader),
        desc=desc,
        unit="img",
        unit_scale=True,
        leave=False,
        dynamic_ncols=True,
    ) as bar:
        for x, y in loader:
            yield x, y
            bar.update(int(y.shape[0]))


def _plain(loader: Iterable, desc: str, every_s: float) -> Iterator:
    """One log line every ``every_s`` seconds and one at the end: no carriage returns."""
    total = _total(loader)
    t0 = last = time.perf_counter()
    done = 0
    for x, y in loader:
        yield x, y
        done += int(y.shape[0])
        now = time.perf_counter()
        if now - last >= every_s and done < total:
            last = now
            rate = done / max(now - t0, 1e-9)
            eta = (total - done) / max(rate, 1e-9)
            log.info(
                "%s: %d/%d img (%.0f%%), %.0f img/s, ETA %.0f s",
                desc,
                done,
                total,
                100 * done / max(total, 1),
                rate,
                eta,
            )
    seconds = time.perf_counter() - t0
    if seconds >= every_s:  # short passes stay silent, as a bar with leave=False does
        log.info(
            "%s: %d img in %.0f s (%.0f img/s)", desc, done, seconds, done / max(seconds, 1e-9)
        )
