"""Estimate vs truth on the planted experiment (truth = 1.5 × the planted change)."""

import pytest

from analysis.experiment import read_experiment
from analysis.ground_truth import compute_truth_comparison


def test_planted_bound_is_two_thirds_of_the_truth(planted_experiment):
    days = read_experiment(planted_experiment)
    result = compute_truth_comparison({d.day: d.records for d in days})
    assert len(result["sites"]) == 4 * 3 * 3
    assert all(r["below"] and r["within_2se"] and r["ratio"] == pytest.approx(2 / 3) for r in result["sites"])
    assert [r["n"] for r in result["summary"]] == [12, 12, 12]


def test_estimate_above_truth_is_flagged():
    records = [{"site": 0, "eps": 1.0, "kind": "attack", "n_images": 4, "estimate": 3.0, "sem": 0.4, "sigma": 1.0,
                "normalized": 3.0, "truth": 2.0},
               {"site": 1, "eps": 1.0, "kind": "attack", "n_images": 4, "estimate": 2.5, "sem": 0.4, "sigma": 1.0,
                "normalized": 2.5, "truth": 2.0}]
    rows = compute_truth_comparison({1: records})["sites"]
    assert [(r["below"], r["within_2se"]) for r in rows] == [(False, False), (False, True)]


def test_real_rig_has_no_truth_rows():
    record = {"site": 0, "eps": 1.0, "kind": "attack", "n_images": 4, "estimate": 1.0, "sem": 0.1, "sigma": 1.0,
              "normalized": 1.0, "truth": None}
    assert compute_truth_comparison({0: [record]}) == {"sites": [], "summary": [], "days": []}
    with pytest.raises(TypeError, match="'records_by_day' must be a dict"):
        compute_truth_comparison([record])


def test_days_table_averages_the_noise_free_view_over_sites():
    def record(site, day_expected, right):
        return {"site": site, "eps": 3.0, "kind": "attack", "n_images": 4, "estimate": 1.0, "sem": 0.4, "sigma": 1.0,
                "normalized": 1.0, "truth": 2.0, "expected": day_expected, "direction_right": right}

    days = compute_truth_comparison({0: [record(0, 0.1, 0.5), record(1, 0.3, 0.25)], 1: [record(0, 0.9, 1.0), record(1, 0.7, 0.75)]})["days"]
    assert [(d["day"], d["n_sites"]) for d in days] == [(0, 2), (1, 2)]
    assert [d["expected_mean"] for d in days] == pytest.approx([0.2, 0.8])
    assert [d["direction_right_mean"] for d in days] == pytest.approx([0.375, 0.875])
    older = {k: v for k, v in record(0, 0.1, 0.5).items() if k not in ("expected", "direction_right")}
    assert compute_truth_comparison({0: [older]})["days"][0]["expected_mean"] is None
