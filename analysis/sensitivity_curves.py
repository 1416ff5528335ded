"""Sensitivity curves: the normalised lower bound s̃_i(ε) per site and over sites (Guo et al. Fig. 1A, 3A).

s̃_i(ε) = ŝ_i(ε) / σ_i, with ŝ_i the biased-down estimate (spikes per window) and σ_i the
standard deviation of site i's mean response over the day's clean images, so 1.0 on the
normalised axis is "one clean-response s.d.". For scale, the mean absolute difference between a
site's responses to two random clean images, also in units of σ_i (≈ 2/√π ≈ 1.13 for normally
distributed responses).
"""

from __future__ import annotations

import numpy as np

from closedloop.core.validation import check_array, check_option
from closedloop.sensitivity.estimator import ATTACK, BASELINES

__all__ = ["compute_sensitivity_curves", "compute_response_scale"]

KINDS = (ATTACK, *BASELINES)


def compute_sensitivity_curves(records: list[dict], *, kind: str = "attack") -> dict[str, list[dict]]:
    """Per-site and mean normalised lower bounds against ε.

    ``records``: rows of ``sensitivity.json``; ``kind``: which perturbations ("attack",
    "gaussian", "interpolation"). Returns two tables:

    - ``"sites"``: one row per site and ε: ``site``, ``eps`` (L2, [0, 1] pixel units),
      ``n_images``, ``estimate`` and ``sem`` (spikes per window), ``sigma`` (spikes per window),
      ``normalized`` = estimate / sigma and ``normalized_sem`` = sem / sigma (units of σ_i).
    - ``"mean"``: one row per ε: ``n_sites`` (sites with a finite normalised value),
      ``n_images`` (total), ``mean`` and ``sd`` (s.d. over sites, ddof=0) of ``normalized``.
    """
    check_option("kind", kind, KINDS)
    if not isinstance(records, list):
        raise TypeError(f"'records' must be a list of sensitivity.json rows, but got {type(records).__name__}.")
    sites = []
    for r in sorted((r for r in records if r["kind"] == kind), key=lambda r: (r["eps"], r["site"])):
        sigma = r["sigma"]
        scale = sigma if sigma else None
        sites.append({
            "site": r["site"], "eps": r["eps"], "n_images": r["n_images"], "estimate": r["estimate"], "sem": r["sem"],
            "sigma": sigma, "normalized": r["normalized"],
            "normalized_sem": r["sem"] / scale if (scale and r["sem"] is not None) else None,
        })
    mean = []
    for eps in sorted({row["eps"] for row in sites}):
        chosen = [row for row in sites if row["eps"] == eps]
        values = np.array([row["normalized"] for row in chosen if row["normalized"] is not None], dtype=float)
        mean.append({
            "eps": eps, "n_sites": int(values.size), "n_images": int(sum(row["n_images"] for row in chosen)),
            "mean": float(values.mean()) if values.size else None, "sd": float(values.std()) if values.size else None,
        })
    return {"sites": sites, "mean": mean}


def compute_response_scale(clean_means) -> dict[str, list[dict]]:
    """The reference scales of the sensitivity axis, per site and over sites.

    ``clean_means``: (n_images, n_sites) mean responses to clean images, spikes per window
    (n_images >= 2). Returns ``"sites"``: per site ``site``, ``n_images``, ``sigma`` (s.d.,
    ddof=1, spikes per window), ``mean_abs_difference`` (mean |r(x) − r(x')| over every pair of
    distinct clean images, spikes per window) and ``normalized_difference`` (the same ÷ sigma);
    ``"mean"``: one row with the mean and s.d. over sites of ``normalized_difference`` and the
    clean-response s.d. reference (1.0 by definition on the normalised axis).
    """
    values = check_array("clean_means", clean_means, shape=(None, None)).astype(np.float64)
    if values.shape[0] < 2 or not np.isfinite(values).all():
        raise ValueError(
            f"'clean_means' must hold finite responses to at least 2 clean images, but got shape {values.shape}"
            f"{' with NaN' if not np.isfinite(values).all() else ''}; drop images without valid presentations."
        )
    n = values.shape[0]
    ordered = np.sort(values, axis=0)
    weights = 2 * np.arange(n) - n + 1  # sum over pairs |a - b| = sum_k sorted_k (2k - n + 1)
    mean_difference = (weights[:, None] * ordered).sum(axis=0) / (n * (n - 1) / 2)
    sigma = values.std(axis=0, ddof=1)
    rows = []
    for i in range(values.shape[1]):
        normalized = float(mean_difference[i] / sigma[i]) if sigma[i] > 0 else None
        rows.append({"site": i, "n_images": n, "sigma": float(sigma[i]), "mean_abs_difference": float(mean_difference[i]),
                     "normalized_difference": normalized})
    finite = np.array([r["normalized_difference"] for r in rows if r["normalized_difference"] is not None])
    summary = {"n_sites": int(finite.size), "clean_sd_reference": 1.0,
               "normalized_difference": float(finite.mean()) if finite.size else None,
               "normalized_difference_sd": float(finite.std()) if finite.size else None}
    return {"sites": rows, "mean": [summary]}
