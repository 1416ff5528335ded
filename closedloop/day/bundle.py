"""Stage 3 of a day: the rig bundle ``stimuli.h5`` from the day store's stimuli (DESIGN.md §4)."""

from __future__ import annotations

import numpy as np

from closedloop.data import layout
from closedloop.data.bundle import write_bundle
from closedloop.data.store import open_store

__all__ = ["run_stage"]


def run_stage(day) -> dict:
    """Write ``stimuli.h5``: every stimulus's 8-bit frame, id and event code; returns its sha256."""
    stimuli = open_store(day.path(layout.STORE)).read_stimuli(pixels=True)
    n = len(stimuli["code"])
    digest = write_bundle(
        day.path(layout.BUNDLE), stimuli["pixels"], np.arange(n), stimuli["code"],
        attrs={"experiment": day.config.experiment.name, "day": day.number},
    )
    return {"n_stimuli": n, "sha256": digest}
