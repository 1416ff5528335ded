"""How well the loop's day-0 model predicts the simulated sites, per ``[sim] weight_noise``.

Usage: ``PYTHONPATH=. python benchmarks/bench_twin_mismatch.py EXPERIMENT [SETTING ...]`` (an experiment on
the simulated rig whose ``day_000`` has been synthesized, e.g. a ``closedloop validate`` campaign stopped
after day 0's synthesize; 2 torch threads). A SETTING is a ``weight_noise`` level (0 0.05 0.1 0.2 0.3 by
default) or ``KNOB=VALUE`` for another ``[sim]`` knob of the twin's structure, e.g. ``nonrobust_fraction=0.5``
(the other knobs as the experiment sets them).

``weight_noise`` (issue 25) puts the twin's base copy off the loop's backbone by noise on its convolution
weights, a mismatch that only refitting the backbone can learn. Its size is a scientific choice: it should
make the loop's day-0 model as good a predictor of the twin as a model of this class is of real IT, a
published measurement of the same quantity. This script gives the other side of that reading: per noise
setting it builds the twin, draws the day-0 responses (every day-0 stimulus of the experiment, the
experiment's repetitions, Poisson), fits the day-0 model to them exactly as the refit stage does, and
scores it on clean images day 0 did not show, against the twin's expected counts (noise-free): per site
the Pearson r and r², median (quartiles) over sites. Nothing here reads the loop's estimator or its bound.
"""

import sys
import time
from pathlib import Path

import numpy as np
import torch

from closedloop.config import read_config
from closedloop.core.files import read_json
from closedloop.data import layout
from closedloop.data.store import open_store
from closedloop.day.plan import read_plan
from closedloop.images import read_image_source, to_tensor
from models import fit_it_model, make_it_model
from models.predictivity import compute_pearson
from rigs.sim import ExpectedCounts, compute_hidden_site_options, make_hidden_sites

NOISE = ("0", "0.05", "0.1", "0.2", "0.3")
KNOBS = ("weight_noise", "nonrobust_fraction", "nonrobust_input_size", "threshold", "max_rate_hz")


def _expected(expected: ExpectedCounts, images: np.ndarray, batch: int = 64) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate([expected(to_tensor(images[i:i + batch])).numpy() for i in range(0, len(images), batch)])


def _predict(model, images: np.ndarray, batch: int = 64) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return np.concatenate([model(to_tensor(images[i:i + batch])).numpy() for i in range(0, len(images), batch)])


def _setting(text: str) -> dict:
    """``"0.1"`` → {"weight_noise": 0.1}; ``"KNOB=VALUE"`` → {KNOB: VALUE} for a knob of :data:`KNOBS`."""
    knob, _, value = text.rpartition("=")
    knob = knob or "weight_noise"
    if knob not in KNOBS:
        raise SystemExit(f"unknown knob {knob!r} in {text!r}; choose from {', '.join(KNOBS)}")
    return {knob: int(value) if knob == "nonrobust_input_size" else float(value)}


def main(experiment: Path, settings) -> None:
    torch.set_num_threads(2)
    config = read_config(experiment)
    day0 = layout.day_folder(experiment, 0)
    pixels = open_store(day0 / layout.STORE).read_stimuli(pixels=True)["pixels"]
    pool = read_image_source(config.images.source, per_photo=config.images.embedded_per_photo,
                             seed=config.experiment.seed)
    shown = set(read_plan(read_json(day0 / layout.PLAN)).clean)
    held_out = pool.read([i for i in range(len(pool)) if i not in shown])
    repetitions, rng = config.rsvp.repetitions, np.random.default_rng(0)
    print(f"{experiment}: {len(pixels)} day-0 stimuli x {repetitions} repetitions, {config.sites.n_sites} sites; "
          f"scored on {len(held_out)} clean images day 0 did not show", flush=True)
    for setting in settings:
        began = time.monotonic()
        options = {**compute_hidden_site_options(config), **setting}
        expected = ExpectedCounts(make_hidden_sites(config.sites.n_sites, config.sim.seed, **options),
                                  window_s=config.response.window_s, on_s=config.rsvp.on_s).eval()
        mean = _expected(expected, pixels)
        counts = rng.poisson(np.repeat(mean, repetitions, axis=0))
        stimulus = np.repeat(np.arange(len(pixels)), repetitions)
        model = make_it_model(config.model.backbone, config.model.layer, config.sites.n_sites,
                              positive=config.model.readout_positive, seed=layout.compute_base_seed(config))
        fit = config.fit
        fit_it_model(model, pixels, counts, stimulus, loss=fit.loss, epochs=fit.epochs,
                     learning_rate=fit.learning_rate, backbone_learning_rate=fit.backbone_learning_rate,
                     batch_size=fit.batch_size, held_out_fraction=fit.held_out_fraction, patience=fit.patience,
                     freeze_backbone=fit.freeze_backbone, l1=config.model.readout_l1, seed=0, device="cpu")
        r = compute_pearson(_predict(model, held_out), _expected(expected, held_out))
        q = np.percentile(r, [25, 50, 75])
        q2 = np.percentile(r ** 2, [25, 50, 75])
        name = ", ".join(f"{knob} {value:g}" for knob, value in setting.items())
        print(f"{name}: day-0 model vs the twin's expected counts on new clean images: "
              f"r {q[1]:.3f} ({q[0]:.3f}-{q[2]:.3f}), r^2 {q2[1]:.3f} ({q2[0]:.3f}-{q2[2]:.3f}) "
              f"({time.monotonic() - began:.0f} s)", flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), [_setting(text) for text in sys.argv[2:] or NOISE])
