"""The simulated rig's truth for validation: the class ceiling (what the best model of the loop's
class would measure) against the base share it attacks and the white-box truth it must stay under."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from closedloop.attacks.sites import make_site_attacks
from closedloop.attacks.whitebox import compute_unit_sensitivity
from closedloop.config import build_config
from closedloop.data.bundle import make_event_codes
from closedloop.data.store import create_store
from closedloop.images import make_embedded_image_set
from rigs.sim import ExpectedCounts, compute_hidden_site_options, make_hidden_sites
from rigs.truth import compute_class_ceiling, compute_sim_truth

pytestmark = pytest.mark.timeout(300)

_WINDOW = {"window_s": (0.07, 0.17), "on_s": 0.1}


def _config(**sim):
    """A small twin on random-weight resnet_tiny networks (no training)."""
    return build_config({"model": {"backbone": "resnet_tiny"}, "sites": {"n_sites": 2}, "attack": {"steps": 8},
                         "sim": sim})


def _photographs(n: int) -> np.ndarray:
    images = make_embedded_image_set(per_photo=1, seed=5)
    return images.read(np.arange(n))


def test_the_base_share_does_not_depend_on_the_nonrobust_network():
    config = _config(nonrobust_fraction=0.3)
    sites = make_hidden_sites(2, config.sim.seed, **compute_hidden_site_options(config))
    images = torch.from_numpy(_photographs(4)).permute(0, 3, 1, 2).float().div(255)
    share, full = ExpectedCounts(sites, **_WINDOW, base_share_only=True), ExpectedCounts(sites, **_WINDOW)
    with torch.no_grad():
        before_share, before_full = share(images), full(images)
        sites.readouts[1].channels.mul_(-3.0)  # another non-robust network's drive
        after_share, after_full = share(images), full(images)
    torch.testing.assert_close(after_share, before_share)
    assert not torch.allclose(after_full, before_full, atol=0.1)


def test_without_a_nonrobust_share_the_ceiling_reaches_the_white_box_truth():
    """The share is then the whole site: the loop's own attack on it comes close to the white-box
    truth and never exceeds it (beyond the 8-bit rounding of the attack images)."""
    config = _config(nonrobust_fraction=0.0)
    clean = _photographs(2)
    image_index, site = np.meshgrid(np.arange(2), np.arange(2), indexing="ij")
    ceiling = compute_class_ceiling(config, clean, image_index.ravel(), site.ravel(), 2.0, seed=0)
    sites = make_hidden_sites(2, config.sim.seed, **compute_hidden_site_options(config))
    truth = compute_unit_sensitivity(ExpectedCounts(sites, **_WINDOW), clean, 2.0, n_starts=1, n_steps=12).sensitivity
    truth = truth.ravel()  # (image, site), as the jobs
    assert ceiling.shape == truth.shape
    assert np.all(ceiling <= 1.1 * truth + 0.05), np.c_[ceiling, truth]
    assert ceiling.mean() >= 0.7 * truth.mean(), (ceiling.mean(), truth.mean())


def test_a_nonrobust_share_puts_the_truth_beyond_the_ceiling():
    """With most of the drive from a network the model cannot represent (here a network as
    sensitive as the base: both random, both at 224 px), attacks on the base share reach a small part
    of the truth."""
    config = _config(nonrobust_fraction=0.99, nonrobust_input_size=0)
    clean = _photographs(2)
    image_index, site = np.meshgrid(np.arange(2), np.arange(2), indexing="ij")
    ceiling = compute_class_ceiling(config, clean, image_index.ravel(), site.ravel(), 2.0, seed=0)
    sites = make_hidden_sites(2, config.sim.seed, **compute_hidden_site_options(config))
    truth = compute_unit_sensitivity(ExpectedCounts(sites, **_WINDOW), clean, 2.0, n_starts=1, n_steps=12).sensitivity
    assert ceiling.mean() < 0.5 * truth.mean(), (ceiling.mean(), truth.mean())


def _attacked_store(tmp_path, truth_images: int):
    """A day store of 2 clean photographs and a 20-step increase attack of each for each of 2 sites
    at ε = 2, and the config of a weak truth solver (1 start, 2 steps)."""
    config = _config(nonrobust_fraction=0.0, truth_starts=1, truth_steps=2, truth_images=truth_images)
    clean = _photographs(2)
    sites = make_hidden_sites(2, config.sim.seed, **compute_hidden_site_options(config))
    expected = ExpectedCounts(sites, window_s=config.response.window_s, on_s=config.rsvp.on_s)
    image_index, site = (a.ravel() for a in np.meshgrid(np.arange(2), np.arange(2), indexing="ij"))
    attacks = make_site_attacks(expected, clean, image_index, site, 2.0, n_steps=20, seed=0, directions="increase")
    store = create_store(tmp_path / "store.zarr", sites=2)
    store.append_stimuli(clean, parent=-1, site=-1, eps=0.0, direction=0, kind="clean", predicted=np.zeros((2, 2)),
                         code=make_event_codes(6)[:2])
    store.append_stimuli(attacks.pixels, parent=image_index, site=site, eps=2.0, direction=1, kind="attack",
                         predicted=attacks.predicted, code=make_event_codes(6)[2:])
    return config, expected, clean, image_index, site


def test_the_truth_is_never_below_the_attack_shown(tmp_path):
    """A weak white-box solver (1 start, 2 steps) must not put the truth under the change that the
    shown attack image (a point of the same ε-ball, here a 20-step attack) made."""
    config, expected, clean, image_index, site = _attacked_store(tmp_path, truth_images=0)
    truth = compute_sim_truth(config, tmp_path / "store.zarr", seed=0)
    shown = np.abs(truth.expected_counts[2:][np.arange(4), site] - truth.expected_counts[image_index, site])
    solver = compute_unit_sensitivity(expected, clean, 2.0, n_starts=1, n_steps=2, seed=0).sensitivity
    for s in range(2):
        mine = site == s
        assert truth.sensitivity(s, 2.0) == pytest.approx(np.fmax(solver[image_index[mine], s], shown[mine]).mean())
        assert truth.sensitivity(s, 2.0) >= shown[mine].mean() > solver[:, s].mean(), (shown[mine], solver[:, s])


def test_a_truth_subsample_solves_one_shared_parent_for_every_site(tmp_path):
    """``[sim] truth_images`` = 1 of 2: each site's truth is its value on one parent, the same parent
    for both sites, solved as on the whole day (the subsample changes the images, not the solver)."""
    config, expected, clean, image_index, site = _attacked_store(tmp_path, truth_images=1)
    truth = compute_sim_truth(config, tmp_path / "store.zarr", seed=3)
    shown = np.abs(truth.expected_counts[2:][np.arange(4), site] - truth.expected_counts[image_index, site])
    candidates = {}
    for parent in (0, 1):
        solver = compute_unit_sensitivity(expected, clean[[parent]], 2.0, units=[0, 1], n_starts=1, n_steps=2,
                                          batch_size=256, seed=3).sensitivity[0]
        candidates[parent] = [max(solver[s], shown[(image_index == parent) & (site == s)][0]) for s in (0, 1)]
    values = [truth.sensitivity(s, 2.0) for s in (0, 1)]
    assert any(values == pytest.approx(candidate) for candidate in candidates.values()), (values, candidates)
    assert candidates[0] != pytest.approx(candidates[1])  # the two parents differ, so the test can tell them apart


def test_the_truth_solver_follows_the_configured_step_rule(tmp_path):
    """``[sim] truth_step_rule`` = "apgd": the truth is the APGD solver's (or the shown attack's), not the paper rule's."""
    config, expected, clean, image_index, site = _attacked_store(tmp_path, truth_images=0)
    config = config.model_copy(update={"sim": config.sim.model_copy(update={"truth_step_rule": "apgd", "truth_steps": 20})})
    truth = compute_sim_truth(config, tmp_path / "store.zarr", seed=0)
    shown = np.abs(truth.expected_counts[2:][np.arange(4), site] - truth.expected_counts[image_index, site])
    solved = {rule: compute_unit_sensitivity(expected, clean, 2.0, n_starts=1, n_steps=20, step_rule=rule,
                                             batch_size=256, seed=0).sensitivity for rule in ("pgd", "apgd")}
    # at 20 steps APGD beats the shown attack and the paper rule does not, so the truth tells the rules apart
    assert (solved["apgd"][image_index, site] > shown).all() and (solved["pgd"][image_index, site] < shown).any()
    for s in range(2):
        mine = site == s
        assert truth.sensitivity(s, 2.0) == pytest.approx(np.fmax(solved["apgd"][image_index[mine], s], shown[mine]).mean())


def test_the_truth_solver_chooses_the_direction_early_when_configured(tmp_path, monkeypatch):
    """``[sim] truth_choose_direction_at`` = 3: the truth is the solver's with each (image, site)'s
    weaker direction stopped after 3 steps, the same solve as compute_unit_sensitivity's with that choice.
    (A right choice gives the same numbers as no choice, so the solver's calls are also recorded.)"""
    import rigs.truth

    config, expected, clean, image_index, site = _attacked_store(tmp_path, truth_images=0)
    chosen = {"truth_step_rule": "apgd", "truth_steps": 20, "truth_choose_direction_at": 3}
    config = config.model_copy(update={"sim": config.sim.model_copy(update=chosen)})
    calls = []

    def recorded(*arguments, **options):
        calls.append(options)
        return compute_unit_sensitivity(*arguments, **options)

    monkeypatch.setattr(rigs.truth, "compute_unit_sensitivity", recorded)
    truth = compute_sim_truth(config, tmp_path / "store.zarr", seed=0)
    assert calls and all(call["choose_direction_at"] == 3 and call["step_rule"] == "apgd" for call in calls)
    shown = np.abs(truth.expected_counts[2:][np.arange(4), site] - truth.expected_counts[image_index, site])
    solved = compute_unit_sensitivity(expected, clean, 2.0, n_starts=1, n_steps=20, step_rule="apgd", choose_direction_at=3,
                                      batch_size=256, seed=0)
    assert (np.isnan(solved.increase) ^ np.isnan(solved.decrease)).all()  # one direction per (image, site) was solved
    for s in range(2):
        mine = site == s
        assert truth.sensitivity(s, 2.0) == pytest.approx(np.fmax(solved.sensitivity[image_index[mine], s], shown[mine]).mean())
