"""Response geometry: contour curvature of a linear unit is 0, of a quadratic unit its analytic value."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from closedloop.probes.geometry import compute_contour_curvature, compute_plane_directions, compute_response_geometry

SIZE = 8


class _Quadratic(torch.nn.Module):
    """f(x) = u0·(x − x0) + (k/2) (v0·(x − x0))², u0 ⊥ v0 unit vectors; k = 0 is a linear unit."""

    def __init__(self, x0: torch.Tensor, k: float, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        u0, v0 = torch.randn(2, 3 * SIZE * SIZE, generator=generator, dtype=torch.float64)
        u0 = u0 / u0.norm()
        v0 = v0 - (v0 @ u0) * u0
        self.register_buffer("u0", u0)
        self.register_buffer("v0", v0 / v0.norm())
        self.register_buffer("x0", x0.flatten().double())
        self.k = k

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        shift = images.flatten(1).double() - self.x0
        return (shift @ self.u0 + 0.5 * self.k * (shift @ self.v0) ** 2)[:, None]


def _image() -> tuple[np.ndarray, torch.Tensor]:
    pixels = np.random.default_rng(0).integers(100, 156, (1, SIZE, SIZE, 3), dtype=np.uint8)
    return pixels, torch.from_numpy(pixels[0]).permute(2, 0, 1).float() / 255


def test_linear_unit_has_straight_contours():
    pixels, image = _image()
    result = compute_response_geometry(_Quadratic(image, 0.0), pixels, [0], eps=0.2, second="random", n_grid=5, n_steps=6)
    assert result["rows"][0]["curvature"] == pytest.approx(0.0, abs=1e-6)
    assert result["rows"][0]["sensitivity"] == pytest.approx(0.2, rel=1e-3), "a linear unit moves by ε along its gradient"
    assert result["maps"][0]["responses"].shape == (5, 5)


def test_quadratic_unit_curvature_equals_the_analytic_value():
    _, image = _image()
    k = 0.7
    model = _Quadratic(image, k)
    u0, v0 = model.u0.float().view(3, SIZE, SIZE), model.v0.float().view(3, SIZE, SIZE)
    curvature = compute_contour_curvature(model, image, 0, u0, v0, np.linspace(0, 0.2, 4), h=0.05)
    assert np.allclose(curvature, k, rtol=1e-3)
    u, v, length = compute_plane_directions(model, image, 0, eps=0.2, second="random", n_steps=6, seed=3)
    assert length == pytest.approx(0.2, rel=1e-4) and float((u * u0).sum()) == pytest.approx(1.0, abs=1e-4)
    expected = k * float(v.double().flatten() @ model.v0) ** 2
    found = compute_contour_curvature(model, image, 0, u, v, [0.0, 0.1], h=0.05)
    assert np.allclose(found, expected, rtol=1e-2, atol=1e-4)


def test_correlation_and_bad_inputs():
    pixels = np.random.default_rng(1).integers(60, 200, (3, SIZE, SIZE, 3), dtype=np.uint8)
    generator = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * SIZE * SIZE, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
    for parameter in model.parameters():
        parameter.data = torch.randn(parameter.shape, generator=generator)
    result = compute_response_geometry(model, pixels, [0, 1], eps=0.3, n_grid=3, n_path=2, n_steps=4)
    assert len(result["rows"]) == 6 and result["correlation"]["n"] == 6
    assert result["correlation"]["spearman_r"] is None or -1 <= result["correlation"]["spearman_r"] <= 1
    with pytest.raises(ValueError, match="'units' must lie in"):
        compute_response_geometry(model, pixels, [4], eps=0.3)
    with pytest.raises(ValueError, match="Invalid value for 'second'"):
        compute_response_geometry(model, pixels, [0], eps=0.3, second="pca")
    with pytest.raises(ValueError, match="'n_grid' must lie in"):
        compute_response_geometry(model, pixels, [0], eps=0.3, n_grid=1)
