"""The behavioural demo (``closedloop behavior demo``): generate → build → simulated observers → report.

On the embedded default, CPU-sized (behaviour preset ``demo``): one guide (``embedded:robust``) and its surrogate
(``embedded:robust-seed1``), disruption and targeted perturbations at ε = 15 and 30 plus the
clean images (171 images), categorisation sessions of the published size (130 trials; 4
sessions so that every perturbed image has 2 subjects) and same/different sessions on the
disruption images. Simulated subjects whose choices follow the surrogate (softmax of its logits,
lapse rate 0.1) do every session in headless Chromium; the report follows. The summary checks
the pipeline against the known truth: the lapse rate recovered from catch trials, and the
lapse-corrected disruption rates of "people" against the observers' true rates.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from analysis.behavior import lapse_rate, read_behavior_data
from analysis.behavior_report import write_behavior_report
from closedloop.behavior.config import make_preset_config
from closedloop.behavior.generate import write_behavior_stimuli
from closedloop.behavior.manifest import read_manifest
from closedloop.behavior.observers import ObserverModel, compute_observer_probabilities, write_simulated_results
from closedloop.behavior.sessions import write_behavior_sessions
from closedloop.core.logs import logger

__all__ = ["DEMO_OBSERVER", "compute_demo_truth", "run_behavior_demo"]

DEMO_OBSERVER = {"model": "robust-seed1", "temperature": 1.0, "lapse_rate": 0.1}


def compute_demo_truth(out: str | Path, model: str, temperature: float) -> dict:
    """The simulated observers' true disruption rate per (mode, guide, budget): mean over images of 1 − p(start).

    ``out``: a built task folder; keys are ``"mode/guide/eps"`` (``"control//0"`` for clean images).
    """

    manifest = read_manifest(out)
    names = manifest["category_names"]
    groups: dict[str, list[float]] = {}
    for record in manifest["records"]:
        p = compute_observer_probabilities(record["logits"][model], temperature)
        key = f"{record['mode']}/{record['guide']}/{record['budget']:g}"
        groups.setdefault(key, []).append(1 - p[names.index(record["category"])])
    return {key: float(np.mean(values)) for key, values in groups.items()}


def run_behavior_demo(out: str | Path, *, n_parallel: int = 3, n_boot: int = 500, seed: int = 0) -> dict:
    """Run the whole behavioural pipeline into folder ``out`` (``stimuli/``, ``task/``, ``task/report/``).

    Classifiers come from (or are trained into) the default cache ``daily_runs/cache``; an
    existing stimulus set in ``out/stimuli`` made with the same settings is reused. Returns the
    paths, seconds per stage, the true and recovered lapse rate, and per budget the true and
    measured disruption rate of the simulated people with its 95% CI (``within_ci``).
    """

    out = Path(out).expanduser()
    seconds, started = {}, time.monotonic()
    config = make_preset_config("demo")
    write_behavior_stimuli(config, out / "stimuli")
    seconds["generate"] = time.monotonic() - started
    task = out / "task"
    for old in (task / "results").glob("*.json") if (task / "results").is_dir() else []:
        old.unlink()
    write_behavior_sessions(out / "stimuli", task, detection_modes=["disrupt"], n_detection_items=18, seed=seed)
    seconds["build"] = time.monotonic() - started - seconds["generate"]
    observer = ObserverModel(**DEMO_OBSERVER)
    files = write_simulated_results(task, observer, n_parallel=n_parallel, seed=seed)
    seconds["observers"] = time.monotonic() - started - seconds["generate"] - seconds["build"]
    report = write_behavior_report(task, n_boot=n_boot, seed=seed)
    seconds["report"] = time.monotonic() - started - sum(seconds.values())
    data = read_behavior_data(task)
    truth = compute_demo_truth(task, observer.model, observer.temperature)
    checks = []
    for row in (r for r in report["rates"] if r["observer"] == "people" and r["measure"] == "disruption"):
        key = f"{'control' if row['budget'] == 0 else row['mode']}/{'' if row['budget'] == 0 else row['guide']}/{row['budget']:g}"
        checks.append({"mode": row["mode"], "budget": row["budget"], "true": truth[key], "measured": row["rate"],
                       "low": row["low"], "high": row["high"], "within_ci": row["low"] <= truth[key] <= row["high"]})
    lapse = lapse_rate(data.p_catch, len(data.category_names))
    result = {"out": str(out), "report": report["html"], "n_results": len(files), "seconds": seconds,
              "lapse_true": observer.lapse_rate, "lapse_recovered": float(lapse.mean()), "disruption": checks,
              "mtme": report["mtme"], "detection": report["detection"]}
    logger.info("behaviour demo done in %.0f s: %s", sum(seconds.values()), report["html"])
    return result

