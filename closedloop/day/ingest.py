"""Stage 5 of a day: the Blackrock recording's counts, reconciled with the presentation log.

When the day folder holds ``recording.nev`` (the simulated rig's, or the NSP's copied in by the
operator), its counts are reconciled with the day store's log and stored beside the live ones
(:func:`closedloop.data.reconcile.write_day_counts`); without a recording the live counts stand.
"""

from __future__ import annotations

from closedloop.data import layout
from closedloop.data.reconcile import write_day_counts

__all__ = ["run_stage"]


def run_stage(day) -> dict:
    """Ingest ``recording.nev`` into the day store when there is one."""
    recording = day.path(layout.RECORDING)
    if not recording.exists():
        return {"reconciled": False, "reason": f"no {recording.name} in the day folder"}
    report = write_day_counts(recording, day.path(layout.STORE), window_s=day.config.response.window_s)
    return {"reconciled": True, **{k: report[k] for k in ("n_presentations", "n_onsets", "n_matched", "n_mismatches")}}
