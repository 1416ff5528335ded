"""Stage 6 of a day: the lower bound on every site's sensitivity, ``sensitivity.json``.

The biased-down estimator of :mod:`closedloop.sensitivity.estimator` on the day's responses
(the ``.nev`` counts when ingested, else the live ones). On a simulated rig each record also
carries the truth the rig knows (validation only; see :meth:`RigAccess.compute_truth`).
"""

from __future__ import annotations

from closedloop.core.files import write_json
from closedloop.data import layout
from closedloop.sensitivity.estimator import compute_sensitivity
from closedloop.sensitivity.responses import read_day_responses

__all__ = ["run_stage"]


def run_stage(day) -> dict:
    """Write ``sensitivity.json`` (one record per site, budget and kind; ``eps`` in pixel units and
    ``eps_paper`` = ``eps`` ÷ ``[attack] paper_scale``, the paper-equivalent budget)."""
    store = day.path(layout.STORE)
    responses = read_day_responses(store)
    stimuli = responses.stimuli
    truth = day.rig.compute_truth(day.config, store, seed=day.seed("truth"), device=day.device)
    sensitivity, expected = truth if truth is not None else (None, None)
    records = compute_sensitivity(
        stimuli["parent"], stimuli["site"], stimuli["eps"], stimuli["kind"], stimuli["predicted"], responses.means,
        truth=sensitivity, expected=expected,
    )
    scale = day.config.attack.paper_scale
    records = [record | {"eps_paper": round(record["eps"] / scale, 9)} for record in records]  # 9 digits: 3k/k is 3
    write_json(day.path(layout.SENSITIVITY), records)
    return {"n_records": len(records), "source": responses.source}
