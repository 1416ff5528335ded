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
from typing import NamedTuple

import numpy as np

__all__ = ["SYSTEM_PACKET_IDS", "PacketWindow", "check_packets", "iterate_packets", "find_digital_events",
           "find_spikes"]

SYSTEM_PACKET_IDS = np.arange(0xFFFB, 0x10000)  # comments, video sync, tracking, button, config
_FIELDS = ("timestamp", "packet_id", "unit_or_reason")
_SCAN_PACKETS = 1 << 18
_BLOCK_PACKETS = 1 << 14


class PacketWindow(NamedTuple):
    """Consecutive data packets of a ``.nev``.

    ``ticks`` int64, ``ids`` uint16 (packet id: 0 for an event, the electrode for a spike),
    ``units`` uint8 (a spike's unit class, an event's insertion reason), each ``(n,)``;
    ``events`` int64 ``(n_events,)``: the positions of the event packets (id 0) in the window;
    ``words`` uint16 ``(n_events,)``: their first payload word (the digital word).
    """

    ticks: np.ndarray
    ids: np.ndarray
    units: np.ndarray
    events: np.ndarray
    words: np.ndarray


def _make_packet_dtype(facts: dict) -> np.dtype:
    """One data packet: timestamp, packet id, unit class or insertion reason, first payload word."""
    prefix = 12 if facts["version"] == "3.0" else 8
    stamp = "<u8" if facts["version"] == "3.0" else "<u4"
    return np.dtype({"names": [*_FIELDS, "word"], "formats": [stamp, "<u2", "u1", "<u2"],
                     "offsets": [0, prefix - 4, prefix - 2, prefix], "itemsize": facts["packet_bytes"]})


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


def iterate_packets(path: Path, facts: dict) -> Iterator[PacketWindow]:
    """Yield the data packets a window at a time (:class:`PacketWindow`), in file order.

    ``facts``: :func:`~closedloop.data.nev_header.read_nev_header`'s. Every window is checked
    (see the module docstring) before it is yielded. The window's ``ticks``, ``ids`` and
    ``units`` arrays are reused for the next window: copy what you keep.
    """
    dtype = _make_packet_dtype(facts)
    allowed = _make_allowed_ids(facts)
    n_packets, size = facts["n_packets"], min(_SCAN_PACKETS, facts["n_packets"])
    buffers = [np.empty(size, np.int64), np.empty(size, np.uint16), np.empty(size, np.uint8)]
    previous = 0
    for first in range(0, n_packets, _SCAN_PACKETS):
        size = min(_SCAN_PACKETS, n_packets - first)
        window = np.memmap(path, dtype=dtype, mode="r", offset=facts["header_bytes"] + first * facts["packet_bytes"],
                           shape=(size,))
        ticks, ids, units = (buffer[:size] for buffer in buffers)
        for low in range(0, size, _BLOCK_PACKETS):
            block = window[low : low + _BLOCK_PACKETS]
            for name, array in zip(_FIELDS, (ticks, ids, units)):
                np.copyto(array[low : low + len(block)], block[name], casting="unsafe")
        events = np.flatnonzero(ids == 0)
        words = np.array(window["word"][events])
        del window, block
        _check_window(path, first, ticks, ids, allowed, previous)
        previous = int(ticks[-1])
        yield PacketWindow(ticks, ids, units, events, words)


def find_spikes(ids: np.ndarray) -> np.ndarray:
    """bool ``(n,)``: which packets, by packet id uint16 ``(n,)``, are spikes (ids 1..0xFFFA)."""
    return (ids - np.uint16(1)) < np.uint16(SYSTEM_PACKET_IDS[0] - 1)


def find_digital_events(reasons: np.ndarray, version: str) -> np.ndarray:
    """bool ``(n_events,)``: which event packets, by insertion reason uint8 ``(n_events,)``, are
    words on the digital input port, as neo reads them: reason 1 (spec 2.2), or bit 0 set and
    bit 7 (serial port) clear (2.3, 3.0)."""
    if version == "2.2":
        return reasons == 1
    return (reasons & 0x81) == 1


def check_packets(path: Path, facts: dict) -> None:
    """Check every data packet's id and time (see the module docstring)."""
    for _ in iterate_packets(path, facts):
        pass
