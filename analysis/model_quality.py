"""Model quality per site and day: predictivity, its noise ceiling, and direction accuracy.

Two predictivities per site and day:

- ``prediction``: the model that made the day's stimuli (day N−1's refit; day 0's random
  readout) against the day's mean clean responses. These images were never used to fit that
  model, so this is a true held-out test; it is what the day's attacks were made with.
- ``refit``: the refit stage's own held-out r (the model fitted at the end of the day, on the
  stimuli it held out for early stopping), from ``stages/refit.json``.

Ceiling convention: ρ is the split-half reliability of the mean responses, Spearman-Brown
corrected to the full number of presentations (:func:`models.compute_split_half_reliability`).
A perfect model reaches r = √ρ, so the normalised predictivity is r / √ρ (1 = at the noise
ceiling; undefined where ρ ≤ 0).

Direction accuracy: the fraction of attack pairs whose recorded change r(x) − r(x+δ) has the
sign the model predicted (ties count one half). The estimator is tight exactly when this is 1;
trial-to-trial noise keeps the measured fraction below 1 even for a perfect model.
"""

from __future__ import annotations

import numpy as np

from closedloop.sensitivity.estimator import ATTACK
from models.predictivity import compute_pearson, compute_split_half_reliability

__all__ = ["compute_model_quality", "compute_direction_accuracy"]


def _normalized(r, reliability) -> float | None:
    if r is None or reliability is None or not np.isfinite(r) or not np.isfinite(reliability) or reliability <= 0:
        return None
    return float(r / np.sqrt(reliability))


def _finite(value) -> float | None:
    return float(value) if value is not None and np.isfinite(value) else None


def compute_direction_accuracy(changes) -> list[dict]:
    """Fraction of attack directions predicted right, per site and ε and over sites per ε.

    ``changes``: :class:`closedloop.sensitivity.estimator.SignedChanges` of one day. Returns rows ``site``
    ("all" for the pooled row), ``eps``, ``n_pairs``, ``fraction_right`` (ties count ½).
    """
    attack = np.asarray(changes.kind) == ATTACK
    site, eps, change = changes.site[attack], changes.eps[attack], changes.change[attack]
    right = (change > 0) + 0.5 * (change == 0)
    rows = []
    for e in sorted(set(eps.tolist())):
        at = eps == e
        for i in sorted(set(site[at].tolist())):
            chosen = at & (site == i)
            rows.append({"site": i, "eps": e, "n_pairs": int(chosen.sum()), "fraction_right": float(right[chosen].mean())})
        rows.append({"site": "all", "eps": e, "n_pairs": int(at.sum()), "fraction_right": float(right[at].mean())})
    return rows


def compute_model_quality(days: list, *, seed: int = 0) -> dict[str, list[dict]]:
    """Predictivity, ceiling and direction accuracy for each day of ``days``.

    ``days``: :class:`analysis.experiment.ExperimentDay` objects. ``seed``: the random
    split-halves of the reliability. Returns tables:

    - ``"prediction"``: ``day``, ``site``, ``n_images`` (clean images shown at least once),
      ``r`` (Pearson r of the generating model's predictions with the mean clean responses),
      ``reliability`` (ρ, Spearman-Brown), ``ceiling`` (√ρ), ``normalized`` (r / √ρ);
    - ``"refit"``: ``day``, ``site``, ``held_out_r``, ``reliability``, ``normalized`` from the
      refit stage (days whose refit finished);
    - ``"directions"``: ``day`` plus the rows of :func:`compute_direction_accuracy`.
    """
    tables = {"prediction": [], "refit": [], "directions": []}
    for day in days:
        s, responses = day.stimuli, day.responses
        clean = day.shown_clean()
        predicted = s["predicted"][clean]
        usable = np.isfinite(predicted).all(axis=1)
        clean, predicted = clean[usable], predicted[usable]
        shown = responses.valid & np.isin(responses.stimulus, clean)
        reliability = compute_split_half_reliability(responses.counts[shown], responses.stimulus[shown], seed=seed)
        r = compute_pearson(predicted, responses.means[clean]) if clean.size >= 2 else np.full(len(reliability), np.nan)
        for site in range(len(reliability)):
            rho = _finite(reliability[site])
            tables["prediction"].append({
                "day": day.day, "site": site, "n_images": int(clean.size), "r": _finite(r[site]), "reliability": rho,
                "ceiling": float(np.sqrt(rho)) if rho is not None and rho > 0 else None,
                "normalized": _normalized(r[site], reliability[site]),
            })
        fit = day.stages.get("refit", {}).get("summary")
        if fit:
            for site, (held, rho) in enumerate(zip(fit["held_out_r"], fit["reliability"])):
                tables["refit"].append({"day": day.day, "site": site, "held_out_r": held, "reliability": rho,
                                        "normalized": _normalized(held, rho)})
        tables["directions"] += [{"day": day.day, **row} for row in compute_direction_accuracy(day.signed_changes())]
    return tables
