"""The data packets of a Blackrock ``.nev``, a window at a time, checked, without neo.

Packets are mapped with ``numpy.memmap`` ``_SCAN_PACKETS`` at a time, so memory does not grow
with the file's length. Each window is checked before it is handed on: every packet id must be
0 (digital event), an electrode listed in the NEUEVWAV headers, or a system event
(:data:`SYSTEM_PACKET_IDS`, spec 2.3 and 3.0), and time must never go backwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

__all__ = ["SYSTEM_PACKET_IDS", "PAYLOAD_FIELDS", "check_packets", "iterate_packets"]

SYSTEM_PACKET_IDS = np.arange(0xFFFB, 0x10000)  # comments, video sync, tracking, button, config
PAYLOAD_FIELDS = ("unit_or_reason", "word")
_SCAN_PACKETS = 1 << 18


def _make_packet_dtype(facts: dict) -> np.dtype:
    """One data packet: timestamp, packet id, unit class or insertion reason, first payload word."""
    prefix = 12 if facts["version"] == "3.0" else 8
    stamp = "<u8" if facts["version"] == "3.0" else "<u4"
    return np.dtype({"names": ["timestamp", "packet_id", *PAYLOAD_FIELDS],
                     "formats": [stamp, "<u2", "u1", "<u2"], "offsets": [0, prefix - 4, prefix - 2, prefix],
                     "itemsize": facts["packet_bytes"]})


def _check_window(path: Path, first: int, ticks: np.ndarray, ids: np.ndarray, allowed: np.ndarray,
                  previous: int) -> None:
    """Refuse unknown packet ids and time going backwards in the window starting at packet ``first``."""
    unknown = ~np.isin(ids, allowed)
    if unknown.any():
        raise ValueError(
            f"recording {str(path)!r}: data packet {first + int(np.flatnonzero(unknown)[0])} has packet id "
            f"{int(ids[unknown][0])}, neither an electrode listed in the header nor a known event type (corrupt "
            "file, or spikes on electrodes missing from the NEUEVWAV headers)."
        )
    backwards = np.flatnonzero(np.diff(np.concatenate([[previous], ticks])) < 0)
    if backwards.size:
        raise ValueError(
            f"recording {str(path)!r}: time goes backwards at data packet {first + int(backwards[0])} "
            "(corrupt file, or a clock reset: ingest each continuous part separately)."
        )


def iterate_packets(path: Path, facts: dict, *, fields: tuple[str, ...] = PAYLOAD_FIELDS) -> Iterator[tuple]:
    """Yield the data packets a window at a time as ``(ticks, packet ids, *fields)``.

    ``facts``: :func:`~closedloop.data.nev_header.read_nev_header`'s. ``ticks`` int64 and packet
    ids uint16, ``(n_window,)``; ``fields``, among :data:`PAYLOAD_FIELDS`: ``"unit_or_reason"``
    uint8 (a spike's unit class, an event's insertion reason) and ``"word"`` uint16 (the first
    payload word: an event's digital word), each ``(n_window,)``. Every window is checked (see
    the module docstring) before it is yielded.
    """
    dtype = _make_packet_dtype(facts)
    allowed = np.concatenate([[0], facts["electrodes"], SYSTEM_PACKET_IDS if facts["version"] != "2.2" else []])
    previous = 0
    for first in range(0, facts["n_packets"], _SCAN_PACKETS):
        window = np.memmap(path, dtype=dtype, mode="r", offset=facts["header_bytes"] + first * facts["packet_bytes"],
                           shape=(min(_SCAN_PACKETS, facts["n_packets"] - first),))
        ticks, ids = window["timestamp"].astype(np.int64), np.array(window["packet_id"])
        payload = [np.array(window[name]) for name in fields]
        del window
        _check_window(path, first, ticks, ids, allowed, previous)
        previous = int(ticks[-1])
        yield ticks, ids, *payload


def check_packets(path: Path, facts: dict) -> None:
    """Check every data packet's id and time (see the module docstring), reading only those two fields."""
    for _ in iterate_packets(path, facts, fields=()):
        pass
