"""The present stage: stream a shuffled RSVP list to the rig until every stimulus has its valid repetitions.

:func:`run_presentations` keeps a few presentations queued on the rig ahead of the one on
screen, hands every outcome to ``on_result`` exactly once (the day loop writes it to the day
store), puts a stimulus shown with a fixation break back at a random place in the rest of the
list (so the order stays shuffled), and resumes from what is already recorded: a control process
restarted mid-session neither loses nor duplicates a presentation.
"""

from __future__ import annotations

import time
from collections import Counter

import numpy as np

from closedloop.core.logs import logger
from closedloop.core.validation import check_integer, check_number
from closedloop.data.handoff import make_rsvp_order
from closedloop.link.client import RigLinkError

__all__ = ["run_presentations"]


def _check_recorded(already_recorded) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if already_recorded is None:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0, dtype=bool)
    if len(already_recorded) != 3:
        raise ValueError(
            "'already_recorded' must be (presentation_ids, stimulus_ids, valid), three arrays of equal length, "
            f"but got {len(already_recorded)} items."
        )
    ids, stimuli, valid = (np.asarray(a).reshape(-1) for a in already_recorded)
    if not (len(ids) == len(stimuli) == len(valid)):
        raise ValueError(
            f"'already_recorded' arrays must have equal lengths, but got {len(ids)}, {len(stimuli)}, {len(valid)}."
        )
    return ids.astype(np.int64), stimuli.astype(np.int64), valid.astype(bool)


def run_presentations(
    client,
    stimulus_ids,
    *,
    repetitions: int,
    seed: int,
    on_result,
    already_recorded=None,
    n_ahead: int = 16,
    max_presentations: int | None = None,
    stall_s: float = 60.0,
) -> dict:
    """Present every stimulus until it has ``repetitions`` valid presentations.

    ``client``: a connected-or-not :class:`closedloop.link.client.RigClient` whose bundle is loaded.
    ``stimulus_ids``: unique stimulus ids, shape (n_stimuli,). ``seed``: seeds the shuffle and the
    re-insertion of fixation breaks. ``on_result(outcome)``: called once per presentation with a
    dict (presentation_id, stimulus_id, valid, onset_s in s on the recording clock, counts: spikes
    per site in the response window). ``already_recorded``: (presentation_ids, stimulus_ids, valid)
    of presentations stored before a restart; they count and are not handed over again.
    ``n_ahead``: presentations kept queued on the rig. ``max_presentations``: give up (RuntimeError)
    after this many new presentations (default 10 x the planned number + 100). ``stall_s``: raise
    :class:`RigLinkError` if the rig holds presentations but reports none for this long, s.

    Returns counts: n_handed (outcomes given to ``on_result``), n_valid, n_fixation_breaks,
    n_skipped (outcomes already recorded).
    """
    stimuli = np.asarray(stimulus_ids).reshape(-1)
    if stimuli.size and not np.issubdtype(stimuli.dtype, np.integer):
        raise TypeError(f"'stimulus_ids' must hold integers, but got dtype {stimuli.dtype}.")
    if len(np.unique(stimuli)) != len(stimuli):
        raise ValueError("'stimulus_ids' must be unique; use 'repetitions' to show a stimulus more than once.")
    repetitions = check_integer("repetitions", repetitions, minimum=1)
    n_ahead = check_integer("n_ahead", n_ahead, minimum=1)
    stall_s = check_number("stall_s", stall_s, minimum=0.0, inclusive=False)
    recorded_ids, recorded_stimuli, recorded_valid = _check_recorded(already_recorded)
    schedule = _Schedule(stimuli, repetitions, seed, gap=n_ahead)
    for presentation_id, stimulus_id, valid in sorted(zip(*(a.tolist() for a in (recorded_ids, recorded_stimuli, recorded_valid)))):
        if schedule.stimulus(presentation_id) != stimulus_id:
            raise ValueError(
                f"stored presentation {presentation_id} showed stimulus {stimulus_id}, but this schedule (seed {seed}, "
                f"{repetitions} repetitions) puts stimulus {schedule.stimulus(presentation_id)} there: the stored "
                "presentations belong to another schedule; resume with the seed and settings they were made with."
            )
        schedule.resolve(presentation_id, valid)
    recorded = set(recorded_ids.tolist())
    summary = Counter(n_handed=0, n_valid=0, n_fixation_breaks=0, n_skipped=0)

    def handle(outcome: dict) -> None:
        presentation_id = outcome["presentation_id"]
        if presentation_id in recorded:
            summary["n_skipped"] += 1
            return
        expected = schedule.stimulus(presentation_id)
        if outcome["stimulus_id"] != expected:
            raise RigLinkError(
                f"the rig reports presentation {presentation_id} as stimulus {outcome['stimulus_id']}, but it was "
                f"scheduled as stimulus {expected}; the rig's session does not belong to this day"
            )
        on_result(outcome)
        recorded.add(presentation_id)
        schedule.resolve(presentation_id, bool(outcome["valid"]))
        summary["n_handed"] += 1
        summary["n_valid" if outcome["valid"] else "n_fixation_breaks"] += 1

    client.connect()
    for outcome in client.read_outcomes(0.0):
        handle(outcome)
    limit = max_presentations if max_presentations is not None else 10 * len(schedule.order) + 100
    next_id, n_new, last_progress = 0, 0, time.monotonic()
    while not schedule.finished:
        wanted = []
        while next_id < schedule.queueable and len(client.outstanding) + len(wanted) < n_ahead:
            if next_id not in recorded and next_id not in client.outstanding:
                wanted.append((next_id, schedule.stimulus(next_id)))
            next_id += 1
        if wanted:
            if n_new + len(wanted) > limit:
                raise RuntimeError(
                    f"gave up after {n_new} presentations (max_presentations={limit}): too many fixation breaks; "
                    "check the rig, then run again to resume (nothing recorded is lost)."
                )
            client.queue(wanted)
            n_new += len(wanted)
        outcomes = client.read_outcomes(0.05)
        for outcome in outcomes:
            handle(outcome)
        if outcomes:
            last_progress = time.monotonic()
        elif client.outstanding and time.monotonic() - last_progress > stall_s:
            raise RigLinkError(
                f"the rig holds {len(client.outstanding)} presentations but reported none for {stall_s:g} s; "
                "check that it is presenting (not stopped), then run again to resume."
            )
        elif not client.outstanding and next_id >= schedule.queueable and not schedule.finished:
            next_id = schedule.first_unresolved  # the rig lost queued presentations (restart): queue them again
    logger.info("presentations done: %s", dict(summary))
    return dict(summary)


class _Schedule:
    """The RSVP order as a deterministic function of the seed and the fixation breaks seen.

    Presentation id k shows ``order[k]``. The order starts as every stimulus ``repetitions``
    times, shuffled (:func:`~closedloop.data.handoff.make_rsvp_order`, as in the files hand-off's
    list); when presentation k is resolved as a fixation break, its stimulus is put back at a
    random position after ``k + gap`` (drawn from a generator keyed by the seed and k), where no
    presentation has been queued yet. Breaks are applied in id order, whatever order the
    outcomes arrive in, so a resumed session (replaying what was stored) and an uninterrupted one
    give the same order for the same fixation breaks.
    """

    def __init__(self, stimuli: np.ndarray, repetitions: int, seed: int, *, gap: int) -> None:
        self.seed, self.gap = seed, gap
        self.order = make_rsvp_order(stimuli, repetitions, seed).tolist()
        self.valid: dict[int, bool] = {}
        self.first_unresolved = 0

    def stimulus(self, presentation_id: int) -> int:
        if not 0 <= presentation_id < len(self.order):
            raise RigLinkError(f"presentation id {presentation_id} was never scheduled (0..{len(self.order) - 1})")
        return int(self.order[presentation_id])

    @property
    def finished(self) -> bool:
        return self.first_unresolved >= len(self.order)

    @property
    def queueable(self) -> int:
        """Ids below this may be queued: later positions may still receive re-inserted stimuli."""
        return min(len(self.order), self.first_unresolved + self.gap)

    def resolve(self, presentation_id: int, valid: bool) -> None:
        self.valid[presentation_id] = valid
        while self.first_unresolved in self.valid:
            k = self.first_unresolved
            if not self.valid[k]:
                low = k + 1 + self.gap
                position = int(np.random.default_rng([self.seed, 1, k]).integers(min(low, len(self.order)), len(self.order) + 1))
                self.order.insert(position, self.order[k])
            self.first_unresolved += 1


