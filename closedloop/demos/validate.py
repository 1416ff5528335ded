"""The paper's protocol on the calibrated simulated rig: does the loop reproduce the paper's claims?

``closedloop validate`` creates a fresh experiment (the validate preset: 21 sites, 42 new attacked
images per day, each attacked for every site at ε = 1, 2, 4, 6, 10, two valid repetitions,
Gaussian and interpolation baselines at the same budgets; base model the embedded robust
``resnet_tiny`` of the demo, the twin as calibrated in docs/riglink.md; the embedded vanilla
``resnet_tiny`` as the standard network of Fig. 1A), runs day 0 plus ``n_days − 1`` refitted days with
:func:`closedloop.day.runner.run_day` against the simulated rig, writes the experiment report
(whose sections 3, 4, 5 and 8 are the paper's Fig. 5, Fig. 2C, Fig. 1A and the truth check),
saves those figures as PNGs, and checks the four targets of the issue on what was measured:

1. ``lower_bound``: the noise-free bound (the estimator on the twin's expected counts) ≤ the
   truth for every site × ε × day, and at most 5% of measured estimates above truth by more
   than 2 s.e.;
2. ``growth``: at the smallest ε the measured mean bound on the last day ≥ 2 × the first
   refitted day's, with the difference beyond 2 standard errors (paper: 2.7×);
3. ``attacks_beat_baselines``: on the last day, the mean attack bound ≥ 3 × each baseline's at
   every ε (and above 0);
4. ``super_stimuli``: on the last day, increase attacks on non-preferred images exceed the
   preferred-category mean at the largest ε (the paper's 10) for most (> half) of the sites.

Nothing here changes the estimator or the twin; the numbers are what the run measured.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np

from analysis.categories import compute_category_preference
from analysis.experiment import read_experiment
from analysis.progress import compute_progress
from analysis.report import write_report
from analysis.report_sections import (
    NetworkData,
    NetworkOptions,
    compute_networks,
    compute_sensitivity,
    make_categories_figure,
    make_networks_figure,
    make_progress_figure,
)
from closedloop.behavior.models import make_embedded_classifier
from closedloop.config import CONFIG_NAME, read_config, write_default_config
from closedloop.core.files import read_json, write_json
from closedloop.core.lock import hold_lock
from closedloop.core.logs import logger
from closedloop.core.validation import check_integer
from closedloop.data import layout
from closedloop.data.layout import day_folder
from closedloop.day.runner import run_day
from closedloop.demos.loop import compute_ceiling_summary, compute_demo_summary, format_ceiling
from rigs.launch import RigLauncher

__all__ = ["VALIDATE_SETTINGS", "run_validation", "analyse_validation", "compute_validation_targets", "format_validation"]

# The paper's protocol (DESIGN.md §6) at the size this CPU can run, over the demo preset.
VALIDATE_SETTINGS = {
    "images": {"n_clean_day0": 280, "n_clean_per_day": 42, "embedded_per_photo": 48},
    "sites": {"n_sites": 21},
    "attack": {"budgets": [1.0, 2.0, 4.0, 6.0, 10.0]},
    "rsvp": {"repetitions": 2},
    # the truth (validation only) on a third of each day's 42 attacked images: docs/validate.md
    "sim": {"truth_images": 14},
}
SUMMARY_NAME = "validation.json"


def _prepare(out: Path, cache: Path, changes: dict, *, resume: bool) -> Path:
    """Write the fresh experiment (or, with ``resume``, keep the one in ``out`` when its settings are
    this campaign's); return the standard network (embedded vanilla) for Fig. 1A."""
    if out.exists() and not (out / CONFIG_NAME).exists():
        raise FileExistsError(f"{out} exists and is not a closedloop experiment; choose another --out")
    if resume and (out / CONFIG_NAME).exists():
        read_config(out)  # a malformed experiment.toml fails here, before minutes of training
    robust = make_embedded_classifier("robust", cache)
    settings = {section: dict(values) for section, values in VALIDATE_SETTINGS.items()}
    for section, values in changes.items():
        settings.setdefault(section, {}).update(values)
    settings["model"] = {"backbone": str(robust.resolve())}
    if resume and (out / CONFIG_NAME).exists():
        _check_resumable(out, settings)
        logger.info("validate: resuming the campaign in %s", out)
    else:
        if out.exists():
            shutil.rmtree(out)
        write_default_config(out, preset="demo", changes=settings)
    return make_embedded_classifier("vanilla", cache)


def _check_resumable(out: Path, settings: dict) -> None:
    """Refuse to resume a campaign whose experiment.toml differs from ``settings``, naming each key."""
    config = read_config(out).model_dump()
    differ = [f"{section}.{key} = {config[section][key]!r} (this campaign: {value!r})"
              for section, values in settings.items() for key, value in values.items()
              if config[section][key] != value]
    if differ:
        raise ValueError(f"{out} holds another campaign, so --resume cannot continue it: {'; '.join(differ)}; "
                         "run without --resume to start over there, or choose another --out")


def _day_seconds(out: Path, day: int) -> float:
    """Wall time of a day's finished stages, from their markers (so a resumed campaign counts every day)."""
    folder = day_folder(out, day)
    return float(sum(read_json(layout.marker_path(folder, stage)).get("seconds", 0.0) for stage in layout.STAGES
                     if layout.marker_path(folder, stage).exists()))


def compute_validation_targets(summary: dict, categories: dict, records_by_day: dict[int, list[dict]]) -> dict:
    """The four targets (module docstring) from a run's numbers.

    ``summary``: :func:`closedloop.demos.loop.compute_demo_summary`; ``categories``:
    :func:`analysis.categories.compute_category_preference` of the last day alone;
    ``records_by_day``: ``{day: sensitivity.json rows}``. Each target: the measured values and
    ``met`` (bool).
    """
    attacks = [r for rows in records_by_day.values() for r in rows if r["kind"] == "attack" and r.get("truth") is not None]
    noise_free_over = [r for r in attacks if r.get("expected") is not None and r["expected"] > r["truth"] + 1e-6]
    measured_over = [r for r in attacks if r["estimate"] > r["truth"] + 2 * (r["sem"] or 0.0)]
    fraction_over = len(measured_over) / len(attacks) if attacks else None
    lower_bound = {"n_records": len(attacks), "n_noise_free_above_truth": len(noise_free_over),
                   "n_measured_above_truth_beyond_2_se": len(measured_over), "fraction_above": fraction_over,
                   "met": bool(attacks) and not noise_free_over and fraction_over <= 0.05}
    smallest = min(summary["growth"], key=float)
    g = summary["growth"][smallest]
    first, last = g["first"], g["last"]
    difference_se = float(np.hypot(first["sem"] or 0.0, last["sem"] or 0.0))
    ratio = last["estimate"] / first["estimate"] if first["estimate"] > 0 else None
    growth = {"eps": float(smallest), "first_day": g["first_day"], "last_day": g["last_day"],
              "first": first["estimate"], "first_sem": first["sem"], "last": last["estimate"], "last_sem": last["sem"],
              "fold_change": ratio, "difference_in_se": (last["estimate"] - first["estimate"]) / difference_se
              if difference_se > 0 else None}
    growth["met"] = bool(ratio is not None and ratio >= 2 and growth["difference_in_se"] is not None
                         and growth["difference_in_se"] > 2)
    last_day = summary["by_day"][max(summary["by_day"])]
    beats = {}
    for eps, cell in last_day["attack"].items():
        baselines = {kind: last_day[kind][eps]["estimate"] for kind in ("gaussian", "interpolation") if eps in last_day[kind]}
        ratios = {kind: cell["estimate"] / value if value > 0 else None for kind, value in baselines.items()}
        beats[eps] = {"attack": cell["estimate"], **baselines,
                      "met": cell["estimate"] > 0 and all(cell["estimate"] >= 3 * max(v, 0.0) for v in baselines.values()),
                      "ratios": ratios}
    crossing = categories["crossing"]
    largest = max(float(eps) for eps in last_day["attack"])
    n_super = sum(r["super_stimulus"] for r in crossing if r["max_eps"] == largest)
    super_stimuli = {"eps": largest, "n_sites": len(crossing), "n_super_stimulus": int(n_super),
                     "met": bool(crossing) and n_super > len(crossing) / 2, **categories["summary"][0]}
    return {"lower_bound": lower_bound, "growth": growth,
            "attacks_beat_baselines": {"by_eps": beats, "met": all(b["met"] for b in beats.values())},
            "super_stimuli": super_stimuli}


def _write_figures(out: Path, days, data: NetworkData | None, sensitivity: dict, ceiling: dict,
                   categories: dict) -> dict[str, str]:
    """Fig. 1A (bound vs class ceiling vs truth vs network units, last day), Fig. 5 (progress), Fig. 2C
    (super-stimuli) as PNGs; ``data``: the network units (:func:`analysis.report_sections.compute_networks`),
    ``sensitivity``: :func:`analysis.report_sections.compute_sensitivity` of the last day,
    ``ceiling``: :func:`closedloop.demos.loop.compute_ceiling_summary` and ``categories``:
    :func:`analysis.categories.compute_category_preference` of the last day."""
    folder = out / "validation_figures"
    folder.mkdir(exist_ok=True)
    last = days[-1]
    truth = _normalised_truth(last.records)
    normalised_ceiling = [{"eps": float(eps), "mean": c["ceiling_normalized"]} for eps, c in ceiling.items()
                          if c["ceiling_normalized"] is not None]
    figures = {"fig1a": make_networks_figure(data, sensitivity["curves"]["mean"], last.day, truth=truth,
                                             ceiling=normalised_ceiling),
               "fig5": make_progress_figure(compute_progress({d.day: d.records for d in days})),
               # the sites with increase attacks on non-preferred images (all, unless a site saw few images)
               "fig2c": make_categories_figure(categories, sorted({r["site"] for r in categories["crossing"]})[:8],
                                               last.window_length_s)}
    paths = {}
    for name, figure in figures.items():
        paths[name] = str(folder / f"{name}.png")
        figure.savefig(paths[name], dpi=90, bbox_inches="tight")
    return paths


def compute_fig1a_position(bound: list[dict], units: list[dict], robust: str, standard: str) -> dict:
    """Where the sites' bound lies between two networks' units (the paper's Fig. 1A: between
    AT-ResNet-50 and ResNet-50 units, nearer the former).

    ``bound``: the last day's mean normalised bound per ε (rows of ``eps``, ``mean``); ``units``:
    rows of ``network``, ``eps``, ``mean`` (mean normalised white-box sensitivity of its units,
    :func:`analysis.network_units.compute_network_sensitivity`, the same pixel budgets);
    ``robust`` / ``standard``: the two networks' labels. Per ε the log-scale position
    log(bound / robust) / log(standard / robust): 0 at the robust units, 1 at the standard ones;
    undefined (None) where a value is ≤ 0 or the two networks are equal. Returns ``by_eps``,
    ``position`` (mean over the defined ε) and ``met`` (0 ≤ position ≤ 0.5).
    """
    value = {(row["network"], float(row["eps"])): row["mean"] for row in units}
    by_eps = {}
    for row in bound:
        eps = float(row["eps"])
        b, r, v = row["mean"], value.get((robust, eps)), value.get((standard, eps))
        defined = None not in (b, r, v) and min(b, r, v) > 0 and v != r
        by_eps[format(eps, "g")] = {"bound": b, "robust": r, "standard": v,
                                    "position": float(np.log(b / r) / np.log(v / r)) if defined else None}
    positions = [c["position"] for c in by_eps.values() if c["position"] is not None]
    position = float(np.mean(positions)) if positions else None
    return {"by_eps": by_eps, "position": position, "met": position is not None and 0.0 <= position <= 0.5}


def _normalised_truth(records: list[dict]) -> list[dict]:
    """Mean over sites of truth / σ per ε (the twin's white-box sensitivity, the bound's units)."""
    rows = [r for r in records if r["kind"] == "attack" and r.get("truth") is not None and r["sigma"]]
    return [{"eps": eps, "mean": float(np.mean([r["truth"] / r["sigma"] for r in rows if r["eps"] == eps]))}
            for eps in sorted({r["eps"] for r in rows})]


def run_validation(out: str | Path = "daily_runs/validate", *, n_days: int = 6, n_sites: int = 21, steps: int = 20,
                   cache: str | Path | None = None, device: str = "cpu", resume: bool = False) -> dict:
    """Run the validation campaign into a fresh experiment ``out``; return its summary (also written to
    ``out/validation.json``).

    ``n_days``: day 0 plus ``n_days − 1`` refitted days (paper: 6); ``n_sites``: 21 in the paper;
    ``steps``: PGD steps of the loop's attacks (docs/attacks.md: 20 reach ≥ 95% of the 100-step
    objective); ``cache``: folder of the embedded networks (default: ``cache`` beside ``out``).
    ``resume``: continue the campaign already in ``out`` (its finished stages are kept; refused,
    naming the keys, when its settings differ) instead of starting over. One process at a time
    runs a campaign or a day in ``out`` (``OUT.lock`` beside it, which ``fit-day`` takes too; a second
    campaign, or a ``fit-day`` in ``out``, is refused with :class:`~closedloop.core.lock.LockedError`
    naming the holder, before anything is touched).
    The summary holds ``targets`` (:func:`compute_validation_targets`), the loop summary
    (``by_day``, ``growth``, …), ``figures`` (PNG paths), ``report`` and ``seconds``: ``days`` (each
    day's stages, from their markers, so a resumed campaign counts every day), ``analysis`` (report
    and figures), ``total`` (their sum) and ``wall`` (this call, with the first training of the
    embedded networks).
    """
    out = Path(out)
    n_days = check_integer("n_days", n_days, minimum=2)
    changes = {"sites": {"n_sites": check_integer("n_sites", n_sites, minimum=1)},
               "attack": {"steps": check_integer("steps", steps, minimum=1)}}
    start = time.monotonic()
    out.parent.mkdir(parents=True, exist_ok=True)
    # one campaign per folder: a second one would delete this one's days (or analyse them twice)
    with hold_lock(layout.experiment_lock_path(out), what=f"the experiment {out}", remove=True, nested=True):
        standard = _prepare(out, Path(cache) if cache is not None else out.parent / "cache", changes, resume=resume)
        for day in range(n_days):
            logger.info("validate: day %d of %d", day, n_days - 1)
            # the last day's refit would fit a model no day uses (about 13 min at the paper's protocol here)
            run_day(out, day, rig=RigLauncher(), until="estimate" if day == n_days - 1 else None)
        result = analyse_validation(out, n_days, standard, device=device)
        result["seconds"]["wall"] = time.monotonic() - start
        write_json(out / SUMMARY_NAME, result)
    return result


def analyse_validation(out: str | Path, n_days: int, standard: str | Path, *, device: str = "cpu") -> dict:
    """The campaign's analysis on its days 0..``n_days`` − 1 (the last one estimated; its refit
    and day report are not needed): the result of :func:`run_validation` without ``seconds.wall``,
    not yet written. ``standard``: the standard network of the base model's family, for Fig. 1A
    and the report's section 5."""
    out = Path(out)
    day_seconds = [_day_seconds(out, day) for day in range(n_days)]
    analysis_start = time.monotonic()
    summary = compute_demo_summary(out, n_days)
    days = read_experiment(out)
    last = days[-1]
    categories = compute_category_preference([last.responses], window_length_s=last.window_length_s)
    targets = compute_validation_targets(summary, categories, {d.day: d.records for d in days})
    networks = NetworkOptions(networks=[read_config(out).model.backbone, str(standard)], n_units=8, n_images=4,
                              n_starts=1, n_steps=20)
    ceiling = compute_ceiling_summary(out, last.day, device=device)
    report = write_report(out, networks=networks, device=device)
    sensitivity = compute_sensitivity(last)
    data = compute_networks(out, days, networks, seed=0, device=device)
    labels = list(data.sources)  # the base model's, then the standard's (one label when both are the same network)
    targets["fig1a"] = compute_fig1a_position(sensitivity["curves"]["mean"], data.result["mean"], labels[0], labels[-1])
    figures = _write_figures(out, days, data, sensitivity, ceiling, categories)
    result = {"targets": targets, **summary, "class_ceiling": ceiling, "report": report["html"], "figures": figures,
              "seconds": {"days": day_seconds, "analysis": time.monotonic() - analysis_start}}
    result["seconds"]["total"] = sum(day_seconds) + result["seconds"]["analysis"]
    return result


def format_validation(result: dict) -> str:
    """The targets of :func:`run_validation`'s result, one line each, with the measured values; every
    ε as the attacks' pixel ε and the paper's (``eps_paper``)."""
    t, seconds = result["targets"], result["seconds"]
    b, g, s = t["lower_bound"], t["growth"], t["super_stimuli"]
    paper = result.get("eps_paper", {})

    def eps(value) -> str:
        shown = paper.get(str(float(value)))
        return f"eps={float(value):g}" + ("" if shown is None else f" (paper {shown:g})")

    fold = "-" if g["fold_change"] is None else f"{g['fold_change']:.2f}x"
    by_eps = "; ".join(
        f"{eps(e)}: {c['attack']:.2f} vs gaussian {c.get('gaussian', float('nan')):.2f}, "
        f"interpolation {c.get('interpolation', float('nan')):.2f}" for e, c in t["attacks_beat_baselines"]["by_eps"].items())
    mark = {True: "met", False: "NOT met"}
    lines = [
        f"closedloop validate: {len(seconds['days'])} days in {seconds['total']:.0f} s "
        f"({', '.join(f'{d:.0f}' for d in seconds['days'])} s per day)",
        f"lower bound: {b['n_noise_free_above_truth']} of {b['n_records']} noise-free bounds above truth; "
        f"{b['n_measured_above_truth_beyond_2_se']} measured above truth by > 2 s.e. -> {mark[b['met']]}",
        f"growth at {eps(g['eps'])}: day {g['first_day']} {g['first']:.2f} ± {g['first_sem']:.2f} -> day {g['last_day']} "
        f"{g['last']:.2f} ± {g['last_sem']:.2f} spikes/window ({fold}, difference "
        f"{g['difference_in_se'] or 0:.1f} s.e.; target >= 2x beyond 2 s.e.) -> {mark[g['met']]}",
        f"attacks >= 3x baselines on the last day: {by_eps} -> {mark[t['attacks_beat_baselines']['met']]}",
        f"super-stimuli at {eps(s['eps'])} on the last day: {s['n_super_stimulus']} of {s['n_sites']} sites -> "
        f"{mark[s['met']]}",
    ]
    if "fig1a" in t:
        f = t["fig1a"]
        cells = ", ".join(f"{eps(e)}: {'-' if c['position'] is None else format(c['position'], '.2f')}"
                          for e, c in f["by_eps"].items())
        shown = "-" if f["position"] is None else f"{f['position']:.2f}"
        lines.append(f"Fig. 1A: the last day's bound between the robust (0) and vanilla (1) units: position {shown} "
                     f"({cells}; target 0-0.5, nearer the robust) -> {mark[f['met']]}")
    lines += [*([format_ceiling(result["class_ceiling"], g["last_day"])] if result.get("class_ceiling") else []),
              f"figures: {', '.join(result['figures'].values())}",
              f"report: {result['report']}"]
    return "\n".join(lines)
