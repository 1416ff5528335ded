"""Sensitivity curves against the planted experiment and exact scale references."""

import numpy as np
import pytest

from analysis.experiment import read_experiment
from analysis.sensitivity_curves import compute_response_scale, compute_sensitivity_curves
from tests.planted import BUDGETS, OTHER, PREFERRED


def test_normalised_bound_equals_the_planted_change_over_sigma(planted_experiment):
    day = read_experiment(planted_experiment)[2]  # gain 2: every attack adds 2 ε spikes per window
    sigma = np.std([PREFERRED] * 3 + [OTHER] * 9, ddof=1)
    curves = compute_sensitivity_curves(day.records)
    for row in curves["sites"]:
        assert row["estimate"] == pytest.approx(2 * row["eps"])
        assert row["normalized"] == pytest.approx(2 * row["eps"] / sigma)
        assert row["n_images"] == 4 and row["sem"] == pytest.approx(0.0)
    assert [r["eps"] for r in curves["mean"]] == list(BUDGETS)
    for row in curves["mean"]:
        assert row["n_sites"] == 3 and row["n_images"] == 12
        assert row["mean"] == pytest.approx(2 * row["eps"] / sigma) and row["sd"] == pytest.approx(0.0)
    gaussian = compute_sensitivity_curves(day.records, kind="gaussian")
    assert all(r["mean"] == pytest.approx(0.0) for r in gaussian["mean"])


def test_mean_abs_difference_is_exact():
    values = np.array([[0.0, 10.0], [1.0, 10.0], [2.0, 10.0], [3.0, 10.0]])
    scale = compute_response_scale(values)
    site0, site1 = scale["sites"]
    assert site0["mean_abs_difference"] == pytest.approx(10 / 6)  # |pairs| = 1+2+3+1+2+1 over 6 pairs
    assert site0["sigma"] == pytest.approx(np.std([0, 1, 2, 3], ddof=1))
    assert site0["normalized_difference"] == pytest.approx(10 / 6 / np.std([0, 1, 2, 3], ddof=1))
    assert site1["normalized_difference"] is None  # constant site: no scale
    assert scale["mean"][0]["n_sites"] == 1 and scale["mean"][0]["clean_sd_reference"] == 1.0


def test_gaussian_responses_give_two_over_root_pi(rng):
    scale = compute_response_scale(rng.normal(50, 7, size=(4000, 2)))
    assert scale["mean"][0]["normalized_difference"] == pytest.approx(2 / np.sqrt(np.pi), rel=0.03)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="Invalid value for 'kind'.*but got 'atack'"):
        compute_sensitivity_curves([], kind="atack")
    with pytest.raises(TypeError, match="'records' must be a list"):
        compute_sensitivity_curves({"site": 0})
    with pytest.raises(ValueError, match="at least 2 clean images"):
        compute_response_scale(np.ones((1, 3)))
