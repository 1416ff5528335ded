"""Category preference and super-stimuli (Guo et al. Fig. 2C).

Per site, the category whose clean images drive it most (preferred) and least, from the mean
clean responses pooled over the given days (``stimuli/category`` of the day store). Then the
"increase" attacks made for that site on images of every other category: their mean response
against ε, starting at ε = 0 with the clean responses of the same images, compared with the
mean (± s.d.) clean response to the preferred category. The ε where the curve first reaches the
preferred mean (linear interpolation between budgets) is the crossing budget; the rate reached
at the largest budget, when above the preferred mean, marks super-stimuli.
"""

from __future__ import annotations

import numpy as np

from closedloop.core.validation import check_number
from closedloop.sensitivity.responses import DayResponses

__all__ = ["compute_category_preference", "compute_crossing_eps"]


def _pooled(responses: list[DayResponses]) -> tuple[np.ndarray, np.ndarray, list[tuple]]:
    """Clean means (n_clean, n_sites) and categories, and the increase attacks.

    Attacks are tuples (site, eps, parent category, parent response, response, (day, parent)).
    """
    clean_means, clean_category, attacks = [], [], []
    for number, day in enumerate(responses):
        s = day.stimuli
        clean = np.flatnonzero((s["parent"] < 0) & np.isfinite(day.means).all(axis=1))
        clean_means.append(day.means[clean])
        names, kind = np.array(s["category"].tolist(), dtype=str), np.array(s["kind"].tolist(), dtype=str)
        clean_category.append(names[clean])
        increase = np.flatnonzero((kind == "attack") & (s["direction"] == 1))
        for k in increase:
            site, parent = int(s["site"][k]), int(s["parent"][k])
            if np.isfinite(day.means[k, site]) and np.isfinite(day.means[parent, site]):
                attacks.append((site, float(s["eps"][k]), str(names[parent]), float(day.means[parent, site]),
                                float(day.means[k, site]), (number, parent)))
    return np.concatenate(clean_means), np.concatenate(clean_category), attacks


def compute_crossing_eps(eps: list[float], mean: list[float], level: float) -> float | None:
    """First ε where the piecewise-linear curve (``eps``, ``mean``) reaches ``level``; None if never.

    ``eps``: increasing budgets (the first usually 0, the clean images); ``mean``: the mean
    response at each; ``level``: e.g. the preferred-category mean, in the same units.
    """
    if mean[0] >= level:
        return eps[0]
    for (e0, m0), (e1, m1) in zip(zip(eps, mean), zip(eps[1:], mean[1:])):
        if m1 >= level:
            return e0 + (level - m0) / (m1 - m0) * (e1 - e0)
    return None


def compute_category_preference(responses: list[DayResponses], *, window_length_s: float) -> dict[str, list[dict]]:
    """Preferred categories and super-stimuli per site.

    ``responses``: the days to pool (:class:`closedloop.sensitivity.responses.DayResponses` each);
    ``window_length_s``: response window length, s (spikes per window ÷ this = Hz). Returns:

    - ``"category_means"``: ``site``, ``category``, ``n_images``, ``mean``, ``sd`` of clean
      responses (spikes per window);
    - ``"preference"``: per site ``preferred`` / ``least_preferred`` categories with their
      ``preferred_mean``, ``preferred_sd``, ``n_preferred``, ``least_mean`` (spikes per window);
    - ``"curves"``: per site and ε (0 = the clean images attacked), increase attacks on images
      of non-preferred categories: ``n_images``, ``mean``, ``sd`` (spikes per window), ``rate_hz``;
    - ``"crossing"``: per site ``crossing_eps`` (None if the curve never reaches the preferred
      mean), ``max_eps``, ``rate_at_max_eps_hz``, ``preferred_rate_hz``, ``preferred_sd_hz``,
      ``super_stimulus`` (rate at the largest ε above the preferred mean);
    - ``"summary"``: one row: ``n_sites``, ``n_crossing``, ``crossing_eps_mean`` / ``_sd`` over
      sites that cross, ``rate_at_max_eps_hz_mean`` / ``_sd`` and ``preferred_rate_hz_mean`` /
      ``_sd`` over sites.
    """
    if not isinstance(responses, list) or not all(isinstance(r, DayResponses) for r in responses) or not responses:
        raise TypeError("'responses' must be a non-empty list of closedloop.sensitivity.responses.DayResponses (one per day).")
    window = check_number("window_length_s", window_length_s, minimum=0.0, inclusive=False)
    means, category, attacks = _pooled(responses)
    tables = {name: [] for name in ("category_means", "preference", "curves", "crossing")}
    for site in range(means.shape[1]):
        by_category = {c: means[category == c, site] for c in np.unique(category)}
        rows = [{"site": site, "category": str(c), "n_images": int(v.size), "mean": float(v.mean()),
                 "sd": float(v.std(ddof=1)) if v.size > 1 else None} for c, v in by_category.items()]
        tables["category_means"] += rows
        best = max(rows, key=lambda r: r["mean"])
        worst = min(rows, key=lambda r: r["mean"])
        preferred = by_category[best["category"]]
        pref_sd = float(preferred.std(ddof=1)) if preferred.size > 1 else 0.0
        tables["preference"].append({
            "site": site, "preferred": best["category"], "preferred_mean": best["mean"], "preferred_sd": pref_sd,
            "n_preferred": best["n_images"], "least_preferred": worst["category"], "least_mean": worst["mean"],
            "n_categories": len(rows),
        })
        mine = [a for a in attacks if a[0] == site and a[2] != best["category"]]
        if not mine:
            continue
        parents = {a[5]: a[3] for a in mine}  # each attacked clean image once
        curve = [(0.0, np.array(list(parents.values())))]
        curve += [(e, np.array([a[4] for a in mine if a[1] == e])) for e in sorted({a[1] for a in mine})]
        for e, values in curve:
            tables["curves"].append({"site": site, "eps": e, "n_images": int(values.size), "mean": float(values.mean()),
                                     "sd": float(values.std(ddof=1)) if values.size > 1 else None,
                                     "rate_hz": float(values.mean() / window)})
        eps, level = [e for e, _ in curve], [float(v.mean()) for _, v in curve]
        tables["crossing"].append({
            "site": site, "crossing_eps": compute_crossing_eps(eps, level, best["mean"]), "max_eps": eps[-1],
            "rate_at_max_eps_hz": level[-1] / window, "preferred_rate_hz": best["mean"] / window,
            "preferred_sd_hz": pref_sd / window, "super_stimulus": bool(level[-1] > best["mean"]),
        })
    crossing = tables["crossing"]
    crossed = np.array([r["crossing_eps"] for r in crossing if r["crossing_eps"] is not None])
    rates = np.array([r["rate_at_max_eps_hz"] for r in crossing])
    preferred_rates = np.array([r["preferred_rate_hz"] for r in crossing])

    def _stat(values: np.ndarray, how) -> float | None:
        return float(how(values)) if values.size else None

    tables["summary"] = [{
        "n_sites": len(crossing), "n_crossing": int(crossed.size),
        "crossing_eps_mean": _stat(crossed, np.mean), "crossing_eps_sd": _stat(crossed, np.std),
        "rate_at_max_eps_hz_mean": _stat(rates, np.mean), "rate_at_max_eps_hz_sd": _stat(rates, np.std),
        "preferred_rate_hz_mean": _stat(preferred_rates, np.mean), "preferred_rate_hz_sd": _stat(preferred_rates, np.std),
    }]
    return tables
