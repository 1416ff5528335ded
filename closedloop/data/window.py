"""The response window: which spikes count as a site's response to a presentation.

A site's response to a presentation is its number of spikes in ``[onset + start, onset + stop)``
(``window_s`` = (start, stop) s after onset; default 0.07–0.17 s, Guo et al.). Times are
integer ticks of the recording clock, so the edges are exact: a duration of ``t`` s is
``ceil(t · rate − 1e-6)`` ticks (:func:`compute_duration_ticks`; the 1e-6 absorbs floating-point
error in ``t · rate``), and a spike at tick ``k`` counts iff
``onset + start_ticks ≤ k < onset + stop_ticks``.

This module is the one owner of the rule: the ``.nev`` ingest (:mod:`closedloop.data.counts`) and
the simulated rig's live counts (:mod:`rigs.sim`) both apply it, which is why the live stream's
counts and the recording's agree.
"""

from __future__ import annotations

import math

from closedloop.core.validation import check_number

__all__ = ["DEFAULT_WINDOW_S", "check_window", "compute_duration_ticks", "compute_window_ticks"]

DEFAULT_WINDOW_S = (0.07, 0.17)


def check_window(window_s) -> tuple[float, float]:
    """``window_s`` as ``(start, stop)`` s after onset, 0 ≤ start < stop ≤ 5; ``ValueError`` otherwise."""
    window = tuple(window_s)
    if len(window) != 2:
        raise ValueError(f"'window_s' must be (start, stop) in s, but got {window_s!r}.")
    start = check_number("window_s start", window[0], minimum=0.0, maximum=5.0)
    stop = check_number("window_s stop", window[1], minimum=0.0, maximum=5.0)
    if not start < stop:
        raise ValueError(f"'window_s' needs start < stop (s after onset), but got [{start:g}, {stop:g}].")
    return start, stop


def compute_duration_ticks(seconds: float, rate_hz: float) -> int:
    """A duration of ``seconds`` in whole ticks of a ``rate_hz`` clock (rounded up, see the module docstring)."""
    return math.ceil(seconds * rate_hz - 1e-6)


def compute_window_ticks(window_s, rate_hz: float) -> tuple[int, int]:
    """Window edges in ticks after onset: a spike at tick k counts iff start ≤ k − onset < stop."""
    start, stop = window_s
    return compute_duration_ticks(start, rate_hz), compute_duration_ticks(stop, rate_hz)
