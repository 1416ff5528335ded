"""Category preference and the planted crossing budget."""

import pytest

from analysis.categories import compute_category_preference
from analysis.experiment import read_experiment
from tests.planted import CATEGORIES, GAIN, OTHER, PREFERRED


def test_preferred_category_and_planted_crossing(planted_experiment):
    days = read_experiment(planted_experiment)
    result = compute_category_preference([d.responses for d in days], window_length_s=0.1)
    for row in result["preference"]:
        assert row["preferred"] == CATEGORIES[row["site"]] and row["preferred_mean"] == PREFERRED
        assert row["n_preferred"] == 3 * 4 and row["least_mean"] == OTHER and row["n_categories"] == 4
    # non-preferred attacked images respond OTHER + g ε, pooled over the 4 days: slope = mean gain
    mean_gain = sum(GAIN.values()) / len(GAIN)
    for row in result["crossing"]:
        assert row["crossing_eps"] == pytest.approx((PREFERRED - OTHER) / mean_gain)
        assert row["max_eps"] == 8.0 and row["super_stimulus"]
        assert row["rate_at_max_eps_hz"] == pytest.approx((OTHER + mean_gain * 8) / 0.1)
        assert row["preferred_rate_hz"] == pytest.approx(PREFERRED / 0.1)
    site0 = [r for r in result["curves"] if r["site"] == 0]
    assert [r["eps"] for r in site0] == [0.0, 2.0, 4.0, 8.0]
    assert [r["n_images"] for r in site0] == [12, 12, 12, 12]  # 3 non-preferred attacked images × 4 days
    assert site0[0]["mean"] == OTHER
    summary = result["summary"][0]
    assert summary["n_crossing"] == 3 and summary["crossing_eps_sd"] == pytest.approx(0.0)


def test_no_crossing_when_attacks_stay_below(planted_experiment):
    day0 = read_experiment(planted_experiment)[0]  # gain 0.5: 5 + 0.5 · 8 = 9 < 15
    result = compute_category_preference([day0.responses], window_length_s=0.1)
    assert all(r["crossing_eps"] is None and not r["super_stimulus"] for r in result["crossing"])
    assert result["summary"][0]["n_crossing"] == 0 and result["summary"][0]["crossing_eps_mean"] is None


def test_bad_inputs_are_refused(planted_experiment):
    day0 = read_experiment(planted_experiment)[0]
    with pytest.raises(TypeError, match="'responses' must be a non-empty list"):
        compute_category_preference(day0.responses, window_length_s=0.1)
    with pytest.raises(ValueError, match="'window_length_s' must lie in"):
        compute_category_preference([day0.responses], window_length_s=0.0)
