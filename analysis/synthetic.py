"""Synthetic experiments with known answers, written with the real store and JSON writers.

:func:`write_synthetic_day` turns expected spike counts that the caller chooses (a site whose
response is a known function of ε, a category a site prefers, a model that predicts a planted
fraction of directions right, …) into a finished day folder: ``config.toml``, ``store.zarr``
with Poisson (or noise-free) counts for every presentation, ``sensitivity.json`` from the real
estimator, and stage markers. The offline analyses then run on it exactly as on a recorded day;
the tests and dry runs of the report use it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from closedloop.config import CONFIG_NAME, build_config, render_config
from closedloop.core.files import write_json, write_text
from closedloop.core.validation import check_array, check_integer, check_option
from closedloop.data.bundle import make_event_codes
from closedloop.data.store import create_store
from closedloop.sensitivity.estimator import compute_sensitivity
from closedloop.sensitivity.responses import read_day_responses

__all__ = ["make_synthetic_images", "write_synthetic_day"]


def make_synthetic_images(n_images: int, *, seed: int = 0, size: int = 224) -> np.ndarray:
    """uint8 (n_images, size, size, 3): smooth seeded random patterns with random mean and contrast."""
    rng = np.random.default_rng(check_integer("seed", seed, minimum=0))
    n_images = check_integer("n_images", n_images, minimum=0)
    coarse = rng.random((n_images, 8, 8, 3))
    fine = np.repeat(np.repeat(coarse, -(-size // 8), axis=1), -(-size // 8), axis=2)[:, :size, :size]
    mean = rng.uniform(0.2, 0.8, (n_images, 1, 1, 3))
    contrast = rng.uniform(0.1, 1.0, (n_images, 1, 1, 1))
    return (np.clip(mean + contrast * (fine - 0.5), 0, 1) * 255).round().astype(np.uint8)


def _perturb(pixels: np.ndarray, parent: np.ndarray, eps: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each parent image plus a random direction of L2 norm ``eps`` ([0, 1] units), 8-bit."""
    base = pixels[parent].astype(np.float64) / 255
    direction = rng.normal(size=base.shape)
    direction /= np.sqrt((direction**2).sum(axis=(1, 2, 3), keepdims=True))
    return (np.clip(base + eps[:, None, None, None] * direction, 0, 1) * 255).round().astype(np.uint8)


def write_synthetic_day(
    experiment: str | Path,
    day: int,
    *,
    clean,
    category,
    parent,
    site,
    eps,
    direction,
    kind,
    perturbed,
    predicted=None,
    pixels=None,
    repetitions: int = 2,
    noise: str = "poisson",
    truth: dict | None = None,
    refit: dict | None = None,
    window_s: tuple[float, float] = (0.07, 0.17),
    base_backbone: str = "resnet_tiny",
    seed: int = 0,
) -> Path:
    """Write ``experiment/day_NNN`` as a finished day; return the day folder.

    ``clean``: expected counts (n_clean, n_sites), spikes per window, of the clean images;
    ``category``: (n_clean,) their category names. ``parent`` (index into the clean images),
    ``site`` (−1 for baselines), ``eps`` (L2, [0, 1] pixel units), ``direction`` (±1 for
    attacks, 0 otherwise), ``kind`` ("attack", "gaussian", "interpolation"): (n_perturbed,);
    ``perturbed``: expected counts (n_perturbed, n_sites) of the perturbed images.
    ``predicted``: the generating model's predictions, (n_clean + n_perturbed, n_sites)
    (default: the expected counts themselves, a model that is right about everything).
    ``pixels``: uint8 (n_clean + n_perturbed, 224, 224, 3) (default: seeded random clean images
    and each parent plus a random direction of norm ε). Every stimulus is shown ``repetitions``
    times, validly; ``noise``: "poisson" draws counts from Poisson(expected) with ``seed``,
    "none" rounds the expected counts. ``truth``: ``{(site, eps): true sensitivity}`` written
    into ``sensitivity.json`` (a simulated rig), else null. ``refit``: the summary written to
    ``stages/refit.json`` (``held_out_r``, ``reliability`` per site, ...), if any.
    ``experiment/experiment.toml`` is written if missing.
    """
    experiment = Path(experiment)
    day = check_integer("day", day, minimum=0, maximum=999)
    clean = check_array("clean", clean, shape=(None, None)).astype(np.float64)
    n_clean, n_sites = clean.shape
    perturbed = check_array("perturbed", perturbed, shape=(None, n_sites)).astype(np.float64)
    n_perturbed = len(perturbed)
    n_stimuli = n_clean + n_perturbed
    parent = check_array("parent", parent, shape=(n_perturbed,)).astype(np.int64)
    eps = check_array("eps", eps, shape=(n_perturbed,)).astype(np.float64)
    expected = np.concatenate([clean, perturbed])
    predicted = expected if predicted is None else check_array("predicted", predicted, shape=(n_stimuli, n_sites))
    check_option("noise", noise, ("poisson", "none"))
    rng = np.random.default_rng(check_integer("seed", seed, minimum=0))
    if pixels is None:
        clean_pixels = make_synthetic_images(n_clean, seed=seed)
        pixels = np.concatenate([clean_pixels, _perturb(clean_pixels, parent, eps, rng)])
    simulated = truth is not None
    config = build_config({
        "experiment": {"name": experiment.name or "synthetic", "seed": seed},
        "model": {"backbone": base_backbone},
        "sites": {"n_sites": n_sites},
        "response": {"window_s": list(window_s)},
        "rig": {"kind": "sim" if simulated else "zmq"},
        "rsvp": {"repetitions": repetitions},
    }, source="write_synthetic_day")
    folder = experiment / f"day_{day:03d}"
    folder.mkdir(parents=True, exist_ok=True)
    if not (experiment / CONFIG_NAME).exists():
        write_text(experiment / CONFIG_NAME, render_config(config))
    write_text(folder / "config.toml", render_config(config))

    store = create_store(folder / "store.zarr", sites=n_sites, overwrite=True)
    category = np.asarray(category, dtype=str)
    store.append_stimuli(
        pixels, parent=np.concatenate([np.full(n_clean, -1), parent]), site=np.concatenate([np.full(n_clean, -1), site]),
        eps=np.concatenate([np.zeros(n_clean), eps]), direction=np.concatenate([np.zeros(n_clean, int), direction]),
        kind=np.concatenate([np.full(n_clean, "clean"), np.asarray(kind, dtype=str)]), predicted=predicted,
        code=make_event_codes(n_stimuli), image_id=np.array([f"img{i}" for i in range(n_clean)])[
            np.concatenate([np.arange(n_clean), parent])],
        category=np.concatenate([category, category[parent]]),
    )
    stimulus = np.repeat(np.arange(n_stimuli), repetitions)
    stimulus = stimulus[rng.permutation(stimulus.size)]
    rates = expected[stimulus]
    counts = rng.poisson(rates) if noise == "poisson" else np.round(rates)
    store.append_presentations(np.arange(stimulus.size), stimulus, 0.2 * np.arange(stimulus.size),
                               np.ones(stimulus.size, bool), counts.astype(np.int64))
    store.finish()

    responses = read_day_responses(folder / "store.zarr")
    s = responses.stimuli
    records = compute_sensitivity(s["parent"], s["site"], s["eps"], s["kind"], s["predicted"], responses.means,
                                  truth=None if truth is None else lambda i, e: truth[(int(i), float(e))])
    write_json(folder / "sensitivity.json", records)
    write_json(folder / "stages" / "estimate.json", {"stage": "estimate", "seconds": 0.0, "summary": {"n_records": len(records)}})
    if refit is not None:
        write_json(folder / "stages" / "refit.json", {"stage": "refit", "seconds": 0.0, "summary": refit})
    return folder
