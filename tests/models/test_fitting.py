import copy

import numpy as np
import pytest
import torch

from closedloop.images import to_tensor
from models import FactorizedReadout, ITModel, compute_pearson, fit_it_model, make_it_model

SIZE = 64


@pytest.fixture
def truth_and_data(make_images):
    """Builds (truth, images, counts, stimulus, rates) for n_stimuli, n_repeats, n_sites."""

    def build(n_stimuli: int, n_repeats: int, n_sites: int = 4):
        return _truth_and_data(make_images, n_stimuli, n_repeats, n_sites)

    return build


def _truth_and_data(make_images, n_stimuli: int, n_repeats: int, n_sites: int):
    """A known random readout on a frozen resnet_tiny, scaled so its readout values have mean 1 and
    standard deviation 1.5 over the images, and Poisson counts drawn from it."""
    truth = make_it_model("resnet_tiny", "layer4.0", n_sites, seed=0, image_size=SIZE)
    images = make_images(n_stimuli, SIZE, seed=1)
    with torch.no_grad():
        raw = truth.readout(truth.backbone(to_tensor(images)))
        gain = 1.5 / raw.std(dim=0)
        truth.readout.channel.mul_(gain[:, None])
        truth.readout.bias.copy_(1.0 - raw.mean(dim=0) * gain)
        rates = truth(to_tensor(images)).numpy()
    stimulus = np.repeat(np.arange(n_stimuli), n_repeats)
    counts = np.random.default_rng(2).poisson(rates[stimulus]).astype(np.uint16)
    return truth, images, counts, stimulus, rates


def _student(truth: ITModel, seed: int = 7) -> ITModel:
    return ITModel(copy.deepcopy(truth.backbone), FactorizedReadout(truth.n_sites, truth.readout.in_shape, seed=seed))


@pytest.mark.slow
def test_fit_recovers_a_known_random_readout_on_a_frozen_backbone(truth_and_data):
    # Thresholds: on held-out stimuli the fitted model's predictions correlate with the truth's noise-free
    # rates at r > 0.85 on average (> 0.7 for every site), and with the observed mean counts at a median
    # r > 0.75 (split-half reliability ρ is about 0.85 here, so a perfect model reaches about √ρ ≈ 0.92).
    truth, images, counts, stimulus, rates = truth_and_data(n_stimuli=800, n_repeats=8)
    model = _student(truth)
    result = fit_it_model(
        model, images, counts, stimulus, epochs=40, learning_rate=0.1, freeze_backbone=True,
        held_out_fraction=0.2, seed=0, device="cpu",
    )
    with torch.no_grad():
        predicted = model(to_tensor(images[result.held_out_stimuli])).numpy()
    versus_truth = compute_pearson(predicted, rates[result.held_out_stimuli])
    assert versus_truth.mean() > 0.85 and versus_truth.min() > 0.7, versus_truth
    assert np.median(result.held_out_r) > 0.75, result.held_out_r
    assert (result.reliability > 0.7).all() and result.held_out_r.shape == result.reliability.shape == (4,)
    assert result.held_out_loss[result.best_epoch] < result.held_out_loss[0]
    entry = model.metadata["history"][-1]
    assert entry["n_stimuli"] == 800 and entry["n_held_out_stimuli"] == 160 and entry["best_epoch"] == result.best_epoch
    assert entry["settings"]["freeze_backbone"] is True


def test_fit_is_deterministic_and_frozen_backbone_stays_put(truth_and_data):
    truth, images, counts, stimulus, _ = truth_and_data(n_stimuli=40, n_repeats=2, n_sites=2)
    first, second = _student(truth), _student(truth)
    results = [
        fit_it_model(m, images, counts, stimulus, epochs=2, learning_rate=0.05, freeze_backbone=True,
                     held_out_fraction=0.25, seed=3, device="cpu")
        for m in (first, second)
    ]
    np.testing.assert_array_equal(results[0].held_out_r, results[1].held_out_r)
    assert results[0].held_out_loss == results[1].held_out_loss
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    backbone_before = truth.backbone.state_dict()
    assert all(torch.equal(backbone_before[k], v) for k, v in first.backbone.state_dict().items())
    assert all(p.requires_grad for p in first.parameters())
    assert len(results[0].train_loss) == results[0].n_epochs and len(results[0].held_out_loss) == results[0].n_epochs + 1


def test_end_to_end_fit_changes_the_backbone(truth_and_data):
    truth, images, counts, stimulus, _ = truth_and_data(n_stimuli=40, n_repeats=4, n_sites=2)
    model = _student(truth)
    result = fit_it_model(model, images, counts, stimulus, epochs=3, learning_rate=0.01, backbone_learning_rate=1e-4,
                          held_out_fraction=0.25, patience=3, seed=0, device="cpu")
    assert result.best_epoch >= 1  # otherwise the initial state is kept
    assert model.metadata["history"][-1]["settings"]["freeze_backbone"] is False
    before = truth.backbone.state_dict()["network.conv1.weight"]
    assert not torch.equal(model.backbone.state_dict()["network.conv1.weight"], before)


def test_early_stopping_keeps_the_best_held_out_state(truth_and_data):
    truth, images, counts, stimulus, _ = truth_and_data(n_stimuli=40, n_repeats=2, n_sites=2)
    model = _student(truth)
    result = fit_it_model(model, images, counts, stimulus, loss="mse", epochs=30, learning_rate=5.0,
                          freeze_backbone=True, held_out_fraction=0.25, patience=2, seed=0, device="cpu")
    assert result.n_epochs < 30 and result.n_epochs - result.best_epoch == 2
    held_out = result.held_out_stimuli
    with torch.no_grad():
        predicted = model(to_tensor(images[held_out]))
    means = torch.from_numpy(np.stack([counts[stimulus == s].mean(axis=0) for s in held_out]).astype(np.float32))
    assert float(torch.nn.functional.mse_loss(predicted, means)) == pytest.approx(result.held_out_loss[result.best_epoch], rel=1e-5)


def test_reliability_is_nan_without_repeats(truth_and_data):
    truth, images, counts, stimulus, _ = truth_and_data(n_stimuli=20, n_repeats=1, n_sites=2)
    result = fit_it_model(_student(truth), images, counts.tolist(), stimulus.tolist(), epochs=1,
                          freeze_backbone=True, seed=0, device="cpu")  # lists work too
    assert np.isnan(result.reliability).all() and result.held_out_stimuli.size == 2


def test_fit_refuses_bad_inputs(truth_and_data):
    truth, images, counts, stimulus, _ = truth_and_data(n_stimuli=6, n_repeats=1, n_sites=2)
    model = _student(truth)
    with pytest.raises(ValueError, match=r"'images' must be a uint8 array \(n_stimuli, 224, 224, 3\), channels last, but got float32"):
        fit_it_model(model, images.astype(np.float32), counts, stimulus)
    with pytest.raises(ValueError, match=r"'counts' must have shape \(n_presentations, n_sites\) with n_sites = 2, but got \(6, 3\)"):
        fit_it_model(model, images, np.zeros((6, 3)), stimulus)
    with pytest.raises(ValueError, match=r"'counts' must hold finite spike counts >= 0"):
        fit_it_model(model, images, -np.ones((6, 2)), stimulus)
    with pytest.raises(ValueError, match=r"'stimulus' must lie in \[0, 5\], but got \[6\]"):
        fit_it_model(model, images, counts, [0, 1, 2, 3, 4, 6])
    with pytest.raises(ValueError, match=r"'stimulus' must have shape \(n_presentations,\) = \(6,\)"):
        fit_it_model(model, images, counts, stimulus[:5])
    with pytest.raises(ValueError, match=r"names only 2 distinct stimuli; fitting needs at least 3"):
        fit_it_model(model, images, counts, [0, 0, 0, 1, 1, 1])
    with pytest.raises(ValueError, match=r"Invalid value for 'loss': allowed values are 'poisson', 'mse', but got 'l2'"):
        fit_it_model(model, images, counts, stimulus, loss="l2")
    with pytest.raises(ValueError, match=r"'held_out_fraction' must lie in \(0, 1\), but got 1"):
        fit_it_model(model, images, counts, stimulus, held_out_fraction=1.0)
    with pytest.raises(TypeError, match=r"'model' must be a models\.ITModel"):
        fit_it_model(truth.backbone, images, counts, stimulus)
