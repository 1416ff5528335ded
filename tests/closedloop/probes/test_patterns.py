"""Adversarial patterns: zero/noise feed and AAI equal the analytic answer on a linear unit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from closedloop.probes.patterns import (
    compute_attack_patterns,
    compute_contrast_pattern,
    compute_pattern_similarity,
    compute_site_patterns,
)


def _linear(n_units: int = 2, size: int = 8, seed: int = 0) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * size * size, n_units))
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(n_units, 3 * size * size, generator=generator))
    return model


def test_attack_patterns_of_a_linear_unit_are_its_weights():
    model, eps = _linear(), 0.25
    weights = model[1].weight.detach().numpy()[1].reshape(3, 8, 8)
    expected = eps * weights / np.linalg.norm(weights)
    clean = np.random.default_rng(0).integers(80, 176, (4, 8, 8, 3), dtype=np.uint8)
    patterns = compute_attack_patterns(model, 1, image_size=8, eps=eps, clean_uint8=clean, n_noise=4, n_steps=6)
    for name in ("zero_feed", "noise_feed", "aai"):
        assert patterns[name].shape == (3, 8, 8)
        assert np.allclose(patterns[name], expected, atol=1e-5), name
    assert compute_pattern_similarity(patterns["zero_feed"], weights) == pytest.approx(1.0, abs=1e-5)


def test_contrast_pattern_and_site_patterns():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    model = _linear()
    with torch.no_grad():
        responses = model(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255).numpy()
    contrast = compute_contrast_pattern(images, responses[:, 0])
    positive = responses[:, 0] > np.median(responses[:, 0])
    manual = (images[positive].mean(0) - images[~positive].mean(0)).transpose(2, 0, 1) / 255
    assert np.allclose(contrast, manual, atol=1e-6)
    weights = model[1].weight.detach().numpy()[0]
    assert compute_pattern_similarity(contrast, weights) > 0.3, "PNC of a linear unit should resemble its weights"
    responses[3] = np.nan
    result = compute_site_patterns(model, [0, 1], images, responses, eps=0.25, n_aai=3, n_noise=2, n_steps=4)
    assert set(result["patterns"]) == {0, 1}
    rows = {(r["site"], r["pattern"]): r["similarity_to_data"] for r in result["similarity"]}
    assert rows[(0, "predicted_pnc")] == pytest.approx(1.0), "predictions are the data here"
    assert rows[(1, "zero_feed")] > 0.15, "random directions in 192 dimensions give |cos| ~ 0.07"


def test_bad_inputs():
    model = _linear()
    with pytest.raises(ValueError, match="Invalid value for 'zero_feed'"):
        compute_attack_patterns(model, 0, image_size=8, eps=0.1, zero_feed="white")
    with pytest.raises(ValueError, match="'eps' must lie in"):
        compute_attack_patterns(model, 0, image_size=8, eps=0.0)
    images = np.zeros((4, 8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="'responses' are all equal"):
        compute_contrast_pattern(images, np.ones(4))
    with pytest.raises(ValueError, match="'responses' must have shape"):
        compute_contrast_pattern(images, np.ones(3))
    with pytest.raises(ValueError, match="the two patterns must have the same size"):
        compute_pattern_similarity(np.ones(3), np.ones(4))
    with pytest.raises(ValueError, match="'sites' must lie in"):
        compute_site_patterns(model, [5], images, np.arange(8.0).reshape(4, 2), eps=0.1)
