"""Model-free baseline perturbations at the same budgets as the attacks.

Both return 8-bit images made by :func:`closedloop.attacks.engine.quantize_within_budget`, so each
image's own perturbation ‖pixels/255 − clean/255‖₂ is at most its ε ([0, 1] pixel units).
"""

from __future__ import annotations

import numpy as np

from closedloop.attacks.engine import quantize_within_budget
from closedloop.core.validation import check_budgets, check_integer, check_uint8_images
from closedloop.images import dequantize

__all__ = ["make_gaussian_baseline", "make_interpolation_baseline"]


def _lengths(deltas: np.ndarray) -> np.ndarray:
    """L2 norm of each row of (n_images, ...), (n_images,)."""
    flat = deltas.reshape(len(deltas), -1)
    return np.sqrt(np.einsum("ij,ij->i", flat, flat))


def make_gaussian_baseline(clean_uint8: np.ndarray, eps, *, seed: int) -> np.ndarray:
    """Gaussian noise scaled to L2 norm ε, added to each clean image, clipped to [0, 1], quantised.

    ``clean_uint8``: uint8 (n_images, H, W, 3); ``eps``: a number or (n_images,), [0, 1] pixel
    units; ``seed``: seed of the noise. Returns uint8 (n_images, H, W, 3). Clipping at black and
    white can only shorten δ, so the realised norm is ≤ ε (close to ε on mid-grey images).
    """
    check_uint8_images("clean_uint8", clean_uint8)
    budgets = check_budgets("eps", eps, len(clean_uint8))
    rng = np.random.default_rng(check_integer("seed", seed, minimum=0))
    clean = dequantize(clean_uint8).astype(np.float64)
    noise = rng.standard_normal(clean.shape)
    lengths = _lengths(noise)
    noisy = clean + noise * (budgets / lengths).reshape(-1, 1, 1, 1)
    return quantize_within_budget(np.clip(noisy, 0.0, 1.0), clean_uint8, budgets)


def make_interpolation_baseline(clean_uint8: np.ndarray, other_uint8: np.ndarray, eps) -> np.ndarray:
    """Move each clean image straight toward another image until the budget ε is spent.

    ``clean_uint8``, ``other_uint8``: uint8 (n_images, H, W, 3), row j of ``other_uint8`` is the
    destination of row j (e.g. an image of another category); ``eps``: a number or (n_images,),
    [0, 1] pixel units. x = clean + min(1, ε / ‖other − clean‖) (other − clean). Returns uint8
    (n_images, H, W, 3).
    """
    check_uint8_images("clean_uint8", clean_uint8)
    check_uint8_images("other_uint8", other_uint8)
    if other_uint8.shape != clean_uint8.shape:
        raise ValueError(
            f"'other_uint8' must have the shape of 'clean_uint8' {clean_uint8.shape}, one destination per image, "
            f"but got {other_uint8.shape}."
        )
    budgets = check_budgets("eps", eps, len(clean_uint8))
    clean = dequantize(clean_uint8).astype(np.float64)
    direction = dequantize(other_uint8).astype(np.float64) - clean
    lengths = _lengths(direction)
    fraction = np.minimum(1.0, budgets / np.maximum(lengths, 1e-12))
    return quantize_within_budget(clean + direction * fraction.reshape(-1, 1, 1, 1), clean_uint8, budgets)
