"""Human (or simulated) category reports vs the guides and surrogates (Gaziv et al.; DESIGN.md §6).

Reads a built task folder (``closedloop behavior build``) with its saved results and computes:

- per-subject lapse rates from catch trials and :func:`lapse_correct` choice probabilities,
  averaged per image over subjects (:func:`compute_choice_probabilities`);
- disruption rate (report ≠ start category) and target-choice rate (report ∈ targets) against
  budget ε for people, each guide and each surrogate, with 95% bootstrap CIs over images and
  subjects (:func:`compute_rates`); composite-target rates are the target rates of mode
  ``composite`` (chance: k/9 for k targets);
- confusion matrices (:func:`compute_confusion`); MTME (:func:`mtme`, :func:`compute_mtme_table`);
- bias-corrected detection rates of the same/different task (:func:`compute_detection_rates`).

Models "report" their top category (argmax of the 9 logits on the saved PNG, from the manifest).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from closedloop.behavior.manifest import read_manifest
from closedloop.behavior.server import read_behavior_results
from closedloop.behavior.sessions import read_behavior_build
from closedloop.core.logs import logger
from closedloop.core.validation import check_integer, check_number

__all__ = [
    "BehaviorData",
    "lapse_correct",
    "lapse_rate",
    "mtme",
    "read_behavior_data",
    "compute_choice_probabilities",
    "compute_rates",
    "compute_mtme_table",
    "compute_confusion",
    "compute_detection_rates",
    "compute_timing_summary",
]

_CURVE_MODES = ("disrupt", "target", "composite", "centroid", "interpolation", "gaussian")
_TARGET_MODES = ("target", "composite", "interpolation")


def lapse_rate(p_catch, n_choices: int = 9):
    """Lapse rate γ = (1 − p_catch) / (1 − 1/N) from catch-trial accuracy ``p_catch`` (scalar or array); N = ``n_choices``."""
    return (1.0 - np.asarray(p_catch, dtype=np.float64)) / (1.0 - 1.0 / n_choices)


def lapse_correct(p, p_catch, n_choices: int = 9):
    """Lapse-corrected choice probability ``(p − γ/N) / (1 − γ)``, γ = (1 − p_catch) / (1 − 1/N).

    ``p``: observed probability of a choice (array or scalar in [0, 1]); ``p_catch``: the
    subject's accuracy on catch trials, in (1/N, 1], broadcast against ``p``; ``n_choices``: N.
    A subject who lapses (answers at random among N buttons) with probability γ shows
    p = (1 − γ) p_true + γ/N; this inverts it. Returns a float or an array of the broadcast shape.
    """
    n_choices = check_integer("n_choices", n_choices, minimum=2)
    p_values, catch = np.asarray(p, dtype=np.float64), np.asarray(p_catch, dtype=np.float64)
    for name, values in (("p", p_values), ("p_catch", catch)):
        if not np.all(np.isfinite(values)) or np.any(values < 0) or np.any(values > 1):
            raise ValueError(f"'{name}' must hold probabilities in [0, 1], but got values {values.ravel()[:5]} ...")
    if np.any(catch <= 1.0 / n_choices):
        raise ValueError(f"'p_catch' must be > 1/n_choices = {1 / n_choices:.3g} (a subject at chance on catch trials has "
                         f"no usable answers), but got {catch.min():g}; leave such subjects out.")
    gamma = lapse_rate(catch, n_choices)
    corrected = (p_values - gamma / n_choices) / (1.0 - gamma)
    return float(corrected) if corrected.ndim == 0 else corrected


def mtme(budgets, rates, threshold: float = 0.10, max_budget: float = 30.0) -> float | None:
    """Model targeted-modulation efficiency: the first budget where the target rate exceeds ``threshold``.

    ``budgets`` (ε, increasing) and ``rates`` (same length): a target-rate curve. It is linearly
    interpolated to 100 points evenly over [0, ``max_budget``] (points outside the measured
    budgets are not used); returns the first grid budget whose rate is > ``threshold``, or None.
    """
    budgets, rates = np.asarray(budgets, dtype=np.float64), np.asarray(rates, dtype=np.float64)
    if budgets.ndim != 1 or budgets.shape != rates.shape or len(budgets) < 2:
        raise ValueError(f"'budgets' and 'rates' must be 1-D of the same length >= 2, but got shapes {budgets.shape} "
                         f"and {rates.shape}.")
    if not (np.all(np.isfinite(budgets)) and np.all(np.isfinite(rates))) or np.any(np.diff(budgets) <= 0):
        raise ValueError(f"'budgets' must be finite and strictly increasing and 'rates' finite, but got {budgets.tolist()} "
                         f"and {rates.tolist()}.")
    threshold = check_number("threshold", threshold)
    grid = np.linspace(0.0, check_number("max_budget", max_budget, minimum=0.0, inclusive=False), 100)
    curve = np.interp(grid, budgets, rates, left=np.nan, right=np.nan)
    above = np.flatnonzero(curve > threshold)
    return float(grid[above[0]]) if len(above) else None


@dataclass(frozen=True)
class BehaviorData:
    """A build's results, arranged for analysis.

    ``items``: manifest records (index = item); ``counts``: (n_subjects, n_items, n_categories)
    reports per subject and item (test and reference trials; warm-up left out); ``p_catch``:
    (n_subjects,) catch accuracy; ``subjects``: anonymous ids; ``model_choices``: model name ->
    (n_items,) top category; ``detection``: one dict per detection trial (subject, order, budget,
    different (bool), catch (bool)); ``timings``: one dict per trial (kind, role, image_ms,
    blank_ms, image2_ms, rt_ms); ``excluded``: ids of subjects at chance on catch trials.
    """

    category_names: list[str]
    items: list[dict]
    models: dict
    subjects: list[str]
    counts: np.ndarray
    p_catch: np.ndarray
    model_choices: dict[str, np.ndarray]
    detection: list[dict]
    timings: list[dict]
    excluded: list[str]


def read_behavior_data(out: str | Path) -> BehaviorData:
    """Read the build ``out`` (build.json, manifest.json, results/*.json) into a :class:`BehaviorData`.

    Categorisation subjects whose catch accuracy is ≤ 1/9 are left out (listed in ``excluded``).
    """

    out = Path(out).expanduser()
    build = read_behavior_build(out)
    manifest = read_manifest(out)
    names = manifest["category_names"]
    index = {record["item"]: k for k, record in enumerate(manifest["records"])}
    stimulus_item = {name: index.get(item) for name, item in build["stimuli"].items()}
    budget_of = {name: manifest["records"][k]["budget"] for name, k in stimulus_item.items() if k is not None}
    category = {name: k for k, name in enumerate(names)}
    subjects, counts, p_catch, excluded, detection, timings = [], [], [], [], [], []
    for result in read_behavior_results(out):
        trials = result["trials"]
        timings += [{"kind": result["kind"], **{key: t.get(key) for key in ("role", "image_ms", "blank_ms", "image2_ms", "rt_ms")}}
                    for t in trials]
        if result["kind"] == "detection":
            probes = build["probes"][result["session"]]
            detection += _detection_rows(result, [budget_of[p] if p else None for p in probes])
            continue
        catch = [t["response"] == t["stimulus"].removeprefix("stimuli/catch_").removesuffix(".png")
                 for t in trials if t["role"] == "catch"]
        accuracy = float(np.mean(catch)) if catch else 0.0
        if accuracy <= 1.0 / len(names):
            excluded.append(result["anonymous_id"])
            continue
        table = np.zeros((len(manifest["records"]), len(names)), dtype=np.float32)
        for trial in trials:
            if trial["role"] in ("test", "reference") and trial["response"] in category:
                table[stimulus_item[trial["stimulus"]], category[trial["response"]]] += 1
        subjects.append(result["anonymous_id"])
        counts.append(table)
        p_catch.append(accuracy)
    if excluded:
        logger.warning("left out %d subjects at chance on catch trials: %s", len(excluded), ", ".join(excluded))
    logits = {model: np.array([record["logits"][model] for record in manifest["records"]]) for model in manifest["models"]}
    shape = (0, len(manifest["records"]), len(names))
    return BehaviorData(names, manifest["records"], manifest["models"], subjects,
                        np.stack(counts) if counts else np.zeros(shape, np.float32), np.array(p_catch),
                        {model: values.argmax(axis=1) for model, values in logits.items()}, detection, timings, excluded)


def _detection_rows(result: dict, budgets: list) -> list[dict]:
    """One row per detection trial; ``budgets``: the budget of each trial's perturbed image (None: catch)."""
    return [{"subject": result["anonymous_id"], "order": trial["order"], "catch": trial["role"] == "catch",
             "different": trial["response"] == "different", "session": result["session"], "budget": budgets[trial["index"]]}
            for trial in result["trials"]]


def _corrected(data: BehaviorData) -> tuple[np.ndarray, np.ndarray]:
    """(lapse-corrected probabilities (n_subjects, n_items, n_categories), seen mask (n_subjects, n_items))."""
    totals = data.counts.sum(axis=2)
    seen = totals > 0
    observed = np.divide(data.counts, totals[..., None], out=np.zeros(data.counts.shape), where=seen[..., None])
    corrected = lapse_correct(observed, data.p_catch[:, None, None], len(data.category_names))
    return np.where(seen[..., None], corrected, np.nan), seen


def compute_choice_probabilities(data: BehaviorData) -> np.ndarray:
    """Lapse-corrected report probabilities per image, averaged over subjects: (n_items, n_categories).

    Rows of images nobody saw are NaN. Single subjects' corrected values can fall below 0 (the
    correction is unbiased, not clipped).
    """
    corrected, seen = _corrected(data)
    with np.errstate(invalid="ignore"):
        return np.nansum(corrected, axis=0) / seen.sum(axis=0)[:, None]


def _item_values(data: BehaviorData, corrected: np.ndarray, measure: str) -> np.ndarray:
    """Per subject and item, the corrected rate of one measure: (n_subjects, n_items), NaN where unseen."""
    index = {name: k for k, name in enumerate(data.category_names)}
    values = np.full(corrected.shape[:2], np.nan)
    for i, record in enumerate(data.items):
        if measure == "disruption":
            values[:, i] = 1.0 - corrected[:, i, index[record["category"]]]
        elif record["mode"] == "control":  # the chance level of one target at ε = 0
            values[:, i] = (1.0 - corrected[:, i, index[record["category"]]]) / (len(index) - 1)
        else:
            targets = [index[t] for t in record["targets"] if t in index]
            values[:, i] = corrected[:, i, targets].sum(axis=1) if targets else np.nan
    return values


def _model_values(data: BehaviorData, model: str, measure: str) -> np.ndarray:
    index = {name: k for k, name in enumerate(data.category_names)}
    choice = data.model_choices[model]
    values = np.full(len(data.items), np.nan)
    for i, record in enumerate(data.items):
        wrong = float(choice[i] != index[record["category"]])
        if measure == "disruption":
            values[i] = wrong
        elif record["mode"] == "control":
            values[i] = wrong / (len(index) - 1)
        elif any(t in index for t in record["targets"]):
            values[i] = float(data.category_names[choice[i]] in record["targets"])
    return values


def _bootstrap_people(values: np.ndarray, group: np.ndarray, n_boot: int, rng) -> tuple[float, float, float]:
    """Mean over ``group`` items of the subject-averaged values; 95% CI resampling subjects, then images."""
    block = values[:, group]
    seen = np.isfinite(block)
    filled = np.where(seen, block, 0.0)
    with np.errstate(invalid="ignore"):
        estimate = float(np.nanmean(filled.sum(0) / seen.sum(0)))
    if not n_boot:
        return estimate, np.nan, np.nan
    weights = rng.multinomial(block.shape[0], np.full(block.shape[0], 1.0 / block.shape[0]), size=n_boot).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_item = (weights @ filled) / (weights @ seen)
    picks = rng.integers(0, block.shape[1], size=(n_boot, block.shape[1]))
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a resample whose images nobody saw
        means = np.nanmean(np.take_along_axis(per_item, picks, axis=1), axis=1)
    low, high = np.nanpercentile(means, [2.5, 97.5])
    return estimate, float(low), float(high)


def _bootstrap_items(values: np.ndarray, n_boot: int, rng) -> tuple[float, float, float]:
    estimate = float(values.mean())
    if not n_boot:
        return estimate, np.nan, np.nan
    means = values[rng.integers(0, len(values), size=(n_boot, len(values)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return estimate, float(low), float(high)


def compute_rates(data: BehaviorData, *, n_boot: int = 1000, seed: int = 0) -> list[dict]:
    """Disruption and target-choice rates per (mode, guide, budget) for people and every model.

    One row per (measure, mode, guide, budget, observer): ``measure`` ("disruption" or
    "target"), ``observer`` ("people" or a model name), ``role`` ("people", "guide",
    "surrogate"), ``rate`` in [0, 1], ``low``/``high`` (95% bootstrap CI: people over subjects
    and images, models over images), ``n_items``, ``n_subjects``. Each curve starts at ε = 0
    with the unperturbed images (target: one other category's share of the errors). Target rates
    of mode "composite" are composite-target rates (any of the 2-3 targets).
    """
    check_integer("n_boot", n_boot, minimum=0)
    rng = np.random.default_rng(seed)
    corrected, _ = _corrected(data)
    observers = ["people", *data.models]
    controls = np.array([i for i, r in enumerate(data.items) if r["mode"] == "control"], dtype=np.int64)
    rows = []
    for measure in ("disruption", "target"):
        people = _item_values(data, corrected, measure) if data.subjects else None
        models = {model: _model_values(data, model, measure) for model in data.models}
        curves = sorted({(r["mode"], r["guide"]) for r in data.items if r["mode"] in _CURVE_MODES
                         and (measure == "disruption" or r["mode"] in _TARGET_MODES)})
        for mode, guide in curves:
            budgets = sorted({r["budget"] for r in data.items if r["mode"] == mode and r["guide"] == guide})
            for budget in ([0.0] if len(controls) and mode != "composite" else []) + budgets:
                group = controls if budget == 0.0 else np.array(
                    [i for i, r in enumerate(data.items) if (r["mode"], r["guide"], r["budget"]) == (mode, guide, budget)])
                for observer in observers:
                    if observer == "people":
                        if people is None or not np.isfinite(people[:, group]).any():
                            continue
                        keep = group[np.isfinite(people[:, group]).any(axis=0)]
                        rate, low, high = _bootstrap_people(people, keep, n_boot, rng)
                        n_items, n_subjects = len(keep), int(np.isfinite(people[:, keep]).any(axis=1).sum())
                    else:
                        values = models[observer][group]
                        rate, low, high = _bootstrap_items(values, n_boot, rng)
                        n_items, n_subjects = len(group), 0
                    role = "people" if observer == "people" else data.models[observer]["role"]
                    rows.append({"measure": measure, "mode": mode, "guide": guide, "budget": float(budget),
                                 "observer": observer, "role": role, "rate": rate, "low": low, "high": high,
                                 "n_items": n_items, "n_subjects": n_subjects})
    return rows


def compute_mtme_table(rates: list[dict], *, threshold: float = 0.10, max_budget: float = 30.0) -> list[dict]:
    """MTME of every target-rate curve (modes target and interpolation) in ``rates`` (from :func:`compute_rates`).

    Rows: ``mode``, ``guide``, ``observer``, ``mtme`` (ε, or None when the rate never exceeds
    ``threshold`` within [0, ``max_budget``]).
    """
    table = []
    curves = sorted({(r["mode"], r["guide"], r["observer"]) for r in rates
                     if r["measure"] == "target" and r["mode"] in ("target", "interpolation")})
    for mode, guide, observer in curves:
        points = sorted((r["budget"], r["rate"]) for r in rates if (r["measure"], r["mode"], r["guide"], r["observer"])
                        == ("target", mode, guide, observer))
        value = mtme(*zip(*points), threshold=threshold, max_budget=max_budget) if len(points) >= 2 else None
        table.append({"mode": mode, "guide": guide, "observer": observer, "mtme": value})
    return table


def compute_confusion(data: BehaviorData, probabilities: np.ndarray, *, mode: str, guide: str = "",
                      budget: float = 0.0) -> np.ndarray:
    """Mean report probabilities (n_categories, n_categories): rows start category, columns report.

    ``probabilities``: (n_items, n_categories), e.g. :func:`compute_choice_probabilities`;
    averaged over the images of ``mode`` / ``guide`` / ``budget`` (``mode="control"`` for clean
    images). Rows without images are NaN.
    """
    n = len(data.category_names)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.shape != (len(data.items), n):
        raise ValueError(f"'probabilities' must have shape (n_items, n_categories) = {(len(data.items), n)}, "
                         f"but got {probabilities.shape}.")
    index = {name: k for k, name in enumerate(data.category_names)}
    matrix, totals = np.zeros((n, n)), np.zeros(n)
    for i, record in enumerate(data.items):
        if (record["mode"], record["guide"], record["budget"]) == (mode, guide, budget) and np.isfinite(probabilities[i]).all():
            matrix[index[record["category"]]] += probabilities[i]
            totals[index[record["category"]]] += 1
    with np.errstate(invalid="ignore"):
        return matrix / totals[:, None]


def compute_detection_rates(data: BehaviorData, *, n_boot: int = 1000, seed: int = 0) -> list[dict]:
    """Same/different detection per budget, lapse- and bias-corrected.

    Per subject: hit rate H ("different" on p-c, c-p), false-alarm rate F ("different" on c-c,
    p-p) and catch accuracy (two different images). Averaged over subjects, H and F are
    lapse-corrected with :func:`lapse_correct` (N = 2) at the mean catch accuracy (a session's
    ~8 catch trials are too few for a stable per-subject correction with two buttons); the
    detection rate is (H − F) / (1 − F), the probability of seeing the perturbation once guessing
    is removed (0: invisible, 1: always seen). Rows: ``budget``, ``hit_rate``,
    ``false_alarm_rate`` (corrected, clipped to [0, 1]), ``detection`` with ``low``/``high`` (95% bootstrap over
    subjects), ``proportion_correct`` (raw, over the four orders; chance 0.5), ``n_subjects``,
    ``n_trials``. Subjects at chance on catch trials (≤ 0.5) are left out.
    """
    check_integer("n_boot", n_boot, minimum=0)
    rng = np.random.default_rng(seed)
    subjects = sorted({row["subject"] for row in data.detection})
    catch = {s: np.mean([r["different"] for r in data.detection if r["subject"] == s and r["catch"]] or [0.0]) for s in subjects}
    subjects = [s for s in subjects if catch[s] > 0.5]
    rows = []
    for budget in sorted({r["budget"] for r in data.detection if not r["catch"]}):
        trials = [r for r in data.detection if not r["catch"] and r["budget"] == budget and r["subject"] in subjects]
        rates = np.full((len(subjects), 3), np.nan)  # H, F, catch accuracy
        for k, subject in enumerate(subjects):
            for column, orders in enumerate((("p-c", "c-p"), ("c-c", "p-p"))):
                answers = [r["different"] for r in trials if r["subject"] == subject and r["order"] in orders]
                rates[k, column] = np.mean(answers) if answers else np.nan
            rates[k, 2] = catch[subject]
        rates = rates[np.isfinite(rates).all(axis=1)]
        if not len(rates):
            continue
        corrected = lambda sample: np.clip(lapse_correct(sample[:, :2].mean(0), sample[:, 2].mean(), 2), 0, 1)  # noqa: E731
        hit, false_alarm = corrected(rates)
        boots = [_detection(*corrected(rates[rng.integers(0, len(rates), len(rates))])) for _ in range(n_boot)]
        low, high = np.nanpercentile(boots, [2.5, 97.5]) if n_boot else (np.nan, np.nan)
        correct = [r["different"] == (r["order"] in ("p-c", "c-p")) for r in trials]
        rows.append({"budget": budget, "hit_rate": float(hit), "false_alarm_rate": float(false_alarm),
                     "detection": _detection(hit, false_alarm), "low": float(low), "high": float(high),
                     "proportion_correct": float(np.mean(correct)), "n_subjects": int(len(rates)), "n_trials": len(trials)})
    return rows


def _detection(hit: float, false_alarm: float) -> float:
    """(H − F) / (1 − F): detection with guessing removed (NaN when F = 1)."""
    return float((hit - false_alarm) / (1.0 - false_alarm)) if false_alarm < 1 else float("nan")


def compute_timing_summary(data: BehaviorData) -> list[dict]:
    """The presentation times jsPsych recorded (ms): per task kind and phase, median, min, max and count."""
    rows = []
    for kind in sorted({t["kind"] for t in data.timings}):
        for phase in ("image_ms", "blank_ms", "image2_ms", "rt_ms"):
            values = np.array([t[phase] for t in data.timings if t["kind"] == kind and t[phase] is not None], dtype=np.float64)
            if len(values):
                rows.append({"kind": kind, "phase": phase.removesuffix("_ms"), "median_ms": float(np.median(values)),
                             "min_ms": float(values.min()), "max_ms": float(values.max()), "n_trials": len(values)})
    return rows
