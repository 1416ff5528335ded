"""The digital event-code layout: what the rig sends to the NSP's 16-bit digital input, and when.

One owner for every code a recording can carry, so that a Blackrock ``.nev`` can be decoded
without closedloop (docs/rig.md prints this table):

==========================  ===============  ==================================================
code                        value            sent
==========================  ===============  ==================================================
stimulus                    1 .. 65279       on the onset flip of that stimulus (the bundle's
                                             ``codes``; one per stimulus, unique in a day)
``OFFSET``                  65280 (0xFF00)   on the flip that removes the stimulus
``FIXATION_BREAK``          65281 (0xFF01)   when fixation breaks before the end of the
                                             response window of the last onset
``VALID``                   65282 (0xFF02)   when the last onset's response window ends with
                                             fixation held and no frame dropped
``DROPPED_FRAME``           65283 (0xFF03)   when a frame of the last presentation was late
                                             (the presentation is invalid)
``SESSION_START``           65290 (0xFF0A)   once, before the first onset of a session
``SESSION_END``             65291 (0xFF0B)   once, after the last outcome of a session
==========================  ===============  ==================================================

An outcome code (``FIXATION_BREAK``, ``VALID``, ``DROPPED_FRAME``) belongs to the nearest
stimulus code before it (:func:`compute_outcomes`). Codes 65284..65289 and 65292..65535 are
reserved. A zero word clears the strobe and means nothing. Every other non-zero word that is
not a control code marks an onset (:func:`is_onset_code`): a stimulus code, or a reserved code
that the ingest then reports as unknown.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "MAX_STIMULUS_CODE",
    "OFFSET",
    "FIXATION_BREAK",
    "VALID",
    "DROPPED_FRAME",
    "SESSION_START",
    "SESSION_END",
    "OUTCOME_CODES",
    "CONTROL_CODES",
    "is_stimulus_code",
    "is_onset_code",
    "compute_outcomes",
]

MAX_STIMULUS_CODE = 0xFEFF
OFFSET = 0xFF00
FIXATION_BREAK = 0xFF01
VALID = 0xFF02
DROPPED_FRAME = 0xFF03
SESSION_START = 0xFF0A
SESSION_END = 0xFF0B

OUTCOME_CODES = {FIXATION_BREAK: "fixation_break", VALID: "valid", DROPPED_FRAME: "dropped_frame"}
CONTROL_CODES = {OFFSET: "offset", **OUTCOME_CODES, SESSION_START: "session_start", SESSION_END: "session_end"}


def is_stimulus_code(codes) -> np.ndarray:
    """Whether each code (any integer array) is a stimulus code, 1..``MAX_STIMULUS_CODE``; bool, same shape."""
    codes = np.asarray(codes, dtype=np.int64)
    return (codes >= 1) & (codes <= MAX_STIMULUS_CODE)


def is_onset_code(words) -> np.ndarray:
    """Whether each digital word (any integer array) marks an onset: non-zero and not a control
    code (so a reserved code is an onset, which no stimulus explains); bool, same shape."""
    words = np.asarray(words, dtype=np.int64)
    return (words != 0) & ~np.isin(words, list(CONTROL_CODES))


def compute_outcomes(words) -> tuple[np.ndarray, int]:
    """The outcome code of every onset in a sequence of digital words in time order.

    ``words`` ``(n_events,)``. Returns ``(outcomes, n_orphans)``: ``outcomes`` uint16
    ``(n_onsets,)``, one per onset word (:func:`is_onset_code`) in order: ``FIXATION_BREAK`` or
    ``DROPPED_FRAME`` when any such code belongs to the onset (the later one when there are
    both), else ``VALID`` when one does, else 0 (no outcome was sent). An outcome code belongs to
    the nearest onset before it; ``n_orphans`` counts outcome codes before the first onset.
    """
    words = np.asarray(words, dtype=np.int64).reshape(-1)
    onset = is_onset_code(words)
    owner = np.cumsum(onset) - 1  # index of the last onset at or before each word
    outcomes = np.zeros(int(onset.sum()), dtype=np.uint16)
    is_outcome = np.isin(words, list(OUTCOME_CODES))
    n_orphans = int((is_outcome & (owner < 0)).sum())
    for position in np.flatnonzero(is_outcome & (owner >= 0)):
        index, word = owner[position], words[position]
        if word != VALID or outcomes[index] == 0:
            outcomes[index] = word
    return outcomes, n_orphans
