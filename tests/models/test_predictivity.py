import numpy as np
import pytest

from models import compute_pearson, compute_split_half_reliability


def test_pearson_matches_numpy_per_site():
    rng = np.random.default_rng(0)
    predicted = rng.normal(size=(30, 4))
    observed = predicted * [1, -1, 0.5, 0] + rng.normal(size=(30, 4))
    expected = [np.corrcoef(predicted[:, s], observed[:, s])[0, 1] for s in range(4)]
    np.testing.assert_allclose(compute_pearson(predicted, observed), expected)


def test_pearson_of_a_constant_site_is_nan():
    predicted = np.array([[1.0, 1.0], [2.0, 1.0], [3.0, 1.0]])
    r = compute_pearson(predicted, predicted + 1)
    assert r[0] == pytest.approx(1.0) and np.isnan(r[1])


def test_pearson_refuses_bad_shapes():
    with pytest.raises(ValueError, match=r"must have the same shape \(n_images, n_sites\), but got \(3, 2\) and \(3, 1\)"):
        compute_pearson(np.zeros((3, 2)), np.zeros((3, 1)))
    with pytest.raises(ValueError, match=r"'predicted' must have shape \(n_images, n_sites\), but got \(3,\)"):
        compute_pearson(np.zeros(3), np.zeros(3))
    with pytest.raises(ValueError, match=r"need at least 2 images to correlate, but got 1"):
        compute_pearson(np.zeros((1, 2)), np.zeros((1, 2)))
    with pytest.raises(ValueError, match=r"'observed' must hold finite numbers"):
        compute_pearson(np.zeros((2, 1)), np.array([[1.0], [np.nan]]))


def test_split_half_ceiling_of_poisson_repeats_matches_the_analytic_value():
    # Rates lambda ~ Gamma(k, theta) per stimulus; k_rep Poisson repeats. The reliability of the mean
    # of k_rep repeats is var(lambda) / (var(lambda) + E[lambda] / k_rep).
    rng = np.random.default_rng(1)
    n_stimuli, n_repeats = 3000, 4
    shapes, scales = np.array([4.0, 2.0, 9.0]), np.array([2.0, 1.0, 0.5])
    rates = rng.gamma(shapes, scales, size=(n_stimuli, 3))
    stimulus = rng.permutation(np.repeat(np.arange(n_stimuli), n_repeats))
    counts = rng.poisson(rates[stimulus])
    mean, variance = shapes * scales, shapes * scales**2
    expected = variance / (variance + mean / n_repeats)
    np.testing.assert_allclose(compute_split_half_reliability(counts, stimulus, seed=2), expected, atol=0.02)


def test_split_half_is_nan_without_repeats_and_deterministic_in_the_seed():
    counts = np.arange(12.0).reshape(6, 2)
    assert np.isnan(compute_split_half_reliability(counts, np.arange(6))).all()
    assert np.isnan(compute_split_half_reliability(counts, [0, 0, 1, 2, 3, 4])).all()  # one repeated stimulus
    rng = np.random.default_rng(3)
    stimulus = np.repeat(np.arange(20), 3)
    counts = rng.poisson(5.0, size=(60, 2))
    first = compute_split_half_reliability(counts, stimulus, seed=4)
    np.testing.assert_array_equal(first, compute_split_half_reliability(counts, stimulus, seed=4))
    assert not np.array_equal(first, compute_split_half_reliability(counts, stimulus, seed=5))


def test_split_half_refuses_mismatched_stimulus():
    with pytest.raises(ValueError, match=r"'stimulus' must have shape \(n_presentations,\) = \(4,\) to match 'counts', but got \(3,\)"):
        compute_split_half_reliability(np.zeros((4, 2)), [0, 0, 1])
    with pytest.raises(ValueError, match=r"'stimulus' must lie in \[0, 0\], but got \[-1\]"):
        compute_split_half_reliability(np.zeros((2, 2)), [0, -1])
