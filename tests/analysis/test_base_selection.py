"""Base-model selection: the layer that generated the responses wins every criterion."""

import numpy as np
import pytest

from analysis.base_selection import compute_base_selection, compute_layer_scores
from analysis.experiment import read_experiment
from analysis.synthetic import make_synthetic_images, write_synthetic_day
from closedloop.attacks.engine import compute_predictions
from models import load_backbone


def _planted(rng, n_clean=60, n_features=20, n_sites=3, n_pairs=40):
    truth = rng.normal(size=(n_clean, n_features))
    weights = rng.normal(size=(n_features, n_sites))
    responses = truth @ weights + rng.normal(scale=0.3, size=(n_clean, n_sites))
    parent, site = rng.integers(0, n_clean, n_pairs), rng.integers(0, n_sites, n_pairs)
    step = rng.normal(size=(n_pairs, n_features))
    change = np.einsum("pf,fp->p", step, weights[:, site])
    return truth, responses, truth[parent] + step, parent, site, change


def test_the_generating_features_beat_unrelated_ones(rng):
    truth, responses, perturbed, parent, site, change = _planted(rng)
    right = compute_layer_scores(truth, responses, perturbed, parent, site, change, seed=1)
    unrelated = rng.normal(size=truth.shape)
    wrong = compute_layer_scores(unrelated, responses, unrelated[parent] + rng.normal(size=perturbed.shape), parent, site,
                                 change, seed=1)
    assert right["predictivity"] > 0.9 and abs(wrong["predictivity"]) < 0.35
    assert right["cka"] > wrong["cka"] + 0.2
    sigma = responses.std(axis=0, ddof=1)
    assert right["transfer"] == pytest.approx(np.mean(np.abs(change) / sigma[site]), rel=0.15)
    assert abs(wrong["transfer"]) < 0.5 * right["transfer"]


def test_cka_is_one_for_a_rotated_and_scaled_copy(rng):
    features = rng.normal(size=(30, 6))
    rotation, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    scores = compute_layer_scores(features, 3 * features @ rotation + 7, np.zeros((0, 6)), [], [], [])
    assert scores["cka"] == pytest.approx(1.0)


def test_no_pairs_gives_nan_transfer(rng):
    truth, responses, *_ = _planted(rng)
    scores = compute_layer_scores(truth, responses, np.zeros((0, truth.shape[1])), [], [], [])
    assert np.isnan(scores["transfer"]) and scores["predictivity"] > 0.9


def test_bad_inputs_are_refused(rng):
    truth, responses, perturbed, parent, site, change = _planted(rng)
    with pytest.raises(ValueError, match="'clean_responses' must have shape"):
        compute_layer_scores(truth, responses[:5], perturbed, parent, site, change)
    with pytest.raises(ValueError, match="'pair_site' must lie in"):
        compute_layer_scores(truth, responses, perturbed, parent, site + 5, change)
    with pytest.raises(ValueError, match="'n_folds' must lie in"):
        compute_layer_scores(truth, responses, perturbed, parent, site, change, n_folds=1)
    with pytest.raises(ValueError, match="'candidates' must be a non-empty dict"):
        compute_base_selection({}, ["layer4.0"], [None])


def test_recorded_sites_that_read_out_a_layer_select_it(tmp_path):
    """Sites are linear readouts of resnet_tiny's penultimate layer; layer1.0 of the same network loses."""
    rng = np.random.default_rng(5)
    n_clean, n_sites = 48, 8
    clean = make_synthetic_images(n_clean, seed=2)
    parent = np.repeat(np.arange(3), n_sites)
    site = np.tile(np.arange(n_sites), 3)
    other = (parent + 1 + rng.integers(0, n_clean - 1, parent.size)) % n_clean
    mixed = 0.7 * clean[parent].astype(float) + 0.3 * clean[other].astype(float)  # interpolation toward another image
    pixels = np.concatenate([clean, mixed.round().astype(np.uint8)])
    features = compute_predictions(load_backbone("resnet_tiny", "avgpool"), pixels).astype(np.float64)
    drive = features @ rng.normal(size=(features.shape[1], n_sites))
    drive = (drive - drive[:n_clean].mean(axis=0)) / drive[:n_clean].std(axis=0)
    expected = np.clip(40 + 12 * drive, 1, None)
    write_synthetic_day(tmp_path / "exp", 1, clean=expected[:n_clean], category=np.array(["a", "b"] * (n_clean // 2)),
                        parent=parent, site=site, eps=np.full(parent.size, 3.0), direction=np.ones(parent.size, int),
                        kind=np.array(["attack"] * parent.size), perturbed=expected[n_clean:], pixels=pixels, noise="none")
    days = read_experiment(tmp_path / "exp")
    result = compute_base_selection({"tiny": "resnet_tiny"}, ["layer1.0", "avgpool"], days, n_images=48, n_pairs=24)
    scores = {row["layer"]: row for row in result["scores"]}
    assert scores["avgpool"]["n_images"] == 48 and scores["avgpool"]["n_pairs"] == 24
    assert scores["avgpool"]["predictivity"] > 0.95 and scores["avgpool"]["transfer"] > 0
    assert {row["criterion"]: row["layer"] for row in result["best"]} == {"cka": "avgpool", "predictivity": "avgpool",
                                                                           "transfer": "avgpool"}
