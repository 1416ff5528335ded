"""Model quality: a perfect model reaches the ceiling; planted wrong directions are counted."""

import numpy as np
import pytest

from analysis.experiment import read_experiment
from analysis.model_quality import compute_direction_accuracy, compute_model_quality
from analysis.synthetic import write_synthetic_day


def test_perfect_noise_free_model_is_at_the_ceiling(planted_experiment):
    days = read_experiment(planted_experiment)
    result = compute_model_quality(days)
    assert len(result["prediction"]) == 4 * 3
    for row in result["prediction"]:
        assert row["n_images"] == 12
        assert row["r"] == pytest.approx(1.0) and row["reliability"] == pytest.approx(1.0)
        assert row["normalized"] == pytest.approx(1.0)
    refit = [r for r in result["refit"] if r["day"] == 0]
    assert [r["normalized"] for r in refit] == [pytest.approx(0.5 / 0.9), pytest.approx(0.6 / 0.8), None]
    pooled = [r for r in result["directions"] if r["site"] == "all"]
    assert len(pooled) == 4 * 3 and all(r["fraction_right"] == 1.0 and r["n_pairs"] == 12 for r in pooled)


def test_planted_wrong_directions_and_ties(tmp_path):
    clean = np.array([[10.0], [20.0], [30.0], [40.0]])
    parent, eps = np.arange(4), np.full(4, 2.0)
    perturbed = clean + np.array([[3.0], [3.0], [3.0], [0.0]])  # the last one does not move: a tie
    predicted = np.concatenate([clean, perturbed])
    predicted[4 + 2] = clean[2] - 1  # the model expected image 2's response to fall: wrong
    folder = write_synthetic_day(tmp_path / "exp", 1, clean=clean, category=np.array(["a"] * 4), parent=parent,
                                 site=np.zeros(4, int), eps=eps, direction=np.ones(4, int), kind=np.array(["attack"] * 4),
                                 perturbed=perturbed, predicted=predicted, noise="none")
    rows = compute_direction_accuracy(read_experiment(folder.parent)[0].signed_changes())
    assert rows == [{"site": 0, "eps": 2.0, "n_pairs": 4, "fraction_right": 0.625},  # (1 + 1 + 0 + ½) / 4
                    {"site": "all", "eps": 2.0, "n_pairs": 4, "fraction_right": 0.625}]
