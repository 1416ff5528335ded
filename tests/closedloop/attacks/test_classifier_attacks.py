"""Classifier attacks of the behavioural pipeline: disrupt, target, composite, centroid (small CPU models)."""

import numpy as np
import pytest
import torch
from torch import nn

from closedloop.attacks.baselines import make_gaussian_baseline
from closedloop.attacks.classifiers import make_classifier_attacks
from closedloop.attacks.engine import compute_predictions
from tests.closedloop.attacks.conftest import TinyNet, check_budget, make_images


def _classifier_case(n_images=12):
    classifier = TinyNet(9, seed=7, scale=3.0)
    clean = make_images(n_images, seed=8)
    labels = compute_predictions(classifier, clean).argmax(1)
    targets = (labels + 1 + np.arange(n_images) % 8) % 9
    return classifier, clean, labels, targets


def test_targeted_attacks_reach_the_target_far_more_often_than_noise():
    classifier, clean, _, targets = _classifier_case()
    eps = 4.0  # ≈ 0.07 per value at 32 px
    attacks = make_classifier_attacks(classifier, clean, mode="target", targets=targets, eps=eps, n_steps=40)
    check_budget(attacks.pixels, clean, eps)
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
    check_budget(attacks.pixels, clean, 4.0)


def test_centroid_attacks_move_toward_the_centroid():
    classifier, clean, _, _ = _classifier_case(n_images=6)
    features = classifier.body
    centroid = compute_predictions(features, make_images(8, seed=9)).mean(0)
    attacks = make_classifier_attacks(classifier, clean, mode="centroid", features=features, centroid=centroid,
                                      eps=[0.5, 1.0, 2.0, 0.5, 1.0, 2.0], n_steps=20)
    distance = lambda pixels: ((compute_predictions(features, pixels) - centroid) ** 2).mean(1)  # noqa: E731
    assert (distance(attacks.pixels) < 0.8 * distance(clean)).all()
    check_budget(attacks.pixels, clean, np.array([0.5, 1.0, 2.0, 0.5, 1.0, 2.0]))


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
        make_classifier_attacks(TinyNet(9), make_images(2), **arguments)
