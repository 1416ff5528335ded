"""The files hand-off for a rig that runs its own software (MWorks, NIMH MonkeyLogic, Psychtoolbox).

Out goes the day's RSVP list (:func:`make_rsvp_list`): every stimulus ``repetitions`` times, in
the seeded order the streaming rig would start with (:func:`make_rsvp_order`, which the
streaming schedule also uses), written as ``rsvp.csv`` (:func:`write_rsvp_csv`) and into the rig
bundle. Back comes the NSP's ``.nev`` and, optionally, the rig's trial log (:func:`read_trial_log`);
:func:`read_recorded_presentations` decodes what was shown from the event codes
(:mod:`closedloop.data.event_codes`): one presentation per stimulus onset, valid from its outcome
code or from the trial log. docs/rig.md documents both files for the lab.

``rsvp.csv`` has a header and one row per presentation: ``presentation`` (0, 1, … in showing
order), ``stimulus_id`` (the bundle's id of the stimulus), ``code`` (the event code to send at its
onset), ``repetition`` (0 for the stimulus's first showing, 1 for its second, …).

A trial log is a CSV with a header; the columns ``code`` (the stimulus code sent at onset) and
``outcome`` (``valid``, ``fixation_break`` or ``dropped_frame``) are required, others are
ignored; one row per stimulus onset in the recording, in the same order.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import NamedTuple

import numpy as np

from closedloop.core.files import write_text
from closedloop.core.validation import check_file, check_integer, check_integer_array
from closedloop.data.event_codes import MAX_STIMULUS_CODE, OUTCOME_CODES, VALID, compute_outcomes, is_onset_code
from closedloop.data.nev import read_nev

__all__ = [
    "RSVP_COLUMNS", "TRIAL_LOG_COLUMNS", "LIST_ORDER_FRACTION", "RecordedPresentations", "make_rsvp_order",
    "make_rsvp_list", "write_rsvp_csv", "read_trial_log", "read_recorded_presentations",
]

RSVP_COLUMNS = ("presentation", "stimulus_id", "code", "repetition")
TRIAL_LOG_COLUMNS = ("code", "outcome")
#: Least fraction of recorded onsets that must follow the list's order (a recording of another list fails).
LIST_ORDER_FRACTION = 0.5
_LIST_REACH = 3  # an onset follows the list when its code is one of the next 3 entries (the rig may skip a few)
_OUTCOME_NAMES = {name: code for code, name in OUTCOME_CODES.items()}


def make_rsvp_order(stimulus_ids, repetitions: int, seed: int) -> np.ndarray:
    """The seeded RSVP order: every stimulus id ``repetitions`` times, shuffled; int64 ``(n * repetitions,)``."""
    stimuli = np.asarray(stimulus_ids, dtype=np.int64).reshape(-1)
    return np.random.default_rng([seed, 0]).permutation(np.repeat(stimuli, repetitions))


def make_rsvp_list(codes, repetitions: int, seed: int) -> dict[str, np.ndarray]:
    """The day's RSVP list for stimuli ``0..n-1`` with event ``codes`` ``(n,)``.

    Returns :data:`RSVP_COLUMNS` → int64 arrays ``(n * repetitions,)`` (``code`` uint16), in the
    order of :func:`make_rsvp_order` (the streaming rig's order before any fixation break).
    """
    codes = check_integer_array("codes", codes, shape=(None,), minimum=1, maximum=MAX_STIMULUS_CODE)
    repetitions = check_integer("repetitions", repetitions, minimum=1)
    order = make_rsvp_order(np.arange(len(codes)), repetitions, seed)
    repetition = np.zeros(len(order), dtype=np.int64)
    for stimulus in range(len(codes)):
        shown = np.flatnonzero(order == stimulus)
        repetition[shown] = np.arange(len(shown))
    return {"presentation": np.arange(len(order), dtype=np.int64), "stimulus_id": order,
            "code": codes[order].astype(np.uint16), "repetition": repetition}


def write_rsvp_csv(path: str | Path, rsvp: dict[str, np.ndarray]) -> Path:
    """Write the RSVP list (:func:`make_rsvp_list`) as ``rsvp.csv``, atomically; return the path."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(RSVP_COLUMNS)
    writer.writerows(zip(*(rsvp[column].tolist() for column in RSVP_COLUMNS)))
    return write_text(path, text.getvalue())


def read_trial_log(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """A rig's trial log (see the module docstring): codes uint16 and outcome codes uint16, ``(n_rows,)``.

    Raises ``ValueError`` naming the file, the row and what is allowed for a missing column, a
    code outside 1..65279 or an unknown outcome.
    """
    path = check_file("trial log", path)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"trial log {str(path)!r} is not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset {error.start}); "
            "give the rig's CSV trial log (see docs/rig.md)."
        ) from None
    with io.StringIO(text, newline="") as stream:
        reader = csv.DictReader(stream)
        columns = [name.strip() for name in reader.fieldnames or []]
        missing = [name for name in TRIAL_LOG_COLUMNS if name not in columns]
        if missing:
            raise ValueError(
                f"trial log {str(path)!r} lacks the column(s) {missing}: it has {columns}; a trial log needs a header "
                f"with {list(TRIAL_LOG_COLUMNS)} (other columns are ignored; see docs/rig.md)."
            )
        reader.fieldnames = columns
        codes, outcomes = [], []
        for row_number, row in enumerate(reader, start=2):
            code, outcome = (row["code"] or "").strip(), (row["outcome"] or "").strip()
            if not (code.isdigit() and 1 <= int(code) <= MAX_STIMULUS_CODE):
                raise ValueError(
                    f"trial log {str(path)!r} line {row_number}: code {code!r} is not a stimulus code; allowed are the "
                    f"integers 1..{MAX_STIMULUS_CODE} of the day's rsvp.csv."
                )
            if outcome not in _OUTCOME_NAMES:
                raise ValueError(
                    f"trial log {str(path)!r} line {row_number}: outcome {outcome!r} is not one of "
                    f"{sorted(_OUTCOME_NAMES)}."
                )
            codes.append(int(code))
            outcomes.append(_OUTCOME_NAMES[outcome])
    if not codes:
        raise ValueError(f"trial log {str(path)!r} has no rows; write one row per presentation, or leave the file out.")
    return np.array(codes, dtype=np.uint16), np.array(outcomes, dtype=np.uint16)


class RecordedPresentations(NamedTuple):
    """What a recording says was shown, one entry per stimulus onset in time order.

    ``stimulus`` int64 and ``onset_s`` float64 (s, recording clock) and ``valid`` bool
    ``(n_presentations,)``; ``validity_from``: "event codes" or "trial log"; ``n_in_list_order``:
    onsets that followed the RSVP list; ``n_without_outcome``: onsets no outcome code (or trial-log
    row) marked valid or invalid (counted invalid); ``n_orphan_outcomes``: outcome codes before the
    first onset (ignored); ``n_disagreements``: onsets whose outcome code and trial-log outcome
    differ (the trial log decides).
    """

    stimulus: np.ndarray
    onset_s: np.ndarray
    valid: np.ndarray
    validity_from: str
    n_in_list_order: int
    n_without_outcome: int
    n_orphan_outcomes: int
    n_disagreements: int


def _count_in_list_order(recorded_codes: np.ndarray, list_codes: np.ndarray) -> int:
    """Onsets whose code is one of the next few entries of the list, walking the list as they do;
    an onset off the list (a stimulus shown again after a break) leaves the place unchanged."""
    position, n_in_order = 0, 0
    for code in recorded_codes.tolist():
        hit = np.flatnonzero(list_codes[position : position + _LIST_REACH] == code)
        if hit.size:
            position += int(hit[0]) + 1
            n_in_order += 1
    return n_in_order


def read_recorded_presentations(recording_path: str | Path, codes, list_codes, *,
                                trial_log: str | Path | None = None) -> RecordedPresentations:
    """Decode the presentations of a files hand-off from the NSP's ``.nev`` (and the trial log).

    ``codes`` ``(n_stimuli,)``: the day's stimulus codes (stimulus ``k`` has ``codes[k]``);
    ``list_codes`` ``(n_list,)``: the codes of the RSVP list in order. Every onset word must be a
    code of the day, and at least :data:`LIST_ORDER_FRACTION` of the onsets must follow the list's
    order (a recording of another day's list does not); validity is the onset's outcome code
    (``VALID``: valid; ``FIXATION_BREAK``, ``DROPPED_FRAME`` or none: invalid), or the trial log's
    outcome when ``trial_log`` is given (its rows must carry the recorded onsets' codes, in order).
    Raises ``ValueError`` naming the file and the problem otherwise. See :class:`RecordedPresentations`.
    """
    codes = np.asarray(codes, dtype=np.int64)
    list_codes = np.asarray(list_codes, dtype=np.int64)
    recording = read_nev(recording_path)
    order = np.argsort(recording.event_ticks, kind="stable")
    ticks, words = recording.event_ticks[order], recording.event_words[order].astype(np.int64)
    onset = is_onset_code(words)
    onset_codes, onset_s = words[onset], ticks[onset] / recording.sampling_rate_hz
    name = str(recording_path)
    if not onset_codes.size:
        raise ValueError(f"recording {name!r} holds no stimulus onset codes; is it the day's session?")
    unknown, n_unknown = np.unique(onset_codes[~np.isin(onset_codes, codes)], return_counts=True)
    if unknown.size:
        shown = ", ".join(f"{code} ({n}x)" for code, n in zip(unknown[:10].tolist(), n_unknown[:10].tolist()))
        raise ValueError(
            f"recording {name!r} holds onset codes that no stimulus of the day has: {shown}; the day's stimulus codes "
            f"are {codes.min()}..{codes.max()} (rsvp.csv) and the control codes of docs/rig.md. Is it this day's "
            "recording, and does the rig send the list's codes?"
        )
    n_in_order = _count_in_list_order(onset_codes, list_codes)
    if n_in_order < LIST_ORDER_FRACTION * len(onset_codes):
        raise ValueError(
            f"recording {name!r} does not follow this day's RSVP list: {n_in_order} of its {len(onset_codes)} onsets "
            f"follow the list's order (at least {LIST_ORDER_FRACTION:.0%} must); is it another day's recording? Show "
            "the day's rsvp.csv in order (re-showing stimuli after fixation breaks is fine)."
        )
    outcomes, n_orphans = compute_outcomes(words)
    n_disagreements, validity_from = 0, "event codes"
    if trial_log is not None:
        log_codes, log_outcomes = read_trial_log(trial_log)
        if len(log_codes) != len(onset_codes) or (log_codes != onset_codes).any():
            first = next((k for k in range(min(len(log_codes), len(onset_codes))) if log_codes[k] != onset_codes[k]),
                         min(len(log_codes), len(onset_codes)))
            raise ValueError(
                f"trial log {str(trial_log)!r} does not match recording {name!r}: it has {len(log_codes)} rows for "
                f"{len(onset_codes)} onsets, and they first differ at presentation {first} (row {first + 2}); the trial "
                "log needs one row per stimulus onset, in the order shown."
            )
        n_disagreements = int(((outcomes != 0) & (outcomes != log_outcomes)).sum())
        outcomes, validity_from = log_outcomes, "trial log"
    elif not outcomes.any():
        raise ValueError(
            f"recording {name!r} holds no outcome codes (VALID {VALID}, FIXATION_BREAK, DROPPED_FRAME; docs/rig.md), "
            "so no presentation can be called valid; have the rig send them, or copy its trial log into the day "
            "folder as trial_log.csv."
        )
    return RecordedPresentations(
        stimulus=_stimulus_of(codes, onset_codes),
        onset_s=onset_s, valid=outcomes == VALID, validity_from=validity_from, n_in_list_order=n_in_order,
        n_without_outcome=int((outcomes == 0).sum()), n_orphan_outcomes=n_orphans, n_disagreements=n_disagreements,
    )


def _stimulus_of(codes: np.ndarray, onset_codes: np.ndarray) -> np.ndarray:
    """The stimulus index of each onset code (every one is among ``codes``)."""
    by_code = np.argsort(codes, kind="stable")
    return by_code[np.searchsorted(codes[by_code], onset_codes)].astype(np.int64)
