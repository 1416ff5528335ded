"""Recorded responses of a day: the counts a stage should trust, and their means per stimulus."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from closedloop.data.store import open_store
from closedloop.sensitivity.estimator import compute_mean_responses

__all__ = ["DayResponses", "read_day_responses"]


@dataclass(frozen=True)
class DayResponses:
    """A day's stimuli (without pixels) and responses.

    ``stimuli``: the store's ``stimuli/`` arrays (n_stimuli rows); ``stimulus``, ``valid``:
    (n_presentations,); ``counts``: (n_presentations, n_sites) spikes per response window, from
    the ``.nev`` where the day was ingested and the presentation matched, else from the live
    stream; ``means``: (n_stimuli, n_sites) mean count over valid presentations (NaN if none);
    ``n_valid``: (n_stimuli,); ``source``: "nev", "stream" or "nev+stream". Without live
    counts (:attr:`~closedloop.data.store.DayStore.has_live_counts`) a presentation the ``.nev``
    did not match has no count and is not ``valid`` here.
    """

    stimuli: dict
    stimulus: np.ndarray
    valid: np.ndarray
    counts: np.ndarray
    means: np.ndarray
    n_valid: np.ndarray
    source: str


def read_day_responses(store_path: str | Path) -> DayResponses:
    """Read a day store and average its valid presentations per stimulus (see :class:`DayResponses`)."""
    store = open_store(store_path)
    stimuli = store.read_stimuli(pixels=False)
    presentations = store.read_presentations()
    counts, from_nev = store.read_counts()
    counts = counts.astype(np.int64)
    valid = presentations["valid"] & (from_nev | store.has_live_counts)
    source = "stream" if store.read_ingest() is None else "nev" if from_nev.all() or not store.has_live_counts else "nev+stream"
    means, n_valid = compute_mean_responses(presentations["stimulus"], valid, counts, store.n_stimuli)
    return DayResponses(stimuli, presentations["stimulus"], valid, counts, means, n_valid, source)
