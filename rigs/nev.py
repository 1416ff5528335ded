"""Write a :class:`~closedloop.data.recording.Recording` as a Blackrock ``.nev`` (and optional ``.ns2``).

The files follow Blackrock's published NEV/NSx layout (file specifications 2.2, 2.3 and 3.0),
so ``neo.rawio.BlackrockRawIO`` and Blackrock's own tools read them:

- a 336-byte basic header (``NEURALEV``; ``BREVENTS`` for 3.0) with the "all waveforms are
  16-bit" flag set, the header size, the packet size and the 30 kHz clock;
- per electrode a 32-byte ``NEUEVWAV`` extended header (electrode id, digitization factor,
  2 bytes per waveform sample, spike width) and a 32-byte ``NEUEVLBL`` label header;
- fixed-size data packets in time order: timestamp (uint32; uint64 for 3.0), packet id (the
  electrode for a spike, 0 for a digital event), then for a spike the unit class and a 48-sample
  int16 waveform, for a digital event the insertion reason 1 (digital input port) and the 16-bit
  word.

The simulated rig uses :func:`write_nev` to export what it recorded; the tests use it to build
recordings with known spikes and codes, and :func:`write_nsx` to write continuous signals (an
``.ns2`` beside a ``.nev``, a photodiode on an analog input in an ``.ns5``).
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from closedloop.core.files import atomic_path
from closedloop.core.validation import check_integer, check_option
from closedloop.data.nev_header import BASIC_HEADER_BYTES, EXTENDED_HEADER_BYTES, NEV_VERSIONS
from closedloop.data.recording import Recording

__all__ = ["write_nev", "write_nsx", "NEV_VERSIONS", "SPIKE_WIDTH"]

SPIKE_WIDTH = 48
NS2_PERIOD = 30  # ticks of the 30 kHz clock per sample: 1 kS/s
DIGITAL_INPUT_REASON = 1
DIGITIZATION_NV = 250  # nV per waveform bit
_MAX_ELECTRODE = {"2.2": 255, "2.3": 2048, "3.0": 2048}
_CHUNK_PACKETS = 1 << 18

_SYSTEMTIME = [(name, "<u2") for name in ("year", "month", "weekday", "day", "hour", "minute", "second", "ms")]
_NEV_BASIC = np.dtype([
    ("file_type_id", "S8"), ("ver_major", "u1"), ("ver_minor", "u1"), ("flags", "<u2"),
    ("bytes_in_headers", "<u4"), ("bytes_in_data_packets", "<u4"), ("timestamp_resolution", "<u4"),
    ("sample_resolution", "<u4"), *_SYSTEMTIME, ("application", "S32"), ("comment", "S256"),
    ("n_extended_headers", "<u4"),
])
_NEUEVWAV = np.dtype([
    ("packet_id", "S8"), ("electrode_id", "<u2"), ("physical_connector", "u1"), ("connector_pin", "u1"),
    ("digitization_factor", "<u2"), ("energy_threshold", "<u2"), ("hi_threshold", "<i2"), ("lo_threshold", "<i2"),
    ("n_sorted_units", "u1"), ("bytes_per_waveform", "u1"), ("spike_width", "<u2"), ("unused", "S8"),
])
_NEUEVLBL = np.dtype([("packet_id", "S8"), ("electrode_id", "<u2"), ("label", "S16"), ("unused", "S6")])
_NSX_BASIC = np.dtype([
    ("file_id", "S8"), ("ver_major", "u1"), ("ver_minor", "u1"), ("bytes_in_headers", "<u4"), ("label", "S16"),
    ("comment", "S256"), ("period", "<u4"), ("timestamp_resolution", "<u4"), *_SYSTEMTIME, ("channel_count", "<u4"),
])
_NSX_CHANNEL = np.dtype([
    ("type", "S2"), ("electrode_id", "<u2"), ("electrode_label", "S16"), ("physical_connector", "u1"),
    ("connector_pin", "u1"), ("min_digital_val", "<i2"), ("max_digital_val", "<i2"), ("min_analog_val", "<i2"),
    ("max_analog_val", "<i2"), ("units", "S16"), ("hi_freq_corner", "<u4"), ("hi_freq_order", "<u4"),
    ("hi_freq_type", "<u2"), ("lo_freq_corner", "<u4"), ("lo_freq_order", "<u4"), ("lo_freq_type", "<u2"),
])
assert _NEV_BASIC.itemsize == BASIC_HEADER_BYTES and _NEUEVWAV.itemsize == _NEUEVLBL.itemsize == EXTENDED_HEADER_BYTES
assert _NSX_BASIC.itemsize == 314 and _NSX_CHANNEL.itemsize == 66


def _packet_dtype(version: str) -> np.dtype:
    """One data packet: 8-byte prefix (12 for 3.0), then 48 int16 samples (or the digital word)."""
    timestamp = "<u8" if version == "3.0" else "<u4"
    return np.dtype([
        ("timestamp", timestamp), ("packet_id", "<u2"), ("unit_or_reason", "u1"), ("reserved", "u1"),
        ("samples", "<i2", (SPIKE_WIDTH,)),
    ])


def _waveform_template() -> np.ndarray:
    """A plausible extracellular spike, int16 ``(48,)`` in digitization steps."""
    t = np.arange(SPIKE_WIDTH, dtype=np.float64)
    shape = -240.0 * np.exp(-(((t - 10.0) / 2.0) ** 2)) + 80.0 * np.exp(-(((t - 17.0) / 5.0) ** 2))
    return np.rint(shape).astype(np.int16)


def _systemtime(header: np.ndarray, when: datetime) -> None:
    values = dict(year=when.year, month=when.month, weekday=(when.weekday() + 1) % 7, day=when.day, hour=when.hour,
                  minute=when.minute, second=when.second, ms=when.microsecond // 1000)
    for name, value in values.items():
        header[name] = value


def _version_numbers(version: str) -> tuple[int, int]:
    major, minor = version.split(".")
    return int(major), int(minor)


def _check_recording(recording: Recording, version: str) -> None:
    if not isinstance(recording, Recording):
        raise TypeError(f"'recording' must be a closedloop Recording, but got {type(recording).__name__}.")
    if recording.sampling_rate_hz != 30000.0:
        raise ValueError(
            f"'recording.sampling_rate_hz' = {recording.sampling_rate_hz:g}; Blackrock files use the 30000 Hz clock."
        )
    too_high = [e for e in recording.electrodes if e > _MAX_ELECTRODE[version]]
    if too_high:
        raise ValueError(
            f"electrodes {too_high[:5]} do not fit NEV {version} (electrode ids 1..{_MAX_ELECTRODE[version]}); "
            "write version 2.3 or 3.0."
        )
    last = max(int(recording.spike_ticks.max(initial=0)), int(recording.event_ticks.max(initial=0)))
    if version != "3.0" and last >= 2**32:
        raise ValueError(
            f"the recording lasts {last / 30000.0:.0f} s, beyond the 32-bit clock of NEV {version} (39.7 h); write 3.0."
        )


def _write_atomically(path: Path, write) -> Path:
    with atomic_path(path) as temporary, temporary.open("wb") as handle:
        write(handle)
    return path


def _nev_headers(recording: Recording, version: str, packet_bytes: int, when: datetime) -> bytes:
    electrodes = np.array(recording.electrodes, dtype=np.uint16)
    waveforms = np.zeros(len(electrodes), dtype=_NEUEVWAV)
    waveforms["packet_id"] = b"NEUEVWAV"
    waveforms["electrode_id"] = electrodes
    waveforms["physical_connector"] = (electrodes - 1) // 128 + 1
    waveforms["connector_pin"] = (electrodes - 1) % 128 + 1
    waveforms["digitization_factor"] = DIGITIZATION_NV
    waveforms["hi_threshold"], waveforms["lo_threshold"] = 32767, -32767
    waveforms["bytes_per_waveform"] = 2
    waveforms["spike_width"] = SPIKE_WIDTH
    labels = np.zeros(len(electrodes), dtype=_NEUEVLBL)
    labels["packet_id"] = b"NEUEVLBL"
    labels["electrode_id"] = electrodes
    labels["label"] = [f"elec{e}".encode() for e in electrodes.tolist()]

    basic = np.zeros(1, dtype=_NEV_BASIC)
    basic["file_type_id"] = b"BREVENTS" if version == "3.0" else b"NEURALEV"
    basic["ver_major"], basic["ver_minor"] = _version_numbers(version)
    basic["flags"] = 1  # bit 0: every spike waveform is 16-bit
    basic["bytes_in_headers"] = BASIC_HEADER_BYTES + EXTENDED_HEADER_BYTES * 2 * len(electrodes)
    basic["bytes_in_data_packets"] = packet_bytes
    basic["timestamp_resolution"] = basic["sample_resolution"] = 30000
    _systemtime(basic, when)
    basic["application"] = b"closedloop rigs.nev"
    basic["comment"] = b"written by closedloop"
    basic["n_extended_headers"] = 2 * len(electrodes)
    return basic.tobytes() + waveforms.tobytes() + labels.tobytes()


def write_nev(
    path: str | Path,
    recording: Recording,
    *,
    version: str = "2.3",
    write_ns2: bool = False,
    recorded_at: datetime | None = None,
) -> Path:
    """Write ``recording`` as a Blackrock NEV file (spec ``version`` 2.2, 2.3 or 3.0); return its path.

    ``path`` must end in ``.nev``. Every spike gets the same 48-sample int16 waveform; events are
    digital-input packets carrying their 16-bit word. With ``write_ns2`` a small ``.ns2``
    (1 kS/s, one all-zero channel per electrode, covering the recording) is written next to it.
    Files are written atomically. ``recorded_at`` (UTC, default now) goes into the header.
    """
    check_option("version", version, NEV_VERSIONS)
    path = Path(path).expanduser()
    if path.suffix != ".nev":
        raise ValueError(f"'path' {str(path)!r} must end in .nev (Blackrock readers find files by extension).")
    _check_recording(recording, version)
    when = recorded_at or datetime.now(UTC)
    dtype = _packet_dtype(version)
    ticks = np.concatenate([recording.event_ticks, recording.spike_ticks])
    order = np.argsort(ticks, kind="stable")  # time order; at equal ticks an event precedes spikes
    n_events = recording.n_events
    template = _waveform_template()
    words = recording.event_words.view(np.int16)

    def write(handle) -> None:
        handle.write(_nev_headers(recording, version, dtype.itemsize, when))
        for start in range(0, len(order), _CHUNK_PACKETS):
            chosen = order[start : start + _CHUNK_PACKETS]
            packets = np.zeros(len(chosen), dtype=dtype)
            packets["timestamp"] = ticks[chosen]
            is_event = chosen < n_events
            event_rows, spike_rows = chosen[is_event], chosen[~is_event] - n_events
            packets["unit_or_reason"][is_event] = DIGITAL_INPUT_REASON
            packets["samples"][is_event, 0] = words[event_rows]
            packets["packet_id"][~is_event] = recording.spike_electrodes[spike_rows]
            packets["unit_or_reason"][~is_event] = recording.spike_units[spike_rows]
            packets["samples"][~is_event] = template
            handle.write(packets.tobytes())

    _write_atomically(path, write)
    if write_ns2:
        last = max(int(recording.spike_ticks.max(initial=0)), int(recording.event_ticks.max(initial=0)))
        write_nsx(path.with_suffix(".ns2"), np.zeros((last // NS2_PERIOD + 2, len(recording.electrodes)), np.int16),
                  recording.electrodes, period=NS2_PERIOD, version=version, recorded_at=when)
    return path


def write_nsx(
    path: str | Path,
    signals,
    channel_ids,
    *,
    labels=None,
    period: int = NS2_PERIOD,
    first_tick: int = 0,
    units: str = "uV",
    analog_max: int = 8191,
    version: str = "2.3",
    recorded_at: datetime | None = None,
) -> Path:
    """Write continuous signals as a Blackrock ``.nsX`` (spec ``version`` 2.2, 2.3 or 3.0); return its path.

    ``signals`` int16 ``(n_samples, n_channels)`` in digitization steps; ``channel_ids``: each
    channel's electrode id ``(n_channels,)`` (Blackrock numbers analog inputs after the
    electrodes, e.g. 129 = ``ainp1`` on a 128-channel NSP); ``labels`` (default ``elec<id>``);
    ``period``: ticks of the 30 kHz clock per sample (1 for a ``.ns5``/``.ns6`` at 30 kS/s, 30
    for a ``.ns2`` at 1 kS/s); ``first_tick``: the clock tick of the first sample; ``units`` and
    ``analog_max``: the physical value (in ``units``) of digital ±32764. One data block, written
    atomically.
    """
    check_option("version", version, NEV_VERSIONS)
    period = check_integer("period", period, minimum=1)
    first_tick = check_integer("first_tick", first_tick, minimum=0)
    path = Path(path).expanduser()
    if path.suffix not in tuple(f".ns{n}" for n in range(1, 7)):
        raise ValueError(f"'path' {str(path)!r} must end in .ns1 to .ns6 (Blackrock readers find files by extension).")
    signals = np.asarray(signals)
    channel_ids = np.asarray(channel_ids, dtype=np.uint16).reshape(-1)
    if signals.ndim != 2 or signals.shape[1] != len(channel_ids) or signals.dtype != np.int16:
        raise ValueError(f"'signals' must be int16 (n_samples, {len(channel_ids)}), one column per channel id, but got "
                         f"{signals.dtype} {signals.shape}.")
    labels = [f"elec{e}" for e in channel_ids.tolist()] if labels is None else list(labels)
    basic = np.zeros(1, dtype=_NSX_BASIC)
    basic["file_id"] = b"BRSMPGRP" if version == "3.0" else b"NEURALCD"
    basic["ver_major"], basic["ver_minor"] = _version_numbers(version)
    basic["bytes_in_headers"] = _NSX_BASIC.itemsize + _NSX_CHANNEL.itemsize * len(channel_ids)
    basic["label"] = f"{30 / period:g} kS/s".encode()
    basic["period"] = period
    basic["timestamp_resolution"] = 30000
    _systemtime(basic, recorded_at or datetime.now(UTC))
    basic["channel_count"] = len(channel_ids)
    channels = np.zeros(len(channel_ids), dtype=_NSX_CHANNEL)
    channels["type"] = b"CC"
    channels["electrode_id"] = channel_ids
    channels["electrode_label"] = [label.encode() for label in labels]
    channels["physical_connector"] = (channel_ids - 1) // 128 + 1
    channels["connector_pin"] = (channel_ids - 1) % 128 + 1
    channels["min_digital_val"], channels["max_digital_val"] = -32764, 32764
    channels["min_analog_val"], channels["max_analog_val"] = -analog_max, analog_max
    channels["units"] = units.encode()
    block = np.dtype([("header_flag", "u1"), ("timestamp", "<u8" if version == "3.0" else "<u4"),
                      ("nb_data_points", "<u4")])
    block_header = np.array([(1, first_tick, len(signals))], dtype=block)

    def write(handle) -> None:
        handle.write(basic.tobytes() + channels.tobytes() + block_header.tobytes())
        handle.write(np.ascontiguousarray(signals, dtype="<i2").tobytes())

    return _write_atomically(path, write)
