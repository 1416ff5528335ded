"""The behavioural report page (``closedloop behavior report``): people vs guides vs surrogates.

One self-contained HTML page (figures embedded, :mod:`analysis.html`) plus CSV tables beside it,
from a built task folder with saved results; the numbers come from :mod:`analysis.behavior`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from analysis.behavior import (
    BehaviorData,
    compute_choice_probabilities,
    compute_confusion,
    compute_detection_rates,
    compute_mtme_table,
    compute_rates,
    compute_timing_summary,
    lapse_rate,
    read_behavior_data,
)
from analysis.html import make_figure, render_figure, render_links, render_table, write_csv, write_page

__all__ = ["write_behavior_report"]

_PEOPLE_COLOR = "#111111"


def _curve_panels(rates: list[dict], measure: str, modes: tuple[str, ...]) -> list[tuple[str, str]]:
    return sorted({(r["mode"], r["guide"]) for r in rates if r["measure"] == measure and r["mode"] in modes},
                  key=lambda key: (modes.index(key[0]), key[1]))


def _plot_curves(rates: list[dict], measure: str, modes: tuple[str, ...], chance: float | None, ylabel: str):
    panels = _curve_panels(rates, measure, modes)
    figure, axes = make_figure(width=3.6 * max(len(panels), 1), height=3.4, ncols=max(len(panels), 1))
    axes = np.atleast_1d(axes)
    models = sorted({r["observer"] for r in rates if r["observer"] != "people"})
    colors = dict(zip(models, ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"] * 4))
    for axis, (mode, guide) in zip(axes, panels):
        rows = [r for r in rates if (r["measure"], r["mode"], r["guide"]) == (measure, mode, guide)]
        for observer in ["people", *models]:
            points = sorted((r["budget"], r["rate"], r["low"], r["high"], r["role"]) for r in rows if r["observer"] == observer)
            if not points:
                continue
            budget, rate, low, high, role = (np.array(v) if k < 4 else v[0] for k, v in enumerate(zip(*points)))
            if observer == "people":
                axis.fill_between(budget, low, high, color=_PEOPLE_COLOR, alpha=0.15, linewidth=0)
                axis.plot(budget, rate, "o-", color=_PEOPLE_COLOR, linewidth=2.2, label="people (95% CI)")
            else:
                axis.plot(budget, rate, "s--" if role == "surrogate" else "^-", color=colors[observer], linewidth=1.3,
                          markersize=4, label=f"{observer} ({role})")
        if chance is not None:
            axis.axhline(chance * (2.5 if mode == "composite" else 1), color="#888", linestyle=":", linewidth=1,
                         label="chance" + (" (2-3 targets)" if mode == "composite" else ""))
        axis.set_title(f"{mode}" + (f", guide {guide}" if guide else ""), fontsize=10)
        axis.set_xlabel("budget ε (L2, [0,1] pixels)")
        axis.set_ylim(-0.05, 1.05)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel(ylabel)
    axes[-1].legend(fontsize=7, loc="upper left")
    return figure


def _plot_confusions(data: BehaviorData, probabilities: np.ndarray):
    guides = sorted({r["guide"] for r in data.items if r["mode"] == "disrupt"})
    top = max((r["budget"] for r in data.items if r["mode"] == "disrupt"), default=0.0)
    panels = [("control", "", 0.0, "clean images")] + [("disrupt", g, top, f"disrupt, guide {g}, ε = {top:g}") for g in guides]
    figure, axes = make_figure(width=3.7 * len(panels), height=3.9, ncols=len(panels))
    axes = np.atleast_1d(axes)
    names = data.category_names
    for axis, (mode, guide, budget, title) in zip(axes, panels):
        matrix = compute_confusion(data, probabilities, mode=mode, guide=guide, budget=budget)
        image = axis.imshow(np.clip(matrix, 0, 1), vmin=0, vmax=1, cmap="Greys")
        for (row, column), value in np.ndenumerate(matrix):
            if np.isfinite(value) and value >= 0.05:
                axis.text(column, row, f"{value:.2f}"[1:] if value < 1 else "1", ha="center", va="center", fontsize=6,
                          color="white" if value > 0.5 else "black")
        axis.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
        axis.set_yticks(range(len(names)), names, fontsize=7)
        axis.set_xlabel("reported")
        axis.set_title(title, fontsize=9)
    axes[0].set_ylabel("start category")
    figure.colorbar(image, ax=axes, shrink=0.7, label="report probability (lapse-corrected)")
    return figure


def _plot_detection(rows: list[dict]):
    figure, axis = make_figure(width=4.2, height=3.2)
    budgets = [r["budget"] for r in rows]
    axis.fill_between(budgets, [r["low"] for r in rows], [r["high"] for r in rows], color=_PEOPLE_COLOR, alpha=0.15, linewidth=0)
    axis.plot(budgets, [r["detection"] for r in rows], "o-", color=_PEOPLE_COLOR, label="detection (bias-corrected)")
    axis.plot(budgets, [r["proportion_correct"] for r in rows], "s--", color="#1f77b4", label="proportion correct (raw)")
    axis.axhline(0.5, color="#888", linestyle=":", linewidth=1)
    axis.set_xlabel("budget ε (L2, [0,1] pixels)")
    axis.set_ylim(-0.05, 1.05)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    return figure


def _summary(data: BehaviorData, mtme_rows: list[dict]) -> str:
    people = [r for r in mtme_rows if r["observer"] == "people"]
    lines = [f"{len(data.subjects)} categorisation subjects kept ({len(data.excluded)} left out at chance on catch trials), "
             f"{int(data.counts.sum())} test and reference reports on {int((data.counts.sum(axis=(0, 2)) > 0).sum())} images; "
             f"{len({r['subject'] for r in data.detection})} detection subjects, {len(data.detection)} trials."]
    if len(data.p_catch):
        lapse = lapse_rate(data.p_catch, len(data.category_names))
        lines.append(f"Lapse rate γ from catch trials: median {np.median(lapse):.3f} (range {lapse.min():.3f}–{lapse.max():.3f}).")
    for row in people:
        value = "never (≤ 10% up to ε = 30)" if row["mtme"] is None else f"ε = {row['mtme']:.2f}"
        lines.append(f"People's MTME, {row['mode']}" + (f" by guide {row['guide']}" if row["guide"] else "") + f": {value}.")
    return '<div class="summary">' + "<br>".join(lines) + "</div>"


def write_behavior_report(out: str | Path, *, html_path: str | Path | None = None, n_boot: int = 1000, seed: int = 0) -> dict:
    """Write the behavioural report of the built task folder ``out`` (with saved results).

    ``html_path``: the page [default: ``out/report/behavior.html``]; tables go to
    ``<stem>_tables/`` beside it. ``n_boot``: bootstrap resamples per CI. Returns ``html``,
    ``tables`` (paths), ``n_subjects``, ``rates`` (rows of :func:`analysis.behavior.compute_rates`),
    ``mtme`` (rows of :func:`analysis.behavior.compute_mtme_table`),
    ``detection`` (rows of :func:`analysis.behavior.compute_detection_rates`).
    """
    out = Path(out).expanduser()
    data = read_behavior_data(out)
    html_path = Path(html_path) if html_path is not None else out / "report" / "behavior.html"
    tables_dir = html_path.parent / f"{html_path.stem}_tables"
    rates = compute_rates(data, n_boot=n_boot, seed=seed)
    mtme_rows = compute_mtme_table(rates)
    detection = compute_detection_rates(data, n_boot=n_boot, seed=seed)
    timing = compute_timing_summary(data)
    probabilities = compute_choice_probabilities(data)
    lapse = lapse_rate(data.p_catch, len(data.category_names)) if len(data.p_catch) else []
    subjects = [{"subject": s, "p_catch": float(p), "lapse_rate": float(g)} for s, p, g in zip(data.subjects, data.p_catch, lapse)]
    tables = {name: write_csv(tables_dir / f"{name}.csv", rows)
              for name, rows in (("rates", rates), ("mtme", mtme_rows), ("detection", detection), ("timing", timing),
                                 ("subjects", subjects)) if rows}
    link = lambda *names: render_links([tables[n] for n in names if n in tables], html_path.parent)  # noqa: E731
    sections = [("Summary", _summary(data, mtme_rows) + render_table(mtme_rows, ["mode", "guide", "observer", "mtme"]) +
                 '<p class="note">MTME: the first budget (of 100 over [0, 30]) where the interpolated target-choice rate '
                 "exceeds 10% (Gaziv et al.); — means never.</p>" + link("mtme", "subjects"))]
    if any(r["measure"] == "disruption" for r in rates):
        figure = _plot_curves(rates, "disruption", ("disrupt", "gaussian", "centroid"), None, "reports ≠ start category")
        sections.append(("Disruption rate vs budget", render_figure(figure, (
            "Share of reports that leave the start category. People: lapse-corrected, averaged per image over "
            "subjects, 95% bootstrap CI over subjects and images; models: top category on the saved PNG.")) + link("rates")))
    if any(r["measure"] == "target" and r["mode"] in ("target", "interpolation") for r in rates):
        figure = _plot_curves(rates, "target", ("target", "interpolation"), 1 / 9, "reports = target category")
        sections.append(("Target-choice rate vs budget", render_figure(figure, (
            "Share of reports naming the target category (ε = 0: one other category's share of the errors on clean "
            "images). Dotted: chance 1/9."))))
    if any(r["measure"] == "target" and r["mode"] == "composite" for r in rates):
        figure = _plot_curves(rates, "target", ("composite",), 1 / 9, "reports ∈ composite targets")
        sections.append(("Composite-target rate vs budget", render_figure(figure, (
            "Share of reports naming any of the 2 or 3 target categories at once; dotted: chance for 2.5 targets."))))
    if len(data.subjects):
        sections.append(("Confusion matrices", render_figure(_plot_confusions(data, probabilities), (
            "Lapse-corrected report probabilities of people, averaged over images with each start category (rows)."))))
    if detection:
        sections.append(("Same/different detection", render_figure(_plot_detection(detection), (
            "Detection = (H − F)/(1 − F) on lapse-corrected hit (p-c, c-p) and false-alarm (c-c, p-p) rates; 0: invisible. "
            "Raw proportion correct over the four orders has chance 0.5 (paper: 51% at ε = 1).")) +
            render_table(detection) + link("detection")))
    if timing:
        sections.append(("Presentation timing recorded by jsPsych", render_table(timing) + (
            '<p class="note">image: Start click to end of the image (200 ms asked; detection 100 ms); blank: the gap '
            "(200 ms; detection 100 ms); rt: from the buttons appearing to the click.</p>") + link("timing")))
    write_page(html_path, "Behaviour: people vs guides and surrogates", sections)
    return {"html": str(html_path), "tables": [str(path) for path in tables.values()], "n_subjects": len(data.subjects),
            "rates": rates, "mtme": mtme_rows, "detection": detection}
