"""Simulated observers in headless Chromium: a session built, served, completed, ingested and checked."""

import shutil
from collections import Counter

import numpy as np
import pytest
from behavior_sets import write_stimulus_set

from analysis.behavior import compute_timing_summary, read_behavior_data
from closedloop.behavior.observers import ObserverModel, compute_observer_probabilities, write_simulated_results
from closedloop.behavior.server import RESULT_TRIAL_FIELDS
from closedloop.behavior.sessions import write_behavior_sessions
from closedloop.core.files import read_json

needs_chromium = pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (make browser)")


@pytest.mark.slow  # ~15 s: Chromium start and 25 real-time trials
@needs_chromium
def test_sessions_done_in_headless_chromium_are_saved_with_jspsych_timings(tmp_path):
    write_stimulus_set(tmp_path / "set")
    out = tmp_path / "task"
    write_behavior_sessions(tmp_path / "set", out, n_warmup=2, n_test=6, n_reference=2, n_catch=2,
                            detection_budgets=[30.0], detection_modes=["target"], n_detection_items=3)
    observer = ObserverModel("g", temperature=0.01, lapse_rate=0.0)  # always the guide's top category
    files = write_simulated_results(out, observer, sessions=["c001", "d001"], n_parallel=2)
    assert sorted(path.name.split("-")[0] for path in files) == ["c001", "d001"]
    results = {read_json(path)["session"]: read_json(path) for path in files}

    session = read_json(out / "site" / "sessions" / "c001.json")
    trials = results["c001"]["trials"]
    assert len(trials) == len(session["trials"]) == 12
    assert [t["role"] for t in trials] == [t["role"] for t in session["trials"]]
    assert [t["role"] for t in trials[:2]] == ["warmup"] * 2 and Counter(t["role"] for t in trials[2:]) == {
        "test": 6, "reference": 2, "catch": 2}
    assert all(set(t) <= set(RESULT_TRIAL_FIELDS) for t in trials)
    for trial, planned in zip(trials, session["trials"]):
        assert trial["buttons"] == planned["buttons"] and trial["response"] == trial["buttons"][trial["button"]]
    for trial in trials:  # jsPsych's own record of each phase: 200 ms image, 200 ms blank
        assert 195 <= trial["image_ms"] <= 300 and 195 <= trial["blank_ms"] <= 300
        assert trial["feedback_shown"] is False  # lapse 0: every clean image and shape named right
    timing = {(r["kind"], r["phase"]): r for r in compute_timing_summary(read_behavior_data(out))}
    assert abs(timing[("categorization", "image")]["median_ms"] - 200) <= 15
    assert abs(timing[("detection", "image")]["median_ms"] - 100) <= 15
    assert abs(timing[("detection", "image2")]["median_ms"] - 100) <= 15

    data = read_behavior_data(out)  # the reports land on the right images
    assert data.counts.sum() == 8 and data.p_catch.tolist() == [1.0]
    for item in np.flatnonzero(data.counts[0].sum(axis=1)):
        top = compute_observer_probabilities(data.items[item]["logits"]["g"], 0.01).argmax()
        assert data.counts[0, item].argmax() == top
    detection = results["d001"]["trials"]
    assert len(detection) == 13 and detection[9]["order"] == "catch"
    assert Counter(t["order"] for t in detection if t["order"] != "catch") == {"p-c": 3, "c-p": 3, "c-c": 3, "p-p": 3}


@needs_chromium
def test_observer_inputs_are_checked(tmp_path):
    write_stimulus_set(tmp_path / "set")
    write_behavior_sessions(tmp_path / "set", tmp_path / "task", n_test=6, detection_budgets=[])
    with pytest.raises(ValueError, match=r"'model' 'zebra' is not a model of the stimulus set; allowed: \['g', 's'\]"):
        write_simulated_results(tmp_path / "task", ObserverModel("zebra"))
    with pytest.raises(ValueError, match=r"'sessions' \['x9'\] are not sessions of this build"):
        write_simulated_results(tmp_path / "task", ObserverModel("g"), sessions=["x9"])
    with pytest.raises(ValueError, match=r"'lapse_rate' must lie in \[0, 0.99\]"):
        ObserverModel("g", lapse_rate=1.0)
