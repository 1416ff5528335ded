"""The embedded demo: a whole experiment against the simulated rig, and what it shows.

``closedloop demo`` creates a fresh experiment (demo preset: embedded images; base model the
adversarially trained ``resnet_tiny`` of the embedded behavioural default (L2 ε = 3, 56 px
inside), trained once into the cache folder, as the paper's base model is an adversarially
trained network; the simulated IT rig on loopback, the twin calibrated to the paper (its sites
read that base network mixed with a non-robust one, docs/riglink.md), with CURVE keys made for
the run), runs days 0..N−1 with :func:`closedloop.day.runner.run_day` on a set number of torch
threads, summarises what the loop must show (:func:`compute_demo_summary`) and how far the last
day's bound lies from what its model class allows (:func:`compute_ceiling_summary`), runs the probes and
the base selection small (:func:`_run_probes`) and writes the experiment report with every
section. The summary checks each claim against the simulated monkey's known truth:

1. the model learns the sites: the fraction of attacks whose predicted direction was the true
   one rises from day 0 (random readout), and the bound (and its noise-free value, the
   estimator on the sites' expected counts) grows from the first refitted day to the last; the
   measured bound follows the noise-free value within its standard error;
2. model-guided attacks beat the Gaussian and interpolation baselines, pooled over days 1..,
   by more than 2 standard errors of the difference, and the smallest budget's bound on the
   last day is more than 2 standard errors above zero;
3. every site's estimate stays at or below its true sensitivity, within sampling error
   (estimate ≤ truth + 2 standard errors).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import torch

from analysis.report import write_report, write_selection_report
from closedloop.behavior.models import make_embedded_classifier
from closedloop.config import CONFIG_NAME, read_config, write_default_config
from closedloop.core.files import read_json
from closedloop.core.logs import logger
from closedloop.core.validation import check_integer
from closedloop.data import layout
from closedloop.data.layout import day_folder
from closedloop.day.runner import run_day
from closedloop.probes.evolution import EvolutionSettings
from closedloop.probes.run import write_evolution, write_geometry, write_patterns
from rigs.launch import RigLauncher
from rigs.truth import compute_day_class_ceiling

__all__ = ["run_demo", "compute_demo_summary", "compute_ceiling_summary", "format_ceiling"]

_MOST_ABOVE_TRUTH = 0.05  # at most this fraction of the estimates may lie above truth + 2 s.e.
_CLAIMS = {
    "attacks_beat_baselines": "attacks beyond 2 s.e. above both baselines at every budget (days 1.. pooled)",
    "smallest_budget_above_zero": "the smallest budget's bound on the last day more than 2 s.e. above zero",
    "noise_free_bound_grows": "the noise-free bound growing from the first refitted day to the last at every budget",
    "valid_bound": "no more than 5% of the estimates above truth + 2 s.e.",
}


def _prepare(out: Path, cache: Path) -> None:

    if out.exists() and not (out / CONFIG_NAME).exists():
        raise FileExistsError(f"{out} exists and is not a closedloop experiment; choose another --out")
    base = make_embedded_classifier("robust", cache)
    if out.exists():
        shutil.rmtree(out)
    write_default_config(out, preset="demo", changes={"model": {"backbone": str(base.resolve())}})


def _mean_over_sites(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return float(np.mean(values)) if values else None


def _sem_over_sites(rows: list[dict]) -> float | None:
    """Standard error of the mean over sites of per-site estimates with standard errors ``sem``."""
    sems = [r["sem"] for r in rows if r.get("sem") is not None]
    return float(np.sqrt(np.sum(np.square(sems))) / len(sems)) if len(sems) == len(rows) and rows else None


def _difference_in_se(a: float, sem_a: float | None, b: float, sem_b: float | None) -> float | None:
    """(a − b) in standard errors of the difference of two independent means; None without both s.e."""
    if sem_a is None or sem_b is None or np.hypot(sem_a, sem_b) == 0:
        return None
    return float((a - b) / np.hypot(sem_a, sem_b))


def compute_demo_summary(experiment: str | Path, n_days: int) -> dict:
    """The demo's claims checked on an experiment's ``sensitivity.json`` files.

    Returns, all in spikes per response window:

    - ``by_day``: per day, kind and ε: ``estimate`` (mean over sites) and its ``sem``; for
      attacks also ``expected`` (the estimator on the simulated sites' noise-free counts),
      ``direction_right`` (fraction of attacks whose predicted direction was the true one) and
      ``truth`` (mean true white-box sensitivity);
    - ``growth``: per ε, the attack estimate (± s.e.) and its noise-free value on the first
      refitted day (day 1; day 0 when there is only one more) and on the last day;
    - ``attack_beats_baselines``: per ε, pooled over days 1..: each kind's mean estimate over
      site × day records (``means``) and its s.e. (``sems``), the attack's lead over each baseline
      in s.e. of the difference (``difference_in_se``), whether the attack's mean exceeds every
      baseline's (``attack_beats_all``) and by more than 2 s.e. (``significant``);
    - ``smallest_last_day``: the attack bound at the smallest ε on the last day, its s.e., how
      many s.e. above zero and whether more than 2;
    - ``lower_bound``: site × ε × day attack records: total, ≤ truth, > truth + 2 s.e.;
    - ``claims``: the issue's four, each True or False: ``attacks_beat_baselines`` (beyond 2 s.e.
      at every ε), ``smallest_budget_above_zero``, ``noise_free_bound_grows`` (first to last day at
      every ε) and ``valid_bound`` (at most 5% of the records above truth + 2 s.e.);
    - ``eps_paper``: per ε key (pixel units) the paper-equivalent budget of its records
      (ε ÷ ``[attack] paper_scale``; ε itself for records written before that key existed).
    """
    by_day, records_all = {}, []
    for day in range(n_days):
        records = read_json(day_folder(experiment, day) / layout.SENSITIVITY)
        records_all += [{**r, "day": day} for r in records]
        table = {}
        for kind in ("attack", "gaussian", "interpolation"):
            rows = [r for r in records if r["kind"] == kind]
            table[kind] = {}
            for eps in sorted({r["eps"] for r in rows}):
                chosen = [r for r in rows if r["eps"] == eps]
                cell = {"estimate": _mean_over_sites(chosen, "estimate"), "sem": _sem_over_sites(chosen)}
                if kind == "attack":
                    cell |= {key: _mean_over_sites(chosen, key) for key in ("expected", "direction_right", "truth")}
                table[kind][str(eps)] = cell
        by_day[day] = table
    first, last = (1, n_days - 1) if n_days > 2 else (0, n_days - 1)
    growth = {
        eps: {"first_day": first, "last_day": last, "first": by_day[first]["attack"][eps], "last": by_day[last]["attack"][eps]}
        for eps in by_day[0]["attack"]
    }
    later = [r for r in records_all if r["day"] >= 1] or records_all
    beats = {}
    for eps in sorted({r["eps"] for r in later}):
        pooled = {k: [r for r in later if r["kind"] == k and r["eps"] == eps] for k in ("attack", "gaussian", "interpolation")}
        mean = {k: float(np.mean([r["estimate"] for r in rows])) for k, rows in pooled.items() if rows}
        sem = {k: _sem_over_sites(rows) for k, rows in pooled.items() if rows}
        apart = {k: _difference_in_se(mean["attack"], sem["attack"], mean[k], sem[k]) for k in mean if k != "attack"}
        beats[str(eps)] = {"means": mean, "sems": sem, "difference_in_se": apart,
                           "attack_beats_all": all(mean["attack"] > v for k, v in mean.items() if k != "attack"),
                           "significant": bool(apart) and all(d is not None and d > 2 for d in apart.values())}
    smallest = min(by_day[n_days - 1]["attack"], key=float)
    cell = by_day[n_days - 1]["attack"][smallest]
    above_zero = cell["estimate"] / cell["sem"] if cell["sem"] else None
    attacks = [r for r in records_all if r["kind"] == "attack" and r["truth"] is not None]
    over = [r for r in attacks if r["estimate"] > r["truth"] + 2 * (r["sem"] or 0.0)]
    for g in growth.values():
        g["noise_free_grows"] = None if g["first"]["expected"] is None else g["last"]["expected"] > g["first"]["expected"]
    lower_bound = {"n_records": len(attacks), "n_at_or_below_truth": sum(r["estimate"] <= r["truth"] for r in attacks),
                   "n_above_truth_beyond_2_se": len(over)}
    smallest_last = {"eps": float(smallest), "day": n_days - 1, "estimate": cell["estimate"], "sem": cell["sem"],
                     "above_zero_in_se": above_zero, "significant": above_zero is not None and above_zero > 2}
    return {
        "eps_paper": {str(r["eps"]): r.get("eps_paper", r["eps"]) for r in records_all},
        "by_day": by_day,
        "growth": growth,
        "attack_beats_baselines": beats,
        "smallest_last_day": smallest_last,
        "lower_bound": lower_bound,
        "claims": {
            "attacks_beat_baselines": all(b["significant"] for b in beats.values()),
            "smallest_budget_above_zero": smallest_last["significant"],
            "noise_free_bound_grows": all(g["noise_free_grows"] for g in growth.values()),
            "valid_bound": bool(attacks) and len(over) <= _MOST_ABOVE_TRUTH * len(attacks),
        },
    }


def _cell(value: float | None, sem: float | None = None, *, percent: bool = False) -> str:
    if value is None:
        return f"{'-':>15}"
    if percent:
        return f"{100 * value:>14.0f}%"
    return f"{value:>8.2f} ± {sem:<4.2f}" if sem is not None else f"{value:>8.2f}       "


def compute_ceiling_summary(experiment: str | Path, day: int, *, device="cpu") -> dict:
    """Where a simulated day's bound stands between what the loop's model class allows and the truth.

    Per ε (key ``str(eps)``), means over the attacked sites, spikes per window: ``noise_free``
    (the loop's bound on the sites' expected counts), ``ceiling`` (the same estimator had the best
    model of the loop's class made the attacks: :func:`rigs.truth.compute_day_class_ceiling`,
    seed 0) and ``truth`` (white-box); ``ceiling_normalized``: mean over sites of ceiling / σ (the
    bound's normalisation, for Fig. 1A; None where no site has a σ). Validation only (the simulated rig's sites).
    """
    folder = day_folder(experiment, day)
    config = read_config(folder / layout.CONFIG)
    ceiling = compute_day_class_ceiling(config, folder / layout.STORE, seed=0, device=device)
    return _summarise_ceiling(read_json(folder / layout.SENSITIVITY), ceiling)


def _summarise_ceiling(records: list[dict], ceiling: dict) -> dict:
    """:func:`compute_ceiling_summary` from a day's ``sensitivity.json`` records and its
    ``{(site, eps): ceiling}``; ``ceiling_normalized`` is None where no site has a σ."""
    rows = [r for r in records if r["kind"] == "attack" and (r["site"], r["eps"]) in ceiling]
    summary = {}
    for eps in sorted({r["eps"] for r in rows}):
        chosen = [r for r in rows if r["eps"] == eps]
        normalized = [ceiling[(r["site"], eps)] / r["sigma"] for r in chosen if r["sigma"]]
        summary[str(eps)] = {
            "noise_free": _mean_over_sites(chosen, "expected"),
            "ceiling": float(np.mean([ceiling[(r["site"], eps)] for r in chosen])),
            "truth": _mean_over_sites(chosen, "truth"),
            "ceiling_normalized": float(np.mean(normalized)) if normalized else None,
        }
    return summary


def format_ceiling(ceiling: dict, day: int) -> str:
    """One line per ε of :func:`compute_ceiling_summary`: the loop's noise-free bound, the class ceiling, the truth."""
    lines = [f"model class on day {day}, noise-free: the loop's bound / the best model of its class (the base network, "
             "perfect readout) / truth, spikes per window"]
    lines += [f"  eps={eps}: {c['noise_free']:.2f} / {c['ceiling']:.2f} / {c['truth']:.2f}" for eps, c in ceiling.items()]
    return "\n".join(lines)


def _render(summary: dict, seconds: float, out: Path) -> str:
    budgets = list(summary["by_day"][0]["attack"])
    lines = [f"closedloop demo: {out} ({seconds:.0f} s, torch threads: {summary['threads']})", "",
             "Lower bound on the sites' sensitivity, mean over sites (± s.e.), spikes per response window",
             f"{'day':>4}  {'':<16}" + "".join(f"{'eps=' + format(float(b), 'g'):>15}" for b in budgets),
             f"{'':>4}  {'':<16}" + "".join(f"{'eps_paper=' + format(summary['eps_paper'][b], 'g'):>15}" for b in budgets)]
    for day, table in summary["by_day"].items():
        rows = [(kind, {b: _cell(c["estimate"], c["sem"]) for b, c in table[kind].items()})
                for kind in ("attack", "gaussian", "interpolation")]
        attack = table["attack"]
        if any(c.get("truth") is not None for c in attack.values()):
            rows += [("noise-free", {b: _cell(c["expected"]) for b, c in attack.items()}),
                     ("right direction", {b: _cell(c["direction_right"], percent=True) for b, c in attack.items()}),
                     ("truth", {b: _cell(c["truth"]) for b, c in attack.items()})]
        for i, (label, cells) in enumerate(rows):
            lines.append(f"{day if i == 0 else '':>4}  {label:<16}" + "".join(cells.get(b, _cell(None)) for b in budgets))
    lines += ["", "attack: model-guided attacks; noise-free: the same estimator on the simulated sites' expected counts;",
              "right direction: attacks whose predicted direction was the true one; truth: white-box sensitivity;",
              "eps: L2 budget in [0, 1] pixel units; eps_paper = eps / [attack] paper_scale, the paper's equivalent.", ""]
    right = {day: [c["direction_right"] for c in table["attack"].values() if c.get("direction_right") is not None]
             for day, table in summary["by_day"].items()}
    if all(right.values()):
        lines.append("model learns: right direction " + " -> ".join(f"day {d} {100 * np.mean(v):.0f}%" for d, v in right.items())
                     + " (mean over budgets)")
    for eps, g in summary["growth"].items():
        first, last = g["first"], g["last"]
        noise_free = (f"; noise-free {first['expected']:.2f} -> {last['expected']:.2f}"
                      if first.get("expected") is not None else "")
        lines.append(f"bound at eps={eps}: day {g['first_day']} {first['estimate']:.2f} ± {first['sem'] or 0:.2f} -> day "
                     f"{g['last_day']} {last['estimate']:.2f} ± {last['sem'] or 0:.2f}{noise_free}")
    for eps, result in summary["attack_beats_baselines"].items():
        means = ", ".join(f"{k} {v:.2f} ± {result['sems'][k] or 0:.2f}" for k, v in result["means"].items())
        apart = ", ".join(f"{k} by {'-' if d is None else format(d, '.1f')} s.e."
                          for k, d in result["difference_in_se"].items())
        lines.append(f"eps={eps} (days 1..): {means} -> attack above {apart}; beyond 2 s.e.: "
                     f"{'yes' if result['significant'] else 'NO'}")
    low = summary["smallest_last_day"]
    lines.append(f"bound at the smallest budget on the last day: eps={low['eps']:g} day {low['day']} {low['estimate']:.2f} ± "
                 f"{low['sem'] or 0:.2f}, {low['above_zero_in_se'] or 0:.1f} s.e. above zero: "
                 f"{'yes' if low['significant'] else 'NO'}")
    if summary.get("class_ceiling"):
        lines.append(format_ceiling(summary["class_ceiling"], max(summary["by_day"])))
    b = summary["lower_bound"]
    lines.append(f"lower bound: {b['n_at_or_below_truth']}/{b['n_records']} site x eps x day estimates <= truth; "
                 f"{b['n_above_truth_beyond_2_se']} above truth by more than 2 s.e.")
    claims = summary["claims"]
    lines += ["claims:"] + [f"  {_CLAIMS[name]}: {'met' if met else 'NOT MET'}" for name, met in claims.items()]
    if summary["probe_seconds"]:
        lines.append("probes for the report: " + ", ".join(f"{k} {v:.0f} s" for k, v in summary["probe_seconds"].items()))
    lines.append(f"report: {summary['report']} (and {out}/day_NNN/report.html per day)")
    return "\n".join(lines)


def _run_probes(out: Path) -> dict[str, float]:
    """The probes and the base selection on the demo's experiment, small, so that its report has
    every section: evolved images (in silico), adversarial patterns, response geometry, and the
    base model against a random-weight network of its architecture. Returns seconds per probe."""
    base = read_config(out).model.backbone
    steps = {
        "evolve": lambda: write_evolution(out, EvolutionSettings(n_generations=6, n_children=8, seed=0), overwrite=True),
        "patterns": lambda: write_patterns(out, n_images=16, n_aai=4, n_noise=4, n_steps=10),
        "geometry": lambda: write_geometry(out, n_images=2, n_grid=9, n_path=3, n_steps=5),
        "select-base": lambda: write_selection_report(out, [base, "resnet_tiny"], ["layer3.0", "layer4.0"], n_images=48,
                                                      n_pairs=48),
    }
    seconds = {}
    for name, step in steps.items():
        logger.info("demo: %s", name)
        began = time.monotonic()
        step()
        seconds[name] = time.monotonic() - began
    return seconds


def run_demo(out: str | Path = "daily_runs/demo", *, n_days: int = 4, cache: str | Path | None = None,
             threads: int = 2, probes: bool = True) -> dict:
    """Create a fresh demo experiment in ``out`` and run ``n_days`` days. Returns summary and text.

    ``cache``: folder of the embedded classifiers (default: ``cache`` beside ``out``, which the
    behavioural pipeline's default config shares); the base model is trained there on first use.
    ``threads``: torch's threads for the whole run; the demo's numbers are the same on every run
    with the same thread count (a different count changes the order of floating-point sums, so
    the numbers move within their errors). ``probes``: end with :func:`_run_probes`.
    """
    out = Path(out)
    threads = check_integer("threads", threads, minimum=1)
    torch.set_num_threads(threads)
    start = time.monotonic()
    _prepare(out, Path(cache) if cache is not None else out.parent / "cache")
    for day in range(n_days):
        logger.info("demo: day %d of %d", day, n_days - 1)
        run_day(out, day, rig=RigLauncher())
    summary = compute_demo_summary(out, n_days)
    logger.info("demo: the model class's ceiling on day %d", n_days - 1)
    summary["class_ceiling"] = compute_ceiling_summary(out, n_days - 1)
    summary["probe_seconds"] = _run_probes(out) if probes else {}
    report = write_report(out)
    summary["report"] = str(report["html"])
    summary["threads"] = threads
    seconds = time.monotonic() - start
    return {"summary": {**summary, "seconds": seconds}, "text": _render(summary, seconds, out)}
