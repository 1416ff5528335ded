"""Stage 3 of a day: the rig bundle ``stimuli.h5`` from the day store's stimuli (DESIGN.md §4).

For a rig that runs its own software (``[rig] kind = "files"``) it also writes the day's RSVP
list (:func:`closedloop.data.handoff.make_rsvp_list`, in the order the streaming rig would start
with) as ``rsvp.csv`` and as ``rsvp/`` inside the bundle; both are written before the stage's
marker, each atomically.
"""

from __future__ import annotations

import numpy as np

from closedloop.data import layout
from closedloop.data.bundle import write_bundle
from closedloop.data.handoff import make_rsvp_list, write_rsvp_csv
from closedloop.data.store import open_store

__all__ = ["run_stage"]


def run_stage(day) -> dict:
    """Write ``stimuli.h5``: every stimulus's 8-bit frame, id and event code (and for ``[rig] kind =
    "files"`` the RSVP list, also as ``rsvp.csv``); returns its sha256."""
    stimuli = open_store(day.path(layout.STORE)).read_stimuli(pixels=True)
    n = len(stimuli["code"])
    rsvp = None
    if day.config.rig.kind == "files":
        rsvp = make_rsvp_list(stimuli["code"], day.config.rsvp.repetitions, day.seed("present"))
        write_rsvp_csv(day.path(layout.RSVP_LIST), rsvp)
    digest = write_bundle(
        day.path(layout.BUNDLE), stimuli["pixels"], np.arange(n), stimuli["code"],
        attrs={"experiment": day.config.experiment.name, "day": day.number}, rsvp=rsvp,
    )
    return {"n_stimuli": n, "sha256": digest} | ({} if rsvp is None else {"n_list": len(rsvp["presentation"])})
