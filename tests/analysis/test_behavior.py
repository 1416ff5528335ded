"""analysis.behavior: lapse correction, MTME, recovery of known observers' probabilities, the report page."""

import numpy as np
import pytest
from behavior_sets import write_stimulus_set

from analysis.behavior import (
    compute_choice_probabilities,
    compute_confusion,
    compute_detection_rates,
    compute_mtme_table,
    compute_rates,
    lapse_correct,
    mtme,
    read_behavior_data,
)
from analysis.behavior_report import write_behavior_report
from closedloop.behavior.observers import ObserverModel, _choose, compute_observer_probabilities
from closedloop.behavior.server import write_behavior_result
from closedloop.behavior.sessions import read_behavior_build, write_behavior_sessions
from closedloop.core.files import read_json

LAPSE, TEMPERATURE, SCALE = 0.3, 2.0, 20.0


def test_lapse_correct_inverts_the_lapse_model_and_broadcasts():
    truth, gamma = np.array([[0.0, 0.25, 1.0]]), np.array([[0.0], [0.3], [0.6]])
    observed = (1 - gamma) * truth + gamma / 9
    p_catch = 1 - gamma * (1 - 1 / 9)
    assert np.allclose(lapse_correct(observed, p_catch), np.broadcast_to(truth, (3, 3)))
    assert lapse_correct(0.5, 1.0) == 0.5
    assert lapse_correct(0.75, 0.75, n_choices=2) == pytest.approx(1.0)  # gamma 0.5: p = 0.5 * 1 + 0.25


@pytest.mark.parametrize(("args", "error", "message"), [
    ((0.5, 0.1), ValueError, r"'p_catch' must be > 1/n_choices = 0.111"),
    ((1.5, 0.9), ValueError, r"'p' must hold probabilities in \[0, 1\]"),
    ((0.5, np.nan), ValueError, r"'p_catch' must hold probabilities"),
    ((0.5, 0.9, 1), ValueError, r"'n_choices' must lie in \[2, inf\]"),
    ((0.5, 0.9, 2.5), TypeError, "'n_choices' must be an integer"),
])
def test_lapse_correct_refuses_bad_input(args, error, message):
    with pytest.raises(error, match=message):
        lapse_correct(*args)


def test_mtme_matches_hand_computed_cases():
    # rate 0.02 per unit eps up to 10: exceeds 0.1 after eps 5; grid step 30/99, first point > 5 is 17 * 30/99.
    assert mtme([0, 10, 30], [0, 0.2, 0.4]) == pytest.approx(17 * 30 / 99)
    assert mtme([0, 10, 30], [0, 0.05, 0.1]) is None  # reaches, never exceeds, 0.1
    assert mtme([0, 30], [0.5, 0.9]) == 0.0
    assert mtme([0, 3, 30], [0, 0.6, 0.6], threshold=0.5, max_budget=10) == pytest.approx(25 * 10 / 99)  # 0.5 at 2.5
    assert mtme([5, 10], [0, 1], max_budget=30) == pytest.approx(19 * 30 / 99)  # nothing below eps 5 is used; 0.1 at 5.5
    assert mtme([0, 15], [0, 0.05], max_budget=30) is None  # not extrapolated past 15


@pytest.mark.parametrize(("budgets", "rates", "message"), [
    ([0, 10], [0.1], "same length >= 2"),
    ([10, 0], [0.1, 0.2], "strictly increasing"),
    ([0, 10], [0.1, np.nan], "'rates' finite"),
])
def test_mtme_refuses_bad_curves(budgets, rates, message):
    with pytest.raises(ValueError, match=message):
        mtme(budgets, rates)


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    """40 subjects with lapse 0.3 (softmax of guide g's logits at temperature 2), results written through the server."""
    root = tmp_path_factory.mktemp("observers")
    write_stimulus_set(root / "set")
    out = root / "task"
    write_behavior_sessions(root / "set", out, n_warmup=2, n_test=36, n_reference=9, n_catch=30, n_subjects_per_image=40,
                            detection_budgets=[5.0, 30.0], detection_modes=["disrupt"], n_detection_items=18)
    build, manifest = read_behavior_build(out), read_json(out / "manifest.json")
    by_item = {record["item"]: record for record in manifest["records"]}
    items = {name: by_item[item] for name, item in build["stimuli"].items() if item in by_item}
    observer = ObserverModel("g", temperature=TEMPERATURE, lapse_rate=LAPSE, detection_scale=SCALE)
    rng = np.random.default_rng(3)
    for listing in build["sessions"]:
        session = read_json(out / "site" / "sessions" / f"{listing['session']}.json")
        trials = [{"index": t["index"], "role": t["role"], "stimulus": t.get("stimulus"), "order": t.get("order"),
                   "response": _choose(t, session["kind"], observer, items, manifest["category_names"], rng)}
                  for t in session["trials"]]
        write_behavior_result(out, {"format": "closedloop.behavior_result", "session": session["session"], "trials": trials})
    return out, read_behavior_data(out)


def test_corrected_probabilities_recover_the_observers_truth(simulated):
    _, data = simulated
    truth = compute_observer_probabilities([r["logits"]["g"] for r in data.items], TEMPERATURE)
    estimate = compute_choice_probabilities(data)
    n = (data.counts.sum(axis=2) > 0).sum(axis=0)[:, None]
    observed = (1 - LAPSE) * truth + LAPSE / 9
    z = (estimate - truth) / (np.sqrt(observed * (1 - observed) / n) / (1 - LAPSE))
    assert np.abs(z).max() < 5 and np.mean(z**2) < 1.6  # calibrated: errors are sampling errors
    naive = (data.counts / data.counts.sum(axis=2, keepdims=True)).mean(axis=0)
    assert np.abs(naive - truth).max() > 3 * np.abs(estimate - truth).mean()  # uncorrected: visibly biased
    assert np.mean((1 - data.p_catch) / (8 / 9)) == pytest.approx(LAPSE, abs=0.045)  # 3 s.e. over 1200 catch trials


def test_rates_confusion_and_mtme_follow_the_known_truth(simulated):
    _, data = simulated
    rates = compute_rates(data, n_boot=300)
    index = {name: k for k, name in enumerate(data.category_names)}
    truth = compute_observer_probabilities([r["logits"]["g"] for r in data.items], TEMPERATURE)
    for row in (r for r in rates if r["observer"] == "people" and r["measure"] == "disruption" and r["budget"] > 0):
        members = [i for i, r in enumerate(data.items) if (r["mode"], r["budget"]) == (row["mode"], row["budget"])]
        expected = np.mean([1 - truth[i, index[data.items[i]["category"]]] for i in members])
        assert row["low"] - 0.02 <= expected <= row["high"] + 0.02
        assert row["n_items"] == 9 and row["n_subjects"] == 40
    guide = [r for r in rates if (r["observer"], r["measure"], r["mode"]) == ("g", "target", "target")]
    assert [(r["budget"], r["rate"]) for r in guide] == [(0.0, 0.0), (5.0, 0.0), (30.0, 1.0)]  # argmax moves at eps 30
    table = {(r["observer"], r["mode"]): r["mtme"] for r in compute_mtme_table(rates)}
    assert table[("g", "target")] == pytest.approx(next(b for b in np.linspace(0, 30, 100) if 5 < b and (b - 5) / 25 > 0.1))
    confusion = compute_confusion(data, compute_choice_probabilities(data), mode="control")
    right = np.exp(3 / TEMPERATURE) / (np.exp(3 / TEMPERATURE) + 8)  # clean images: logit 3 on the start category
    assert np.diag(confusion).mean() == pytest.approx(right, abs=0.04)
    assert confusion[~np.eye(9, dtype=bool)].mean() == pytest.approx((1 - right) / 8, abs=0.01)
    assert np.allclose(confusion.sum(axis=1), 1)
    with pytest.raises(ValueError, match=r"'probabilities' must have shape \(n_items, n_categories\)"):
        compute_confusion(data, np.zeros((3, 9)), mode="control")


def test_detection_rates_are_lapse_and_bias_corrected(simulated):
    _, data = simulated
    rows = {r["budget"]: r for r in compute_detection_rates(data, n_boot=300)}
    for budget, row in rows.items():
        seen = 1 - np.exp(-0.9 * budget / SCALE)
        assert row["low"] - 0.03 <= seen <= row["high"] + 0.03
        assert row["false_alarm_rate"] == pytest.approx(0.5, abs=0.08)
    assert rows[30.0]["detection"] > rows[5.0]["detection"] + 0.3


def test_report_page_has_every_section(simulated, tmp_path):
    out, _ = simulated
    result = write_behavior_report(out, html_path=tmp_path / "behavior.html", n_boot=50)
    page = (tmp_path / "behavior.html").read_text()
    for heading in ("Disruption rate vs budget", "Target-choice rate vs budget", "Confusion matrices",
                    "Same/different detection", "MTME"):
        assert heading in page
    assert page.count("data:image/png;base64") == 4
    assert {p.rsplit("/", 1)[1] for p in result["tables"]} == {"rates.csv", "mtme.csv", "detection.csv", "subjects.csv"}
    assert result["n_subjects"] == 40
