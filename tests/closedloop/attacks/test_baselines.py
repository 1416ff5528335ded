"""Model-free baselines: Gaussian noise and interpolation at a budget, within ε on the 8-bit image."""

import numpy as np
import pytest

from closedloop.attacks.baselines import make_gaussian_baseline, make_interpolation_baseline
from closedloop.attacks.engine import compute_realised_eps


def _images(n, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)


def test_gaussian_baseline_spends_the_budget_and_no_more():
    clean = np.full((3, 16, 16, 3), 128, np.uint8)
    eps = np.array([0.2, 1.0, 3.0])
    noisy = make_gaussian_baseline(clean, eps, seed=0)
    realised = compute_realised_eps(noisy, clean)
    assert (realised <= eps).all() and (realised > 0.95 * eps).all()
    np.testing.assert_array_equal(noisy, make_gaussian_baseline(clean, eps, seed=0))
    assert not np.array_equal(noisy, make_gaussian_baseline(clean, eps, seed=1))


def test_gaussian_baseline_at_black_and_white_stays_within_budget():
    clean = np.where(np.random.default_rng(0).random((2, 16, 16, 3)) < 0.5, 0, 255).astype(np.uint8)
    assert (compute_realised_eps(make_gaussian_baseline(clean, 2.0, seed=3), clean) <= 2.0).all()


def test_interpolation_moves_straight_toward_the_other_image():
    clean, other = _images(3, 1), _images(3, 2)
    distance = compute_realised_eps(other, clean)
    eps = np.array([1.0, 5.0, distance[2] + 10.0])
    moved = make_interpolation_baseline(clean, other, eps)
    realised = compute_realised_eps(moved, clean)
    assert (realised <= eps).all() and (realised[:2] > 0.97 * eps[:2]).all()
    np.testing.assert_array_equal(moved[2], other[2])  # budget larger than the distance: all the way
    direction = (other[0].astype(float) - clean[0]).ravel()
    step = (moved[0].astype(float) - clean[0]).ravel()
    assert step @ direction / (np.linalg.norm(step) * np.linalg.norm(direction)) > 0.95


def test_baselines_bad_input():
    clean = _images(2, 0)
    with pytest.raises(ValueError, match="'eps' must be finite and > 0"):
        make_gaussian_baseline(clean, [1.0, -1.0], seed=0)
    with pytest.raises(ValueError, match=r"'other_uint8' must have the shape of 'clean_uint8'"):
        make_interpolation_baseline(clean, clean[:1], 1.0)
    with pytest.raises(TypeError, match="'clean_uint8' must be a uint8"):
        make_gaussian_baseline(clean / 255.0, 1.0, seed=0)
    with pytest.raises(ValueError, match=r"'seed' must lie in \[0, inf\]"):
        make_gaussian_baseline(clean, 1.0, seed=-2)
