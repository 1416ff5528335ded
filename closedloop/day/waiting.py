"""When a day waits for its recording, and the one message that tells the operator what to do.

Two kinds of day cannot go on without the NSP's ``.nev`` in the day folder
(:data:`~closedloop.data.layout.RECORDING`): a day on a rig that runs its own software
(``[rig] kind = "files"``), once its RSVP list is written and until the rig has run it; and a
day whose rig streamed outcomes without spike counts (a real presenter, or
``[sim] live_counts = false``), after its session and before ``estimate``. The stage that needs
the recording raises :class:`WaitingForRecording`; ``closedloop fit-day`` prints its message and
exits with :data:`EXIT_WAITING`; ``closedloop status`` shows such a day as waiting
(:func:`compute_waiting`). Running ``fit-day`` again once the file is there goes on.
"""

from __future__ import annotations

from pathlib import Path

from closedloop.data import layout
from closedloop.data.store import open_store

__all__ = ["EXIT_WAITING", "WaitingForRecording", "compute_waiting", "make_waiting_error"]

#: Exit status of ``closedloop fit-day`` when the day waits for its recording (2: bad input, 1: a crash).
EXIT_WAITING = 3


class WaitingForRecording(Exception):
    """The day cannot go on before its recording is in the day folder. ``recording``: where it goes;
    ``reason``: "files" (the rig has not run the RSVP list yet) or "counts" (the session sent no
    spike counts)."""

    def __init__(self, message: str, recording: Path, reason: str) -> None:
        super().__init__(message)
        self.recording, self.reason = Path(recording), reason


def compute_waiting(folder: str | Path) -> str | None:
    """Why the day in ``folder`` waits for its recording ("files" or "counts"), or None when it does not."""
    folder = Path(folder)
    if (folder / layout.RECORDING).exists():
        return None
    if (folder / layout.RSVP_LIST).exists() and not layout.marker_path(folder, "present").exists():
        return "files"
    if (layout.marker_path(folder, "present").exists() and not layout.marker_path(folder, "ingest").exists()
            and not open_store(folder / layout.STORE).has_live_counts):
        return "counts"
    return None


def make_waiting_error(day, reason: str) -> WaitingForRecording:
    """The error a stage of ``day`` (a :class:`~closedloop.day.context.DayContext`) raises while it
    waits, for ``reason`` "files" or "counts" (see :class:`WaitingForRecording`)."""
    folder, number = day.folder, day.number
    recording = folder / layout.RECORDING
    again = f"then run `closedloop fit-day {number} --experiment {day.experiment}` again"
    if reason == "files":
        message = (
            f"day {number} waits for its recording. On the rig, show the RSVP list {folder / layout.RSVP_LIST} in order "
            f"(also /rsvp in {folder / layout.BUNDLE}), sending each stimulus's code at onset and the outcome codes "
            f"(docs/rig.md); copy the NSP's .nev to {recording} (and, optionally, the rig's trial log to "
            f"{folder / layout.TRIAL_LOG}); {again}."
        )
    else:
        simulated = (f" (the simulated rig wrote it to {folder / layout.RIG_STATE / layout.RECORDING})"
                     if day.config.rig.kind == "sim" else "")
        message = (
            f"day {number} waits for its recording: the session is over, but the rig sent no spike counts. Copy the "
            f"NSP's .nev of this session to {recording}{simulated}; {again}."
        )
    return WaitingForRecording(message, recording, reason)
