"""A recording reconciled with the day's presentation log, and its counts stored in the day store.

:func:`compute_reconciliation` matches each logged presentation to the recorded onset with the
same code nearest in time within a tolerance and explains, never guesses, what is left.
:func:`write_day_counts` reads a ``.nev``, reconciles it with the day store's log (codes, order,
onset times) and stores the ``.nev`` counts next to the live ones, reporting every mismatch.
When the day has no live counts (a real presenter), its logged onsets are on the display
computer's clock, not the NSP's: :func:`compute_clock_fit` maps them onto the recording's clock
(offset and drift, fitted on presentations paired by code and time) before they are matched.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

import numpy as np

from closedloop.core.files import compute_file_digest
from closedloop.core.logs import logger
from closedloop.core.validation import check_array, check_number, check_option
from closedloop.data.counts import Onsets, compute_counts, compute_nev_counts, compute_onsets
from closedloop.data.nev import NEV_ENGINES, read_nev
from closedloop.data.photodiode import Photodiode, compute_latency_summary
from closedloop.data.sites import SiteTable
from closedloop.data.store import DayStore, open_store
from closedloop.data.window import DEFAULT_WINDOW_S, check_window

__all__ = ["Reconciliation", "compute_clock_fit", "compute_day_reconciliation", "compute_reconciliation",
           "format_mismatch", "write_day_counts", "DEFAULT_TOLERANCE_S"]

DEFAULT_TOLERANCE_S = 0.010
SHIFT_SEARCH_S = 1.0
_VOTE_PRESENTATIONS, _VOTE_WIDTH_S = 64, 0.005  # the clock offset's vote (compute_clock_fit)
_PAIR_REACH_S = 0.050  # a logged presentation pairs with an onset of its code this close to its predicted time


class Reconciliation(NamedTuple):
    """``onset_index`` int64 ``(n_presentations,)``: the matching onset of each logged
    presentation, −1 if none; ``mismatches``: one dict per problem found; ``unrecorded`` int64:
    the presentations logged before the recording's first onset or after its last (the NSP
    started late or stopped early), which are not mismatches."""

    onset_index: np.ndarray
    mismatches: list[dict]
    unrecorded: np.ndarray


def _mismatch(kind: str, presentation, code, log_s, nev_s) -> dict:
    shift = None if log_s is None or nev_s is None else round(float(nev_s - log_s), 6)
    return {"kind": kind, "presentation": presentation, "code": int(code),
            "log_onset_s": None if log_s is None else float(log_s),
            "nev_onset_s": None if nev_s is None else float(nev_s), "shift_s": shift}


def format_mismatch(mismatch: dict) -> str:
    """One mismatch of :func:`compute_reconciliation` for people: kind, presentation, code, onsets (s)."""
    def seconds(value):
        return "none" if value is None else f"{value:.4f} s"

    recorded = f", recorded code {mismatch['nev_code']}" if "nev_code" in mismatch else ""
    presentation = "none" if mismatch["presentation"] is None else mismatch["presentation"]
    return (f"{mismatch['kind']}: presentation {presentation}, code {mismatch['code']}, "
            f"log {seconds(mismatch['log_onset_s'])}, nev {seconds(mismatch['nev_onset_s'])}{recorded}")


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
    presentation explains, ``order`` (matches out of order). Once some presentation matched, one
    left unmatched whose onset lies more than ``tolerance_s`` before the first recorded onset or
    after the last is ``unrecorded`` (outside the recording), not a mismatch.
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
    outside = (log_onsets < times[0] - tolerance) | (log_onsets > times[-1] + tolerance) if len(times) else log_onsets < np.inf
    unrecorded = (onset_index < 0) & outside & (onset_index >= 0).any()
    for presentation in by_time[(onset_index[by_time] < 0) & ~unrecorded[by_time]]:  # second pass: explain what is left
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
    return Reconciliation(onset_index=onset_index, mismatches=mismatches, unrecorded=np.flatnonzero(unrecorded))


def _compute_code_differences(codes_a: np.ndarray, times_a: np.ndarray, codes_b: np.ndarray,
                               times_b: np.ndarray) -> np.ndarray:
    """``times_b[j] − times_a[i]`` (s) for every pair (i, j) with ``codes_a[i] == codes_b[j]``, float64 ``(n_pairs,)``."""
    order = np.argsort(codes_b, kind="stable")
    low, high = np.searchsorted(codes_b[order], codes_a, "left"), np.searchsorted(codes_b[order], codes_a, "right")
    n_same = high - low
    rows = np.repeat(np.arange(len(codes_a)), n_same)
    columns = order[np.repeat(low - np.cumsum(n_same) + n_same, n_same) + np.arange(n_same.sum())]
    return times_b[columns] - times_a[rows]


def compute_clock_fit(onsets: Onsets, log_codes, log_onsets_s) -> dict:
    """The map from the log's clock onto the recording's: ``nev_s ≈ offset_s + rate · log_s``.

    ``log_codes``, ``log_onsets_s`` ``(n_presentations,)``. The offset is first found by a vote:
    each of the first 64 logged presentations (in time order) with every recorded onset of the
    same code, and each of the first 64 recorded onsets with every logged presentation of its
    code, propose their time difference, and the densest 5 ms of proposals wins. So every lag
    between the two sequences is tried: a recording that started late (its onsets a later part of
    the log's) or early is aligned, since only at the true lag do codes and intervals agree.
    Then each logged presentation, in time order, pairs with the unpaired onset of its code
    nearest to its predicted time within 50 ms, the offset following the last pair (so a slow
    drift of either clock is tracked); a line is fitted to the pairs. Returns ``{"offset_s",
    "rate", "drift_ppm", "n_pairs", "first_onset_offset_s"}``: ``offset_s`` is the offset at log
    time 0 (the line's intercept, extrapolated from the session), ``first_onset_offset_s`` the
    offset at the first logged onset (recording minus log time there, s: the number to compare
    with the clocks' difference at the start of the session); the identity when nothing pairs
    (one pair: the offset only).
    """
    log_codes = np.asarray(log_codes, dtype=np.int64)
    log_onsets = np.asarray(log_onsets_s, dtype=np.float64)
    order = np.argsort(log_onsets, kind="stable")
    log_codes, log_onsets = log_codes[order], log_onsets[order]
    codes, times = onsets.codes.astype(np.int64), onsets.times_s
    first = slice(0, _VOTE_PRESENTATIONS)
    proposals = np.sort(np.concatenate([
        _compute_code_differences(log_codes[first], log_onsets[first], codes, times),
        -_compute_code_differences(codes[first], times[first], log_codes, log_onsets),
    ]))
    if not proposals.size:
        return _describe_clock(0.0, 1.0, 0, log_onsets)
    n_within = np.searchsorted(proposals, proposals + _VOTE_WIDTH_S, side="right") - np.arange(len(proposals))
    best = int(np.argmax(n_within))
    offset = float(np.median(proposals[best : best + n_within[best]]))
    used = np.zeros(len(times), dtype=bool)
    pairs = []
    for code, log_s in zip(log_codes.tolist(), log_onsets.tolist()):
        low, high = np.searchsorted(times, [log_s + offset - _PAIR_REACH_S, log_s + offset + _PAIR_REACH_S])
        candidates = [j for j in range(low, high) if codes[j] == code and not used[j]]
        if candidates:
            j = min(candidates, key=lambda j: abs(times[j] - log_s - offset))
            used[j] = True
            pairs.append((log_s, times[j]))
            offset = times[j] - log_s
    x, y = (np.array(column, dtype=np.float64) for column in zip(*pairs)) if pairs else (np.zeros(0), np.zeros(0))
    if len(x) < 2:
        return _describe_clock(float(y[0] - x[0]) if len(x) else 0.0, 1.0, len(x), log_onsets)
    rate, intercept = np.polyfit(x - x[0], y, 1)
    return _describe_clock(float(intercept - rate * x[0]), float(rate), len(x), log_onsets)


def _describe_clock(offset_s: float, rate: float, n_pairs: int, log_onsets: np.ndarray) -> dict:
    """The clock fit as reported; ``first_onset_offset_s``: recording minus log time at the first logged onset."""
    first = float(log_onsets[0]) if len(log_onsets) else 0.0
    return {"offset_s": offset_s, "rate": rate, "drift_ppm": (rate - 1.0) * 1e6, "n_pairs": n_pairs,
            "first_onset_offset_s": offset_s + (rate - 1.0) * first}


def _compute_runs(indices: np.ndarray) -> list[list[int]]:
    """Sorted indices as runs ``[[first, last], ...]`` of consecutive values (JSON-ready)."""
    breaks = np.flatnonzero(np.diff(indices) != 1)
    starts, stops = np.append(indices[:1], indices[breaks + 1]), np.append(indices[breaks], indices[-1:])
    return [[int(a), int(b)] for a, b in zip(starts, stops)]


def compute_day_reconciliation(onsets: Onsets, store: DayStore, *,
                               tolerance_s: float = DEFAULT_TOLERANCE_S) -> tuple[Reconciliation, dict | None]:
    """A day store's presentation log matched to a recording's onsets, as the ingest matches them.

    ``onsets``: the recording's (with a photodiode, the log is matched by the codes' own times).
    A store without live counts logged its onsets on the presenter's clock: they are first mapped
    onto the recording's with :func:`compute_clock_fit`. Returns the
    :func:`compute_reconciliation` of every logged presentation and the clock fit (None for a
    store with live counts, whose onsets are recording times already).
    """
    log = store.read_presentations()
    stimulus_codes = store.read_stimuli(pixels=False)["code"]
    log_codes = stimulus_codes[log["stimulus"]]
    by_code = onsets if onsets.code_times_s is None else Onsets(onsets.code_times_s, onsets.codes)
    log_onsets, clock = log["onset"], None
    if not store.has_live_counts:  # onsets on the presenter's clock: map them onto the NSP's
        clock = compute_clock_fit(by_code, log_codes, log_onsets)
        log_onsets = clock["offset_s"] + clock["rate"] * log_onsets
    return compute_reconciliation(by_code, log_codes, log_onsets, stimulus_codes, tolerance_s=tolerance_s), clock


def write_day_counts(
    nev_path: str | Path,
    store_path: str | Path,
    *,
    window_s=DEFAULT_WINDOW_S,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    sites: SiteTable | None = None,
    unmapped: str = "error",
    allow_mismatch: bool = False,
    engine: str = "stream",
    photodiode: Photodiode | None = None,
    allow_truncated: bool = False,
) -> dict:
    """Reconcile a ``.nev`` with a day store's presentation log and store its counts there.

    Counts use the store's site table (``sites``, when given, must equal it). With any mismatch
    nothing is written unless ``allow_mismatch``, in which case matched presentations get their
    ``.nev`` counts and the rest are marked unmatched. Returns a JSON-ready report:
    ``n_presentations`` (logged), ``n_onsets`` (recorded), ``n_matched``, ``n_mismatches``,
    ``mismatches``, ``n_unrecorded`` and ``unrecorded`` (runs ``[first, last]`` of presentations
    logged outside the recording: they are marked unmatched, not counted as mismatches),
    ``window_s``, ``written``, ``source``, ``sha256``, ``clock`` (the
    :func:`compute_clock_fit` applied to the logged onsets of a store without live counts, else
    None). ``engine``: "stream"
    counts with :func:`compute_nev_counts` (one pass, memory independent of the recording's
    length); "neo" reads the file with ``read_nev(engine="neo")`` (the reference; same result).
    With a ``photodiode`` (:func:`~closedloop.data.photodiode.read_photodiode`), presentations
    are matched to the log by their codes' times, and counted and stored from the light's; the
    report adds ``photodiode`` (settings and code-to-light latencies). ``allow_truncated`` drops a
    partial last packet of the ``.nev`` (a recording cut short).
    """
    window = check_window(window_s)
    check_option("engine", engine, NEV_ENGINES)
    check_option("unmapped", unmapped, ("error", "ignore"))
    store = open_store(store_path, mode="a")
    if sites is not None and sites != store.sites:
        raise ValueError(
            f"the site map ({sites.n_sites} sites) differs from the sites of day store {str(store.path)!r} "
            f"({store.n_sites} sites); use the site map the day was recorded with."
        )
    if engine == "neo":
        recording = read_nev(nev_path, engine="neo", allow_truncated=allow_truncated)
        onsets = compute_onsets(recording, photodiode=photodiode)
        nev_counts = compute_counts(recording, onsets.times_s, window_s=window, sites=store.sites, unmapped=unmapped)
    else:
        onsets, nev_counts = compute_nev_counts(nev_path, window_s=window, sites=store.sites, unmapped=unmapped,
                                                photodiode=photodiode, allow_truncated=allow_truncated)
    reconciliation, clock = compute_day_reconciliation(onsets, store, tolerance_s=tolerance_s)
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
        "n_unrecorded": len(reconciliation.unrecorded),
        "unrecorded": _compute_runs(reconciliation.unrecorded),
        "clock": clock,
        "written": False,
    }
    if photodiode is not None:
        report["photodiode"] = photodiode.describe() | compute_latency_summary(onsets.latency_s)
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

