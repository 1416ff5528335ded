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

from closedloop.link import RigLinkError
from closedloop.logs import logger
from closedloop.validation import check_integer, check_number

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

    ``client``: a connected-or-not :class:`closedloop.link.RigClient` whose bundle is loaded.
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
    rng = np.random.default_rng(seed)
    targets = {int(s) for s in stimuli}
    recorded = {int(i) for i in recorded_ids}
    n_valid = Counter(int(s) for s in recorded_stimuli[recorded_valid])
    summary = Counter(n_handed=0, n_valid=0, n_fixation_breaks=0, n_skipped=0)

    client.connect()
    seen = set(recorded)

    def handle(outcome: dict) -> None:
        presentation_id, stimulus_id = outcome["presentation_id"], outcome["stimulus_id"]
        seen.add(presentation_id)
        if presentation_id in recorded:
            summary["n_skipped"] += 1
            return
        on_result(outcome)
        recorded.add(presentation_id)
        summary["n_handed"] += 1
        summary["n_valid" if outcome["valid"] else "n_fixation_breaks"] += 1
        if outcome["valid"] and stimulus_id in targets:
            n_valid[stimulus_id] += 1

    for outcome in client.read_outcomes(0.0):
        handle(outcome)
    todo: list[int] = []
    _top_up(todo, targets, n_valid, client.outstanding, repetitions, rng)
    limit = max_presentations if max_presentations is not None else 10 * len(todo) + 100
    next_id = max([*seen, *client.outstanding, -1]) + 1
    n_new, last_progress = 0, time.monotonic()
    while todo or client.outstanding:
        if todo and len(client.outstanding) < n_ahead:
            batch = [todo.pop() for _ in range(min(len(todo), n_ahead - len(client.outstanding)))]
            if n_new + len(batch) > limit:
                raise RuntimeError(
                    f"gave up after {n_new} presentations (max_presentations={limit}): too many fixation breaks; "
                    "check the rig, then run again to resume (nothing recorded is lost)."
                )
            client.queue([(next_id + k, s) for k, s in enumerate(batch)])
            next_id, n_new = next_id + len(batch), n_new + len(batch)
        outcomes = client.read_outcomes(0.05)
        for outcome in outcomes:
            handle(outcome)
        if outcomes:
            last_progress = time.monotonic()
            _top_up(todo, targets, n_valid, client.outstanding, repetitions, rng)
        elif time.monotonic() - last_progress > stall_s:
            raise RigLinkError(
                f"the rig holds {len(client.outstanding)} presentations but reported none for {stall_s:g} s; "
                "check that it is presenting (not stopped), then run again to resume."
            )
    logger.info("presentations done: %s", dict(summary))
    return dict(summary)


def _top_up(todo: list[int], targets: set[int], n_valid: Counter, outstanding: dict, repetitions: int, rng) -> None:
    """Insert at random places in ``todo`` each stimulus short of valid + queued repetitions."""
    planned = Counter(todo) + Counter(s for s in outstanding.values() if s in targets)
    for stimulus in sorted(targets):
        for _ in range(repetitions - n_valid[stimulus] - planned[stimulus]):
            todo.insert(int(rng.integers(0, len(todo) + 1)), stimulus)
