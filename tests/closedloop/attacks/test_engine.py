"""The L2 PGD engine, budget-safe 8-bit output, per-site and classifier attacks (small CPU models)."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from closedloop.attacks.baselines import make_gaussian_baseline
from closedloop.attacks.engine import (
    compute_pgd,
    compute_predictions,
    compute_realised_eps,
    compute_step_schedule,
    make_classifier_attacks,
    make_site_attacks,
    quantize_within_budget,
)
from closedloop.images import to_tensor

SIZE = 32


class TinyNet(nn.Module):
    """(N, 3, 32, 32) in [0, 1] → (N, n_outputs); BatchNorm so train mode would couple images."""

    def __init__(self, n_outputs: int, seed: int = 0, scale: float = 10.0):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 5, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
        )
        self.head = nn.Linear(256, n_outputs)
        self.scale = scale
        with torch.no_grad():
            self.body[1].running_mean.uniform_(-0.1, 0.1)
            self.body[1].running_var.uniform_(0.5, 1.5)

    def forward(self, images):
        return self.scale * self.head(self.body(images - 0.5))


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)


def _norms(adversarial: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm((adversarial - clean).flatten(1), dim=1)


# --------------------------------------------------------------------------------- engine


def test_pgd_respects_each_budget_and_pixel_range():
    model = TinyNet(4)
    clean = to_tensor(_images(5))
    eps = torch.tensor([0.05, 0.3, 1.0, 3.0, 50.0])
    result = compute_pgd(model, clean, eps=eps, step_size=eps / 3, n_steps=15,
                         objective=lambda out: -out[:, 0], random_start=True, n_restarts=2, generator=3)
    assert (_norms(result.images, clean) <= eps * (1 + 1e-5)).all()
    assert result.images.min() >= 0 and result.images.max() <= 1
    assert (result.loss < result.start_loss).all()


def test_pgd_best_iterate_is_never_worse_than_start_and_matches_its_loss():
    model = TinyNet(4)
    clean = to_tensor(_images(6, seed=1))
    # a huge step overshoots: later iterates are worse than the start, the best must still be kept
    objective = lambda out: (out[:, 1] - 0.0) ** 2  # noqa: E731
    for options in ({}, {"step_shrink": 0.9, "n_step_resets": 4}):
        result = compute_pgd(model, clean, eps=20.0, step_size=20.0, n_steps=8, objective=objective, **options)
        assert (result.loss <= result.start_loss).all()
        with torch.no_grad():
            model.eval()
            torch.testing.assert_close(objective(model(result.images)), result.loss, rtol=1e-4, atol=1e-4)


def test_pgd_images_are_independent_and_model_state_is_restored():
    model = TinyNet(3)
    model.train()
    clean = to_tensor(_images(3, seed=2))
    eps = torch.tensor([0.2, 0.5, 1.0])
    together = compute_pgd(model, clean, eps=eps, step_size=eps / 4, n_steps=10, objective=lambda out: out[:, 2])
    assert model.training and all(p.requires_grad for p in model.parameters())
    for row in range(3):
        alone = compute_pgd(model, clean[row : row + 1], eps=eps[row], step_size=eps[row] / 4, n_steps=10,
                            objective=lambda out: out[:, 2])
        torch.testing.assert_close(alone.images[0], together.images[row], atol=1e-4, rtol=0)


def test_pgd_descends_and_ascends():
    model = TinyNet(2)
    clean = to_tensor(_images(4, seed=3))
    with torch.no_grad():
        start = model.eval()(clean)[:, 0]
    down = compute_pgd(model, clean, eps=1.0, step_size=0.3, n_steps=10, objective=lambda out: out[:, 0])
    up = compute_pgd(model, clean, eps=1.0, step_size=0.3, n_steps=10, objective=lambda out: -out[:, 0])
    assert (down.loss < start - 0.1).all() and (-up.loss > start + 0.1).all()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"eps": 0.0}, "'eps' must be finite and > 0"),
        ({"eps": -1.0}, "'eps' must be finite and > 0"),
        ({"eps": torch.tensor([1.0, 2.0])}, r"'eps' must be a number or have shape \(3,\)"),
        ({"step_size": float("nan")}, "'step_size' must be finite and > 0"),
        ({"n_steps": 0}, r"'n_steps' must lie in \[1, inf\]"),
        ({"n_restarts": 2}, "needs random_start=True"),
        ({"objective": lambda out: out}, r"one loss per image, shape \(3,\)"),
    ],
)
def test_pgd_bad_input_raises_clear_errors(change, message):
    arguments = dict(eps=1.0, step_size=0.3, n_steps=2, objective=lambda out: out[:, 0])
    arguments.update(change)
    with pytest.raises(ValueError, match=message):
        compute_pgd(TinyNet(2), to_tensor(_images(3)), **arguments)


def test_pgd_refuses_nan_images_and_wrong_shapes():
    clean = to_tensor(_images(2))
    clean[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="'clean' contains NaN"):
        compute_pgd(TinyNet(2), clean, eps=1.0, step_size=0.3, n_steps=2, objective=lambda out: out[:, 0])
    with pytest.raises(ValueError, match=r"'clean' must have shape \(n_images, 3, H, W\)"):
        compute_pgd(TinyNet(2), torch.rand(2, 32, 32, 3), eps=1.0, step_size=0.3, n_steps=2,
                    objective=lambda out: out[:, 0])


# --------------------------------------------------------------------------------- 8-bit budget


def _check_budget(pixels, clean, eps):
    realised = compute_realised_eps(pixels, clean)
    assert pixels.dtype == np.uint8 and pixels.shape == clean.shape
    assert (realised <= np.broadcast_to(eps, realised.shape)).all(), (realised, eps)
    return realised


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    eps=st.one_of(st.floats(1e-4, 0.02), st.floats(0.02, 2.0), st.floats(2.0, 1e4)),
    spread=st.floats(0.0, 3.0),
    extreme=st.booleans(),
)
def test_quantize_within_budget_never_exceeds_eps(seed, eps, spread, extreme):
    rng = np.random.default_rng(seed)
    clean = rng.integers(0, 256, (2, 6, 6, 3), dtype=np.uint8)
    if extreme:  # values pinned at 0 and 1
        clean = np.where(rng.random(clean.shape) < 0.5, 0, 255).astype(np.uint8)
    delta = rng.standard_normal(clean.shape)
    delta *= spread * eps / np.linalg.norm(delta.reshape(2, -1), axis=1).reshape(2, 1, 1, 1)
    adversarial = np.clip(clean / 255.0 + delta, 0, 1)
    _check_budget(quantize_within_budget(adversarial, clean, eps), clean, eps)


def test_quantize_rounds_toward_clean_only_where_needed():
    clean = np.full((1, 8, 8, 3), 128, np.uint8)
    # every value sits just past a rounding tie, and the budget is exactly the float perturbation
    adversarial = (clean + 0.5001) / 255.0
    eps = float(np.linalg.norm(adversarial - clean / 255.0))
    pixels = quantize_within_budget(adversarial, clean, eps)
    realised = _check_budget(pixels, clean, eps)
    assert realised > 0.7 * eps  # still spends most of the budget, not simply truncated to clean
    # a generous budget gives plain rounding
    np.testing.assert_array_equal(quantize_within_budget(adversarial, clean, 10 * eps), np.rint(adversarial * 255))


def test_quantize_below_one_grey_level_returns_clean_and_pulls_far_images_in():
    clean = _images(3, seed=4)
    far = np.clip(clean / 255.0 + 0.3, 0, 1)
    np.testing.assert_array_equal(quantize_within_budget(far, clean, 0.9 / 255), clean)
    _check_budget(quantize_within_budget(far, clean, [0.5, 2.0, 7.0]), clean, np.array([0.5, 2.0, 7.0]))


def test_quantize_bad_input():
    clean = _images(2)
    with pytest.raises(ValueError, match="finite float values"):
        quantize_within_budget(np.full(clean.shape, np.nan), clean, 1.0)
    with pytest.raises(ValueError, match="must have the shape of 'clean_uint8'"):
        quantize_within_budget(clean[:1] / 255.0, clean, 1.0)
    with pytest.raises(ValueError, match="'eps' must be finite and > 0"):
        quantize_within_budget(clean / 255.0, clean, 0.0)
    with pytest.raises(TypeError, match="'clean_uint8' must be a uint8"):
        quantize_within_budget(clean / 255.0, clean.astype(np.float32), 1.0)


# --------------------------------------------------------------------------------- site attacks


def test_site_attacks_move_the_targeted_site_within_budget():
    model = TinyNet(5)
    clean = _images(4, seed=5)
    image_index = np.array([0, 1, 2, 3, 0, 1])
    site = np.array([0, 1, 2, 3, 4, 4])
    eps = np.array([0.5, 0.5, 1.0, 1.0, 2.0, 0.05])
    attacks = make_site_attacks(model, clean, image_index, site, eps, n_steps=12, batch_size=4, seed=1)
    rows = np.arange(len(site))
    change = attacks.predicted[rows, site] - attacks.predicted_clean[rows, site]
    assert set(attacks.direction.tolist()) <= {1, -1} and attacks.direction.dtype == np.int8
    assert (np.sign(change) == attacks.direction).all()  # increase raised, decrease lowered
    _check_budget(attacks.pixels, clean[image_index], eps)
    np.testing.assert_allclose(attacks.realised_eps, compute_realised_eps(attacks.pixels, clean[image_index]))
    np.testing.assert_allclose(attacks.predicted, compute_predictions(model, attacks.pixels), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(attacks.predicted_clean, compute_predictions(model, clean[image_index]), rtol=1e-5, atol=1e-5)
    noise = make_gaussian_baseline(clean[image_index], eps, seed=0)
    noise_change = compute_predictions(model, noise)[rows, site] - attacks.predicted_clean[rows, site]
    assert (np.abs(change) > 3 * np.abs(noise_change))[:5].all()


def test_site_attacks_both_directions_work():
    """Forcing one direction per site by sign flips: the kept direction follows the model."""
    model = TinyNet(2)

    class Flipped(nn.Module):  # site 1 is minus site 0: whatever raises one lowers the other
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, images):
            out = self.inner(images)[:, :1]
            return torch.cat([out, -out], dim=1)

    clean = _images(2, seed=6)
    attacks = make_site_attacks(Flipped(), clean, [0, 0, 1, 1], [0, 1, 0, 1], 1.0, n_steps=10, random_start=False)
    rows = np.arange(4)
    change = attacks.predicted[rows, [0, 1, 0, 1]] - attacks.predicted_clean[rows, [0, 1, 0, 1]]
    assert (np.sign(change) == attacks.direction).all() and (np.abs(change) > 0.05).all()


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"site": [0, 7]}, ValueError, r"'site' must lie in \[0, 4\], but got \[7\]"),
        ({"site": [-1, 0]}, ValueError, r"'site' must lie in \[0, 4\], but got \[-1\]"),
        ({"image_index": [0, 5]}, ValueError, r"'image_index' must lie in \[0, 1\]"),
        ({"eps": [1.0, 0.0]}, ValueError, "'eps' must be finite and > 0"),
        ({"eps": [1.0, float("nan")]}, ValueError, "'eps' must be finite and > 0"),
        ({"clean_uint8": np.zeros((2, 3, SIZE, SIZE), np.uint8)}, ValueError, r"shape \(n_images, H, W, 3\)"),
        ({"clean_uint8": np.zeros((2, SIZE, SIZE, 3), np.float32)}, TypeError, "must be a uint8 numpy array"),
        ({"site": [[0, 1], [1, 0]]}, ValueError, r"broadcast to one dimension \(n_jobs,\)"),
        ({"device": "tpu"}, ValueError, "allowed values are 'cpu', 'cuda'"),
    ],
)
def test_site_attacks_bad_input(change, error, message):
    arguments = dict(clean_uint8=_images(2), image_index=[0, 1], site=[0, 1], eps=[1.0, 1.0])
    arguments.update(change)
    with pytest.raises(error, match=message):
        make_site_attacks(TinyNet(5), n_steps=1, **arguments)


# --------------------------------------------------------------------------------- classifiers


def test_step_schedule_matches_the_paper():
    steps, iterations = compute_step_schedule([0.1, 0.5, 1.0, 3.0, 5.0, 15.0, 20.0, 25.0, 30.0, 50.0, 100.0, 150.0])
    np.testing.assert_array_equal(steps, [0.02, 0.1, 0.3, 0.3, 0.5, 0.5, 0.5, 0.5, 2, 2, 2, 2])
    np.testing.assert_array_equal(iterations, [200, 200, 200, 200, 500, 500, 1000, 1000, 2000, 2000, 5000, 10000])
    with pytest.raises(ValueError, match="'eps' must be finite and > 0"):
        compute_step_schedule(-1.0)


def _classifier_case(n_images=12):
    classifier = TinyNet(9, seed=7, scale=3.0)
    clean = _images(n_images, seed=8)
    labels = compute_predictions(classifier, clean).argmax(1)
    targets = (labels + 1 + np.arange(n_images) % 8) % 9
    return classifier, clean, labels, targets


def test_targeted_attacks_reach_the_target_far_more_often_than_noise():
    classifier, clean, _, targets = _classifier_case()
    eps = 4.0  # ≈ 0.07 per value at 32 px
    attacks = make_classifier_attacks(classifier, clean, mode="target", targets=targets, eps=eps, n_steps=40)
    _check_budget(attacks.pixels, clean, eps)
    hit = (attacks.logits.argmax(1) == targets).mean()
    noise = make_gaussian_baseline(clean, eps, seed=1)
    noise_hit = (compute_predictions(classifier, noise).argmax(1) == targets).mean()
    assert hit >= 0.75 and hit >= noise_hit + 0.5, (hit, noise_hit)


def test_disruption_lowers_the_true_class():
    classifier, clean, labels, _ = _classifier_case()
    attacks = make_classifier_attacks(classifier, clean, mode="disrupt", labels=labels, eps=1.0, n_steps=30)
    rows = np.arange(len(labels))
    probability = lambda logits: torch.softmax(torch.as_tensor(logits), 1).numpy()[rows, labels]  # noqa: E731
    assert (probability(attacks.logits) < probability(attacks.logits_clean)).all()
    assert (attacks.logits.argmax(1) != labels).mean() >= 0.75


def test_composite_attacks_move_toward_their_targets():
    classifier, clean, labels, targets = _classifier_case()
    pairs = np.stack([targets, (targets + 1) % 9], axis=1)
    pairs[:, 1] = np.where(pairs[:, 1] == labels, (pairs[:, 1] + 1) % 9, pairs[:, 1])
    attacks = make_classifier_attacks(classifier, clean, mode="composite", targets=pairs, eps=4.0, n_steps=30)
    mass = lambda logits: np.take_along_axis(torch.softmax(torch.as_tensor(logits), 1).numpy(), pairs, 1).sum(1)  # noqa: E731
    noise = compute_predictions(classifier, make_gaussian_baseline(clean, 4.0, seed=2))
    assert (mass(attacks.logits) > mass(attacks.logits_clean) + 0.05).all()
    assert (mass(attacks.logits) - mass(attacks.logits_clean) > 5 * np.abs(mass(noise) - mass(attacks.logits_clean))).all()
    _check_budget(attacks.pixels, clean, 4.0)


def test_centroid_attacks_move_toward_the_centroid():
    classifier, clean, _, _ = _classifier_case(n_images=6)
    features = classifier.body
    centroid = compute_predictions(features, _images(8, seed=9)).mean(0)
    attacks = make_classifier_attacks(classifier, clean, mode="centroid", features=features, centroid=centroid,
                                      eps=[0.5, 1.0, 2.0, 0.5, 1.0, 2.0], n_steps=20)
    distance = lambda pixels: ((compute_predictions(features, pixels) - centroid) ** 2).mean(1)  # noqa: E731
    assert (distance(attacks.pixels) < 0.8 * distance(clean)).all()
    _check_budget(attacks.pixels, clean, np.array([0.5, 1.0, 2.0, 0.5, 1.0, 2.0]))


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"mode": "targeted"}, ValueError, "Invalid value for 'mode': allowed values are 'disrupt', 'target'"),
        ({"mode": "target", "targets": None}, ValueError, "'targets' is required"),
        ({"mode": "target", "targets": [0, 9]}, ValueError, r"'targets' must lie in \[0, 8\]"),
        ({"mode": "disrupt", "labels": [0]}, ValueError, r"'labels' must have shape \(2,\)"),
        ({"mode": "composite", "targets": [[0, 1, 2, 3]] * 2}, ValueError, r"\(2, 2\) or \(2, 3\)"),
        ({"mode": "centroid"}, TypeError, "mode 'centroid' needs 'features'"),
        ({"mode": "centroid", "features": nn.Flatten(), "centroid": np.zeros(5)}, ValueError,
         r"'centroid' must be finite with shape \(3072,\)"),
        ({"eps": -0.5}, ValueError, "'eps' must be finite and > 0"),
    ],
)
def test_classifier_attacks_bad_input(change, error, message):
    arguments = dict(mode="target", targets=[1, 2], eps=1.0, n_steps=1)
    arguments.update(change)
    with pytest.raises(error, match=message):
        make_classifier_attacks(TinyNet(9), _images(2), **arguments)
