"""Ground truth (simulated rig only): the lower bound against each site's true sensitivity.

On the simulated rig every site is a known function, and the estimate stage records its true
mean white-box sensitivity over the same clean images (``truth`` in ``sensitivity.json``). The
estimate should lie at or below the truth (up to sampling error; a 2-standard-error margin is
used) and the ratio estimate / truth says how tight the bound is.
"""

from __future__ import annotations

import numpy as np

from closedloop.sensitivity.estimator import ATTACK

__all__ = ["compute_truth_comparison"]


def compute_truth_comparison(records_by_day: dict[int, list[dict]]) -> dict[str, list[dict]]:
    """Estimate vs truth per day, site and ε (model-guided attacks with a recorded truth).

    ``records_by_day``: ``{day: rows of sensitivity.json}``. Returns tables (empty when no
    record carries a truth, i.e. a real rig):

    - ``"sites"``: ``day``, ``site``, ``eps``, ``estimate``, ``sem``, ``truth`` (spikes per
      window), ``ratio`` (estimate / truth; None when truth ≤ 0), ``below`` (estimate ≤ truth),
      ``within_2se`` (estimate ≤ truth + 2 sem);
    - ``"summary"``: per ε over days and sites: ``n``, ``n_below``, ``n_within_2se``,
      ``ratio_mean``, ``ratio_median``, ``estimate_mean``, ``truth_mean``;
    - ``"days"``: per day and ε, means over sites of ``estimate``, ``expected`` (the estimator
      on the sites' noise-free counts), ``direction_right`` (fraction of attacks whose predicted
      direction was the true one) and ``truth``: whether the model learned, free of response
      noise (``expected`` and ``direction_right`` None for days recorded before they existed).
    """
    if not isinstance(records_by_day, dict):
        raise TypeError(f"'records_by_day' must be a dict {{day: sensitivity.json rows}}, but got {type(records_by_day).__name__}.")
    sites = []
    for day in sorted(records_by_day):
        for r in records_by_day[day]:
            if r["kind"] != ATTACK or r.get("truth") is None:
                continue
            sem = r["sem"] or 0.0
            sites.append({
                "day": day, "site": r["site"], "eps": r["eps"], "estimate": r["estimate"], "sem": r["sem"], "truth": r["truth"],
                "ratio": r["estimate"] / r["truth"] if r["truth"] > 0 else None,
                "below": bool(r["estimate"] <= r["truth"]), "within_2se": bool(r["estimate"] <= r["truth"] + 2 * sem),
                "expected": r.get("expected"), "direction_right": r.get("direction_right"),
            })
    summary = []
    for eps in sorted({row["eps"] for row in sites}):
        chosen = [row for row in sites if row["eps"] == eps]
        ratios = np.array([row["ratio"] for row in chosen if row["ratio"] is not None])
        summary.append({
            "eps": eps, "n": len(chosen), "n_below": sum(row["below"] for row in chosen),
            "n_within_2se": sum(row["within_2se"] for row in chosen),
            "ratio_mean": float(ratios.mean()) if ratios.size else None,
            "ratio_median": float(np.median(ratios)) if ratios.size else None,
            "estimate_mean": float(np.mean([row["estimate"] for row in chosen])),
            "truth_mean": float(np.mean([row["truth"] for row in chosen])),
        })
    days = []
    for day, eps in sorted({(row["day"], row["eps"]) for row in sites}):
        chosen = [row for row in sites if row["day"] == day and row["eps"] == eps]
        means = {f"{key}_mean": _mean([row[key] for row in chosen]) for key in ("estimate", "expected", "direction_right", "truth")}
        days.append({"day": day, "eps": eps, "n_sites": len(chosen)} | means)
    return {"sites": sites, "summary": summary, "days": days}


def _mean(values: list) -> float | None:
    return float(np.mean(values)) if values and all(v is not None for v in values) else None
