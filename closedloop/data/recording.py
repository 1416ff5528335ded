"""A Blackrock recording in memory: spikes and digital events on the NSP clock.

Times are seconds on the recording clock; internally every time is an integer number of clock
ticks (``sampling_rate_hz``, 30 kHz on a Blackrock NSP), so response-window edges are exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from closedloop.core.validation import check_array, check_integer_array, check_number

__all__ = ["Recording", "compute_ticks", "NSP_CLOCK_HZ"]

NSP_CLOCK_HZ = 30000.0


def compute_ticks(times_s, sampling_rate_hz: float) -> np.ndarray:
    """Seconds → nearest integer clock tick, int64 (same shape)."""
    return np.rint(np.asarray(times_s, dtype=np.float64) * sampling_rate_hz).astype(np.int64)


@dataclass(frozen=True, eq=False)
class Recording:
    """Spikes and digital events of one recording.

    ``spike_times_s`` float64 ``(n_spikes,)``; ``spike_electrodes`` int ``(n_spikes,)``
    (Blackrock electrode id ≥ 1); ``spike_units`` int ``(n_spikes,)`` (unit class 0–255);
    ``event_times_s`` float64 ``(n_events,)``; ``event_words`` uint16 ``(n_events,)`` (digital
    input port); ``electrodes``: every electrode the recording has, spikes or not;
    ``sampling_rate_hz``: the clock, Hz; ``source``: the file it came from (for messages). Times
    are rounded to the nearest clock tick; ``spike_ticks`` and ``event_ticks`` hold them as int64.
    """

    spike_times_s: np.ndarray
    spike_electrodes: np.ndarray
    spike_units: np.ndarray
    event_times_s: np.ndarray
    event_words: np.ndarray
    electrodes: tuple[int, ...]
    sampling_rate_hz: float = NSP_CLOCK_HZ
    source: str = ""
    spike_ticks: np.ndarray = field(init=False, repr=False)
    event_ticks: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        rate = check_number("sampling_rate_hz", self.sampling_rate_hz, minimum=0, inclusive=False)
        electrodes = check_integer_array("electrodes", list(self.electrodes), shape=(None,), minimum=1, maximum=65535)
        spike_times = check_array("spike_times_s", self.spike_times_s, shape=(None,)).astype(np.float64)
        n_spikes = len(spike_times)
        spike_electrodes = check_integer_array("spike_electrodes", self.spike_electrodes, shape=(n_spikes,))
        spike_units = check_integer_array("spike_units", self.spike_units, shape=(n_spikes,), minimum=0, maximum=255)
        event_times = check_array("event_times_s", self.event_times_s, shape=(None,)).astype(np.float64)
        event_words = check_integer_array("event_words", self.event_words, shape=(len(event_times),), minimum=0,
                                          maximum=65535)
        for name, times in (("spike_times_s", spike_times), ("event_times_s", event_times)):
            if not (np.isfinite(times).all() and (times >= 0).all()):
                raise ValueError(f"'{name}' must be finite times >= 0 s on the recording clock.")
        unknown = np.setdiff1d(spike_electrodes, electrodes)
        if unknown.size:
            raise ValueError(
                f"'spike_electrodes' holds electrodes {unknown[:5].tolist()} that are not in 'electrodes' "
                f"({electrodes[:10].tolist()}…); list every recorded electrode in 'electrodes'."
            )
        values = {
            "sampling_rate_hz": rate,
            "electrodes": tuple(int(e) for e in electrodes),
            "spike_times_s": spike_times,
            "spike_electrodes": spike_electrodes,
            "spike_units": spike_units,
            "event_times_s": event_times,
            "event_words": event_words.astype(np.uint16),
            "spike_ticks": compute_ticks(spike_times, rate),
            "event_ticks": compute_ticks(event_times, rate),
        }
        for name, value in values.items():
            object.__setattr__(self, name, value)

    @property
    def n_spikes(self) -> int:
        return len(self.spike_times_s)

    @property
    def n_events(self) -> int:
        return len(self.event_times_s)

    @classmethod
    def from_ticks(cls, spike_ticks, spike_electrodes, spike_units, event_ticks, event_words, electrodes,
                   sampling_rate_hz: float = NSP_CLOCK_HZ, source: str = "") -> Recording:
        """Build a recording from integer clock ticks (exact)."""
        return cls(
            spike_times_s=np.asarray(spike_ticks, dtype=np.int64) / sampling_rate_hz,
            spike_electrodes=spike_electrodes,
            spike_units=spike_units,
            event_times_s=np.asarray(event_ticks, dtype=np.int64) / sampling_rate_hz,
            event_words=event_words,
            electrodes=tuple(electrodes),
            sampling_rate_hz=sampling_rate_hz,
            source=source,
        )
