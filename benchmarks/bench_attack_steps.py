"""How many steps the loop's site attacks need, per step rule: predicted |Δr| after n steps ÷ after 100 PGD steps.

Usage: ``PYTHONPATH=. python benchmarks/bench_attack_steps.py BASE_CHECKPOINT [EPS ...]`` (the
day-0 model: the base backbone + a random 21-site readout; 7 embedded images × 4 sites, both
directions, the larger kept, as the day's attacks; pixel ε = 1, 4, 10 unless given, e.g. 6.3 25.2 63
for the demo preset's paper ε = 1, 4, 10 at k = 6.3; one torch thread). For each budget and step
rule (``[attack] step_rule``: ``pgd``, the paper's fixed ε/3 step; ``apgd``) and 10, 20, 50 steps it
prints the mean over attacks of the change ÷ the mean after 100 PGD steps, the smallest per-attack
ratio and the seconds. Results: docs/attacks.md and docs/validate.md.
"""

import sys
import time

import numpy as np
import torch

from closedloop.attacks.sites import make_site_attacks
from closedloop.images import make_embedded_image_set
from models import make_it_model

STEPS = (10, 20, 50)


def main(base: str, budgets: list[float]) -> None:
    torch.set_num_threads(1)
    model = make_it_model(base, "layer4.0", 21, seed=0)
    clean = make_embedded_image_set(per_photo=1, seed=5).read(np.arange(0, 14, 2))
    index, site = (a.ravel() for a in np.meshgrid(np.arange(len(clean)), np.array([0, 5, 10, 15]), indexing="ij"))
    rows = np.arange(len(index))

    def change(eps: float, steps: int, rule: str) -> tuple[np.ndarray, float]:
        began = time.monotonic()
        attacks = make_site_attacks(model, clean, index, site, eps, n_steps=steps, step_rule=rule, seed=0)
        return np.abs(attacks.predicted[rows, site] - attacks.predicted_clean[rows, site]), time.monotonic() - began

    for eps in budgets:
        reference, seconds = change(eps, 100, "pgd")
        print(f"eps={eps:g}: 100 PGD steps, mean predicted |change| {reference.mean():.4f} ({seconds:.1f} s)")
        for rule in ("pgd", "apgd"):
            for steps in STEPS:
                got, seconds = change(eps, steps, rule)
                ratio = got / np.maximum(reference, 1e-9)
                print(f"  {rule:4s} {steps:3d} steps: {got.mean() / reference.mean():.3f} of it, smallest attack "
                      f"{ratio.min():.3f} ({seconds:.1f} s)", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], [float(value) for value in sys.argv[2:]] or [1.0, 4.0, 10.0])
