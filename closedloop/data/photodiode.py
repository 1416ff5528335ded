"""Stimulus onsets from a photodiode recorded on an NSP analog input (a Blackrock ``.ns1``–``.ns6``).

The event code marks the flip on which the presenter asked for a stimulus; the light reaches the
screen later (display input lag, scan-out), by an amount that varies from flip to flip. When the
rig's photodiode patch (white on stimulus frames) is recorded on an analog input, each code's
onset is the first rising threshold crossing of that channel at or after the code, within
``max_latency_s``; a code without one keeps its own time. :func:`read_photodiode` finds the
crossings (through ``neo.rawio.BlackrockRawIO``, a chunk of samples at a time);
:class:`OnsetMatcher` pairs codes with crossings (both ingest engines use it);
:func:`compute_latency_summary` reports the code-to-light latencies.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np

from closedloop.core.validation import check_file, check_number

__all__ = ["Photodiode", "OnsetMatcher", "read_photodiode", "compute_latency_summary", "DEFAULT_MAX_LATENCY_S"]

DEFAULT_MAX_LATENCY_S = 0.1
_CHUNK_SAMPLES = 1 << 22
_NSX_SUFFIXES = tuple(f".ns{n}" for n in range(1, 7))


class Photodiode(NamedTuple):
    """Rising threshold crossings of a photodiode channel.

    ``crossing_ticks`` int64 ``(n_crossings,)``: the first sample at or above ``threshold``
    after one below it, as ticks of the NSP clock (``clock_hz``, the ``.nev``'s), increasing;
    ``max_latency_ticks``: how long after a code its crossing may come; ``source``, ``channel``,
    ``threshold`` (in the channel's units, ``units``) and ``sampling_rate_hz`` (of the channel)
    for the report.
    """

    crossing_ticks: np.ndarray
    max_latency_ticks: int
    clock_hz: float
    source: str
    channel: str
    threshold: float
    units: str
    sampling_rate_hz: float

    def describe(self) -> dict:
        """The photodiode's settings, JSON-ready."""
        return {"source": self.source, "channel": self.channel, "threshold": self.threshold, "units": self.units,
                "sampling_rate_hz": self.sampling_rate_hz, "max_latency_s": self.max_latency_ticks / self.clock_hz,
                "n_crossings": len(self.crossing_ticks)}


def _find_channel(reader, path: Path, channel: str) -> tuple[int, int]:
    """(stream index, channel index within the stream) of ``channel``, given by name (label) or id."""
    channels = reader.header["signal_channels"]
    found = [index for index, (name, identifier) in enumerate(zip(channels["name"], channels["id"]))
             if channel in (str(name), str(identifier))]
    if not found:
        names = ", ".join(f"{name} (id {identifier})" for name, identifier in zip(channels["name"], channels["id"]))
        raise ValueError(f"photodiode file {str(path)!r} has no channel {channel!r}; its channels: {names}.")
    stream_id = channels["stream_id"][found[0]]
    stream_index = list(reader.header["signal_streams"]["id"]).index(stream_id)
    in_stream = [index for index in range(len(channels)) if channels["stream_id"][index] == stream_id]
    return stream_index, in_stream.index(found[0])


def _open_nsx(path: Path):
    """neo's reader on this one ``.nsX`` only (no ``.nev``), header parsed; errors are bad input."""
    from neo.rawio import BlackrockRawIO  # here: the streaming ingest imports this module and needs no neo

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reader = BlackrockRawIO(filename=str(path), nsx_to_load=int(path.suffix[-1]), load_nev=False)
            reader.parse_header()
    except Exception as error:  # neo raises many types for bad files; report them as bad input
        raise ValueError(f"photodiode file {str(path)!r}: neo could not read it ({type(error).__name__}: {error}).") from None
    if reader.header["nb_segment"][0] != 1:
        raise ValueError(f"photodiode file {str(path)!r} has {reader.header['nb_segment'][0]} segments (the recording "
                         "was paused); closedloop reads one continuous segment.")
    return reader


def read_photodiode(path: str | Path, channel: str | int, threshold: float, *,
                    max_latency_s: float = DEFAULT_MAX_LATENCY_S, clock_hz: float = 30000.0) -> Photodiode:
    """Find the rising threshold crossings of ``channel`` in the Blackrock continuous file ``path``.

    ``channel``: the channel's label (e.g. ``"ainp1"``) or id (e.g. ``129``); ``threshold``: in
    the channel's units as neo scales them (mV for analog inputs), best halfway between the dark
    and the lit patch; ``max_latency_s``: how long after an event code its crossing may come
    (shorter than the shortest interval between codes); ``clock_hz``: the ``.nev``'s clock. The
    signal is read a chunk of samples at a time, so memory does not grow with its length.
    """
    path = check_file("photodiode file", path).resolve()
    if path.suffix not in _NSX_SUFFIXES:
        raise ValueError(f"photodiode file {str(path)!r} must be a Blackrock continuous file (.ns1 to .ns6).")
    threshold = check_number("threshold", threshold)
    max_latency_s = check_number("max_latency_s", max_latency_s, minimum=0, inclusive=False)
    reader = _open_nsx(path)
    try:
        stream_index, channel_index = _find_channel(reader, path, str(channel))
        rate = float(reader.get_signal_sampling_rate(stream_index))
        size = reader.get_signal_size(0, 0, stream_index)
        first_tick = round(reader.get_signal_t_start(0, 0, stream_index) * clock_hz)
        crossings, previous = [], np.zeros(1, dtype=bool)  # before the first sample: dark
        for start in range(0, size, _CHUNK_SAMPLES):
            raw = reader.get_analogsignal_chunk(0, 0, start, min(start + _CHUNK_SAMPLES, size), stream_index,
                                                channel_indexes=[channel_index])
            lit = reader.rescale_signal_raw_to_float(raw, dtype="float64", stream_index=stream_index,
                                                     channel_indexes=[channel_index])[:, 0] >= threshold
            rising = np.flatnonzero(lit & ~np.concatenate([previous, lit[:-1]]))
            crossings.append(start + rising)
            previous = lit[-1:]
        info = reader.header["signal_channels"][reader.header["signal_channels"]["stream_id"]
                                                == reader.header["signal_streams"]["id"][stream_index]][channel_index]
    finally:
        for handle in getattr(reader, "_nsx_fids", {}).values():  # neo caches .nsX handles without closing them
            handle.close()
    samples = np.concatenate(crossings) if crossings else np.zeros(0, np.int64)
    ticks = first_tick + np.rint(samples * (clock_hz / rate)).astype(np.int64)
    return Photodiode(crossing_ticks=ticks, max_latency_ticks=math.ceil(max_latency_s * clock_hz - 1e-6),
                      clock_hz=clock_hz, source=str(path), channel=str(info["name"]), threshold=threshold,
                      units=str(info["units"]), sampling_rate_hz=rate)


class OnsetMatcher:
    """Pairs event codes with photodiode crossings, codes in time order over one call or several.

    A code's onset is the first crossing at or after it and less than ``max_latency_ticks`` after
    it; a code without one keeps its own tick. A crossing that two codes would share, or onsets
    that would go backwards, mean codes closer together than the latency allowed: an error.
    """

    def __init__(self, photodiode: Photodiode) -> None:
        self.photodiode = photodiode
        self.last_crossing, self.last_onset = -1, -(1 << 62)

    def match(self, code_ticks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(onset_ticks, latency_ticks)`` int64 for ``code_ticks`` int64 ``(n,)`` (non-decreasing,
        after every code of earlier calls); latency −1 where a code has no crossing."""
        crossings = self.photodiode.crossing_ticks
        code_ticks = np.asarray(code_ticks, dtype=np.int64)
        index = np.searchsorted(crossings, code_ticks)
        found = index < len(crossings)
        found[found] = crossings[index[found]] - code_ticks[found] < self.photodiode.max_latency_ticks
        onsets = code_ticks.copy()
        onsets[found] = crossings[index[found]]
        shared = np.flatnonzero(found)[np.diff(np.concatenate([[self.last_crossing], index[found]])) <= 0]
        backwards = np.flatnonzero(np.diff(np.concatenate([[self.last_onset], onsets])) < 0)
        if shared.size or backwards.size:
            clock = self.photodiode.clock_hz
            where = min(np.concatenate([shared, backwards]))
            raise ValueError(
                f"photodiode {self.photodiode.channel!r}: the event code at {code_ticks[where] / clock:.4f} s and the "
                f"one before it are closer together than the photodiode's latency allows "
                f"({self.photodiode.max_latency_ticks / clock:g} s): their light cannot be told apart; lower the "
                "maximum latency below the shortest interval between codes."
            )
        if found.any():
            self.last_crossing = int(index[found][-1])
        if len(onsets):
            self.last_onset = int(onsets[-1])
        return onsets, np.where(found, onsets - code_ticks, -1)


def compute_latency_summary(latency_s: np.ndarray) -> dict:
    """The code-to-light latencies of ``latency_s`` float64 ``(n_codes,)`` (s; NaN: no crossing), JSON-ready.

    ``{"n_codes", "n_without_crossing", "latency_ms": {"median", "p5", "p95"}}`` (None without
    any crossing).
    """
    latency_s = np.asarray(latency_s, dtype=np.float64)
    found = latency_s[np.isfinite(latency_s)]
    quantiles = np.percentile(found * 1e3, [50, 5, 95]).tolist() if found.size else [None] * 3
    return {"n_codes": int(latency_s.size), "n_without_crossing": int(latency_s.size - found.size),
            "latency_ms": dict(zip(("median", "p5", "p95"), quantiles))}
