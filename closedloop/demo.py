"""The embedded demo: a whole experiment against the simulated rig, and what it shows.

``closedloop demo`` creates a fresh experiment (demo preset: embedded images, ``resnet_tiny``,
the simulated IT rig on loopback with CURVE keys made for the run), runs days 0..N−1 with
:func:`closedloop.day.run_day`, writes the experiment report, and summarises the three things the loop must show:

1. the realised lower bound at the smallest budget grows from day 1 to the last day;
2. model-guided attacks beat the Gaussian and interpolation baselines at every budget;
3. every site's estimate stays at or below its true sensitivity, within sampling error
   (estimate ≤ truth + 2 standard errors).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np

from closedloop.config import CONFIG_NAME, write_default_config
from closedloop.day import day_folder, run_day
from closedloop.files import read_json
from closedloop.logs import logger

__all__ = ["run_demo", "compute_demo_summary"]


def _prepare(out: Path) -> None:
    if out.exists():
        if not (out / CONFIG_NAME).exists():
            raise FileExistsError(f"{out} exists and is not a closedloop experiment; choose another --out")
        shutil.rmtree(out)
    write_default_config(out, preset="demo")


def compute_demo_summary(experiment: str | Path, n_days: int) -> dict:
    """The demo's claims checked on an experiment's ``sensitivity.json`` files.

    Returns ``by_day`` (per day and kind: mean estimate over sites per ε, and mean truth),
    ``growth`` (attack bound at the smallest ε on day 1 and on the last day, their ratio),
    ``attack_beats_baselines`` (per ε, pooled over days 1..: attack mean > each baseline's),
    and ``lower_bound`` (site×ε×day attack records: total, ≤ truth, > truth + 2 s.e.).
    """
    by_day, records_all = {}, []
    for day in range(n_days):
        records = read_json(day_folder(experiment, day) / "sensitivity.json")
        records_all += [{**r, "day": day} for r in records]
        table = {}
        for kind in ("attack", "gaussian", "interpolation"):
            rows = [r for r in records if r["kind"] == kind]
            budgets = sorted({r["eps"] for r in rows})
            table[kind] = {str(e): float(np.mean([r["estimate"] for r in rows if r["eps"] == e])) for e in budgets}
        truth_rows = [r for r in records if r["kind"] == "attack" and r["truth"] is not None]
        table["truth"] = {str(e): float(np.mean([r["truth"] for r in truth_rows if r["eps"] == e]))
                          for e in sorted({r["eps"] for r in truth_rows})}
        by_day[day] = table
    smallest = str(min(float(e) for e in by_day[0]["attack"]))
    later = [r for r in records_all if r["day"] >= 1] or records_all
    beats = {}
    for eps in sorted({r["eps"] for r in later}):
        mean = {k: float(np.mean([r["estimate"] for r in later if r["kind"] == k and r["eps"] == eps]))
                for k in ("attack", "gaussian", "interpolation") if any(r["kind"] == k and r["eps"] == eps for r in later)}
        beats[str(eps)] = {"means": mean, "attack_beats_all": all(mean["attack"] > v for k, v in mean.items() if k != "attack")}
    attacks = [r for r in records_all if r["kind"] == "attack" and r["truth"] is not None]
    over = [r for r in attacks if r["estimate"] > r["truth"] + 2 * (r["sem"] or 0.0)]
    first, last = (1, n_days - 1) if n_days > 2 else (0, n_days - 1)
    growth = {"eps": float(smallest), "first_day": first, "last_day": last,
              "first": by_day[first]["attack"][smallest], "last": by_day[last]["attack"][smallest]}
    growth["ratio"] = growth["last"] / growth["first"] if growth["first"] > 0 else None
    return {
        "by_day": by_day,
        "growth": growth,
        "attack_beats_baselines": beats,
        "lower_bound": {"n_records": len(attacks), "n_at_or_below_truth": sum(r["estimate"] <= r["truth"] for r in attacks),
                        "n_above_truth_beyond_2_se": len(over)},
    }


def _render(summary: dict, seconds: float, out: Path) -> str:
    lines = [f"closedloop demo: {out} ({seconds:.0f} s)", "",
             "mean lower bound over sites, spikes per window (truth: simulated rig's white-box sensitivity)"]
    budgets = list(summary["by_day"][0]["attack"])
    lines.append(f"{'day':>4} {'kind':<14}" + "".join(f"{'eps=' + b:>11}" for b in budgets))
    for day, table in summary["by_day"].items():
        for kind in ("attack", "gaussian", "interpolation", "truth"):
            values = table.get(kind, {})
            lines.append(f"{day:>4} {kind:<14}" + "".join(f"{values.get(b, float('nan')):>11.3f}" for b in budgets))
    g = summary["growth"]
    lines += ["", f"growth at eps={g['eps']:g}: day {g['first_day']} {g['first']:.3f} -> day {g['last_day']} {g['last']:.3f}"
              + (f" (x{g['ratio']:.2f})" if g["ratio"] else "")]
    for eps, result in summary["attack_beats_baselines"].items():
        means = ", ".join(f"{k} {v:.3f}" for k, v in result["means"].items())
        lines.append(f"eps={eps}: {means} -> attack beats baselines: {'yes' if result['attack_beats_all'] else 'NO'}")
    b = summary["lower_bound"]
    lines.append(f"lower bound: {b['n_at_or_below_truth']}/{b['n_records']} site x eps x day estimates <= truth; "
                 f"{b['n_above_truth_beyond_2_se']} above truth by more than 2 s.e.")
    lines.append(f"report: {summary['report']} (and {out}/day_NNN/report.html per day)")
    return "\n".join(lines)


def run_demo(out: str | Path = "daily_runs/demo", *, n_days: int = 4) -> dict:
    """Create a fresh demo experiment in ``out`` and run ``n_days`` days. Returns summary and text."""
    out = Path(out)
    start = time.monotonic()
    _prepare(out)
    for day in range(n_days):
        logger.info("demo: day %d of %d", day, n_days - 1)
        run_day(out, day)
    summary = compute_demo_summary(out, n_days)
    from analysis.report import write_report

    report = write_report(out)
    summary["report"] = str(report["html"])
    seconds = time.monotonic() - start
    return {"summary": {**summary, "seconds": seconds}, "text": _render(summary, seconds, out)}
