"""The offline experiment report (``closedloop report``) and the base-selection page (``closedloop select-base``).

:func:`write_report` runs every analysis of :mod:`analysis` over an experiment's finished days
and writes one self-contained HTML page (figures embedded as PNG) plus, next to it, a folder
``<name>_tables/`` holding the table behind every figure as CSV and ``summary.json`` with the
headline numbers. Each section is computed, drawn and assembled in :mod:`analysis.report_sections`;
:func:`_make_sections` sets their order and hands each its data. :func:`write_selection_report`
does the same for the base-model selection.
"""

from __future__ import annotations

import html
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from analysis.base_selection import CRITERIA, compute_base_selection
from analysis.categories import compute_category_preference
from analysis.experiment import ExperimentDay, read_experiment
from analysis.ground_truth import compute_truth_comparison
from analysis.html import make_figure, render_figure, render_links, render_table, write_csv, write_page, write_pdf
from analysis.image_curves import compute_image_curves
from analysis.probe_sections import render_evolution_section, render_geometry_section, render_patterns_section
from analysis.progress import compute_progress
from analysis.report_sections import (
    NetworkOptions,
    Section,
    TableWriter,
    compute_networks,
    compute_overview,
    compute_quality,
    compute_sensitivity,
    make_categories_section,
    make_images_section,
    make_networks_section,
    make_overview_section,
    make_progress_section,
    make_quality_section,
    make_selection_section,
    make_sensitivity_section,
    make_truth_section,
    read_selection_best,
    render_number,
)
from closedloop.core.files import write_json
from closedloop.core.logs import progress
from closedloop.core.validation import check_dir, check_integer

__all__ = ["NetworkOptions", "write_report", "write_selection_report"]

_N_SECTIONS = 12  # what _make_sections yields, for the progress bar


def _make_sections(experiment: Path, days: list[ExperimentDay], networks: NetworkOptions, tables: TableWriter, *,
                   seed: int, device: str) -> Iterator[Section]:
    """The page's sections in order, each computed from the experiment, then assembled (its tables
    written through ``tables``). Single-day sections use the last of ``days``. Section 5 draws
    section 1's mean curve beside the network units: it is handed over here."""
    day = days[-1]
    records = {d.day: d.records for d in days}
    yield make_overview_section(experiment, days, compute_overview(days), tables)
    sensitivity = compute_sensitivity(day)
    yield make_sensitivity_section(sensitivity, day.day, tables)
    yield make_images_section(compute_image_curves(day.responses), day.day, tables)
    yield make_progress_section(compute_progress(records), tables)
    categories = compute_category_preference([d.responses for d in days], window_length_s=day.window_length_s)
    yield make_categories_section(categories, day.window_length_s, tables)
    network_data = compute_networks(experiment, days, networks, seed=seed, device=device)
    yield make_networks_section(network_data, sensitivity["curves"]["mean"], day.day, tables)
    yield make_quality_section(compute_quality(days, seed=seed), tables)
    yield make_selection_section(experiment, read_selection_best(experiment), tables.folder.parent)
    yield make_truth_section(compute_truth_comparison(records), tables)
    yield Section("9. Evolved images", render_evolution_section(experiment))
    yield Section("10. Adversarial patterns", render_patterns_section(experiment))
    yield Section("11. Response geometry", render_geometry_section(experiment))


def write_report(
    experiment: str | Path,
    *,
    day: int | None = None,
    out: str | Path | None = None,
    networks: NetworkOptions | None = None,
    pdf: bool = False,
    seed: int = 0,
    device: str = "cpu",
) -> dict:
    """Write the experiment report; return ``{"html", "pdf", "tables", "summary"}``.

    ``experiment``: the experiment folder; ``day``: the day of the single-day sections and the
    last day included (default: the last finished day); ``out``: the HTML path (default
    ``EXPERIMENT/report/report.html``); the tables go to ``<out stem>_tables/`` beside it.
    ``networks``: the network-unit comparison (:class:`NetworkOptions`; default: the base
    backbone, small). ``pdf``: also print the page to ``<out>.pdf`` with headless Chromium.
    ``seed``: image and unit choices, split-halves. ``device``: for the white-box solver.
    """
    experiment = check_dir("experiment", experiment)
    seed = check_integer("seed", seed, minimum=0)
    days = read_experiment(experiment, last_day=day)
    out = Path(out) if out is not None else experiment / "report" / "report.html"
    if out.suffix.lower() not in (".html", ".htm"):
        raise ValueError(f"'out' must be an .html path, but got {str(out)!r}; e.g. {out.with_suffix('.html')}.")
    tables = TableWriter(out.parent / f"{out.stem}_tables")
    tables.folder.mkdir(parents=True, exist_ok=True)
    built = _make_sections(experiment, days, networks or NetworkOptions(), tables, seed=seed, device=device)
    sections = list(progress(built, total=_N_SECTIONS, description="report sections"))
    summary = {key: value for section in sections for key, value in section.summary.items()}
    write_page(out, f"{experiment.name}: sensitivity report, days {days[0].day}–{days[-1].day}",
               [(section.heading, section.body) for section in sections])
    tables.written.append(write_json(tables.folder / "summary.json", summary))
    pdf_path = write_pdf(out, out.with_suffix(".pdf")) if pdf else None
    return {"html": str(out), "pdf": None if pdf_path is None else str(pdf_path),
            "tables": [str(p) for p in tables.written], "summary": summary}


# -- select-base -------------------------------------------------------------------------------------
def _selection_figure(scores: list[dict]) -> str:
    candidates = list(dict.fromkeys(r["candidate"] for r in scores))
    layers = list(dict.fromkeys(r["layer"] for r in scores))
    figure, axes = make_figure(4.2 * len(CRITERIA), 1.0 + 0.7 * len(layers) + 0.3 * max(len(c) for c in candidates) / 4,
                               ncols=len(CRITERIA))
    titles = {"cka": "CKA with recorded responses", "predictivity": "cross-validated predictivity\n(median r over sites)",
              "transfer": "perturbation transfer\n(lower bound, units of σ)"}
    for ax, criterion in zip(axes, CRITERIA):
        grid = np.array([[next(r[criterion] for r in scores if r["candidate"] == c and r["layer"] == layer) for c in candidates]
                         for layer in layers], dtype=float)
        image = ax.imshow(grid, cmap="viridis", aspect="auto")
        figure.colorbar(image, ax=ax, shrink=0.8)
        for (i, j), value in np.ndenumerate(grid):
            ax.text(j, i, render_number(value, 2), ha="center", va="center", fontsize=8, color="w")
        if np.isfinite(grid).any():
            i, j = np.unravel_index(np.nanargmax(grid), grid.shape)
            ax.add_patch(_best_box(j, i))
        ax.set_xticks(range(len(candidates)), candidates, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(len(layers)), layers, fontsize=8)
        ax.set(xlabel="candidate backbone", ylabel="layer", title=titles[criterion])
        ax.title.set_fontsize(9)
    n_images, n_pairs = scores[0]["n_images"], scores[0]["n_pairs"]
    caption = (f"Each cell: a candidate backbone cut at a layer, scored on {n_images} recorded clean images and {n_pairs} "
               "recorded attack pairs. Red box: the best cell of each criterion. CKA: linear centred kernel alignment of "
               "the layer's features with the sites' mean responses; predictivity: median over sites of the "
               "cross-validated Pearson r of a ridge readout; transfer: mean of sign(predicted change) × recorded change / "
               "σ_site over the recorded attack pairs, with the candidate's ridge readout giving the sign.")
    return render_figure(figure, caption)


def _best_box(column: int, row: int):
    from matplotlib.patches import Rectangle  # lazy, as every matplotlib import of the report (see analysis.report_sections)

    return Rectangle((column - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="red", lw=3)


def write_selection_report(
    experiment: str | Path,
    candidates: list[str],
    layers: list[str],
    *,
    out: str | Path | None = None,
    n_images: int = 200,
    n_pairs: int = 200,
    trust: bool = False,
    seed: int = 0,
    device: str = "cpu",
) -> dict:
    """Score ``candidates`` × ``layers`` on every finished day (:func:`analysis.base_selection.compute_base_selection`).

    Writes ``out`` (default ``EXPERIMENT/report/select_base.html``) with the heat map and
    ``<out stem>_tables/`` with ``scores.csv`` and ``best.csv``. Returns ``{"html", "tables",
    "scores", "best"}``.
    """
    experiment = check_dir("experiment", experiment)
    days = read_experiment(experiment)
    out = Path(out) if out is not None else experiment / "report" / "select_base.html"
    if out.suffix.lower() not in (".html", ".htm"):
        raise ValueError(f"'out' must be an .html path, but got {str(out)!r}; e.g. {out.with_suffix('.html')}.")
    sources = {Path(name).stem if Path(name).suffix else name: name for name in candidates}
    result = compute_base_selection(sources, layers, days, n_images=n_images, n_pairs=n_pairs, trust=trust, seed=seed,
                                    device=device)
    tables_dir = out.parent / f"{out.stem}_tables"
    paths = [write_csv(tables_dir / f"{name}.csv", rows) for name, rows in result.items()]
    best = "".join(f"<li>{html.escape(r['criterion'])}: <b>{html.escape(r['candidate'])}</b> at <b>{html.escape(r['layer'])}</b> "
                   f"({render_number(r['score'])})</li>" for r in result["best"])
    body = (f'<p class="summary">Best per criterion:</p><ul>{best}</ul>' + _selection_figure(result["scores"])
            + render_table(result["scores"]) + render_links(paths, out.parent))
    write_page(out, f"{experiment.name}: base-model selection", [("Candidates × layers", body)])
    return {"html": str(out), "tables": [str(p) for p in paths], **result}
