"""White-box unit sensitivity: exact on linear units, at least what plain PGD finds on a small net."""

import numpy as np
import pytest
import torch
from torch import nn

from closedloop.attacks.engine import compute_pgd, compute_predictions
from closedloop.attacks.whitebox import compute_unit_sensitivity
from closedloop.images import to_tensor

SIZE = 12


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, stride=2), nn.ReLU(), nn.Conv2d(6, 8, 3), nn.AdaptiveAvgPool2d(2), nn.Flatten()
    )


@pytest.mark.parametrize("step_rule", ["pgd", "apgd"])
def test_linear_units_reach_the_exact_sensitivity(step_rule):
    torch.manual_seed(1)
    linear = nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, 3))
    clean = np.full((2, SIZE, SIZE, 3), 128, np.uint8)
    eps = 0.5  # far from the [0, 1] walls: the optimum is δ = ±ε w/‖w‖
    result = compute_unit_sensitivity(linear, clean, eps, n_starts=2, n_steps=30, step_rule=step_rule)
    exact = eps * linear[1].weight.detach().norm(dim=1).numpy()
    np.testing.assert_allclose(result.increase, np.broadcast_to(exact, (2, 3)), rtol=1e-3)
    np.testing.assert_allclose(result.decrease, np.broadcast_to(exact, (2, 3)), rtol=1e-3)
    np.testing.assert_allclose(result.sensitivity, np.maximum(result.increase, result.decrease))


def test_one_direction_solves_only_that_direction():
    torch.manual_seed(1)
    linear = nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, 3))
    clean = np.full((2, SIZE, SIZE, 3), 128, np.uint8)
    exact = 0.5 * linear[1].weight.detach().norm(dim=1).numpy()
    up = compute_unit_sensitivity(linear, clean, 0.5, n_starts=2, n_steps=30, directions="increase")
    np.testing.assert_allclose(up.increase, np.broadcast_to(exact, (2, 3)), rtol=1e-3)
    assert np.isnan(up.decrease).all() and np.isnan(up.sensitivity).all()
    down = compute_unit_sensitivity(linear, clean, 0.5, n_starts=2, n_steps=30, directions="decrease")
    np.testing.assert_allclose(down.decrease, np.broadcast_to(exact, (2, 3)), rtol=1e-3)
    assert np.isnan(down.increase).all()
    with pytest.raises(ValueError, match="'directions'"):
        compute_unit_sensitivity(linear, clean, 0.5, directions="up")


def test_whitebox_finds_at_least_what_plain_pgd_finds():
    net = _net()
    clean = np.random.default_rng(0).integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8)
    eps, units = 0.5, np.array([0, 5, 17, 31])
    result = compute_unit_sensitivity(net, clean, eps, units=units, n_starts=3, n_steps=60, seed=2, batch_size=64)
    images = to_tensor(clean)
    at_clean = compute_predictions(net, clean)[:, units]
    plain = np.zeros((2, len(units)))
    for column, unit in enumerate(units):
        for sign in (-1.0, 1.0):  # −1: increase, +1: decrease
            found = compute_pgd(net, images, eps=eps, step_size=eps / 3, n_steps=30,
                                objective=lambda out, u=unit, s=sign: s * out[:, u], random_start=True, generator=5)
            plain[:, column] = np.maximum(plain[:, column], sign * (at_clean[:, column] - sign * found.loss.numpy()))
    assert (result.sensitivity >= plain - 1e-6).all(), result.sensitivity - plain
    assert (result.sensitivity > 0).all()
    np.testing.assert_array_equal(result.units, units)


class _Convex(nn.Module):
    """Units exp(3 u) and −exp(3 u) of linear units u: whatever moves u by ±Δ raises the first more
    than it can lower it (exp is convex), and lowers the second more than it can raise it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.linear = nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, 2))

    def forward(self, images):
        grown = torch.exp(3.0 * self.linear(images))
        return torch.cat([grown, -grown], dim=1)


def test_choosing_the_direction_early_solves_one_direction_per_image_and_unit():
    """The choice keeps raising for the exp units and lowering for the −exp units, which is what the
    full solve finds larger, at the same sensitivity; the other direction is NaN."""
    clean = np.random.default_rng(4).integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8)
    options = dict(n_starts=2, n_steps=40, seed=1, step_rule="apgd")
    full = compute_unit_sensitivity(_Convex(), clean, 0.5, **options)
    chosen = compute_unit_sensitivity(_Convex(), clean, 0.5, choose_direction_at=4, batch_size=7, **options)  # 7 → 4 rows
    assert (full.increase[:, :2] > full.decrease[:, :2]).all() and (full.increase[:, 2:] < full.decrease[:, 2:]).all()
    assert np.isnan(chosen.decrease[:, :2]).all() and np.isnan(chosen.increase[:, 2:]).all()
    assert np.isfinite(chosen.increase[:, :2]).all() and np.isfinite(chosen.decrease[:, 2:]).all()
    np.testing.assert_allclose(chosen.sensitivity, full.sensitivity, rtol=1e-3)
    with pytest.raises(ValueError, match=r"'choose_direction_at' = 20 needs directions='both' and 2 <= it < n_steps // 2"):
        compute_unit_sensitivity(_Convex(), clean, 0.5, n_steps=40, choose_direction_at=20)


def test_whitebox_bad_input():
    clean = np.zeros((1, SIZE, SIZE, 3), np.uint8)
    with pytest.raises(ValueError, match=r"'eps' must lie in \(0, inf\)"):
        compute_unit_sensitivity(_net(), clean, 0.0)
    with pytest.raises(ValueError, match=r"'units' must lie in \[0, 31\]"):
        compute_unit_sensitivity(_net(), clean, 1.0, units=[40])
    with pytest.raises(TypeError, match="'unit_fn' must be a torch.nn.Module"):
        compute_unit_sensitivity(lambda x: x, clean, 1.0)
    with pytest.raises(ValueError, match=r"'n_steps' must lie in \[2, inf\]"):
        compute_unit_sensitivity(_net(), clean, 1.0, n_steps=1)
    with pytest.raises(ValueError, match="'step_rule': allowed values are 'pgd', 'apgd', but got 'sgd'"):
        compute_unit_sensitivity(_net(), clean, 1.0, step_rule="sgd")
