"""The data packets of a Blackrock ``.nev``, a window at a time, checked, without neo.

Packets are read through a numpy structured dtype over ``numpy.memmap``, ``_SCAN_PACKETS`` at
a time (27 MB of 104-byte packets), so memory does not grow with the file's length: each
window is mapped, its fields are copied out ``_BLOCK_PACKETS`` at a time (small enough that the
copies stay in the CPU cache) into arrays reused for every window, and the window is unmapped
before the next one. Each window is checked before it is handed on: every packet id must be 0
(digital event), an electrode listed in the NEUEVWAV headers, or a system event
(:data:`SYSTEM_PACKET_IDS`, spec 2.3 and 3.0), and time must never go backwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

__all__ = ["SYSTEM_PACKET_IDS", "PAYLOAD_FIELDS", "check_packets", "iterate_packets", "find_digital_events",
           "find_spikes"]

SYSTEM_PACKET_IDS = np.arange(0xFFFB, 0x10000)  # comments, video sync, tracking, button, config
PAYLOAD_FIELDS = ("unit_or_reason", "word")
_SCAN_PACKETS = 1 << 18
_BLOCK_PACKETS = 1 << 14


def _make_packet_dtype(facts: dict) -> np.dtype:
    """One data packet: timestamp, packet id, unit class or insertion reason, first payload word."""
    prefix = 12 if facts["version"] == "3.0" else 8
    stamp = "<u8" if facts["version"] == "3.0" else "<u4"
    return np.dtype({"names": ["timestamp", "packet_id", *PAYLOAD_FIELDS],
                     "formats": [stamp, "<u2", "u1", "<u2"], "offsets": [0, prefix - 4, prefix - 2, prefix],
                     "itemsize": facts["packet_bytes"]})


def _make_allowed_ids(facts: dict) -> np.ndarray:
    """bool ``(65536,)``: which packet ids may occur (0, the header's electrodes, system events from 2.3)."""
    allowed = np.zeros(1 << 16, dtype=bool)
    allowed[[0, *facts["electrodes"]]] = True
    if facts["version"] != "2.2":
        allowed[SYSTEM_PACKET_IDS] = True
    return allowed


def _check_window(path: Path, first: int, ticks: np.ndarray, ids: np.ndarray, allowed: np.ndarray,
                  previous: int) -> None:
    """Refuse unknown packet ids and time going backwards in the window starting at packet ``first``."""
    known = allowed[ids]
    if not known.all():
        index = int(np.argmin(known))
        raise ValueError(
            f"recording {str(path)!r}: data packet {first + index} has packet id {int(ids[index])}, neither an "
            "electrode listed in the header nor a known event type (corrupt file, or spikes on electrodes missing "
            "from the NEUEVWAV headers)."
        )
    if ticks[0] < previous or (ticks[1:] < ticks[:-1]).any():
        backwards = np.flatnonzero(np.diff(ticks, prepend=previous) < 0)[0]
        raise ValueError(
            f"recording {str(path)!r}: time goes backwards at data packet {first + int(backwards)} "
            "(corrupt file, or a clock reset: ingest each continuous part separately)."
        )


def iterate_packets(path: Path, facts: dict, *, fields: tuple[str, ...] = PAYLOAD_FIELDS) -> Iterator[tuple]:
    """Yield the data packets a window at a time as ``(ticks, packet ids, *fields)``.

    ``facts``: :func:`~closedloop.data.nev_header.read_nev_header`'s. ``ticks`` int64 and packet
    ids uint16, ``(n_window,)``; ``fields``, among :data:`PAYLOAD_FIELDS`: ``"unit_or_reason"``
    uint8 (a spike's unit class, an event's insertion reason) and ``"word"`` uint16 (the first
    payload word: an event's digital word), each ``(n_window,)``. Every window is checked (see
    the module docstring) before it is yielded. The arrays are reused for the next window: copy
    what you keep.
    """
    dtype = _make_packet_dtype(facts)
    names = ("timestamp", "packet_id", *fields)
    allowed = _make_allowed_ids(facts)
    n_packets, size = facts["n_packets"], min(_SCAN_PACKETS, facts["n_packets"])
    buffers = [np.empty(size, np.int64), *[np.empty(size, dtype.fields[name][0]) for name in names[1:]]]
    previous = 0
    for first in range(0, n_packets, _SCAN_PACKETS):
        size = min(_SCAN_PACKETS, n_packets - first)
        window = np.memmap(path, dtype=dtype, mode="r", offset=facts["header_bytes"] + first * facts["packet_bytes"],
                           shape=(size,))
        arrays = [buffer[:size] for buffer in buffers]
        for low in range(0, size, _BLOCK_PACKETS):
            block = window[low : low + _BLOCK_PACKETS]
            for name, array in zip(names, arrays):
                np.copyto(array[low : low + len(block)], block[name], casting="unsafe")
        del window, block
        _check_window(path, first, arrays[0], arrays[1], allowed, previous)
        previous = int(arrays[0][-1])
        yield tuple(arrays)


def find_spikes(ids: np.ndarray) -> np.ndarray:
    """bool ``(n,)``: which packets, by packet id uint16 ``(n,)``, are spikes (ids 1..0xFFFA)."""
    return (ids - np.uint16(1)) < np.uint16(SYSTEM_PACKET_IDS[0] - 1)


def find_digital_events(ids: np.ndarray, reasons: np.ndarray, version: str) -> np.ndarray:
    """bool ``(n,)``: which packets are words on the digital input port, as neo reads them.

    ``ids`` uint16 and ``reasons`` uint8 (insertion reason) ``(n,)``: packet id 0 with reason 1
    (spec 2.2), or with bit 0 set and bit 7 (serial port) clear (2.3, 3.0).
    """
    if version == "2.2":
        return (ids == 0) & (reasons == 1)
    return (ids == 0) & ((reasons & 0x81) == 1)


def check_packets(path: Path, facts: dict) -> None:
    """Check every data packet's id and time (see the module docstring), reading only those two fields."""
    for _ in iterate_packets(path, facts, fields=()):
        pass
