"""Day-over-day progress of the realised lower bound (Guo et al. Fig. 5).

Each day's attacks come from the model refitted on every earlier day, so the realised
(normalised) lower bound should rise from day to day. Day 0 is excluded by default as in the
paper: its attacks come from a random readout. The model-free baselines (Gaussian noise,
interpolation toward another image) are summarised the same way, for the same axes.
"""

from __future__ import annotations

import numpy as np

from closedloop.core.validation import check_integer
from closedloop.sensitivity.estimator import ATTACK, BASELINES

__all__ = ["compute_progress"]


def compute_progress(records_by_day: dict[int, list[dict]], *, first_day: int = 1) -> dict[str, list[dict]]:
    """The mean normalised lower bound per day, kind and ε, and its growth.

    ``records_by_day``: ``{day: rows of that day's sensitivity.json}``. ``first_day``: the
    first day to include (1: day 0 excluded as in the paper; when no later day exists, day 0 is
    used alone). Returns tables:

    - ``"curves"``: ``day``, ``kind``, ``eps`` (L2, [0, 1] pixel units), ``n_sites``,
      ``n_images`` (total), ``mean`` and ``sd`` (over sites) of the normalised bound (units of
      the site's clean-response s.d.), ``estimate`` (mean, spikes per window);
    - ``"fold_change"``: for the model-guided attacks at every ε, ``first_day``, ``last_day``,
      ``first`` and ``last`` (mean normalised bound) and ``fold_change`` = last / first (None
      when first ≤ 0); the first row is the smallest ε (the paper's headline number).
    """
    if not isinstance(records_by_day, dict) or not records_by_day:
        raise ValueError("'records_by_day' must be a non-empty dict {day: sensitivity.json rows}; read an experiment first.")
    check_integer("first_day", first_day, minimum=0)
    days = sorted(d for d in records_by_day if d >= first_day) or sorted(records_by_day)
    curves = []
    for day in days:
        for kind in (ATTACK, *BASELINES):
            rows = [r for r in records_by_day[day] if r["kind"] == kind]
            for eps in sorted({r["eps"] for r in rows}):
                chosen = [r for r in rows if r["eps"] == eps]
                values = np.array([r["normalized"] for r in chosen if r["normalized"] is not None], dtype=float)
                curves.append({
                    "day": day, "kind": kind, "eps": eps, "n_sites": int(values.size),
                    "n_images": int(sum(r["n_images"] for r in chosen)),
                    "mean": float(values.mean()) if values.size else None, "sd": float(values.std()) if values.size else None,
                    "estimate": float(np.mean([r["estimate"] for r in chosen])),
                })
    attack = {(row["day"], row["eps"]): row["mean"] for row in curves if row["kind"] == ATTACK}
    first, last = days[0], days[-1]
    fold = []
    for eps in sorted({e for d, e in attack if d == first} & {e for d, e in attack if d == last}):
        a, b = attack[(first, eps)], attack[(last, eps)]
        fold.append({"eps": eps, "first_day": first, "last_day": last, "first": a, "last": b,
                     "fold_change": b / a if (a is not None and b is not None and a > 0) else None})
    return {"curves": curves, "fold_change": fold}
