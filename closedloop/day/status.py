"""Where every day of an experiment stands, read from its folders (no model code: ``closedloop
status`` answers in a moment, without importing torch)."""

from __future__ import annotations

from pathlib import Path

from closedloop.data import layout
from closedloop.data.layout import STAGES
from closedloop.data.store import open_store

__all__ = ["read_status"]


def read_status(experiment: str | Path) -> list[dict]:
    """Where every day of an experiment stands.

    One record per ``day_NNN`` folder: ``day``, ``stages_done`` (names), ``next_stage`` (or
    None when complete), ``n_stimuli``, ``n_presentations`` (committed rows of the day store),
    ``model_fitted`` (bool).
    """
    records = []
    for number, folder in layout.find_day_folders(experiment).items():
        done = [stage for stage in STAGES if layout.marker_path(folder, stage).exists()]
        n_stimuli = n_presentations = 0
        if (folder / layout.STORE).exists():
            store = open_store(folder / layout.STORE)
            n_stimuli, n_presentations = store.n_stimuli, store.n_presentations
        records.append({
            "day": number,
            "stages_done": done,
            "next_stage": next((s for s in STAGES if s not in done), None),
            "n_stimuli": n_stimuli,
            "n_presentations": n_presentations,
            "model_fitted": (folder / layout.MODEL).exists() and "refit" in done,
        })
    return records
