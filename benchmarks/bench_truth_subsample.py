"""The equal-result check of the truth subsample (``[sim] truth_images``) on one simulated day.

Usage: ``PYTHONPATH=. python benchmarks/bench_truth_subsample.py DAY_FOLDER [N]`` (a finished day of a
campaign on the simulated rig, e.g. ``daily_runs/validate/day_005``; N = 14 by default). Solves the
twin's white-box truth (:func:`rigs.truth.compute_sim_truth`) on the day's store twice, with the
day's frozen config and truth seed: on a subsample of N of each budget's attacked images and on all
of them. Prints per budget the mean over sites of each, their ratio, the mean per-site difference
± its s.e. over sites, and the time of each solve. Results: docs/validate.md.
"""

import sys
import time
from pathlib import Path

import numpy as np

from closedloop.config import read_config
from closedloop.core.files import read_json
from closedloop.data import layout
from closedloop.data.store import open_store
from rigs.truth import compute_sim_truth


def main(folder: Path, n_images: int) -> None:
    config = read_config(folder / layout.CONFIG)
    seed = read_json(folder / layout.PROVENANCE)["seeds"]["truth"]
    stimuli = open_store(folder / layout.STORE).read_stimuli(pixels=False)
    budgets = sorted(set(stimuli["eps"][stimuli["kind"] == "attack"].tolist()))
    sites = range(config.sites.n_sites)
    truths, seconds = {}, {}
    for n in (n_images, 0):
        changed = config.model_copy(update={"sim": config.sim.model_copy(update={"truth_images": n})})
        began = time.monotonic()
        truth = compute_sim_truth(changed, folder / layout.STORE, seed=seed)
        seconds[n] = time.monotonic() - began
        truths[n] = {eps: np.array([truth.sensitivity(site, eps) for site in sites], float) for eps in budgets}
    print(f"{folder}: truth on {n_images} images {seconds[n_images]:.0f} s, on all {seconds[0]:.0f} s")
    for eps in budgets:
        part, whole = truths[n_images][eps], truths[0][eps]
        difference = part - whole
        print(f"eps={eps:g}: subsample {part.mean():.3f}, all {whole.mean():.3f}, ratio {part.mean() / whole.mean():.3f}, "
              f"difference {difference.mean():+.3f} ± {difference.std(ddof=1) / np.sqrt(len(difference)):.3f} "
              "(s.e. over sites), spikes per window")


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 14)
