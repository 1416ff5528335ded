"""Where every day of an experiment stands, read from its folders (no model code: ``closedloop
status`` answers in a moment, without importing torch)."""

from __future__ import annotations

from pathlib import Path

from closedloop.core.files import read_json
from closedloop.data import layout
from closedloop.data.layout import STAGES
from closedloop.data.store import open_store
from closedloop.day.waiting import compute_waiting

__all__ = ["read_status"]


def read_status(experiment: str | Path) -> list[dict]:
    """Where every day of an experiment stands.

    One record per ``day_NNN`` folder: ``day``, ``stages_done`` (names), ``next_stage`` (or
    None when complete), ``waiting_for_recording`` (bool: the day cannot go on before the NSP's
    ``.nev`` is in its folder, see :mod:`closedloop.day.waiting`), ``n_stimuli``,
    ``n_presentations`` (committed rows of the day store), ``n_lacking_valid`` (stimuli without
    their valid repetitions, once presented; else None), ``lacking_valid`` (those stimuli, once
    presented, else None: one dict each, ``stimulus_id``, ``n_valid`` valid presentations and
    ``repetitions`` wanted; both None for a day presented before they were recorded),
    ``model_fitted`` (bool).
    """
    records = []
    for number, folder in layout.find_day_folders(experiment).items():
        done = [stage for stage in STAGES if layout.marker_path(folder, stage).exists()]
        n_stimuli = n_presentations = 0
        if (folder / layout.STORE).exists():
            store = open_store(folder / layout.STORE)
            n_stimuli, n_presentations = store.n_stimuli, store.n_presentations
        present = layout.marker_path(folder, "present")
        lacking = _read_lacking(present) if present.exists() else None
        records.append({
            "day": number,
            "stages_done": done,
            "next_stage": next((s for s in STAGES if s not in done), None),
            "waiting_for_recording": compute_waiting(folder) is not None,
            "n_stimuli": n_stimuli,
            "n_presentations": n_presentations,
            "n_lacking_valid": None if lacking is None else len(lacking),
            "lacking_valid": lacking,
            "model_fitted": (folder / layout.MODEL).exists() and "refit" in done,
        })
    return records


def _read_lacking(present: Path) -> list[dict]:
    """The stimuli lacking valid repetitions, from the present stage's marker ``present``."""
    summary = read_json(present)["summary"]
    ids = summary["lacking_valid"]
    n_valid = summary.get("n_valid_lacking", [None] * len(ids))  # None: presented before they were recorded
    return [{"stimulus_id": stimulus, "n_valid": n, "repetitions": summary.get("repetitions")}
            for stimulus, n in zip(ids, n_valid, strict=True)]
