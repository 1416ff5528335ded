"""White-box sensitivity of network units against a unit whose answer is known: a linear unit."""

import numpy as np
import pytest
import torch

from analysis.network_units import compute_network_sensitivity
from analysis.synthetic import make_synthetic_images


class _LinearUnits(torch.nn.Module):
    """h(x) = W · flatten(x): unit u's sensitivity at budget ε is ε ‖W_u‖ (away from the [0, 1] box)."""

    def __init__(self, weights: torch.Tensor):
        super().__init__()
        self.weights = torch.nn.Parameter(weights, requires_grad=False)

    def forward(self, images):
        return images.flatten(1) @ self.weights.T


def test_linear_units_reach_eps_times_weight_norm():
    generator = torch.Generator().manual_seed(0)
    weights = torch.randn(3, 3 * 32 * 32, generator=generator) * torch.tensor([[1.0], [2.0], [0.5]])
    network = _LinearUnits(weights)
    images = make_synthetic_images(12, seed=1, size=32)
    images = (np.clip(images.astype(float) * 0.2 + 102, 0, 255)).astype(np.uint8)  # mid-grey: the box never binds
    result = compute_network_sensitivity({"linear": network}, images, [0.5, 1.0], n_units=3, n_images=2, n_starts=1,
                                         n_steps=6, seed=0)
    activations = images.transpose(0, 3, 1, 2).reshape(12, -1).astype(np.float64) / 255 @ weights.double().numpy().T
    sigma = activations.std(axis=0, ddof=1)
    norms = weights.double().norm(dim=1).numpy()
    assert len(result["units"]) == 6 and {r["network"] for r in result["units"]} == {"linear"}
    for row in result["units"]:
        expected = row["eps"] * norms[row["unit"]]
        assert row["sensitivity"] == pytest.approx(expected, rel=0.02)
        assert row["sigma"] == pytest.approx(sigma[row["unit"]], rel=1e-3)
        assert row["normalized"] == pytest.approx(expected / sigma[row["unit"]], rel=0.02)
    assert [r["n_units"] for r in result["mean"]] == [3, 3]


def test_bad_inputs_are_refused():
    images = make_synthetic_images(3, size=32)
    with pytest.raises(ValueError, match="'networks' must be a non-empty dict"):
        compute_network_sensitivity({}, images, [1.0])
    with pytest.raises(TypeError, match="each network must be a backbone name, a checkpoint path or a torch.nn.Module"):
        compute_network_sensitivity({"x": 3}, images, [1.0])
    with pytest.raises(ValueError, match="'budgets' must lie in"):
        compute_network_sensitivity({"x": "resnet_tiny"}, images, [0.0])
    with pytest.raises(ValueError, match="at least 2 clean images"):
        compute_network_sensitivity({"x": "resnet_tiny"}, images[:1], [1.0])
