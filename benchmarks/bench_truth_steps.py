"""How strong the twin's white-box truth solver is, per step rule and number of steps.

Usage: ``PYTHONPATH=. python benchmarks/bench_truth_steps.py DAY_FOLDER [N_IMAGES]`` (a finished day of
a campaign on the simulated rig, e.g. ``daily_runs/validate/day_005``; 6 images by default; 2 torch
threads). Solves the sites' white-box sensitivity (:func:`closedloop.attacks.whitebox.compute_unit_sensitivity`
on the day's hidden sites, every site, one random start as the campaign's ``[sim] truth_starts``)
on the first N attacked clean images at the paper's ε = 1 and 10 (pixel: × the day's
``[attack] paper_scale``), with the paper's rule (``[sim] truth_step_rule = "pgd"``) at 30 and 100
steps and with APGD at 10, 20 and 30 (and at 16, 20 and 30 with the direction chosen after 2 to 4
steps, ``choose_direction_at``), and prints each mean as a share of the 100-step paper-rule
solve, the smallest per (image, site) share, and the seconds. Results: docs/attacks.md.
"""

import sys
import time
from pathlib import Path

import numpy as np
import torch

from closedloop.attacks.whitebox import compute_unit_sensitivity
from closedloop.config import read_config
from closedloop.data import layout
from closedloop.data.store import open_store
from rigs.sim import ExpectedCounts, compute_hidden_site_options, make_hidden_sites

# (step rule, steps, choose_direction_at: 0 = both directions to the end)
RUNS = (("pgd", 30, 0), ("pgd", 100, 0), ("apgd", 10, 0), ("apgd", 20, 0), ("apgd", 30, 0), ("apgd", 16, 2),
        ("apgd", 20, 2), ("apgd", 20, 3), ("apgd", 30, 4))


def main(folder: Path, n_images: int) -> None:
    torch.set_num_threads(2)
    config = read_config(folder / layout.CONFIG)
    sites = make_hidden_sites(config.sites.n_sites, config.sim.seed, **compute_hidden_site_options(config))
    expected = ExpectedCounts(sites, window_s=config.response.window_s, on_s=config.rsvp.on_s).eval()
    store = open_store(folder / layout.STORE)
    stimuli = store.read_stimuli(pixels=False)
    parents = np.unique(stimuli["parent"][stimuli["kind"] == "attack"])[:n_images]
    pixels = store.read_pixels(parents)
    for eps_paper in (1.0, 10.0):
        eps = eps_paper * config.attack.paper_scale
        solved = {}
        for rule, steps, at in RUNS:
            began = time.monotonic()
            sensitivity = compute_unit_sensitivity(expected, pixels, eps, n_starts=1, n_steps=steps, step_rule=rule,
                                                   choose_direction_at=at, batch_size=256, seed=0).sensitivity
            solved[rule, steps, at] = (sensitivity, time.monotonic() - began)
        reference = solved["pgd", 100, 0][0]
        for (rule, steps, at), (sensitivity, seconds) in solved.items():
            chosen = f", direction chosen at step {at}" if at else ""
            print(f"eps={eps:g} (paper {eps_paper:g}) {rule:4s} {steps:3d} steps{chosen}: "
                  f"mean {sensitivity.mean():.3f} spikes/window, "
                  f"{sensitivity.mean() / reference.mean():.3f} of the 100-step paper rule, smallest "
                  f"{(sensitivity / np.maximum(reference, 1e-9)).min():.3f} ({seconds:.1f} s, "
                  f"{seconds / solved['pgd', 30, 0][1]:.2f} of the 30-step paper rule's)", flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 6)
