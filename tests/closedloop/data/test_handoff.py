"""The files hand-off's nouns: the RSVP list out, the event codes and the trial log back."""

import csv

import h5py
import numpy as np
import pytest

from closedloop.data.bundle import check_bundle, make_event_codes, write_bundle
from closedloop.data.counts import compute_nev_counts, compute_onsets
from closedloop.data.event_codes import (
    DROPPED_FRAME,
    FIXATION_BREAK,
    OFFSET,
    SESSION_END,
    SESSION_START,
    VALID,
    compute_outcomes,
)
from closedloop.data.handoff import make_rsvp_list, read_recorded_presentations, read_trial_log, write_rsvp_csv
from closedloop.data.nev import read_nev
from closedloop.data.recording import Recording
from closedloop.link.presentations import _Schedule
from rigs.nev import write_nev

STEP = 6000  # ticks between onsets (0.2 s at 30 kHz)


def _write_session(path, codes, outcomes, *, extra=()):
    """A .nev of one session: per presentation its code, OFFSET, then its outcome code (0: none)."""
    ticks, words = [10], [SESSION_START]
    for k, (code, outcome) in enumerate(zip(codes, outcomes)):
        onset = STEP * (k + 1)
        ticks += [onset, onset + 3000]
        words += [code, OFFSET]
        if outcome:
            ticks.append(onset + 5100)
            words.append(outcome)
    ticks.append(STEP * (len(codes) + 1))
    words.append(SESSION_END)
    for tick, word in extra:
        ticks.append(tick)
        words.append(word)
    order = np.argsort(ticks, kind="stable")
    spikes = np.arange(STEP, STEP * (len(codes) + 1), 700)
    recording = Recording.from_ticks(spikes, np.ones(len(spikes), int), np.ones(len(spikes), int),
                                     np.array(ticks)[order], np.array(words)[order], (1,))
    return write_nev(path, recording)


def test_the_list_is_the_streaming_order_with_every_repetition(tmp_path):
    codes = make_event_codes(5) + 10
    rsvp = make_rsvp_list(codes, 3, seed=7)
    assert rsvp["stimulus_id"].tolist() == _Schedule(np.arange(5), 3, 7, gap=4).order  # the streaming rig's order
    assert np.bincount(rsvp["stimulus_id"]).tolist() == [3] * 5
    assert rsvp["code"].tolist() == codes[rsvp["stimulus_id"]].tolist()
    for stimulus in range(5):
        assert rsvp["repetition"][rsvp["stimulus_id"] == stimulus].tolist() == [0, 1, 2]
    assert rsvp["presentation"].tolist() == list(range(15))
    rows = list(csv.DictReader(write_rsvp_csv(tmp_path / "rsvp.csv", rsvp).open()))
    assert list(rows[0]) == ["presentation", "stimulus_id", "code", "repetition"]
    assert [int(row["code"]) for row in rows] == rsvp["code"].tolist()


def test_the_list_in_the_bundle_is_plain_numeric_hdf5(tmp_path, rng):
    codes = make_event_codes(4)
    rsvp = make_rsvp_list(codes, 2, seed=1)
    path = tmp_path / "stimuli.h5"
    write_bundle(path, rng.integers(0, 256, (4, 224, 224, 3), dtype=np.uint8), np.arange(4), codes, rsvp=rsvp)
    assert check_bundle(path).tolist() == [0, 1, 2, 3]
    with h5py.File(path, "r") as handle:
        for name in ("presentation", "stimulus_id", "code", "repetition"):
            dataset = handle[f"rsvp/{name}"]
            assert dataset.dtype.kind in "iu" and dataset.shape == (8,) and dataset.compression is None
        assert handle["rsvp/code"][()].tolist() == rsvp["code"].tolist()
    with pytest.raises(ValueError, match=r"'rsvp': its stimulus ids and codes must be the bundle's"):
        write_bundle(path, np.zeros((4, 224, 224, 3), np.uint8), np.arange(4), codes + 1, rsvp=rsvp)


def test_an_outcome_code_belongs_to_the_nearest_onset_before_it():
    words = [SESSION_START, VALID, 5, OFFSET, VALID, 0, 6, FIXATION_BREAK, VALID, 7, OFFSET, 65290 - 2, 8, VALID,
             DROPPED_FRAME, 9, SESSION_END]
    outcomes, n_orphans = compute_outcomes(words)
    # onsets: 5, 6, 7, 65288 (reserved: an onset no stimulus has), 8, 9
    assert outcomes.tolist() == [VALID, FIXATION_BREAK, 0, 0, DROPPED_FRAME, 0] and n_orphans == 1


def test_control_codes_are_not_onsets(tmp_path):
    path = _write_session(tmp_path / "r.nev", [3, 4, 3], [VALID, FIXATION_BREAK, 0])
    onsets = compute_onsets(read_nev(path))
    assert onsets.codes.tolist() == [3, 4, 3] and (onsets.times_s * 30000).round().tolist() == [6000, 12000, 18000]
    assert compute_nev_counts(path)[0].codes.tolist() == [3, 4, 3]  # the streaming counter agrees


def test_presentations_decoded_from_the_event_codes(tmp_path):
    codes = make_event_codes(3)
    rsvp = make_rsvp_list(codes, 2, seed=0)
    shown = rsvp["code"].tolist() + [rsvp["code"][1]]  # the break re-shown at the end
    outcomes = [VALID] * 6 + [VALID]
    outcomes[1] = FIXATION_BREAK
    outcomes[4] = 0  # no outcome sent: invalid
    found = read_recorded_presentations(_write_session(tmp_path / "r.nev", shown, outcomes), codes, rsvp["code"])
    assert found.stimulus.tolist() == [int(c) - 1 for c in shown]
    assert found.valid.tolist() == [True, False, True, True, False, True, True]
    assert (found.onset_s * 30000).round().tolist() == [STEP * (k + 1) for k in range(7)]
    assert (found.validity_from, found.n_in_list_order, found.n_without_outcome) == ("event codes", 6, 1)


def test_the_trial_log_decides_validity(tmp_path):
    codes = make_event_codes(3)
    rsvp = make_rsvp_list(codes, 1, seed=0)
    recording = _write_session(tmp_path / "r.nev", rsvp["code"].tolist(), [VALID, VALID, 0])
    log = tmp_path / "trial_log.csv"
    names = {VALID: "valid", FIXATION_BREAK: "fixation_break"}
    log.write_text("trial,code,outcome,rt_ms\n" + "".join(
        f"{k},{c},{names[o]},300\n" for k, (c, o) in enumerate(zip(rsvp["code"].tolist(), [VALID, FIXATION_BREAK, VALID]))))
    found = read_recorded_presentations(recording, codes, rsvp["code"], trial_log=log)
    assert found.valid.tolist() == [True, False, True]
    assert (found.validity_from, found.n_disagreements) == ("trial log", 1)


def test_bad_trial_logs_are_refused_with_the_line(tmp_path):
    log = tmp_path / "trial_log.csv"
    log.write_text("trial,stim,result\n1,3,valid\n")
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['code', 'outcome'\]: it has \['trial', 'stim', 'result'\]"):
        read_trial_log(log)
    log.write_text("code,outcome\n3,valid\n4,broke\n")
    with pytest.raises(ValueError, match=r"line 3: outcome 'broke' is not one of \['dropped_frame', 'fixation_break', 'valid'\]"):
        read_trial_log(log)
    log.write_text("code,outcome\n65280,valid\n")
    with pytest.raises(ValueError, match=r"line 2: code '65280' is not a stimulus code; allowed are the integers 1..65279"):
        read_trial_log(log)
    log.write_text("code,outcome\n")
    with pytest.raises(ValueError, match=r"has no rows"):
        read_trial_log(log)
    log.write_bytes(b"code,outcome\n3,valid\n\xff\xfe\x00binary")  # a binary file copied by mistake
    with pytest.raises(ValueError, match=r"trial log '.*trial_log.csv' is not UTF-8 text \(byte 0xff at offset 21\)"):
        read_trial_log(log)


def test_a_trial_log_of_another_session_is_refused(tmp_path):
    codes = make_event_codes(3)
    rsvp = make_rsvp_list(codes, 1, seed=0)
    recording = _write_session(tmp_path / "r.nev", rsvp["code"].tolist(), [VALID] * 3)
    log = tmp_path / "trial_log.csv"
    log.write_text("code,outcome\n" + "".join(f"{c},valid\n" for c in rsvp["code"].tolist()[::-1]))
    with pytest.raises(ValueError, match=r"does not match recording .*3 rows for 3 onsets, and they first differ at presentation 0"):
        read_recorded_presentations(recording, codes, rsvp["code"], trial_log=log)


def test_unknown_codes_and_another_days_list_are_refused(tmp_path):
    codes = make_event_codes(20)
    rsvp = make_rsvp_list(codes, 2, seed=0)
    unknown = _write_session(tmp_path / "u.nev", rsvp["code"].tolist()[:5] + [33, 65300], [VALID] * 7)
    with pytest.raises(ValueError, match=r"onset codes that no stimulus of the day has: 33 \(1x\), 65300 \(1x\); the day's "
                                         r"stimulus codes are 1..20"):
        read_recorded_presentations(unknown, codes, rsvp["code"])
    other = make_rsvp_list(codes, 2, seed=1)  # another day's list: same codes, another order
    recording = _write_session(tmp_path / "o.nev", other["code"].tolist(), [VALID] * 40)
    with pytest.raises(ValueError, match=r"does not follow this day's RSVP list: \d+ of its 40 onsets follow the list's order "
                                         r"\(at least 50% must\); is it another day's recording"):
        read_recorded_presentations(recording, codes, rsvp["code"])
    silent = _write_session(tmp_path / "s.nev", rsvp["code"].tolist(), [0] * 40)
    with pytest.raises(ValueError, match=r"holds no outcome codes .* copy its trial log into the day folder as trial_log.csv"):
        read_recorded_presentations(silent, codes, rsvp["code"])
