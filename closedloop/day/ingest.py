"""Stage 5 of a day: the Blackrock recording's counts, reconciled with the presentation log.

When the day folder holds ``recording.nev`` (the simulated rig's, or the NSP's copied in by the
operator), its counts are reconciled with the day store's log and stored beside the live ones
(:func:`closedloop.data.reconcile.write_day_counts`); without a recording the live counts stand,
and a day without live counts (a rig that streamed outcomes only) waits for it
(:class:`~closedloop.day.waiting.WaitingForRecording`).
A recording that does not match the log stops the day with nothing stored: the estimate must not
quietly fall back to the live counts. An operator who has checked it can store the matched part
with ``closedloop ingest … --allow-mismatch``; the stage then keeps that ingest.
"""

from __future__ import annotations

from closedloop.data import layout
from closedloop.data.reconcile import write_day_counts
from closedloop.data.store import open_store
from closedloop.day.waiting import make_waiting_error

__all__ = ["run_stage"]

_SUMMARY_KEYS = ("n_presentations", "n_onsets", "n_matched", "n_mismatches")


def run_stage(day) -> dict:
    """Ingest ``recording.nev`` into the day store when there is one (a day without live counts waits for it)."""
    recording = day.path(layout.RECORDING)
    store = open_store(day.path(layout.STORE))
    if not recording.exists():
        if not store.has_live_counts:
            raise make_waiting_error(day, "counts")
        return {"reconciled": False, "reason": f"no {recording.name} in the day folder"}
    ingest = store.read_ingest()
    if ingest is not None:  # an earlier run (killed before its marker) or the operator stored it
        return {"reconciled": True, **{key: ingest["attrs"][key] for key in _SUMMARY_KEYS}}
    report = write_day_counts(recording, day.path(layout.STORE), window_s=day.config.response.window_s)
    if not report["written"]:
        first = report["mismatches"][0] if report["mismatches"] else {}
        raise ValueError(
            f"{recording} does not match day {day.number}'s presentation log: {report['n_matched']} of "
            f"{report['n_presentations']} presentations matched, {report['n_mismatches']} mismatches (first: {first}); "
            "nothing was stored. Check that this is the day's recording; to keep the matched presentations, run "
            f"`closedloop ingest {recording} --experiment {day.experiment} --day {day.number} --allow-mismatch` "
            "and then fit-day again"
        )
    return {"reconciled": True, **{key: report[key] for key in _SUMMARY_KEYS}}
