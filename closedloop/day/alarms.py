"""The operator's alarms during the present stage: a dying electrode, a monkey that stopped
working, a silent rig, a filling disk.

:class:`SessionWatch` follows the outcomes as they arrive and says which alarms hold now;
:class:`AlarmLog` turns those into events (raised, cleared) in the day's ``log.jsonl`` and log
warnings, once per change. The day raises them itself, so they are in the log whether or not a
dashboard is open (``closedloop dashboard`` shows them; docs/dashboard.md). The thresholds are
``[dashboard]``'s (:class:`~closedloop.config.DashboardSection`).

The kinds, and while each holds:

- ``silent_site``: a site has had no spike in its last ``silent_presentations`` valid
  presentations, though it fired at least ``min_reference_rate_hz`` over the day's first
  ``silent_presentations`` (a channel dead from the start is not "dying");
- ``site_at_baseline``: a site's mean rate over its last ``silent_presentations`` valid
  presentations is below ``baseline_fraction`` × its rate over the day's first
  ``silent_presentations`` (which was at least ``min_reference_rate_hz``);
- ``fixation_breaks``: the fixation-break rate over the last ``window_s`` is above
  ``max_fixation_break_rate`` (over at least 20 presentations);
- ``rig_silent``: nothing heard from the rig for ``rig_silent_s``;
- ``disk_low``: the experiment's disk has less than ``min_free_gb`` GB free.

An alarm raised is cleared only once its condition has not held for ``alarm_hold_s``, so a
rate that hovers at its threshold raises it once rather than every other second. The site
alarms need live counts (a simulated rig, or a presenter that streams them).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from closedloop.core.logs import logger

__all__ = ["ALARM_KINDS", "Alarm", "AlarmLog", "SessionWatch"]

ALARM_KINDS = ("silent_site", "site_at_baseline", "fixation_breaks", "rig_silent", "disk_low")
_MIN_WINDOW_PRESENTATIONS = 20  # fewer presentations in the window say nothing about the break rate


@dataclass(frozen=True)
class Alarm:
    """One alarm that holds now: ``kind`` (one of :data:`ALARM_KINDS`), ``message`` for the operator,
    and ``site`` (0-based) for the site alarms, else None."""

    kind: str
    message: str
    site: int | None = None

    @property
    def key(self) -> tuple[str, int | None]:
        return self.kind, self.site


class SessionWatch:
    """Which alarms hold during a session, from its outcomes (:meth:`add`) and the link and disk facts
    handed to :meth:`check`.

    ``thresholds``: a :class:`~closedloop.config.DashboardSection`; ``labels``: one name per site;
    ``window_s``: length of the response window, s (counts / window_s = rate, Hz).
    """

    def __init__(self, thresholds, labels: list[str], window_s: float) -> None:
        self.thresholds, self.labels, self.window_s = thresholds, list(labels), float(window_s)
        n = thresholds.silent_presentations
        self._recent: deque[np.ndarray] = deque(maxlen=n)
        self._first: list[np.ndarray] = []
        self._n_first = n

    def add(self, outcome: dict) -> None:
        """Take one outcome (``valid``, ``counts``: spikes per site or None)."""
        if not outcome["valid"] or outcome.get("counts") is None:
            return
        counts = np.asarray(outcome["counts"], dtype=np.float64)
        self._recent.append(counts)
        if len(self._first) < self._n_first:
            self._first.append(counts)

    def check(self, *, break_rate: float, n_in_window: int, link_silent_s: float, free_bytes: int) -> list[Alarm]:
        """The alarms that hold now. ``break_rate``: fixation-break fraction over the last ``window_s``
        (``n_in_window`` presentations); ``link_silent_s``: seconds since the rig was heard;
        ``free_bytes``: free space on the experiment's disk."""
        t = self.thresholds
        alarms = self._site_alarms()
        if n_in_window >= _MIN_WINDOW_PRESENTATIONS and break_rate > t.max_fixation_break_rate:
            alarms.append(Alarm("fixation_breaks", f"fixation breaks at {break_rate:.0%} of the last {n_in_window} "
                                f"presentations (alarm above {t.max_fixation_break_rate:.0%}): is the monkey still working?"))
        if link_silent_s > t.rig_silent_s:
            alarms.append(Alarm("rig_silent", f"nothing heard from the rig for {link_silent_s:.0f} s (alarm after "
                                f"{t.rig_silent_s:g} s): check the rig computer and the network"))
        if free_bytes < t.min_free_gb * 1e9:
            alarms.append(Alarm("disk_low", f"only {free_bytes / 1e9:.1f} GB free on the experiment's disk (alarm "
                                f"below {t.min_free_gb:g} GB): make room before the day's files fill it"))
        return alarms

    def _site_alarms(self) -> list[Alarm]:
        n = self.thresholds.silent_presentations
        if len(self._recent) < n:
            return []
        recent = np.mean(self._recent, axis=0) / self.window_s
        reference = np.mean(self._first, axis=0) / self.window_s
        alarms = []
        for site, (now, before) in enumerate(zip(recent, reference)):
            name = f"site {site} ({self.labels[site]})"
            if before < self.thresholds.min_reference_rate_hz:
                continue  # never above it: nothing to lose
            if now == 0:
                alarms.append(Alarm("silent_site", f"{name} silent for its last {n} valid presentations "
                                    f"(it fired {before:.0f} Hz at the start of the day): is the electrode dying?", site))
            elif now < self.thresholds.baseline_fraction * before:
                alarms.append(Alarm("site_at_baseline", f"{name} at {now:.1f} Hz over its last {n} valid presentations, "
                                    f"down from {before:.0f} Hz at the start of the day: is the electrode losing its unit?",
                                    site))
        return alarms


class AlarmLog:
    """Writes each change of the alarms that hold: ``log_event(event="alarm", state="raised" |
    "cleared", kind=..., site=..., message=...)`` into the day's log, and a log warning when one is
    raised. :attr:`active` holds the alarms raised and not cleared, in the order raised.

    ``hold_s``: an alarm is cleared once it has not held for this long, s (a condition that
    flickers at its threshold stays one alarm); ``clock``: seconds, monotonic. An event that
    ``log_event`` fails to write (``OSError``, a full disk) is written at the next update instead.
    """

    def __init__(self, log_event: Callable[..., None], *, hold_s: float = 0.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.log_event, self.hold_s, self.clock = log_event, hold_s, clock
        self.active: dict[tuple, Alarm] = {}
        self._last_held: dict[tuple, float] = {}

    def update(self, alarms: list[Alarm]) -> None:
        """Record the alarms that hold now: raise the new ones, clear those that have not held for ``hold_s``."""
        now, held = self.clock(), {alarm.key: alarm for alarm in alarms}
        superseded = {("site_at_baseline", site) for kind, site in held if kind == "silent_site"}  # one alarm per site
        for key in [key for key in self.active
                    if key not in held and (now - self._last_held[key] >= self.hold_s or key in superseded)]:
            self._clear(key)
        for key, alarm in held.items():
            self._last_held[key] = now
            if key not in self.active:
                self.log_event(event="alarm", state="raised", kind=alarm.kind, site=alarm.site, message=alarm.message)
                self.active[key] = alarm  # once logged: an event that could not be written is tried again
                logger.warning("ALARM %s", alarm.message, extra={"alarm": True})
            else:
                self.active[key] = alarm  # the same alarm, its message brought up to date

    def clear_all(self) -> None:
        """Clear every alarm at once (the session has ended)."""
        for key in list(self.active):
            self._clear(key)

    def _clear(self, key: tuple) -> None:
        alarm = self.active[key]
        self.log_event(event="alarm", state="cleared", kind=alarm.kind, site=alarm.site, message=alarm.message)
        del self.active[key]
        self._last_held.pop(key, None)
