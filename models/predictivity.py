"""How well responses are predicted, and how well they could be: per-site Pearson r and the
split-half reliability ceiling (Spearman-Brown corrected).

Arrays are numpy (torch tensors are accepted and copied to the CPU); rows are images or
presentations, columns are sites.
"""

from __future__ import annotations

import numpy as np

from closedloop.core.validation import check_indices, check_integer

__all__ = ["compute_pearson", "compute_split_half_reliability"]


def _as_matrix(name: str, values) -> np.ndarray:
    values = values.detach().cpu().numpy() if hasattr(values, "detach") else np.asarray(values)
    if values.ndim != 2:
        raise ValueError(f"'{name}' must have shape (n_images, n_sites), but got {values.shape}.")
    if not np.issubdtype(values.dtype, np.number) or not np.isfinite(values).all():
        raise ValueError(f"'{name}' must hold finite numbers; remove or fill NaN/inf entries first.")
    return values.astype(np.float64)


def compute_pearson(predicted, observed) -> np.ndarray:
    """Per-site Pearson correlation between columns of ``predicted`` and ``observed``.

    Both (n_images, n_sites), n_images >= 2, any units. Returns (n_sites,) float64; NaN for a
    site whose predictions or observations are constant.
    """
    predicted, observed = _as_matrix("predicted", predicted), _as_matrix("observed", observed)
    if predicted.shape != observed.shape:
        raise ValueError(
            f"'predicted' and 'observed' must have the same shape (n_images, n_sites), but got "
            f"{predicted.shape} and {observed.shape}."
        )
    if predicted.shape[0] < 2:
        raise ValueError(f"need at least 2 images to correlate, but got {predicted.shape[0]}.")
    predicted = predicted - predicted.mean(axis=0)
    observed = observed - observed.mean(axis=0)
    denominator = np.sqrt((predicted**2).sum(axis=0) * (observed**2).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (predicted * observed).sum(axis=0) / denominator
    return np.where(denominator > 0, r, np.nan)


def compute_split_half_reliability(counts, stimulus, *, n_splits: int = 10, seed: int = 0) -> np.ndarray:
    """Split-half reliability of each site's mean response, Spearman-Brown corrected.

    ``counts``: (n_presentations, n_sites) responses (spikes per window); ``stimulus``:
    (n_presentations,) stimulus index of each presentation. For every stimulus with >= 2
    presentations, its presentations are split at random into two halves (sizes ⌊k/2⌋ and
    ⌈k/2⌉); the per-site Pearson r between the two halves' means over stimuli is averaged over
    ``n_splits`` random splits (drawn from ``seed``) and corrected to full length with
    Spearman-Brown, ``2r / (1 + r)``. Returns (n_sites,) float64; NaN for every site when fewer
    than 2 stimuli have >= 2 presentations, and for sites with constant responses.
    """
    counts = _as_matrix("counts", counts)
    stimulus = np.asarray(stimulus)
    if stimulus.shape != (counts.shape[0],):
        raise ValueError(
            f"'stimulus' must have shape (n_presentations,) = ({counts.shape[0]},) to match 'counts', "
            f"but got {stimulus.shape}."
        )
    stimulus = check_indices("stimulus", stimulus, int(stimulus.max(initial=0)) + 1)
    check_integer("n_splits", n_splits, minimum=1)
    check_integer("seed", seed, minimum=0)
    _, inverse, repeats = np.unique(stimulus, return_inverse=True, return_counts=True)
    repeated = repeats[inverse] >= 2
    if np.unique(stimulus[repeated]).size < 2:
        return np.full(counts.shape[1], np.nan)
    counts, stimulus = counts[repeated], stimulus[repeated]
    rng = np.random.default_rng(seed)
    r = np.mean([_split_half_r(counts, stimulus, rng) for _ in range(n_splits)], axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return 2 * r / (1 + r)


def _split_half_r(counts: np.ndarray, stimulus: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per-site r between the mean responses of one random split of each stimulus' presentations."""
    order = np.lexsort((rng.random(stimulus.size), stimulus))
    _, starts, inverse, repeats = np.unique(stimulus[order], return_index=True, return_inverse=True, return_counts=True)
    rank = np.arange(stimulus.size) - starts[inverse]
    first = rank < repeats[inverse] // 2
    means = []
    for half in (first, ~first):
        sums = np.zeros((repeats.size, counts.shape[1]))
        np.add.at(sums, inverse[half], counts[order][half])
        means.append(sums / np.bincount(inverse[half], minlength=repeats.size)[:, None])
    return compute_pearson(*means)
