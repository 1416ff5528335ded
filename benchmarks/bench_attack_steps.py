"""How many steps the loop's site attacks need, per contender: predicted |Δr| after n steps ÷ after 100 PGD steps.

Usage: ``PYTHONPATH=. python benchmarks/bench_attack_steps.py BASE_CHECKPOINT [EPS ...] [--figure PNG]``
(the day-0 model: the base backbone + a random 21-site readout; 7 embedded images × 4 sites, both
directions, the larger kept, as the day's attacks; pixel ε = 1, 4, 10 unless given, e.g. 6.3 25.2 63
for the demo preset's paper ε = 1, 4, 10 at k = 6.3; one torch thread). For each budget and
contender (``pgd``, the paper's fixed ε/3 step; ``apgd``, ``[attack] step_rule = "apgd"``;
``apgd+choice``, APGD with each job's weaker direction stopped after a fifth of the steps,
``[attack] choose_direction_at``) and 5 to 100 steps it prints the mean over attacks of the change
÷ the mean after 100 PGD steps, the smallest per-attack ratio, how many attacks fall below 98% and
the seconds; ``--figure`` draws that share against the seconds, one panel per budget.
Results: docs/attacks.md and docs/validate.md.
"""

import sys
import time

import numpy as np
import torch

from closedloop.attacks.sites import make_site_attacks
from closedloop.images import make_embedded_image_set
from models import make_it_model

STEPS = (5, 10, 20, 30, 40, 50, 100)
CONTENDERS = {"pgd": {"step_rule": "pgd"}, "apgd": {"step_rule": "apgd"}, "apgd+choice": {"step_rule": "apgd", "choice": 0.2}}


def _options(contender: str, steps: int) -> dict:
    """make_site_attacks options of ``contender`` at ``steps`` steps."""
    options = dict(CONTENDERS[contender])
    share = options.pop("choice", 0.0)
    return options | ({"choose_direction_at": max(2, round(share * steps))} if share else {})


def measure(base: str, budgets: list[float]) -> dict:
    """{eps: {contender: [(steps, seconds, mean share, smallest share, attacks below 98%), ...]}}, shares of
    the 100-step PGD objective (mean over attacks; per attack)."""
    torch.set_num_threads(1)
    model = make_it_model(base, "layer4.0", 21, seed=0)
    clean = make_embedded_image_set(per_photo=1, seed=5).read(np.arange(0, 14, 2))
    index, site = (a.ravel() for a in np.meshgrid(np.arange(len(clean)), np.array([0, 5, 10, 15]), indexing="ij"))
    rows = np.arange(len(index))
    results = {}
    for eps in budgets:
        runs = {}
        for contender in CONTENDERS:
            for steps in STEPS:
                began = time.monotonic()
                attacks = make_site_attacks(model, clean, index, site, eps, n_steps=steps, seed=0,
                                            **_options(contender, steps))
                change = np.abs(attacks.predicted[rows, site] - attacks.predicted_clean[rows, site])
                runs[contender, steps] = (change, time.monotonic() - began)
        reference = runs["pgd", 100][0]
        results[eps] = {}
        for contender in CONTENDERS:
            results[eps][contender] = []
            for steps in STEPS:
                change, seconds = runs[contender, steps]
                share = change / np.maximum(reference, 1e-9)
                results[eps][contender].append(
                    (steps, seconds, change.mean() / reference.mean(), share.min(), int(np.sum(share < 0.98))))
        print(f"eps={eps:g}: 100 PGD steps, mean predicted |change| {reference.mean():.4f}")
        for contender in CONTENDERS:
            for steps, seconds, share, smallest, below in results[eps][contender]:
                print(f"  {contender:11s} {steps:3d} steps: {share:.3f} of it, smallest attack {smallest:.3f}, "
                      f"{below} of {len(reference)} below 0.98 ({seconds:.1f} s)", flush=True)
    return results


def draw(results: dict, path: str) -> None:
    """Mean share of the 100-step PGD objective against seconds, one panel per budget, one line per contender."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.6), squeeze=False)
    for ax, (eps, by_rule) in zip(axes[0], results.items()):
        for contender, marker in zip(CONTENDERS, "os^"):
            points = by_rule[contender]
            ax.plot([p[1] for p in points], [p[2] for p in points], marker=marker, label=contender)
            for steps, seconds, share, *_ in points:
                ax.annotate(str(steps), (seconds, share), textcoords="offset points", xytext=(4, -10), fontsize=7)
        ax.axhline(1.0, color="k", ls=":", lw=1)
        ax.set(title=f"pixel eps = {eps:g}", xlabel="seconds (28 attacks x 2 directions, 1 thread)",
               ylabel="share of the 100-step PGD objective")
        ax.legend(title="contender (steps marked)", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    arguments = sys.argv[1:]
    figure_path = None
    if "--figure" in arguments:
        at = arguments.index("--figure")
        figure_path = arguments[at + 1]
        del arguments[at:at + 2]
    measured = measure(arguments[0], [float(value) for value in arguments[1:]] or [1.0, 4.0, 10.0])
    if figure_path:
        draw(measured, figure_path)
