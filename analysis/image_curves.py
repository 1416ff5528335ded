"""Image-specific sensitivity curves and their slopes (Guo et al. Fig. 3B).

For a site i and a clean image x attacked at several budgets, the per-image term of the
biased-down estimator is s_i(x, ε) = sign(f_i(x) − f_i(x+δ)) · (r_i(x) − r_i(x+δ)) (spikes per
window). Its slope between the smallest and the largest budget,
(s_i(x, ε_max) − s_i(x, ε_min)) / (ε_max − ε_min), says whether a larger budget moved the site
further on that image.

Tests (two-sided):

- per image: z = Δs / SE(Δs), with SE from the site's pooled trial-to-trial variance (variance
  of single-presentation counts around their stimulus mean, pooled over all stimuli shown at
  least twice) and the number of valid presentations of the three stimuli involved; p from the
  normal distribution.
- per site: one-sample t-test of the per-image slopes against 0 (images as samples).
"""

from __future__ import annotations

import numpy as np
from scipy import stats

from closedloop.core.validation import check_option
from closedloop.sensitivity.estimator import ATTACK, BASELINES, compute_signed_changes
from closedloop.sensitivity.responses import DayResponses

__all__ = ["compute_noise_variance", "compute_image_curves"]


def compute_noise_variance(stimulus, valid, counts) -> np.ndarray:
    """Pooled trial-to-trial variance per site, (spikes per window)², shape (n_sites,).

    ``stimulus`` (n_presentations,), ``valid`` bool (n_presentations,), ``counts``
    (n_presentations, n_sites). Pools Σ (count − stimulus mean)² / Σ (k − 1) over stimuli with
    k >= 2 valid presentations; NaN per site when no stimulus was shown twice.
    """
    stimulus, valid = np.asarray(stimulus, np.int64), np.asarray(valid, bool)
    counts = np.asarray(counts, np.float64)
    if counts.ndim != 2 or counts.shape[0] != stimulus.shape[0] or valid.shape != stimulus.shape:
        raise ValueError(
            f"'counts' must have shape (n_presentations, n_sites) and 'valid' (n_presentations,) with n_presentations = "
            f"{stimulus.shape[0]}, but got {counts.shape} and {valid.shape}."
        )
    stimulus, counts = stimulus[valid], counts[valid]
    _, inverse, repeats = np.unique(stimulus, return_inverse=True, return_counts=True)
    sums = np.zeros((repeats.size, counts.shape[1]))
    np.add.at(sums, inverse, counts)
    residual = counts - (sums / repeats[:, None])[inverse]
    dof = int((repeats - 1).sum())
    if dof == 0:
        return np.full(counts.shape[1], np.nan)
    return (residual**2).sum(axis=0) / dof


def compute_image_curves(responses: DayResponses, *, kind: str = "attack") -> dict[str, list[dict]]:
    """Per-image curves s_i(x, ε), their slopes and significance, for one day.

    ``responses``: a day's :class:`closedloop.sensitivity.responses.DayResponses`; ``kind``: the
    perturbations to use. Returns tables:

    - ``"points"``: ``site``, ``image`` (stimulus index of the clean image), ``eps``, ``change``
      = s_i(x, ε) (spikes per window);
    - ``"mean"``: per site and ε, ``n_images``, ``mean`` and ``sem`` of ``change``;
    - ``"image_slopes"``: per (site, image) with both the smallest and the largest budget:
      ``eps_low``, ``eps_high``, ``slope`` (spikes per window per unit ε), ``se`` (same units,
      NaN without repeated presentations), ``z``, ``p``;
    - ``"site_slopes"``: per site with >= 2 such images: ``n_images``, ``mean_slope``,
      ``sd_slope``, ``t``, ``p``, ``n_significant_images`` (image p < 0.05).
    """
    if not isinstance(responses, DayResponses):
        raise TypeError(f"'responses' must be closedloop.sensitivity.responses.DayResponses, but got {type(responses).__name__}.")
    check_option("kind", kind, (ATTACK, *BASELINES))
    s = responses.stimuli
    changes = compute_signed_changes(s["parent"], s["site"], s["eps"], s["kind"], s["predicted"], responses.means)
    keep = changes.kind == kind
    site, image, eps = changes.site[keep], changes.parent[keep], changes.eps[keep]
    stimulus, sign, change = changes.stimulus[keep], changes.sign[keep], changes.change[keep]
    points = [{"site": int(a), "image": int(b), "eps": float(c), "change": float(d)}
              for a, b, c, d in zip(site, image, eps, change)]
    mean = []
    for i, e in sorted(set(zip(site.tolist(), eps.tolist()))):
        values = change[(site == i) & (eps == e)]
        sem = float(values.std(ddof=1) / np.sqrt(values.size)) if values.size >= 2 else None
        mean.append({"site": i, "eps": e, "n_images": int(values.size), "mean": float(values.mean()), "sem": sem})
    noise = compute_noise_variance(responses.stimulus, responses.valid, responses.counts)
    image_slopes = []
    for i, x in sorted(set(zip(site.tolist(), image.tolist()))):
        mine = np.flatnonzero((site == i) & (image == x))
        if np.unique(eps[mine]).size < 2:
            continue
        low, high = mine[np.argmin(eps[mine])], mine[np.argmax(eps[mine])]
        span = eps[high] - eps[low]
        difference = change[high] - change[low]
        n_valid = responses.n_valid
        weight = (sign[high] - sign[low]) ** 2 / n_valid[x] + sign[high] ** 2 / n_valid[stimulus[high]] \
            + sign[low] ** 2 / n_valid[stimulus[low]]
        se = np.sqrt(noise[i] * weight)
        z = difference / se if se > 0 else (0.0 if difference == 0 else np.sign(difference) * np.inf)
        p = float(2 * stats.norm.sf(abs(z))) if np.isfinite(se) else float("nan")
        image_slopes.append({"site": i, "image": x, "eps_low": float(eps[low]), "eps_high": float(eps[high]),
                             "slope": float(difference / span), "se": float(se / span), "z": float(z), "p": p})
    site_slopes = []
    for i in sorted({row["site"] for row in image_slopes}):
        rows = [row for row in image_slopes if row["site"] == i]
        slopes = np.array([row["slope"] for row in rows])
        if slopes.size < 2:
            continue
        if slopes.std() == 0:
            t, p = (0.0, 1.0) if slopes.mean() == 0 else (np.sign(slopes.mean()) * np.inf, 0.0)
        else:
            t, p = stats.ttest_1samp(slopes, 0.0)
        site_slopes.append({"site": i, "n_images": int(slopes.size), "mean_slope": float(slopes.mean()),
                            "sd_slope": float(slopes.std(ddof=1)), "t": float(t), "p": float(p),
                            "n_significant_images": sum(row["p"] < 0.05 for row in rows)})
    return {"points": points, "mean": mean, "image_slopes": image_slopes, "site_slopes": site_slopes}
