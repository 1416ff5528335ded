"""One package logger and one progress helper for all long work.

Library code never prints: it logs through ``logger`` and shows progress through
:func:`progress`, which draws a rich progress bar on a terminal and plain log lines
otherwise (e.g. under CI, or when output is piped to a file), and can be turned off.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.progress import Progress

__all__ = ["logger", "set_log_level", "progress"]

logger = logging.getLogger("closedloop")
T = TypeVar("T")

_LEVELS = {None: logging.INFO, True: logging.INFO, False: logging.WARNING}


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (it may be swapped, e.g. by test capture)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def set_log_level(verbose: bool | str | int | None = None) -> None:
    """Set the package log level: None/True → INFO, False → WARNING, or a level name/number."""
    level = _LEVELS.get(verbose, verbose) if not isinstance(verbose, str) else verbose.upper()
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level)


def progress(
    iterable: Iterable[T],
    *,
    total: int | None = None,
    description: str = "working",
    disable: bool | None = None,
    log_every_s: float = 10.0,
) -> Iterator[T]:
    """Yield from ``iterable`` while showing progress.

    On an interactive terminal this draws a rich bar with ETA; otherwise it writes a log
    line at most every ``log_every_s`` seconds. ``disable=True`` shows nothing;
    ``disable=None`` shows progress only when the package log level is INFO or lower.
    """
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if disable is None:
        disable = not logger.isEnabledFor(logging.INFO)
    if disable:
        yield from iterable
        return
    if sys.stderr.isatty():

        with Progress(transient=True) as bar:
            task = bar.add_task(description, total=total)
            for item in iterable:
                yield item
                bar.advance(task)
        return
    start = last = time.monotonic()
    for done, item in enumerate(iterable, start=1):
        yield item
        now = time.monotonic()
        if now - last >= log_every_s or done == total:
            last = now
            of = f"/{total}" if total else ""
            logger.info("%s: %d%s done (%.0f s)", description, done, of, now - start)
