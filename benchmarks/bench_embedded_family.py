"""Can a network trained on the embedded images be as sensitive as the paper's AT-ResNet-50?

Normalised white-box sensitivity s̃(ε) of penultimate units (both directions, ÷ the units' s.d.
over clean crops; :func:`analysis.network_units.compute_network_sensitivity`, the calibration's
settings: 8 units, 1 start × 20 steps) for

- the shipped embedded family (``closedloop.behavior.models``: ``resnet_tiny`` seeing the image
  area-averaged to 56 px), vanilla and robust (training ε = 3);
- the same network with a learned 16 × 16 stride-16 patch stem in place of ``conv1`` + max-pool,
  so that it sees all 224 px at the same cost, trained by the same recipe: vanilla, robust ε = 3
  and robust ε = 1.

The twin's sites need s̃ ≈ 0.29 at ε = 1 and 1.3 at ε = 4 to cross their preferred-category mean
at the paper's ε ≈ 4 (docs/riglink.md); a base network as sensitive as that would let the loop's
model class represent the sites' sensitivity. Results and what they mean: docs/riglink.md.

Usage: ``PYTHONPATH=. python benchmarks/bench_embedded_family.py [--cache DIR] [--json OUT]``
(about 10 min on 2 cores: trains the three patch-stem networks, and the shipped two if not
cached; torch threads: 2).
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from analysis.network_units import compute_network_sensitivity
from closedloop.behavior.models import (
    EMBEDDED_CATEGORIES,
    EMBEDDED_RECIPE,
    make_embedded_classifier,
    make_embedded_training_set,
)
from closedloop.images import make_embedded_image_set
from models.classifiers import load_classifier, make_classifier
from models.training import fit_classifier

BUDGETS = (1.0, 4.0, 10.0)
PATCH_STEM = {"patch vanilla": 0.0, "patch robust eps=3": 3.0, "patch robust eps=1": 1.0}


def make_patch_stem_classifier(eps: float, cache: Path):
    """The embedded recipe's ``resnet_tiny`` at 224 px with a learned 16 px patch stem, trained
    (training ε = ``eps``) on the embedded training set; its checkpoint goes to ``cache``."""
    classifier = make_classifier("resnet_tiny", EMBEDDED_CATEGORIES, input_size=0, seed=0)
    stem = nn.Conv2d(3, 16, kernel_size=16, stride=16, bias=False)
    nn.init.kaiming_normal_(stem.weight, mode="fan_out", nonlinearity="relu", generator=torch.Generator().manual_seed(0))
    classifier.network.conv1, classifier.network.maxpool = stem, nn.Identity()
    pixels, labels = make_embedded_training_set(EMBEDDED_RECIPE["per_photo"], EMBEDDED_RECIPE["crop_seed"])
    fit_classifier(classifier, pixels, labels, cache / f"patch-eps{eps:g}", eps=eps, epochs=EMBEDDED_RECIPE["epochs"],
                   batch_size=EMBEDDED_RECIPE["batch_size"], learning_rate=EMBEDDED_RECIPE["learning_rate"], seed=0,
                   device="cpu", restart=True)
    return classifier.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path("daily_runs/cache"), help="embedded networks' cache")
    parser.add_argument("--json", type=Path, help="also write the table here")
    args = parser.parse_args()
    torch.set_num_threads(2)
    networks = {name: load_classifier(make_embedded_classifier(name, args.cache, device="cpu")).features()
                for name in ("vanilla", "robust")}
    for name, eps in PATCH_STEM.items():
        began = time.monotonic()
        networks[name] = make_patch_stem_classifier(eps, args.cache / "bench_embedded_family").features()
        print(f"{name}: trained in {time.monotonic() - began:.0f} s", flush=True)
    clean = make_embedded_image_set(per_photo=4, seed=0)
    clean = clean.read(np.arange(len(clean)))
    table = compute_network_sensitivity(networks, clean, BUDGETS, n_units=8, n_images=14, n_starts=1, n_steps=20,
                                        seed=0)["mean"]
    print(f"{'network':<22}" + "".join(f"{'eps=' + format(eps, 'g'):>10}" for eps in BUDGETS))
    for name in networks:
        values = {row["eps"]: row["mean"] for row in table if row["network"] == name}
        print(f"{name:<22}" + "".join(f"{values[eps]:>10.3f}" for eps in BUDGETS))
    if args.json:
        args.json.write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
