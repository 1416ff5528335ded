"""Stimulus onsets and spike counts per site in the response window.

Each word on the digital input port that is neither zero (which clears the strobe) nor one of
the rig's control codes (offset, outcomes, session start and end;
:mod:`closedloop.data.event_codes`) is a stimulus onset carrying that stimulus's event code. A
site's response to a presentation is its number of
spikes in the response window (:mod:`closedloop.data.window`, default 0.07–0.17 s after onset),
computed in integer clock ticks so that edges are exact. Counts come from a
:class:`~closedloop.data.recording.Recording` (:func:`compute_onsets`, :func:`compute_counts`)
or straight from a ``.nev`` in one streaming pass (:func:`compute_nev_counts`); both give the
same onsets and counts. Given a :class:`~closedloop.data.photodiode.Photodiode`, both take each
code's onset from the photodiode's crossing that follows it (:mod:`closedloop.data.photodiode`).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import NamedTuple

import numpy as np

from closedloop.core.validation import check_array, check_option
from closedloop.data.event_codes import is_onset_code
from closedloop.data.nev_header import check_nev_path, read_nev_header
from closedloop.data.nev_scan import find_digital_events, iterate_packets
from closedloop.data.photodiode import OnsetMatcher, Photodiode, compute_latency_summary
from closedloop.data.recording import Recording, compute_ticks
from closedloop.data.sites import ALL_UNITS, NOISE_UNIT, SiteTable, make_default_sites
from closedloop.data.window import DEFAULT_WINDOW_S, check_window, compute_window_ticks

__all__ = ["Onsets", "UnmappedSpikesError", "compute_onsets", "compute_counts", "compute_nev_counts", "compute_summary"]

_KEY = 256  # spike key = electrode * 256 + unit class


class Onsets(NamedTuple):
    """Stimulus onsets: ``times_s`` float64 ``(n,)`` (s, recording clock), ``codes`` uint16 ``(n,)``.

    From a photodiode also ``code_times_s`` float64 ``(n,)``, the event codes' own times, and
    ``latency_s`` float64 ``(n,)``, light minus code (NaN where no crossing came: ``times_s`` is
    then the code's time); both None otherwise.
    """

    times_s: np.ndarray
    codes: np.ndarray
    code_times_s: np.ndarray | None = None
    latency_s: np.ndarray | None = None


def _make_onsets(onset_ticks: np.ndarray, codes: np.ndarray, code_ticks: np.ndarray, latency_ticks: np.ndarray,
                 rate_hz: float, photodiode: Photodiode | None) -> Onsets:
    """Onsets from ticks (int64 ``(n,)``; latency −1: no crossing); code times and latencies only from a photodiode."""
    if photodiode is None:
        return Onsets(times_s=onset_ticks / rate_hz, codes=codes)
    return Onsets(times_s=onset_ticks / rate_hz, codes=codes, code_times_s=code_ticks / rate_hz,
                  latency_s=np.where(latency_ticks >= 0, latency_ticks / rate_hz, np.nan))


def compute_onsets(recording: Recording, *, photodiode: Photodiode | None = None) -> Onsets:
    """Stimulus onsets: every onset word (:func:`~closedloop.data.event_codes.is_onset_code`) on the
    digital input port, in time order; 0 and the rig's control codes are not onsets. With a
    ``photodiode``, each at the light that follows its code (see :mod:`closedloop.data.photodiode`)."""
    keep = is_onset_code(recording.event_words)
    order = np.argsort(recording.event_ticks[keep], kind="stable")
    ticks = recording.event_ticks[keep][order]
    onset_ticks, latency = (ticks, None) if photodiode is None else OnsetMatcher(photodiode).match(ticks)
    return _make_onsets(onset_ticks, recording.event_words[keep][order], ticks, latency, recording.sampling_rate_hz,
                        photodiode)


class UnmappedSpikesError(ValueError):
    """Spikes on electrodes the site map lacks; ``problem``: what was found (recording, spikes,
    electrodes), for a caller that names its own way out."""

    def __init__(self, problem: str) -> None:
        super().__init__(f"{problem}; add them to the site map ([sites] site_map or --site-map), "
                         "or ignore them with `closedloop ingest` --ignore-unmapped.")
        self.problem = problem


def _count_spikes_per_electrode(electrodes: np.ndarray) -> Counter:
    """Spikes per electrode id, from the electrode of each spike ``(n_spikes,)``."""
    found, n_spikes = np.unique(electrodes, return_counts=True)
    return Counter(dict(zip(found.tolist(), n_spikes.tolist())))


def _check_unmapped(source: str, spikes_per_electrode: dict[int, int], sites: SiteTable, unmapped: str) -> None:
    """Refuse (:class:`UnmappedSpikesError`) spikes on electrodes no site names, unless ``unmapped="ignore"``."""
    check_option("unmapped", unmapped, ("error", "ignore"))
    missing = sorted(set(spikes_per_electrode) - set(sites.electrode.tolist()))
    if missing and unmapped == "error":
        n_spikes = sum(spikes_per_electrode[e] for e in missing)
        raise UnmappedSpikesError(
            f"recording {source or '(in memory)'!r}: {n_spikes} spikes on electrodes {missing[:10]} that are missing "
            "from the site map"
        )


def _as_uint16(counts: np.ndarray) -> np.ndarray:
    """Counts as stored, uint16 (same shape); more than 65535 spikes in one window is an error."""
    if counts.max(initial=0) > np.iinfo(np.uint16).max:
        raise ValueError("a site has more than 65535 spikes in one window; check the window and the recording.")
    return counts.astype(np.uint16)


def _add_window_counts(counts: np.ndarray, sites: SiteTable, keys: np.ndarray, spike_ticks: np.ndarray,
                       onset_ticks: np.ndarray, edges: tuple[int, int]) -> None:
    """Add each site's spikes in each onset's window to ``counts`` int64 ``(n_onsets, n_sites)``, in place.

    ``keys`` (electrode * 256 + unit class) and ``spike_ticks`` int64 ``(n_spikes,)``;
    ``onset_ticks`` int64 ``(n_onsets,)``; ``edges``: the window in ticks after onset
    (:func:`~closedloop.data.window.compute_window_ticks`).
    """
    start, stop = edges
    order = np.lexsort((spike_ticks, keys))
    sorted_keys, sorted_ticks = keys[order], spike_ticks[order]
    unique_keys, first = np.unique(sorted_keys, return_index=True)
    last = np.append(first[1:], len(sorted_keys))
    membership = sites.compute_membership(unique_keys // _KEY, unique_keys % _KEY)
    for key_index in np.flatnonzero(membership.any(axis=1)):
        ticks = sorted_ticks[first[key_index] : last[key_index]]
        found = np.searchsorted(ticks, onset_ticks + stop) - np.searchsorted(ticks, onset_ticks + start)
        counts[:, membership[key_index]] += found[:, None]


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
    _check_unmapped(recording.source, _count_spikes_per_electrode(recording.spike_electrodes), sites, unmapped)
    onsets = check_array("onset_times_s", onset_times_s, shape=(None,)).astype(np.float64)
    if not np.isfinite(onsets).all():
        raise ValueError("'onset_times_s' must be finite times in s on the recording clock.")
    counts = np.zeros((len(onsets), sites.n_sites), dtype=np.int64)
    _add_window_counts(counts, sites, recording.spike_electrodes * _KEY + recording.spike_units, recording.spike_ticks,
                       compute_ticks(onsets, recording.sampling_rate_hz),
                       compute_window_ticks(window, recording.sampling_rate_hz))
    return _as_uint16(counts)


# -- counting while streaming a .nev ------------------------------------------------------------
class _GrowingCounts:
    """Onset ticks, codes and a table of counts per onset (one column per site class) that grow as
    onsets stream in; with a photodiode, onsets are matched to its crossings as they come."""

    def __init__(self, n_columns: int, photodiode: Photodiode | None) -> None:
        self.matcher = None if photodiode is None else OnsetMatcher(photodiode)
        self.ticks, self.code_ticks, self.latency = (np.zeros(1024, np.int64) for _ in range(3))
        self.codes, self.counts = np.zeros(1024, np.uint16), np.zeros((1024, n_columns), np.int32)
        self.n = 0

    def add(self, code_ticks: np.ndarray, codes: np.ndarray) -> None:
        while self.n + len(code_ticks) > len(self.ticks):
            size = 2 * len(self.ticks)
            self.ticks, self.code_ticks, self.latency, self.codes = (
                np.resize(values, size) for values in (self.ticks, self.code_ticks, self.latency, self.codes))
            self.counts = np.concatenate([self.counts, np.zeros_like(self.counts)])
        ticks, latency = (code_ticks, -1) if self.matcher is None else self.matcher.match(code_ticks)
        added = slice(self.n, self.n + len(code_ticks))
        self.ticks[added], self.code_ticks[added], self.latency[added], self.codes[added] = (
            ticks, code_ticks, latency, codes)
        self.n += len(code_ticks)


class _SiteClasses:
    """Packets grouped by key (electrode, unit class) and keys into classes that count toward the same sites.

    ``key_offset`` int64 ``(65536,)``: packet id → 256 × the electrode's position among the
    header's, so that a packet's key is ``key_offset[id] + unit class``; every packet id that is
    not a listed electrode (digital and system events) points at one extra slot of keys past the
    electrodes', which counts toward no site. ``key_class`` int64 ``(n_keys,)``: each key's class;
    ``class_sites`` float64 ``(n_classes, n_sites)``: 1 where a class counts toward a site.
    """

    def __init__(self, sites: SiteTable, electrodes: tuple[int, ...]) -> None:
        self.electrodes = np.asarray(electrodes, dtype=np.int64)
        self.key_offset = np.full(1 << 16, len(self.electrodes) * _KEY, dtype=np.int64)
        self.key_offset[self.electrodes] = np.arange(len(self.electrodes)) * _KEY
        # Units no site names (noise aside) all count alike: membership is worked out for the named
        # units, noise and one unnamed representative, and spread to all 256 unit classes.
        named = np.unique(np.append(sites.unit[sites.unit != ALL_UNITS], NOISE_UNIT))
        kinds = np.concatenate([named, np.setdiff1d(np.arange(_KEY), named)[:1]])
        unit_kind = np.full(_KEY, len(kinds) - 1)
        unit_kind[named] = np.arange(len(named))
        membership = sites.compute_membership(np.repeat(self.electrodes, len(kinds)), np.tile(kinds, len(electrodes)))
        membership = np.concatenate([membership, np.zeros((1, sites.n_sites), bool)])  # the events' slot
        packed = np.packbits(membership, axis=1)  # one row of bytes per (electrode, unit kind), compared whole
        packed = np.ascontiguousarray(packed).view(np.dtype((np.void, packed.shape[1]))).reshape(-1)
        _, first, row_class = np.unique(packed, return_index=True, return_inverse=True)
        self.key_class = np.append(row_class[:-1].reshape(len(electrodes), len(kinds))[:, unit_kind],
                                   np.full(_KEY, row_class[-1]))
        self.class_sites = membership[first].astype(np.float64)
        self.n_keys, self.n_classes = len(self.key_class), len(first)

    def count_per_site(self, counts_per_class: np.ndarray) -> np.ndarray:
        """Counts per site int64 ``(n, n_sites)`` from counts per class int32 ``(n, n_classes)``.

        Exact: float64 holds every integer below 2**53, far above any spike count.
        """
        return (counts_per_class.astype(np.float64) @ self.class_sites).astype(np.int64)


def _add_packets(table: _GrowingCounts, classes: _SiteClasses, packet_classes: np.ndarray, packet_ticks: np.ndarray,
                 edges: tuple[int, int]) -> None:
    """Add time-ordered packets' spikes to the counts per class of the onsets seen so far, in place.

    ``packet_classes`` (:class:`_SiteClasses`; events fall in a class of no site) and
    ``packet_ticks`` int64 ``(n_packets,)``, ticks non-decreasing. Each onset's window is a slice
    of the packets (two binary searches); the packets of every slice are counted per class with
    one ``bincount``.
    """
    if not packet_ticks.size:
        return
    start, stop = edges
    onsets = table.ticks[: table.n]
    low, high = np.searchsorted(onsets, [packet_ticks[0] - stop, packet_ticks[-1] - start], side="right")
    onsets = onsets[low:high]
    first, last = np.searchsorted(packet_ticks, onsets + start), np.searchsorted(packet_ticks, onsets + stop)
    n_inside = last - first
    rows = np.repeat(np.arange(len(onsets)) * classes.n_classes, n_inside)
    members = np.arange(len(rows)) + np.repeat(first - (np.cumsum(n_inside) - n_inside), n_inside)
    rows += packet_classes[members]
    table.counts[low:high] += np.bincount(rows, minlength=len(onsets) * classes.n_classes).reshape(
        len(onsets), classes.n_classes)


def _stream_counts(path: Path, window: tuple[float, float], sites: SiteTable | None, allow_truncated: bool,
                   mapped: SiteTable | None, photodiode: Photodiode | None):
    """One pass over the packets: onsets, int64 counts per site, spikes per electrode missing from
    ``mapped`` (a Counter; default: from ``sites``), header facts.

    Packets at a window's last tick wait for the next window, whose onsets may share that tick.
    """
    facts = read_nev_header(path, allow_truncated)
    sites = make_default_sites(facts["electrodes"]) if sites is None else sites
    edges = compute_window_ticks(window, facts["resolution"])
    classes = _SiteClasses(sites, facts["electrodes"])
    table, unmapped = _GrowingCounts(classes.n_classes, photodiode), Counter()
    is_unmapped = np.zeros(1 << 16, dtype=bool)  # packet ids of the header's electrodes that no site names
    is_unmapped[np.setdiff1d(facts["electrodes"], (sites if mapped is None else mapped).electrode)] = True
    watch = bool(is_unmapped.any())
    waiting_classes, waiting_ticks = np.zeros(0, np.int64), np.zeros(0, np.int64)
    for ticks, ids, units, events, words in iterate_packets(path, facts):
        onset = find_digital_events(units[events], facts["version"]) & is_onset_code(words)
        table.add(ticks[events[onset]], words[onset])
        _add_packets(table, classes, waiting_classes, waiting_ticks, edges)
        keys = classes.key_offset[ids]
        keys += units
        if watch:
            unmapped.update(_count_spikes_per_electrode(ids[is_unmapped[ids]]))
        packet_classes = classes.key_class[keys]
        ready = np.searchsorted(ticks, ticks[-1])  # packets are in time order: those at the last tick wait
        _add_packets(table, classes, packet_classes[:ready], ticks[:ready], edges)
        waiting_classes, waiting_ticks = packet_classes[ready:], ticks[ready:].copy()
    _add_packets(table, classes, waiting_classes, waiting_ticks, edges)
    onsets = _make_onsets(*(values[: table.n].copy() for values in (table.ticks, table.codes, table.code_ticks,
                                                                     table.latency)), facts["resolution"], photodiode)
    counts = classes.count_per_site(table.counts[: table.n])
    return onsets, counts, unmapped, facts


def compute_nev_counts(
    path: str | Path,
    *,
    window_s=DEFAULT_WINDOW_S,
    sites: SiteTable | None = None,
    unmapped: str = "error",
    allow_truncated: bool = False,
    photodiode: Photodiode | None = None,
) -> tuple[Onsets, np.ndarray]:
    """Onsets and spike counts straight from a ``.nev`` in one streaming pass (no neo).

    The same result as ``compute_counts(read_nev(path), compute_onsets(...).times_s, ...)``, with
    memory that grows with the number of presentations, not with the file's length: for
    recordings too long to hold in memory. Returns ``(onsets, counts)``, counts uint16
    ``(n_presentations, n_sites)``; ``sites`` default: one per electrode in the file's header.
    With a ``photodiode`` the windows start at the light (see :func:`compute_onsets`).
    """
    window = check_window(window_s)
    check_option("unmapped", unmapped, ("error", "ignore"))
    path = check_nev_path(path)
    onsets, counts, spikes_per_electrode, facts = _stream_counts(path, window, sites, allow_truncated, None,
                                                                 photodiode)
    _check_unmapped(str(path), spikes_per_electrode, sites or make_default_sites(facts["electrodes"]), unmapped)
    return onsets, _as_uint16(counts)


def compute_summary(recording: Recording | str | Path, *, window_s=DEFAULT_WINDOW_S, sites: SiteTable | None = None,
                    unmapped: str = "error", photodiode: Photodiode | None = None, allow_truncated: bool = False) -> dict:
    """The operator's first check of a recording, JSON-ready.

    ``{"n_presentations", "electrodes", "window_s", "counts": {"<electrode>": in-window spikes
    over all presentations, units merged}, "codes": {"<code>": number of onsets}}``, and with a
    ``photodiode`` ``"photodiode"``: its settings and the code-to-light latencies
    (:func:`~closedloop.data.photodiode.compute_latency_summary`). ``sites`` (optional) only
    checks that every spiking electrode is mapped. ``recording`` is a :class:`Recording` or the
    path of a ``.nev``, which is then streamed (see :func:`compute_nev_counts`; ``allow_truncated``
    drops a partial last packet of it).
    """
    window = check_window(window_s)
    check_option("unmapped", unmapped, ("error", "ignore"))
    if isinstance(recording, Recording):
        electrodes, source = recording.electrodes, recording.source
        spikes_per_electrode = _count_spikes_per_electrode(recording.spike_electrodes)
        onsets = compute_onsets(recording, photodiode=photodiode)
        counts = compute_counts(recording, onsets.times_s, window_s=window, sites=make_default_sites(electrodes))
    else:
        source = str(check_nev_path(recording))
        onsets, counts, spikes_per_electrode, facts = _stream_counts(Path(source), window, None, allow_truncated, sites,
                                                                     photodiode)
        electrodes = facts["electrodes"]
    if sites is not None:
        _check_unmapped(source, spikes_per_electrode, sites, unmapped)
    totals = counts.sum(axis=0, dtype=np.int64)
    codes, n_onsets = np.unique(onsets.codes, return_counts=True)
    summary = {
        "n_presentations": len(onsets.times_s),
        "electrodes": list(electrodes),
        "window_s": list(window),
        "counts": {str(e): int(n) for e, n in zip(electrodes, totals.tolist())},
        "codes": {str(c): int(n) for c, n in zip(codes.tolist(), n_onsets.tolist())},
    }
    if photodiode is not None:
        summary["photodiode"] = photodiode.describe() | compute_latency_summary(onsets.latency_s)
    return summary
