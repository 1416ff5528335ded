"""The headers of a Blackrock ``.nev``, read and checked without neo.

A NEV file is a 336-byte basic header (``NEURALEV``; ``BREVENTS`` for spec 3.0), 32-byte
extended headers (one ``NEUEVWAV`` per recorded electrode among them), then fixed-size data
packets. :func:`read_nev_header` checks that layout against the file's size and returns the
facts the packet scanner (:mod:`closedloop.data.nev_scan`) and the reader
(:mod:`closedloop.data.nev`) need.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from closedloop.core.validation import check_file

__all__ = ["NEV_VERSIONS", "BASIC_HEADER_BYTES", "EXTENDED_HEADER_BYTES", "check_nev_path", "read_nev_header"]

NEV_VERSIONS = ("2.2", "2.3", "3.0")
_NEV_MAGIC = (b"NEURALEV", b"BREVENTS")
BASIC_HEADER_BYTES = 336
EXTENDED_HEADER_BYTES = 32
_SYSTEMTIME = ("year", "month", "weekday", "day", "hour", "minute", "second", "ms")
_BASIC_HEADER = np.dtype([("magic", "S8"), ("major", "u1"), ("minor", "u1"), ("flags", "<u2"), ("header_bytes", "<u4"),
                          ("packet_bytes", "<u4"), ("resolution", "<u4"), ("sample_resolution", "<u4"),
                          *[(name, "<u2") for name in _SYSTEMTIME]])
_EXTENDED_HEADER = np.dtype([("id", "S8"), ("electrode", "<u2"), ("rest", "S22")])


def check_nev_path(path) -> Path:
    """``path`` resolved, if it names an existing file ending in ``.nev``; an error naming it otherwise."""
    path = check_file("recording", path).resolve()
    if path.suffix != ".nev":
        raise ValueError(f"recording {str(path)!r} must be a Blackrock .nev file (name ending in .nev).")
    return path


def _read_basic_header(path: Path) -> np.void:
    with path.open("rb") as handle:
        raw = handle.read(_BASIC_HEADER.itemsize)
    if len(raw) < _BASIC_HEADER.itemsize or np.frombuffer(raw, dtype=_BASIC_HEADER)[0]["magic"] not in _NEV_MAGIC:
        raise ValueError(
            f"recording {str(path)!r} is not a Blackrock NEV file (it does not start with NEURALEV or BREVENTS); "
            "give the .nev the NSP wrote."
        )
    return np.frombuffer(raw, dtype=_BASIC_HEADER)[0]


def _find_layout_problem(version: str, size: int, header_bytes: int, packet_bytes: int, allow_truncated: bool) -> str:
    """What is wrong with the layout the basic header gives (``""``: nothing); ``size`` in bytes."""
    if version not in NEV_VERSIONS:
        return f"file specification {version} is not supported (allowed: {', '.join(NEV_VERSIONS)})"
    if size < BASIC_HEADER_BYTES:
        return f"the file ends after {size} bytes, inside the 336-byte basic header (truncated)"
    if packet_bytes < 20 or packet_bytes > 1024 or packet_bytes % 2:
        return f"the header gives {packet_bytes} bytes per data packet (corrupt header)"
    if header_bytes < BASIC_HEADER_BYTES or (header_bytes - BASIC_HEADER_BYTES) % EXTENDED_HEADER_BYTES:
        return f"the header size {header_bytes} is not 336 + 32 × n (corrupt header)"
    if header_bytes > size:
        return f"the headers need {header_bytes} bytes but the file has {size} (truncated)"
    leftover = (size - header_bytes) % packet_bytes
    if leftover and not allow_truncated:
        return (
            f"the file ends {leftover} bytes into a {packet_bytes}-byte data packet (truncated or corrupt); "
            "to drop the partial packet, run `closedloop ingest` with --allow-truncated"
        )
    return ""


def _read_time_origin(header: np.void) -> datetime | None:
    """The header's time origin (Windows SYSTEMTIME, UTC: when the recording's clock started), or
    None when the NSP left it empty or invalid."""
    values = {name: int(header[name]) for name in _SYSTEMTIME}
    try:
        return datetime(values["year"], values["month"], values["day"], values["hour"], values["minute"],
                        values["second"], values["ms"] * 1000, tzinfo=UTC)
    except ValueError:
        return None


def read_nev_header(path: Path, allow_truncated: bool) -> dict:
    """Check the published NEV layout (magic, version, sizes) and return the header's facts.

    Reads only the headers. Returns ``{"version": "2.2" | "2.3" | "3.0", "header_bytes",
    "packet_bytes" (bytes), "resolution" (clock, Hz), "electrodes" (sorted ids of the NEUEVWAV
    headers), "n_packets" (whole data packets), "time_origin" (UTC ``datetime`` at which the
    clock started, or None if the header has none)}``. Anything that does not add up raises
    ``ValueError`` naming the file and the problem; a partial last packet is dropped only with
    ``allow_truncated``.
    """
    header = _read_basic_header(path)
    size = path.stat().st_size
    version = f"{header['major']}.{header['minor']}"
    packet_bytes, header_bytes = int(header["packet_bytes"]), int(header["header_bytes"])
    problem = _find_layout_problem(version, size, header_bytes, packet_bytes, allow_truncated)
    if problem:
        raise ValueError(f"recording {str(path)!r}: {problem}.")
    if header["resolution"] == 0:
        raise ValueError(f"recording {str(path)!r}: the header gives a 0 Hz clock (corrupt header).")
    n_extended = (header_bytes - BASIC_HEADER_BYTES) // EXTENDED_HEADER_BYTES
    extended = np.fromfile(path, dtype=_EXTENDED_HEADER, count=n_extended, offset=BASIC_HEADER_BYTES)
    electrodes = tuple(sorted(int(e) for e in extended["electrode"][extended["id"] == b"NEUEVWAV"]))
    return {"version": version, "header_bytes": header_bytes, "packet_bytes": packet_bytes,
            "resolution": float(header["resolution"]), "electrodes": electrodes,
            "n_packets": (size - header_bytes) // packet_bytes, "time_origin": _read_time_origin(header)}
