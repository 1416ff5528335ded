"""Synthetic experiments with planted answers, written with the real day-store and JSON writers
(the `planted_experiment` fixture, imported by the conftest of each test folder that uses it).

The planted experiment (``planted_experiment``): 3 sites, 4 categories × 3 clean images a day,
site s prefers category s (expected 15 spikes per window against 5 for the others). Every day
the four images 0, 3, 6, 9 (one per category) are attacked for every site at budgets 2, 4, 8 with
"increase" attacks that add ``GAIN[day] · ε`` spikes per window; a Gaussian baseline leaves the
responses unchanged. Counts are noise-free and the model predicts every expected count, so the
lower bound equals the planted change exactly. The truth is 1.5 × the planted change.
"""

from __future__ import annotations

import numpy as np
import pytest

from analysis.synthetic import write_synthetic_day

N_SITES = 3
CATEGORIES = ("cat", "dog", "fish", "bird")
BUDGETS = (2.0, 4.0, 8.0)
GAIN = {0: 0.5, 1: 1.0, 2: 2.0, 3: 3.0}
PREFERRED, OTHER = 15.0, 5.0
ATTACKED = (0, 3, 6, 9)


def planted_clean() -> tuple[np.ndarray, np.ndarray]:
    """Expected clean counts (12, 3) and categories (12,): image k is category k // 3."""
    category = np.array([CATEGORIES[k // 3] for k in range(12)])
    clean = np.full((12, N_SITES), OTHER)
    for site in range(N_SITES):
        clean[category == CATEGORIES[site], site] = PREFERRED
    return clean, category


def write_planted_day(experiment, day: int, *, gain: float, truth: bool = True, refit: bool = True, **options):
    clean, category = planted_clean()
    rows = [(p, s, e, 1, "attack") for p in ATTACKED for s in range(N_SITES) for e in BUDGETS]
    rows += [(p, -1, e, 0, "gaussian") for p in ATTACKED for e in BUDGETS]
    parent, site, eps, direction, kind = (np.array(column) for column in zip(*rows))
    perturbed = clean[parent].copy()
    attack = kind == "attack"
    perturbed[np.flatnonzero(attack), site[attack]] += gain * eps[attack]
    planted_truth = {(s, e): 1.5 * gain * e for s in range(N_SITES) for e in BUDGETS} if truth else None
    summary = {"held_out_r": [0.5, 0.6, None], "reliability": [0.81, 0.64, None], "n_stimuli": 60,
               "n_presentations": 120, "n_days": day + 1, "n_epochs": 2, "best_epoch": 1} if refit else None
    return write_synthetic_day(experiment, day, clean=clean, category=category, parent=parent, site=site, eps=eps,
                               direction=direction, kind=kind, perturbed=perturbed, noise="none", truth=planted_truth,
                               refit=summary, seed=day, **options)


@pytest.fixture(scope="session")
def planted_experiment(tmp_path_factory):
    """Days 0..3 of the planted experiment (see the module docstring); shared, so tests must not change it."""
    experiment = tmp_path_factory.mktemp("planted") / "planted"
    for day, gain in GAIN.items():
        write_planted_day(experiment, day, gain=gain)
    return experiment
