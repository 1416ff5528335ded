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
stimulus code before it. Codes 65284..65289 and 65292..65535 are reserved.
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
