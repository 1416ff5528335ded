"""Validation only: the simulated rig's true sensitivity, to check the lower bound against.

For a day recorded on the simulated rig, the true mean white-box sensitivity of site i at
budget ε over the clean images it was attacked on, E_x max_{‖δ‖<ε} |r_i(x) − r_i(x+δ)|, with
r_i the expected spike count per response window of the hidden site (:class:`rigs.sim.ExpectedCounts`),
solved by the white-box solver (:func:`closedloop.attacks.whitebox.compute_unit_sensitivity`), and the
hidden sites' noise-free expected counts of every stimulus shown, and which sites are visually
driven (``[sim] driven_fraction``). Only the
estimate stage of a simulated day, the validation reports and the tests call this; the loop never uses it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np

from closedloop.attacks.engine import compute_predictions
from closedloop.attacks.whitebox import compute_unit_sensitivity
from closedloop.config import ExperimentConfig
from closedloop.data.store import open_store
from rigs.sim import ExpectedCounts, compute_hidden_site_options, compute_site_gains, make_hidden_sites

__all__ = ["SimTruth", "compute_sim_truth", "compute_driven_sites"]

_CHUNK = 256  # stimuli read and evaluated at a time


class SimTruth(NamedTuple):
    """What the simulated rig knows about a day: see :func:`compute_sim_truth`."""

    sensitivity: Callable[[int, float], float]
    expected_counts: np.ndarray


def compute_sim_truth(config: ExperimentConfig, store_path: str | Path, *, seed: int, device="cpu") -> SimTruth:
    """The simulated sites' truth for a day store.

    ``sensitivity(site, eps) -> float | None``: the site's true mean sensitivity (spikes per window)
    at ``eps``, averaged over the clean parents of that site's attacks at that budget (None for a
    site not attacked at ``eps``, e.g. one left out of ``[sites] targets``); solver effort:
    ``[sim] truth_starts`` random starts per direction, ``[sim] truth_steps`` steps.
    ``expected_counts``: (n_stimuli, n_sites) float64 noise-free expected spike counts per
    response window of every stimulus (the 8-bit images shown), in store order.
    """

    store = open_store(store_path)
    stimuli = store.read_stimuli(pixels=False)
    attack = stimuli["kind"] == "attack"
    sites = make_hidden_sites(config.sites.n_sites, config.sim.seed, **compute_hidden_site_options(config))
    expected = ExpectedCounts(sites, window_s=config.response.window_s, on_s=config.rsvp.on_s).to(device)
    truth: dict[tuple[int, float], float] = {}
    for eps in np.unique(stimuli["eps"][attack]):
        chosen = attack & (stimuli["eps"] == eps)
        parents = np.unique(stimuli["parent"][chosen])
        targeted = np.unique(stimuli["site"][chosen])
        solved = compute_unit_sensitivity(
            expected, store.read_pixels(parents), float(eps), units=targeted, n_starts=config.sim.truth_starts,
            n_steps=config.sim.truth_steps, batch_size=256, seed=seed, device=device,
        )
        row = {parent: i for i, parent in enumerate(parents)}
        for column, site in enumerate(targeted):
            mine = np.unique(stimuli["parent"][chosen & (stimuli["site"] == site)])
            truth[(int(site), float(eps))] = float(solved.sensitivity[[row[p] for p in mine], column].mean())
    counts = np.concatenate([
        compute_predictions(expected, store.read_pixels(np.arange(start, min(start + _CHUNK, store.n_stimuli))), device=device)
        for start in range(0, store.n_stimuli, _CHUNK)
    ]).astype(np.float64)
    return SimTruth(lambda site, eps: truth.get((int(site), float(eps))), counts)


def compute_driven_sites(config: ExperimentConfig) -> np.ndarray:
    """Which of the experiment's simulated sites are visually driven: bool ``(n_sites,)``.

    The sites with gain 1 in :func:`rigs.sim.compute_site_gains` (``[sim] seed``,
    ``driven_fraction``, ``undriven_gain``); every site when ``driven_fraction = 1``.
    """
    sim = config.sim
    return compute_site_gains(config.sites.n_sites, sim.seed, sim.driven_fraction, sim.undriven_gain) == 1.0
