"""Image-specific curves: planted slopes, the pooled noise variance, and the significance tests."""

import numpy as np
import pytest

from analysis.experiment import read_experiment
from analysis.image_curves import compute_image_curves, compute_noise_variance
from analysis.synthetic import write_synthetic_day


def test_planted_slope_is_recovered_exactly(planted_experiment):
    day = read_experiment(planted_experiment)[3]  # gain 3: s(x, ε) = 3 ε for every image and site
    result = compute_image_curves(day.responses)
    assert len(result["points"]) == 4 * 3 * 3
    assert all(p["change"] == pytest.approx(3 * p["eps"]) for p in result["points"])
    assert len(result["image_slopes"]) == 4 * 3
    for row in result["image_slopes"]:
        assert (row["eps_low"], row["eps_high"]) == (2.0, 8.0) and row["slope"] == pytest.approx(3.0) and row["p"] == 0.0
    for row in result["site_slopes"]:
        assert row["n_images"] == 4 and row["mean_slope"] == pytest.approx(3.0) and row["p"] == 0.0
        assert row["n_significant_images"] == 4


def test_noise_variance_pools_within_stimulus_spread():
    stimulus = np.array([0, 0, 1, 1, 2])
    counts = np.array([[1], [3], [5], [5], [9]])
    valid = np.ones(5, bool)
    np.testing.assert_allclose(compute_noise_variance(stimulus, valid, counts), [1.0])  # (2 + 0) / (1 + 1)
    valid[1] = False  # stimulus 0 now shown validly once: only stimulus 1 (no spread) is pooled
    np.testing.assert_allclose(compute_noise_variance(stimulus, valid, counts), [0.0])
    assert np.isnan(compute_noise_variance(stimulus, np.zeros(5, bool), counts)).all()
    with pytest.raises(ValueError, match="'counts' must have shape"):
        compute_noise_variance(stimulus, valid, counts[:3])


def test_slope_tests_separate_a_moving_site_from_a_flat_one(tmp_path):
    """Site 0 rises by 4 spikes per unit ε, site 1 does not move; Poisson counts, 8 repetitions."""
    rng = np.random.default_rng(0)
    n_images, budgets = 10, (1.0, 5.0)
    clean = np.column_stack([rng.uniform(20, 40, n_images), rng.uniform(20, 40, n_images)])
    rows = [(p, s, e) for p in range(n_images) for s in (0, 1) for e in budgets]
    parent, site, eps = (np.array(c) for c in zip(*rows))
    perturbed = clean[parent].copy()
    perturbed[site == 0, 0] += 4 * eps[site == 0]
    predicted = np.concatenate([clean, perturbed])
    predicted[n_images:][site == 1, 1] += 1.0  # the model expects site 1 to rise; it does not
    folder = write_synthetic_day(tmp_path / "exp", 1, clean=clean, category=np.array(["a"] * n_images), parent=parent,
                                 site=site, eps=eps, direction=np.ones(len(rows), int), kind=np.array(["attack"] * len(rows)),
                                 perturbed=perturbed, predicted=predicted, repetitions=8, seed=3)
    result = compute_image_curves(read_experiment(folder.parent)[0].responses)
    moving, flat = result["site_slopes"]
    assert moving["mean_slope"] == pytest.approx(4.0, abs=0.6) and moving["p"] < 1e-6
    assert moving["n_significant_images"] >= 8
    assert abs(flat["mean_slope"]) < 0.6 and flat["p"] > 0.05


def test_bad_inputs_are_refused(planted_experiment):
    with pytest.raises(TypeError, match="'responses' must be closedloop.sensitivity.responses.DayResponses"):
        compute_image_curves({"means": None})
    day = read_experiment(planted_experiment)[0]
    with pytest.raises(ValueError, match="Invalid value for 'kind'"):
        compute_image_curves(day.responses, kind="increase")
