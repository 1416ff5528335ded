"""Read a Blackrock ``.nev`` into a :class:`~closedloop.data.recording.Recording`.

The ``.nev`` is the authoritative record of a day: spikes (electrode, unit class, time) and the
words on the digital input port that mark stimulus onsets. Two engines read it and give the same
recording: ``"stream"`` (the default) reads the packets itself, a window at a time
(:mod:`closedloop.data.nev_scan`); ``"neo"``, the reference, goes through
``neo.rawio.BlackrockRawIO``. Either way the headers (:mod:`closedloop.data.nev_header`) and
every packet's id and time are checked first, so a damaged file is refused with a message that
names the problem instead of one of neo's.
"""

from __future__ import annotations

import gc
import warnings
from pathlib import Path

import numpy as np
from neo.rawio import BlackrockRawIO

from closedloop.core.logs import logger
from closedloop.core.validation import check_option
from closedloop.data.nev_header import check_nev_path, read_nev_header
from closedloop.data.nev_scan import check_packets, find_digital_events, find_spikes, iterate_packets
from closedloop.data.recording import Recording

__all__ = ["read_nev", "NEV_ENGINES"]

NEV_ENGINES = ("stream", "neo")


def _release(reader) -> None:
    """Close what neo's reader holds open (cached .nsX handles, memory maps)."""
    for handle in getattr(reader, "_nsx_fids", {}).values():  # neo caches .nsX handles without closing them
        handle.close()


def _extract(reader, facts: dict, path: Path) -> Recording:
    """The one segment of a parsed reader as a recording: spikes in time order, digital input port events."""
    if reader.header["nb_segment"][0] != 1:
        raise ValueError(
            f"recording {str(path)!r} has {reader.header['nb_segment'][0]} segments (the recording was paused or "
            "reset); closedloop ingests one continuous segment per file."
        )
    segment = reader.raw_annotations["blocks"][0]["segments"][0]
    ticks, electrodes, units = [], [], []
    for index in range(reader.spike_channels_count()):
        found = np.asarray(reader.get_spike_timestamps(block_index=0, seg_index=0, spike_channel_index=index),
                           dtype=np.int64)
        annotation = segment["spikes"][index]
        ticks.append(found)
        electrodes.append(np.full(found.shape, int(annotation["channel_id"]), dtype=np.int64))
        units.append(np.full(found.shape, int(annotation["unit_id"]), dtype=np.int64))
    names = list(reader.header["event_channels"]["name"])
    event_ticks, words = np.zeros(0, np.int64), np.zeros(0, np.uint16)
    if "digital_input_port" in names:
        found, _, labels = reader.get_event_timestamps(block_index=0, seg_index=0,
                                                       event_channel_index=names.index("digital_input_port"))
        event_ticks, words = np.asarray(found, dtype=np.int64), np.asarray(labels).astype(np.int64).astype(np.uint16)
    spike_ticks = np.concatenate(ticks) if ticks else np.zeros(0, np.int64)
    order = np.argsort(spike_ticks, kind="stable")
    return Recording.from_ticks(
        spike_ticks[order],
        (np.concatenate(electrodes) if electrodes else np.zeros(0, np.int64))[order],
        (np.concatenate(units) if units else np.zeros(0, np.int64))[order],
        event_ticks, words, facts["electrodes"], sampling_rate_hz=facts["resolution"], source=str(path),
    )


def _read_packets(path: Path, facts: dict) -> Recording:
    """The recording from one pass over the packets (spikes ordered by time, then electrode and unit, as neo's)."""
    spikes = [(np.zeros(0, np.int64), np.zeros(0, np.uint16), np.zeros(0, np.uint8))]
    events = [(np.zeros(0, np.int64), np.zeros(0, np.uint16))]
    for window in iterate_packets(path, facts):
        spike = find_spikes(window.ids)
        spikes.append((window.ticks[spike], window.ids[spike], window.units[spike]))
        digital = find_digital_events(window.units[window.events], facts["version"])
        events.append((window.ticks[window.events[digital]], window.words[digital]))
    spike_ticks, electrodes, units = (np.concatenate(column) for column in zip(*spikes))
    event_ticks, words = (np.concatenate(column) for column in zip(*events))
    order = np.lexsort((units, electrodes, spike_ticks))
    return Recording.from_ticks(spike_ticks[order], electrodes[order], units[order], event_ticks, words,
                                facts["electrodes"], sampling_rate_hz=facts["resolution"], source=str(path))


def _read_with_neo(path: Path, facts: dict) -> Recording:
    """The recording through ``neo.rawio.BlackrockRawIO`` (packets already checked); its warnings are logged."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reader = BlackrockRawIO(filename=str(path))
        try:
            reader.parse_header()
            recording = _extract(reader, facts, path)
        except ValueError:
            raise
        except Exception as error:  # neo raises many types for bad files; report them as bad input
            raise ValueError(f"recording {str(path)!r}: neo could not read it ({type(error).__name__}: {error}).") from None
        finally:
            _release(reader)
            del reader
            gc.collect()
    for warning in caught:
        logger.warning("%s: %s", path.name, warning.message)
    return recording


def read_nev(path: str | Path, *, allow_truncated: bool = False, engine: str = "stream") -> Recording:
    """Read a Blackrock ``.nev`` (spec 2.2, 2.3 or 3.0) into a :class:`Recording`.

    ``engine``: ``"stream"`` reads the data packets with numpy, a memory-mapped window at a
    time (:mod:`closedloop.data.nev_scan`); ``"neo"`` reads them through
    ``neo.rawio.BlackrockRawIO`` (the reference; ``.nsX`` files next to the ``.nev`` are then
    used by neo to check segments, and not required). Both give the same recording: spikes in
    time order (ties by electrode, then unit), and every word on the digital input port. File
    handles are released before returning. A file that is not a NEV, a truncated or corrupt one
    (partial last packet, unknown packet ids, time going backwards) or one with several segments
    raises ``ValueError`` naming the file and the problem. ``allow_truncated`` drops a partial last
    packet instead (Blackrock's own tools do so).
    """
    check_option("engine", engine, NEV_ENGINES)
    path = check_nev_path(path)
    facts = read_nev_header(path, allow_truncated)
    if engine == "stream":
        recording = _read_packets(path, facts)
    else:
        check_packets(path, facts)
        recording = _read_with_neo(path, facts)
    logger.info("read %s: NEV %s, %d electrodes, %d spikes, %d digital events", path.name, facts["version"],
                len(recording.electrodes), recording.n_spikes, recording.n_events)
    return recording
