"""Validation only: the simulated rig's true sensitivity, to check the lower bound against.

For a day recorded on the simulated rig, the true mean white-box sensitivity of site i at
budget ε over the clean images it was attacked on, E_x max_{‖δ‖<ε} |r_i(x) − r_i(x+δ)|, with
r_i the expected spike count per response window of the hidden site (:class:`rigs.sim.ExpectedCounts`),
solved by the white-box solver (:func:`closedloop.whitebox.compute_unit_sensitivity`). Only the
estimate stage of a simulated day and the validation reports call this; the loop never uses it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from closedloop.config import ExperimentConfig
from closedloop.store import open_store
from closedloop.whitebox import compute_unit_sensitivity

__all__ = ["compute_sim_truth", "compute_sim_expected_counts"]


def compute_sim_truth(config: ExperimentConfig, store_path: str | Path, *, seed: int, device="cpu"):
    """``truth(site, eps) -> float``: site's true mean sensitivity (spikes per window) at ``eps``.

    Averages over the clean parents of that site's attacks at that budget in the day store.
    Solver effort: ``[sim] truth_starts`` random starts per direction, ``[sim] truth_steps`` steps.
    """
    store = open_store(store_path)
    stimuli = store.read_stimuli(pixels=False)
    attack = stimuli["kind"] == "attack"
    expected = _make_expected_counts(config)
    truth: dict[tuple[int, float], float] = {}
    for eps in np.unique(stimuli["eps"][attack]):
        chosen = attack & (stimuli["eps"] == eps)
        parents = np.unique(stimuli["parent"][chosen])
        sites = np.unique(stimuli["site"][chosen])
        solved = compute_unit_sensitivity(
            expected, store.read_pixels(parents), float(eps), units=sites, n_starts=config.sim.truth_starts,
            n_steps=config.sim.truth_steps, batch_size=256, seed=seed, device=device,
        )
        row = {parent: i for i, parent in enumerate(parents)}
        for column, site in enumerate(sites):
            mine = np.unique(stimuli["parent"][chosen & (stimuli["site"] == site)])
            truth[(int(site), float(eps))] = float(solved.sensitivity[[row[p] for p in mine], column].mean())
    return lambda site, eps: truth[(int(site), float(eps))]


def compute_sim_expected_counts(config: ExperimentConfig, store_path: str | Path, *, device="cpu") -> np.ndarray:
    """Noise-free expected spike counts per response window of every stimulus in the day store.

    Returns (n_stimuli, n_sites) float64: the simulated rig's hidden sites on the 8-bit stimuli
    that were shown, in store order.
    """
    from closedloop.attacks import compute_predictions

    store = open_store(store_path)
    pixels = store.read_pixels(np.arange(store.n_stimuli))
    return compute_predictions(_make_expected_counts(config).to(device), pixels, device=device).astype(np.float64)


def _make_expected_counts(config: ExperimentConfig):
    from rigs.sim import ExpectedCounts, compute_hidden_site_options, make_hidden_sites

    sites = make_hidden_sites(config.sites.n_sites, config.sim.seed, **compute_hidden_site_options(config))
    return ExpectedCounts(sites, window_s=config.response.window_s, on_s=config.rsvp.on_s)
