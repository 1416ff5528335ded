"""Validation only: the simulated rig's true sensitivity, to check the lower bound against.

For a day recorded on the simulated rig, the true mean white-box sensitivity of site i at
budget ε over the clean images it was attacked on, E_x max_{‖δ‖<ε} |r_i(x) − r_i(x+δ)|, with
r_i the expected spike count per response window of the hidden site (:class:`rigs.sim.ExpectedCounts`),
solved by the white-box solver (:func:`closedloop.attacks.whitebox.compute_unit_sensitivity`), and the
hidden sites' noise-free expected counts of every stimulus shown, and which sites are visually
driven (``[sim] driven_fraction``), and the class ceiling: the bound that attacks made by the
best model of the loop's class would give. Only the estimate stage of a simulated day, the
validation reports and the tests call this; the loop never uses it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np

from closedloop.attacks.engine import compute_predictions
from closedloop.attacks.sites import make_site_attacks
from closedloop.attacks.whitebox import compute_unit_sensitivity
from closedloop.config import ExperimentConfig
from closedloop.data.store import open_store
from rigs.sim import ExpectedCounts, compute_hidden_site_options, compute_site_gains, make_hidden_sites

__all__ = ["SimTruth", "compute_sim_truth", "compute_driven_sites", "compute_class_ceiling",
           "compute_day_class_ceiling"]

_CHUNK = 256  # stimuli read and evaluated at a time


class SimTruth(NamedTuple):
    """What the simulated rig knows about a day: see :func:`compute_sim_truth`."""

    sensitivity: Callable[[int, float], float]
    expected_counts: np.ndarray


def compute_sim_truth(config: ExperimentConfig, store_path: str | Path, *, seed: int, device="cpu") -> SimTruth:
    """The simulated sites' truth for a day store.

    ``sensitivity(site, eps) -> float | None``: the site's true mean sensitivity (spikes per window)
    at ``eps``, averaged over the clean parents of that site's attacks at that budget (None for a
    site not attacked at ``eps``, e.g. one left out of ``[sites] targets``), or with ``[sim]
    truth_images`` = n > 0 over n of them drawn at random with ``seed`` (the same for every site
    and budget when they share their parents, as a plan's attacks do; an unbiased estimate of
    that mean at a fraction of the cost). Per parent it is the best of the white-box solver
    (``[sim] truth_starts`` random starts per direction, ``[sim] truth_steps`` steps, ``[sim]
    truth_step_rule``, ``[sim] truth_choose_direction_at``) and of the
    attack image shown (the site's change there): both are points of the ε-ball, so the larger
    is the better estimate of the maximum, and a solver that falls short of the loop's own
    attack can never put the truth below the bound.
    ``expected_counts``: (n_stimuli, n_sites) float64 noise-free expected spike counts per
    response window of every stimulus (the 8-bit images shown), in store order.
    """

    store = open_store(store_path)
    stimuli = store.read_stimuli(pixels=False)
    attack = stimuli["kind"] == "attack"
    sites = make_hidden_sites(config.sites.n_sites, config.sim.seed, **compute_hidden_site_options(config))
    expected = ExpectedCounts(sites, window_s=config.response.window_s, on_s=config.rsvp.on_s).to(device)
    counts = np.concatenate([
        compute_predictions(expected, store.read_pixels(np.arange(start, min(start + _CHUNK, store.n_stimuli))), device=device)
        for start in range(0, store.n_stimuli, _CHUNK)
    ]).astype(np.float64)
    truth: dict[tuple[int, float], float] = {}
    for eps in np.unique(stimuli["eps"][attack]):
        chosen = attack & (stimuli["eps"] == eps)
        parents = np.unique(stimuli["parent"][chosen])
        if 0 < config.sim.truth_images < len(parents):
            parents = np.sort(np.random.default_rng(seed).choice(parents, config.sim.truth_images, replace=False))
            chosen &= np.isin(stimuli["parent"], parents)
        targeted = np.unique(stimuli["site"][chosen])
        solved = compute_unit_sensitivity(
            expected, store.read_pixels(parents), float(eps), units=targeted, n_starts=config.sim.truth_starts,
            n_steps=config.sim.truth_steps, step_rule=config.sim.truth_step_rule,
            choose_direction_at=config.sim.truth_choose_direction_at, batch_size=256, seed=seed,
            device=device,
        )
        row = {parent: i for i, parent in enumerate(parents)}
        for column, site in enumerate(targeted):
            mine = np.flatnonzero(chosen & (stimuli["site"] == site))
            change = np.abs(counts[stimuli["parent"][mine], site] - counts[mine, site])  # shown attacks: points of the ball
            own, which = np.unique(stimuli["parent"][mine], return_inverse=True)
            shown = np.zeros(len(own))
            np.maximum.at(shown, which, change)
            best = np.fmax(solved.sensitivity[[row[p] for p in own], column], shown)
            truth[(int(site), float(eps))] = float(best.mean())
    return SimTruth(lambda site, eps: truth.get((int(site), float(eps))), counts)


def compute_driven_sites(config: ExperimentConfig) -> np.ndarray:
    """Which of the experiment's simulated sites are visually driven: bool ``(n_sites,)``.

    The sites with gain 1 in :func:`rigs.sim.compute_site_gains` (``[sim] seed``,
    ``driven_fraction``, ``undriven_gain``); every site when ``driven_fraction = 1``.
    """
    sim = config.sim
    return compute_site_gains(config.sites.n_sites, sim.seed, sim.driven_fraction, sim.undriven_gain) == 1.0


def compute_class_ceiling(config: ExperimentConfig, clean_uint8: np.ndarray, image_index, site, eps, *, seed: int,
                          device="cpu") -> np.ndarray:
    """What the best model of the loop's class would have measured, without response noise.

    The loop's model is the base backbone with a readout, so the most it can know of a simulated
    site is the site's base-network share (:class:`rigs.sim.HiddenSites` with the non-robust drive
    held at its mean). Job j attacks that share of site ``site[j]`` on image
    ``clean_uint8[image_index[j]]`` (uint8 (n_images, H, W, 3)) within ``eps[j]`` with the loop's
    own attack (:func:`closedloop.attacks.sites.make_site_attacks`: ``[attack]`` steps and step
    ratio, fp32); the three broadcast to (n_jobs,). Returns float64 (n_jobs,): the estimator's
    signed change sign(f(x) − f(x+δ)) · (r(x) − r(x+δ)), spikes per window, with f the share and
    r the sites' full expected counts. Its mean over a site's images is the ceiling of the loop's
    noise-free bound for a perfectly fitted readout; what lies between it and the truth only a
    model outside the class could reach.
    """
    image_index, site, eps = (np.asarray(a) for a in np.broadcast_arrays(image_index, site, eps))
    sites = make_hidden_sites(config.sites.n_sites, config.sim.seed, **compute_hidden_site_options(config))
    window = {"window_s": config.response.window_s, "on_s": config.rsvp.on_s}
    share = ExpectedCounts(sites, **window, base_share_only=True).to(device)
    counts = ExpectedCounts(sites, **window).to(device)
    attacks = make_site_attacks(share, clean_uint8, image_index, site, eps, n_steps=config.attack.steps,
                                step_ratio=config.attack.step_ratio, step_rule=config.attack.step_rule,
                                choose_direction_at=config.attack.choose_direction_at, seed=seed, device=device,
                                precision="fp32")
    jobs = np.arange(len(site))
    clean_counts = compute_predictions(counts, clean_uint8, device=device).astype(np.float64)
    shown_counts = np.concatenate([
        compute_predictions(counts, attacks.pixels[start:start + _CHUNK], device=device)
        for start in range(0, len(jobs), _CHUNK)
    ]).astype(np.float64)
    sign = np.sign(attacks.predicted_clean[jobs, site] - attacks.predicted[jobs, site])
    return sign * (clean_counts[image_index, site] - shown_counts[jobs, site])


def compute_day_class_ceiling(config: ExperimentConfig, store_path: str | Path, *, seed: int, device="cpu") -> dict:
    """:func:`compute_class_ceiling` for every attack job of a day store (its clean parent, site
    and ε): ``{(site, eps): mean over the site's attacked images}``, spikes per window."""
    store = open_store(store_path)
    stimuli = store.read_stimuli(pixels=False)
    attack = np.flatnonzero(stimuli["kind"] == "attack")
    parents = np.unique(stimuli["parent"][attack])
    site, eps = stimuli["site"][attack].astype(np.int64), stimuli["eps"][attack].astype(np.float64)
    change = compute_class_ceiling(config, store.read_pixels(parents), np.searchsorted(parents, stimuli["parent"][attack]),
                                   site, eps, seed=seed, device=device)
    return {(int(s), float(e)): float(change[(site == s) & (eps == e)].mean())
            for s, e in sorted(set(zip(site.tolist(), eps.tolist())))}
