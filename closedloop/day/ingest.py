"""Stage 5 of a day: the Blackrock recording's counts, reconciled with the presentation log.

When the day folder holds ``recording.nev`` (the simulated rig's, or the NSP's copied in by the
operator), its counts are reconciled with the day store's log and stored beside the live ones
(:func:`closedloop.data.reconcile.write_day_counts`); without a recording the live counts stand,
and a day without live counts (a rig that streamed outcomes only) waits for it
(:class:`~closedloop.day.waiting.WaitingForRecording`).
A recording that does not match the log stops the day with nothing stored: the estimate must not
quietly fall back to the live counts. An operator who has checked it can store the matched part
with ``closedloop ingest … --allow-mismatch``; the stage then keeps that ingest.

An ingest is kept only while it is the ingest of the day folder's ``recording.nev``:
:func:`check_ingest_source` refuses a day whose stored counts came from a file with another
sha256 (e.g. a wrong file ingested with ``--allow-mismatch``, the right one copied in later),
naming the command that replaces them; :func:`remove_stale_markers` then lets the stages from
ingest on run again on the new counts.
"""

from __future__ import annotations

from pathlib import Path

from closedloop.core.files import compute_file_digest
from closedloop.data import layout
from closedloop.data.counts import UnmappedSpikesError
from closedloop.data.layout import STAGES
from closedloop.data.reconcile import format_mismatch, write_day_counts
from closedloop.data.store import open_store
from closedloop.day.waiting import make_waiting_error

__all__ = ["check_ingest_source", "remove_stale_markers", "run_stage"]

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
    try:
        report = write_day_counts(recording, day.path(layout.STORE), window_s=day.config.response.window_s)
    except UnmappedSpikesError as error:  # fit-day has no --ignore-unmapped: name the command that has it
        raise ValueError(
            f"{error.problem}; the day's site map is fixed once the day has been presented, so ignore them: run "
            f"`closedloop ingest {recording} --experiment {day.experiment} --day {day.number} --ignore-unmapped`, "
            f"then `closedloop fit-day {day.number} --experiment {day.experiment}`"
        ) from None
    if not report["written"]:
        first = format_mismatch(report["mismatches"][0]) if report["mismatches"] else "none"
        raise ValueError(
            f"{recording} does not match day {day.number}'s presentation log: {report['n_matched']} of "
            f"{report['n_presentations']} presentations matched, {report['n_mismatches']} mismatches (first: {first}); "
            "nothing was stored. Check that this is the day's recording; to keep the matched presentations, run "
            f"`closedloop ingest {recording} --experiment {day.experiment} --day {day.number} --allow-mismatch`, "
            f"then `closedloop fit-day {day.number} --experiment {day.experiment}`"
        )
    return {"reconciled": True, **{key: report[key] for key in _SUMMARY_KEYS}}


def check_ingest_source(day) -> None:
    """Refuse (``ValueError``) a day whose store holds the counts of another file than its ``recording.nev``.

    Compares the sha256 the ingest recorded with the file now in the day folder; nothing to check
    without a store, an ingest or a recording. The message names the command that replaces the
    counts (``closedloop ingest``, which then has the stages from ingest on redone).
    """
    recording, store_path = day.path(layout.RECORDING), day.path(layout.STORE)
    if not recording.exists() or not store_path.exists():
        return
    ingest = open_store(store_path).read_ingest()
    if ingest is None or ingest["attrs"].get("sha256") in (None, digest := compute_file_digest(recording)):
        return
    attrs = ingest["attrs"]
    raise ValueError(
        f"day {day.number}'s store holds the counts of {attrs.get('source')} (sha256 {attrs['sha256'][:12]}…, "
        f"{attrs.get('n_matched')} of {attrs.get('n_presentations')} presentations matched), but {recording} is another "
        f"file (sha256 {digest[:12]}…); to count the file now there, run `closedloop ingest {recording} --experiment "
        f"{day.experiment} --day {day.number}` (it replaces the counts; fit-day then redoes the stages from ingest on), "
        f"then `closedloop fit-day {day.number} --experiment {day.experiment}`; "
        f"to keep the stored counts, move {recording.name} out of the day folder"
    )


def remove_stale_markers(folder: str | Path) -> list[str]:
    """Remove the markers of the ingest stage and the stages after it from day folder ``folder``
    (their results came from counts just replaced), so that fit-day redoes them; returns those stages."""
    removed = []
    for stage in STAGES[STAGES.index("ingest"):]:
        marker = layout.marker_path(folder, stage)
        if marker.exists():
            marker.unlink()
            removed.append(stage)
    return removed
