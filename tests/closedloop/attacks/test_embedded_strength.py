"""How strong the faster attacks are on the embedded base, against the paper's 100-step PGD (issue 26).

The day-0 model of the demo and the campaign (the embedded robust ``resnet_tiny`` with a random
21-site readout), 7 embedded images × 4 sites, both directions and the larger kept, at the pixel
budgets of the paper's ε = 1, 4, 10 (k = 6.3), from the same random starts. The target of issue
26 is a mean ≥ 99.5% of the 100-step PGD objective *and* no attack below 98%; only the mean is
met (docs/attacks.md, "Step rules": single attacks fall below 98% of a 100-step PGD run even
for a second 100-step PGD run from other random starts), so only the mean is asserted here.
"""

import numpy as np
import pytest

from closedloop.attacks.sites import make_site_attacks
from closedloop.behavior.models import make_embedded_classifier
from closedloop.images import make_embedded_image_set
from models import make_it_model


@pytest.fixture(scope="module")
def day0_model(request):
    """The embedded robust base with a random 21-site readout; the base is trained once into pytest's
    cache (the same folder as the calibration test's)."""
    cache = request.config.cache.mkdir("closedloop-embedded")
    return make_it_model(str(make_embedded_classifier("robust", cache, device="cpu")), "layer4.0", 21, seed=0)


@pytest.mark.slow
def test_thirty_apgd_steps_reach_the_100_step_pgd_objective_on_average_at_every_budget(day0_model):
    clean = make_embedded_image_set(per_photo=1, seed=5).read(np.arange(0, 14, 2))
    index, site = (a.ravel() for a in np.meshgrid(np.arange(len(clean)), np.array([0, 5, 10, 15]), indexing="ij"))
    rows = np.arange(len(index))
    for eps in (6.3, 25.2, 63.0):
        change = {}
        for rule, steps in (("pgd", 100), ("apgd", 30)):
            made = make_site_attacks(day0_model, clean, index, site, eps, n_steps=steps, step_rule=rule, seed=0)
            change[rule] = np.abs(made.predicted[rows, site] - made.predicted_clean[rows, site])
        assert change["apgd"].mean() >= 0.995 * change["pgd"].mean(), (eps, change["apgd"].mean() / change["pgd"].mean())
