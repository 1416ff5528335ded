"""How many PGD steps the loop's site attacks need: mean predicted |Δr| after n steps ÷ after 100.

Usage: ``PYTHONPATH=. python benchmarks/bench_attack_steps.py BASE_CHECKPOINT [EPS ...]`` (the
day-0 model: the base backbone + a random 21-site readout; 7 embedded images × 4 sites; pixel
ε = 1, 4, 10 unless given, e.g. 6.3 25.2 63 for the demo preset's paper ε = 1, 4, 10 at k = 6.3;
one torch thread). Results: docs/validate.md.
"""

import sys
import time

import numpy as np
import torch

from closedloop.attacks.sites import make_site_attacks
from closedloop.images import make_embedded_image_set
from models import make_it_model

STEPS = (10, 20, 50, 100)


def main(base: str, budgets: list[float]) -> None:
    torch.set_num_threads(1)
    model = make_it_model(base, "layer4.0", 21, seed=0)
    clean = make_embedded_image_set(per_photo=1, seed=5).read(np.arange(0, 14, 2))
    index, site = (a.ravel() for a in np.meshgrid(np.arange(len(clean)), np.array([0, 5, 10, 15]), indexing="ij"))
    rows = np.arange(len(index))
    for eps in budgets:
        change = {}
        for steps in STEPS:
            began = time.monotonic()
            attacks = make_site_attacks(model, clean, index, site, eps, n_steps=steps, seed=0)
            change[steps] = float(np.abs(attacks.predicted[rows, site] - attacks.predicted_clean[rows, site]).mean())
            print(f"eps={eps:g} steps={steps}: mean predicted |change| {change[steps]:.4f} ({time.monotonic() - began:.0f} s)")
        print(f"eps={eps:g}: ÷ 100 steps " + ", ".join(f"{n}: {change[n] / change[100]:.3f}" for n in STEPS[:-1]))


if __name__ == "__main__":
    main(sys.argv[1], [float(value) for value in sys.argv[2:]] or [1.0, 4.0, 10.0])
