"""Blackrock ingest: read a ``.nev`` with neo, find stimulus onsets, count spikes per site.

The ``.nev`` is the authoritative record of a day. Each non-zero word on the digital input port
is a stimulus onset carrying that stimulus's event code; a zero word clears the strobe. A site's
response to a presentation is its number of spikes in ``[onset + start, onset + stop)``
(``window_s``, default 0.07–0.17 s), computed in integer clock ticks so that edges are exact.

:func:`write_day_counts` reconciles a recording with the day's presentation log in the day
store (codes, order, onset times within a tolerance) and stores the ``.nev`` counts next to the
live ones, reporting every mismatch instead of guessing.
"""

from __future__ import annotations

import gc
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

import numpy as np

from closedloop.core.files import compute_file_digest
from closedloop.core.logs import logger
from closedloop.core.validation import check_array, check_file, check_number, check_option
from closedloop.data.recording import Recording, compute_ticks
from closedloop.data.sites import SiteTable, make_default_sites
from closedloop.data.store import open_store
from closedloop.data.window import DEFAULT_WINDOW_S, check_window, compute_window_ticks

__all__ = [
    "Recording",
    "Onsets",
    "Reconciliation",
    "read_nev",
    "compute_onsets",
    "compute_counts",
    "compute_nev_counts",
    "compute_summary",
    "compute_reconciliation",
    "write_day_counts",
    "DEFAULT_WINDOW_S",
    "DEFAULT_TOLERANCE_S",
    "ENGINES",
]

DEFAULT_TOLERANCE_S = 0.010
ENGINES = ("neo", "stream")
SHIFT_SEARCH_S = 1.0
NEV_VERSIONS = ("2.2", "2.3", "3.0")
_NEV_MAGIC = (b"NEURALEV", b"BREVENTS")
_BASIC_HEADER_BYTES = 336
_EXTENDED_HEADER_BYTES = 32
_SYSTEM_PACKET_IDS = np.arange(0xFFFB, 0x10000)  # comments, video sync, tracking, button, config
_SCAN_PACKETS = 1 << 18
_KEY = 256  # spike key = electrode * 256 + unit class


class Onsets(NamedTuple):
    """Stimulus onsets: ``times_s`` float64 ``(n,)`` (s, recording clock), ``codes`` uint16 ``(n,)``."""

    times_s: np.ndarray
    codes: np.ndarray


# -- reading ----------------------------------------------------------------------------------
def _read_nev_header(path: Path, allow_truncated: bool) -> dict:
    """Check the published NEV layout (magic, version, sizes, packets) without neo; return header facts."""
    size = path.stat().st_size
    basic = np.dtype([("magic", "S8"), ("major", "u1"), ("minor", "u1"), ("flags", "<u2"), ("header_bytes", "<u4"),
                      ("packet_bytes", "<u4"), ("resolution", "<u4")])
    with path.open("rb") as handle:
        raw = handle.read(_BASIC_HEADER_BYTES)
    if len(raw) < basic.itemsize or np.frombuffer(raw[:basic.itemsize], dtype=basic)[0]["magic"] not in _NEV_MAGIC:
        raise ValueError(
            f"recording {str(path)!r} is not a Blackrock NEV file (it does not start with NEURALEV or BREVENTS); "
            "give the .nev the NSP wrote."
        )
    header = np.frombuffer(raw[:basic.itemsize], dtype=basic)[0]
    version = f"{header['major']}.{header['minor']}"
    problem = None
    if version not in NEV_VERSIONS:
        problem = f"file specification {version} is not supported (allowed: {', '.join(NEV_VERSIONS)})"
    elif size < _BASIC_HEADER_BYTES:
        problem = f"the file ends after {size} bytes, inside the 336-byte basic header (truncated)"
    packet_bytes, header_bytes = int(header["packet_bytes"]), int(header["header_bytes"])
    n_extended = (header_bytes - _BASIC_HEADER_BYTES) // _EXTENDED_HEADER_BYTES
    if problem is None and (packet_bytes < 20 or packet_bytes > 1024 or packet_bytes % 2):
        problem = f"the header gives {packet_bytes} bytes per data packet (corrupt header)"
    elif problem is None and (header_bytes < _BASIC_HEADER_BYTES or (header_bytes - _BASIC_HEADER_BYTES) % 32):
        problem = f"the header size {header_bytes} is not 336 + 32 × n (corrupt header)"
    elif problem is None and header_bytes > size:
        problem = f"the headers need {header_bytes} bytes but the file has {size} (truncated)"
    elif problem is None and (size - header_bytes) % packet_bytes:
        leftover = (size - header_bytes) % packet_bytes
        if not allow_truncated:
            problem = (
                f"the file ends {leftover} bytes into a {packet_bytes}-byte data packet (truncated or corrupt); "
                "pass allow_truncated=True to drop the partial packet"
            )
    if problem:
        raise ValueError(f"recording {str(path)!r}: {problem}.")
    if header["resolution"] == 0:
        raise ValueError(f"recording {str(path)!r}: the header gives a 0 Hz clock (corrupt header).")
    extended = np.fromfile(path, dtype=[("id", "S8"), ("electrode", "<u2"), ("rest", "S22")], count=n_extended,
                           offset=_BASIC_HEADER_BYTES)
    electrodes = tuple(sorted(int(e) for e in extended["electrode"][extended["id"] == b"NEUEVWAV"]))
    return {"version": version, "header_bytes": header_bytes, "packet_bytes": packet_bytes,
            "resolution": float(header["resolution"]), "electrodes": electrodes,
            "n_packets": (size - header_bytes) // packet_bytes}


def _iterate_packets(path: Path, facts: dict):
    """Yield the data packets a window at a time (memory independent of the file's length) as
    ``(ticks int64, packet ids, unit-or-reason bytes, first payload word)``, after checking every
    packet id and that time never goes backwards."""
    prefix = 12 if facts["version"] == "3.0" else 8
    stamp = "<u8" if facts["version"] == "3.0" else "<u4"
    dtype = np.dtype({"names": ["timestamp", "packet_id", "unit_or_reason", "word"],
                      "formats": [stamp, "<u2", "u1", "<u2"], "offsets": [0, prefix - 4, prefix - 2, prefix],
                      "itemsize": facts["packet_bytes"]})
    allowed = np.concatenate([[0], facts["electrodes"], _SYSTEM_PACKET_IDS if facts["version"] != "2.2" else []])
    previous = 0
    for first in range(0, facts["n_packets"], _SCAN_PACKETS):
        window = np.memmap(path, dtype=dtype, mode="r", offset=facts["header_bytes"] + first * facts["packet_bytes"],
                           shape=(min(_SCAN_PACKETS, facts["n_packets"] - first),))
        ticks, ids = window["timestamp"].astype(np.int64), np.array(window["packet_id"])
        units, words = np.array(window["unit_or_reason"]), np.array(window["word"])
        del window
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
        previous = int(ticks[-1])
        yield ticks, ids, units, words


def _release(reader) -> None:
    """Close what neo's reader holds open (cached .nsX handles, memory maps)."""
    for handle in getattr(reader, "_nsx_fids", {}).values():  # neo caches .nsX handles without closing them
        handle.close()


def _extract(reader, facts: dict, path: Path) -> Recording:
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


def read_nev(path: str | Path, *, allow_truncated: bool = False) -> Recording:
    """Read a Blackrock ``.nev`` (spec 2.2, 2.3 or 3.0) through ``neo.rawio.BlackrockRawIO``.

    ``.nsX`` files next to it are used by neo to check segments; they are not required. File
    handles are released before returning. A file that is not a NEV, a truncated or corrupt one
    (partial last packet, unknown packet ids, time going backwards) or one with several segments
    raises ``ValueError`` naming the file and the problem. ``allow_truncated`` drops a partial last
    packet instead (Blackrock's own tools do so).
    """
    from neo.rawio import BlackrockRawIO

    path = _check_nev_path(path)
    facts = _read_nev_header(path, allow_truncated)
    for _ in _iterate_packets(path, facts):
        pass
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
    logger.info("read %s: NEV %s, %d electrodes, %d spikes, %d digital events", path.name, facts["version"],
                len(recording.electrodes), recording.n_spikes, recording.n_events)
    return recording


# -- onsets and counts ------------------------------------------------------------------------
def compute_onsets(recording: Recording) -> Onsets:
    """Stimulus onsets: every non-zero word on the digital input port, in time order."""
    keep = recording.event_words != 0
    order = np.argsort(recording.event_ticks[keep], kind="stable")
    ticks = recording.event_ticks[keep][order]
    return Onsets(times_s=ticks / recording.sampling_rate_hz, codes=recording.event_words[keep][order])


def _spikes_per_electrode(recording: Recording) -> dict[int, int]:
    electrodes, n_spikes = np.unique(recording.spike_electrodes, return_counts=True)
    return dict(zip(electrodes.tolist(), n_spikes.tolist()))


def _check_unmapped(source: str, spikes_per_electrode: dict[int, int], sites: SiteTable, unmapped: str) -> None:
    check_option("unmapped", unmapped, ("error", "ignore"))
    missing = sorted(set(spikes_per_electrode) - set(sites.electrode.tolist()))
    if missing and unmapped == "error":
        n_spikes = sum(spikes_per_electrode[e] for e in missing)
        raise ValueError(
            f"recording {source or '(in memory)'!r}: {n_spikes} spikes on electrodes {missing[:10]} that are missing "
            "from the site map; add them to the site map, or ignore them (unmapped='ignore', --ignore-unmapped)."
        )


def compute_counts(
    recording: Recording,
    onset_times_s,
    *,
    window_s=DEFAULT_WINDOW_S,
    sites: SiteTable | None = None,
    unmapped: str = "error",
) -> np.ndarray:
    """Spikes per site in ``[onset + start, onset + stop)``: uint16 ``(n_presentations, n_sites)``.

    ``onset_times_s`` ``(n_presentations,)`` s on the recording clock (rounded to clock ticks);
    ``window_s`` (start, stop) s after onset; ``sites`` default: one site per electrode of the
    recording, units merged. Spikes on electrodes no site names raise ``ValueError`` unless
    ``unmapped="ignore"``.
    """
    window = check_window(window_s)
    sites = make_default_sites(recording.electrodes) if sites is None else sites
    _check_unmapped(recording.source, _spikes_per_electrode(recording), sites, unmapped)
    onsets = check_array("onset_times_s", onset_times_s, shape=(None,)).astype(np.float64)
    if not np.isfinite(onsets).all():
        raise ValueError("'onset_times_s' must be finite times in s on the recording clock.")
    onset_ticks = compute_ticks(onsets, recording.sampling_rate_hz)
    start, stop = compute_window_ticks(window, recording.sampling_rate_hz)
    keys = recording.spike_electrodes * _KEY + recording.spike_units
    order = np.lexsort((recording.spike_ticks, keys))
    sorted_keys, sorted_ticks = keys[order], recording.spike_ticks[order]
    unique_keys, first = np.unique(sorted_keys, return_index=True)
    last = np.append(first[1:], len(sorted_keys))
    membership = sites.compute_membership(unique_keys // _KEY, unique_keys % _KEY)
    counts = np.zeros((len(onsets), sites.n_sites), dtype=np.int64)
    for key_index in np.flatnonzero(membership.any(axis=1)):
        ticks = sorted_ticks[first[key_index] : last[key_index]]
        found = np.searchsorted(ticks, onset_ticks + stop) - np.searchsorted(ticks, onset_ticks + start)
        counts[:, membership[key_index]] += found[:, None]
    return _as_uint16(counts)


def _check_nev_path(path) -> Path:
    path = check_file("recording", path).resolve()
    if path.suffix != ".nev":
        raise ValueError(f"recording {str(path)!r} must be a Blackrock .nev file (name ending in .nev).")
    return path


class _GrowingCounts:
    """Onset ticks, codes and a counts table that grow as onsets stream in."""

    def __init__(self, n_sites: int) -> None:
        self.ticks, self.codes = np.zeros(1024, np.int64), np.zeros(1024, np.uint16)
        self.counts = np.zeros((1024, n_sites), np.int64)
        self.n = 0

    def add(self, ticks: np.ndarray, codes: np.ndarray) -> None:
        while self.n + len(ticks) > len(self.ticks):
            size = 2 * len(self.ticks)
            self.ticks, self.codes = np.resize(self.ticks, size), np.resize(self.codes, size)
            self.counts = np.concatenate([self.counts, np.zeros_like(self.counts)])
        self.ticks[self.n : self.n + len(ticks)], self.codes[self.n : self.n + len(ticks)] = ticks, codes
        self.n += len(ticks)


def _add_spikes(table: _GrowingCounts, sites: SiteTable, keys: np.ndarray, spike_ticks: np.ndarray,
                edges: tuple[int, int], spikes_per_electrode: dict) -> None:
    """Add time-ordered spikes (keys = electrode * 256 + unit) to the counts of the onsets seen so far."""
    if not keys.size:
        return
    start, stop = edges
    unique_keys, inverse = np.unique(keys, return_inverse=True)
    n_per_key = np.bincount(inverse, minlength=len(unique_keys))
    for electrode, n in zip((unique_keys // _KEY).tolist(), n_per_key.tolist()):
        spikes_per_electrode[electrode] = spikes_per_electrode.get(electrode, 0) + n
    bounds = np.concatenate([[0], np.cumsum(n_per_key)])
    by_key = spike_ticks[np.argsort(inverse, kind="stable")]  # grouped by key, time order kept
    membership = sites.compute_membership(unique_keys // _KEY, unique_keys % _KEY)
    onsets = table.ticks[: table.n]
    low, high = np.searchsorted(onsets, [spike_ticks[0] - stop, spike_ticks[-1] - start], side="right")
    for key_index in np.flatnonzero(membership.any(axis=1)):
        found = by_key[bounds[key_index] : bounds[key_index + 1]]
        in_window = np.searchsorted(found, onsets[low:high] + stop) - np.searchsorted(found, onsets[low:high] + start)
        table.counts[low:high, membership[key_index]] += in_window[:, None]


def _stream_counts(path: Path, window: tuple[float, float], sites: SiteTable | None, allow_truncated: bool):
    """One pass over the packets: onsets, int64 counts per site, spikes per electrode, header facts.

    Spikes at a window's last tick wait for the next window, whose onsets may share that tick.
    """
    facts = _read_nev_header(path, allow_truncated)
    sites = make_default_sites(facts["electrodes"]) if sites is None else sites
    edges = compute_window_ticks(window, facts["resolution"])
    table, spikes_per_electrode = _GrowingCounts(sites.n_sites), {}
    waiting_keys, waiting_ticks = np.zeros(0, np.int64), np.zeros(0, np.int64)
    for ticks, ids, units, words in _iterate_packets(path, facts):
        onset = (ids == 0) & ((units & 0x81) == 1) & (words != 0)  # digital input port, non-zero word
        table.add(ticks[onset], words[onset])
        spike = (ids > 0) & (ids < _SYSTEM_PACKET_IDS[0])
        keys = np.concatenate([waiting_keys, ids[spike].astype(np.int64) * _KEY + units[spike]])
        spike_ticks = np.concatenate([waiting_ticks, ticks[spike]])
        ready = spike_ticks < ticks[-1]
        _add_spikes(table, sites, keys[ready], spike_ticks[ready], edges, spikes_per_electrode)
        waiting_keys, waiting_ticks = keys[~ready], spike_ticks[~ready]
    _add_spikes(table, sites, waiting_keys, waiting_ticks, edges, spikes_per_electrode)
    onsets = Onsets(times_s=table.ticks[: table.n] / facts["resolution"], codes=table.codes[: table.n].copy())
    return onsets, table.counts[: table.n], spikes_per_electrode, facts


def _as_uint16(counts: np.ndarray) -> np.ndarray:
    if counts.max(initial=0) > np.iinfo(np.uint16).max:
        raise ValueError("a site has more than 65535 spikes in one window; check the window and the recording.")
    return counts.astype(np.uint16)


def compute_nev_counts(
    path: str | Path,
    *,
    window_s=DEFAULT_WINDOW_S,
    sites: SiteTable | None = None,
    unmapped: str = "error",
    allow_truncated: bool = False,
) -> tuple[Onsets, np.ndarray]:
    """Onsets and spike counts straight from a ``.nev`` in one streaming pass (no neo).

    The same result as ``compute_counts(read_nev(path), compute_onsets(...).times_s, ...)``, with
    memory that grows with the number of presentations, not with the file's length: for
    recordings too long to hold in memory. Returns ``(onsets, counts)``, counts uint16
    ``(n_presentations, n_sites)``; ``sites`` default: one per electrode in the file's header.
    """
    window = check_window(window_s)
    check_option("unmapped", unmapped, ("error", "ignore"))
    path = _check_nev_path(path)
    onsets, counts, spikes_per_electrode, facts = _stream_counts(path, window, sites, allow_truncated)
    _check_unmapped(str(path), spikes_per_electrode, sites or make_default_sites(facts["electrodes"]), unmapped)
    return onsets, _as_uint16(counts)


def compute_summary(recording: Recording | str | Path, *, window_s=DEFAULT_WINDOW_S, sites: SiteTable | None = None,
                    unmapped: str = "error") -> dict:
    """The operator's first check of a recording, JSON-ready.

    ``{"n_presentations", "electrodes", "window_s", "counts": {"<electrode>": in-window spikes
    over all presentations, units merged}, "codes": {"<code>": number of onsets}}``. ``sites``
    (optional) only checks that every spiking electrode is mapped. ``recording`` is a
    :class:`Recording` or the path of a ``.nev``, which is then streamed (see
    :func:`compute_nev_counts`).
    """
    window = check_window(window_s)
    check_option("unmapped", unmapped, ("error", "ignore"))
    if isinstance(recording, Recording):
        electrodes, source, spikes_per_electrode = recording.electrodes, recording.source, _spikes_per_electrode(recording)
        onsets = compute_onsets(recording)
        counts = compute_counts(recording, onsets.times_s, window_s=window, sites=make_default_sites(electrodes))
    else:
        source = str(_check_nev_path(recording))
        onsets, counts, spikes_per_electrode, facts = _stream_counts(Path(source), window, None, False)
        electrodes = facts["electrodes"]
    if sites is not None:
        _check_unmapped(source, spikes_per_electrode, sites, unmapped)
    totals = counts.sum(axis=0, dtype=np.int64)
    codes, n_onsets = np.unique(onsets.codes, return_counts=True)
    return {
        "n_presentations": len(onsets.times_s),
        "electrodes": list(electrodes),
        "window_s": list(window),
        "counts": {str(e): int(n) for e, n in zip(electrodes, totals.tolist())},
        "codes": {str(c): int(n) for c, n in zip(codes.tolist(), n_onsets.tolist())},
    }


# -- reconciliation with the day store --------------------------------------------------------
class Reconciliation(NamedTuple):
    """``onset_index`` int64 ``(n_presentations,)``: the matching onset of each logged
    presentation, −1 if none; ``mismatches``: one dict per problem found."""

    onset_index: np.ndarray
    mismatches: list[dict]


def _mismatch(kind: str, presentation, code, log_s, nev_s) -> dict:
    shift = None if log_s is None or nev_s is None else round(nev_s - log_s, 6)
    return {"kind": kind, "presentation": presentation, "code": int(code),
            "log_onset_s": None if log_s is None else float(log_s),
            "nev_onset_s": None if nev_s is None else float(nev_s), "shift_s": shift}


def compute_reconciliation(onsets: Onsets, log_codes, log_onsets_s, known_codes, *,
                           tolerance_s: float = DEFAULT_TOLERANCE_S) -> Reconciliation:
    """Match logged presentations to recorded onsets by code and time; list every mismatch.

    ``log_codes``, ``log_onsets_s`` ``(n_presentations,)``: event code and onset (s) of each
    logged presentation; ``known_codes``: every code of the day's stimuli. A presentation matches
    the recorded onset with the same code nearest in time within ``tolerance_s``; what is left
    unmatched is then explained. Mismatch kinds: ``code_mismatch`` / ``unknown_code`` (an onset
    within tolerance carries another stimulus's code / a code no stimulus has),
    ``shifted_timing`` (the code is recorded further than the tolerance but within 1 s),
    ``missing_onset`` (not recorded), ``unknown_code`` or ``extra_onset`` for recorded onsets no
    presentation explains, ``order`` (matches out of order).
    """
    tolerance = check_number("tolerance_s", tolerance_s, minimum=0.0)
    log_codes = np.asarray(log_codes, dtype=np.int64)
    log_onsets = check_array("log_onsets_s", log_onsets_s, shape=(len(log_codes),)).astype(np.float64)
    times, codes = onsets.times_s, onsets.codes.astype(np.int64)
    known = np.isin(codes, np.asarray(known_codes, dtype=np.int64))
    used = np.zeros(len(times), dtype=bool)
    onset_index = np.full(len(log_codes), -1, dtype=np.int64)
    by_time = np.argsort(log_onsets, kind="stable")

    def unused_near(log_s: float, reach: float) -> np.ndarray:
        low, high = np.searchsorted(times, [log_s - reach, log_s + reach + 1e-9])
        candidates = np.arange(low, high)[~used[low:high]]
        return candidates[np.argsort(np.abs(times[candidates] - log_s), kind="stable")]

    for presentation in by_time:  # first pass: same code within the tolerance
        same = [j for j in unused_near(log_onsets[presentation], tolerance) if codes[j] == log_codes[presentation]]
        if same:
            onset_index[presentation], used[same[0]] = same[0], True
    mismatches = []
    for presentation in by_time[onset_index[by_time] < 0]:  # second pass: explain what is left
        log_s, code = log_onsets[presentation], log_codes[presentation]
        near = unused_near(log_s, tolerance)
        shifted = [j for j in unused_near(log_s, SHIFT_SEARCH_S) if codes[j] == code]
        if near.size:
            other = near[0]
            kind = "code_mismatch" if known[other] else "unknown_code"
            found = _mismatch(kind, int(presentation), code, log_s, times[other]) | {"nev_code": int(codes[other])}
        elif shifted:
            other = shifted[0]
            found = _mismatch("shifted_timing", int(presentation), code, log_s, times[other])
        else:
            other, found = None, _mismatch("missing_onset", int(presentation), code, log_s, None)
        if other is not None:
            used[other] = True
        mismatches.append(found)
    for index in np.flatnonzero(~used):
        kind = "extra_onset" if known[index] else "unknown_code"
        mismatches.append(_mismatch(kind, None, codes[index], None, times[index]))
    matched = onset_index[np.argsort(log_onsets, kind="stable")]
    matched = matched[matched >= 0]
    for position in np.flatnonzero(np.diff(matched) < 0):
        index = int(matched[position + 1])
        mismatches.append(_mismatch("order", int(np.flatnonzero(onset_index == index)[0]), codes[index], None,
                                    times[index]))
    return Reconciliation(onset_index=onset_index, mismatches=mismatches)


def write_day_counts(
    nev_path: str | Path,
    store_path: str | Path,
    *,
    window_s=DEFAULT_WINDOW_S,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    sites: SiteTable | None = None,
    unmapped: str = "error",
    allow_mismatch: bool = False,
    engine: str = "neo",
) -> dict:
    """Reconcile a ``.nev`` with a day store's presentation log and store its counts there.

    Counts use the store's site table (``sites``, when given, must equal it). With any mismatch
    nothing is written unless ``allow_mismatch``, in which case matched presentations get their
    ``.nev`` counts and the rest are marked unmatched. Returns a JSON-ready report:
    ``n_presentations`` (logged), ``n_onsets`` (recorded), ``n_matched``, ``n_mismatches``,
    ``mismatches``, ``window_s``, ``written``, ``source``, ``sha256``. ``engine``: "neo" reads
    the file with :func:`read_nev`; "stream" counts with :func:`compute_nev_counts` (same result,
    memory independent of the recording's length).
    """
    window = check_window(window_s)
    check_option("engine", engine, ENGINES)
    check_option("unmapped", unmapped, ("error", "ignore"))
    store = open_store(store_path, mode="a")
    if sites is not None and sites != store.sites:
        raise ValueError(
            f"the site map ({sites.n_sites} sites) differs from the sites of day store {str(store.path)!r} "
            f"({store.n_sites} sites); use the site map the day was recorded with."
        )
    if engine == "neo":
        recording = read_nev(nev_path)
        _check_unmapped(recording.source, _spikes_per_electrode(recording), store.sites, unmapped)
        onsets = compute_onsets(recording)
        nev_counts = compute_counts(recording, onsets.times_s, window_s=window, sites=store.sites, unmapped="ignore")
    else:
        onsets, nev_counts = compute_nev_counts(nev_path, window_s=window, sites=store.sites, unmapped=unmapped)
    log = store.read_presentations()
    stimulus_codes = store.read_stimuli(pixels=False)["code"]
    reconciliation = compute_reconciliation(onsets, stimulus_codes[log["stimulus"]], log["onset"], stimulus_codes,
                                            tolerance_s=tolerance_s)
    matched = reconciliation.onset_index >= 0
    report = {
        "source": str(Path(nev_path).resolve()),
        "sha256": compute_file_digest(nev_path),
        "store": str(store.path),
        "window_s": list(window),
        "tolerance_s": float(tolerance_s),
        "engine": engine,
        "n_presentations": store.n_presentations,
        "n_onsets": len(onsets.times_s),
        "n_matched": int(matched.sum()),
        "n_mismatches": len(reconciliation.mismatches),
        "mismatches": reconciliation.mismatches,
        "written": False,
    }
    if reconciliation.mismatches and not allow_mismatch:
        logger.warning("%s: %d mismatches with the day's log; nothing written", Path(nev_path).name,
                       len(reconciliation.mismatches))
        return report
    counts = np.zeros((store.n_presentations, store.n_sites), dtype=np.uint16)
    counts[matched] = nev_counts[reconciliation.onset_index[matched]]
    onset = np.full(store.n_presentations, np.nan)
    onset[matched] = onsets.times_s[reconciliation.onset_index[matched]]
    report["written"] = True
    attrs = {key: value for key, value in report.items() if key != "store"}
    store.write_ingest(counts, matched, onset,
                       attrs=attrs | {"ingested_at": datetime.now(UTC).isoformat(timespec="seconds")})
    return report

