"""Adversarial patterns of a site (or unit, or class): what the perturbations that drive it look like.

After "networks playing dough": the perturbation δ that increases a unit's response, found by the
project's L2 PGD engine (:func:`closedloop.attacks.engine.compute_pgd`, ascent of the unit's output
within ‖δ‖₂ ≤ ε, ε in [0, 1] pixel units), taken from three kinds of start:

- zero feed: a blank start (mid-grey 0.5, or black 0) and its δ;
- noise feed: uniform noise starts in [0.25, 0.75], each δ = attack − start, averaged;
- AAI (average adversarial image): the δ of attacks on many clean images, averaged;

and, from responses (recorded, or predicted by the model), the positive-minus-negative contrast
(PNC): the mean of the images the unit responds to above its median minus the mean of the rest.
The similarity of an attack pattern to the data pattern is the cosine of the angle between them
(flattened; 1: the same pattern, 0: unrelated). Patterns are float32 (3, H, W) in [0, 1] pixel
units; for a linear unit f(x) = w·x every attack pattern is ε w/‖w‖ (as long as no value clips).
"""

from __future__ import annotations

import numpy as np
import torch

from closedloop.attacks.engine import compute_pgd, compute_predictions
from closedloop.core.logs import progress
from closedloop.core.validation import check_array, check_integer, check_number, check_option, check_uint8_images
from closedloop.images import to_tensor

__all__ = ["ZERO_FEED_STARTS", "compute_attack_patterns", "compute_contrast_pattern", "compute_pattern_similarity",
           "compute_site_patterns"]

ZERO_FEED_STARTS = {"grey": 0.5, "zero": 0.0}


def _ascend(model, unit: int, starts: torch.Tensor, eps: float, n_steps: int) -> torch.Tensor:
    """δ (N, 3, H, W) of the best increase attack on output ``unit`` from each start."""
    result = compute_pgd(model, starts, eps=eps, step_size=eps / 3, n_steps=n_steps,
                         objective=lambda output: -output.flatten(1)[:, unit])
    return result.images - starts


def compute_attack_patterns(
    model: torch.nn.Module,
    unit: int,
    *,
    image_size: int,
    eps: float,
    clean_uint8: np.ndarray | None = None,
    n_noise: int = 8,
    n_steps: int = 20,
    zero_feed: str = "grey",
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Zero-feed, noise-feed and AAI patterns of output ``unit`` of ``model``.

    ``model``: nn.Module, float images (N, 3, image_size, image_size) in [0, 1] → outputs that
    flatten to (N, n_units) (it must sit on the CPU or on the images' device; patterns are computed
    on the CPU). ``eps``: L2 budget, [0, 1] pixel units; ``n_steps``: PGD steps (step ε/3).
    ``clean_uint8``: uint8 (n_images, image_size, image_size, 3) for the AAI (omitted: no "aai").
    ``n_noise``: noise starts; ``zero_feed``: "grey" (0.5) or "zero" (0) start; ``seed``: the noise.
    Returns float32 (3, H, W) arrays ``zero_feed``, ``noise_feed`` and (with images) ``aai``.
    """
    image_size = check_integer("image_size", image_size, minimum=1)
    eps = check_number("eps", eps, minimum=0.0, inclusive=False)
    n_noise = check_integer("n_noise", n_noise, minimum=1)
    n_steps = check_integer("n_steps", n_steps, minimum=1)
    level = ZERO_FEED_STARTS[check_option("zero_feed", zero_feed, ZERO_FEED_STARTS)]
    unit = check_integer("unit", unit, minimum=0)
    shape = (3, image_size, image_size)
    blank = torch.full((1, *shape), level)
    noise = 0.25 + 0.5 * torch.rand((n_noise, *shape), generator=torch.Generator().manual_seed(seed))
    patterns = {"zero_feed": _ascend(model, unit, blank, eps, n_steps)[0],
                "noise_feed": _ascend(model, unit, noise, eps, n_steps).mean(0)}
    if clean_uint8 is not None:
        check_uint8_images("clean_uint8", clean_uint8, size=image_size)
        patterns["aai"] = _ascend(model, unit, to_tensor(clean_uint8), eps, n_steps).mean(0)
    return {name: pattern.detach().cpu().numpy().astype(np.float32) for name, pattern in patterns.items()}


def compute_contrast_pattern(images_uint8: np.ndarray, responses) -> np.ndarray:
    """Positive-minus-negative contrast: mean of the images whose response is above the median
    minus the mean of the others, float32 (3, H, W) in [0, 1] pixel units.

    ``images_uint8``: uint8 (n_images, H, W, 3); ``responses``: (n_images,) one unit's responses
    (spikes per window, or any output), finite, not all equal.
    """
    check_uint8_images("images_uint8", images_uint8)
    responses = check_array("responses", responses, shape=(len(images_uint8),)).astype(np.float64)
    if not np.isfinite(responses).all():
        raise ValueError("'responses' must be finite; drop images without a valid presentation first.")
    positive = responses > np.median(responses)
    if positive.all() or not positive.any():
        raise ValueError("'responses' are all equal: there is no preferred and non-preferred half to contrast.")
    images = images_uint8.astype(np.float64) / 255.0
    contrast = images[positive].mean(0) - images[~positive].mean(0)
    return contrast.transpose(2, 0, 1).astype(np.float32)


def compute_pattern_similarity(first: np.ndarray, second: np.ndarray) -> float:
    """Cosine similarity of two patterns of equal shape (flattened), in [−1, 1]; 0 if either is blank."""
    first, second = np.asarray(first, dtype=np.float64).ravel(), np.asarray(second, dtype=np.float64).ravel()
    if first.shape != second.shape:
        raise ValueError(f"the two patterns must have the same size, but got {first.size} and {second.size} values.")
    norm = np.linalg.norm(first) * np.linalg.norm(second)
    return float(first @ second / norm) if norm > 0 else 0.0


def compute_site_patterns(
    model: torch.nn.Module,
    sites,
    images_uint8: np.ndarray,
    responses: np.ndarray,
    *,
    eps: float,
    n_aai: int = 8,
    n_noise: int = 8,
    n_steps: int = 20,
    seed: int = 0,
) -> dict:
    """Every pattern of every site in ``sites``, and how similar the attack patterns are to the data.

    ``model``: IT model (images → predicted counts (N, n_sites)); ``images_uint8``: uint8 clean
    images (n_images, H, W, 3) with ``responses`` (n_images, n_sites), mean spikes per window
    (recorded; NaN rows, images never validly shown, are dropped). The data pattern is the PNC of
    the recorded responses; ``predicted_pnc`` is the PNC of the model's predictions on the same
    images. ``n_aai``: clean images attacked for the AAI (chosen with ``seed``).

    Returns ``{"patterns": {site: {name: (3, H, W)}}, "similarity": rows}``; each row: ``site``,
    ``pattern`` (zero_feed, noise_feed, aai, predicted_pnc), ``similarity_to_data`` (cosine with the
    recorded PNC).
    """

    check_uint8_images("images_uint8", images_uint8)
    responses = check_array("responses", responses, shape=(len(images_uint8), None)).astype(np.float64)
    shown = np.isfinite(responses).all(axis=1)
    images, responses = images_uint8[shown], responses[shown]
    if len(images) < 2:
        raise ValueError(f"patterns need at least 2 validly shown images, but got {len(images)}.")
    n_aai = check_integer("n_aai", n_aai, minimum=1)
    chosen = np.sort(np.random.default_rng(seed).choice(len(images), min(n_aai, len(images)), replace=False))
    predicted = compute_predictions(model, images, batch_size=16).astype(np.float64)
    patterns, rows = {}, []
    for site in progress([int(s) for s in np.atleast_1d(sites)], description="adversarial patterns"):
        if not 0 <= site < responses.shape[1]:
            raise ValueError(f"'sites' must lie in [0, {responses.shape[1] - 1}], but got {site}.")
        found = compute_attack_patterns(model, site, image_size=images.shape[1], eps=eps, clean_uint8=images[chosen],
                                        n_noise=n_noise, n_steps=n_steps, seed=seed)
        found["predicted_pnc"] = compute_contrast_pattern(images, predicted[:, site])
        data = compute_contrast_pattern(images, responses[:, site])
        rows += [{"site": site, "pattern": name, "similarity_to_data": compute_pattern_similarity(pattern, data)}
                 for name, pattern in found.items()]
        patterns[site] = {**found, "recorded_pnc": data}
    return {"patterns": patterns, "similarity": rows}
