"""Report sections of the probes (``closedloop evolve``, ``patterns``, ``geometry``), shown when their outputs exist.

Each section reads what its command wrote under ``<experiment>/probes/`` and embeds its figures
(the PNG files themselves) with a caption and a table; a probe not run yet gets a one-line note
with the command that makes it.
"""

from __future__ import annotations

import base64
import csv
import html
from pathlib import Path

from analysis.html import render_table
from closedloop.core.files import read_json

__all__ = ["render_evolution_section", "render_patterns_section", "render_geometry_section"]


def _embed(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<figure><img src="data:image/png;base64,{data}"><figcaption>{html.escape(caption)}</figcaption></figure>'


def _not_run(experiment: Path, command: str, what: str) -> str:
    return (f'<p class="note">Not run for this experiment. <code>closedloop {command} --experiment '
            f'{html.escape(str(experiment))}</code> {what}</p>')


def _number(text: str):
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text


def _read_csv(path: Path) -> list[dict]:
    """Rows of a CSV table with numbers as numbers (so the page rounds them)."""
    with path.open(encoding="utf-8") as stream:
        return [{key: _number(value) for key, value in row.items()} for row in csv.DictReader(stream)]


def render_evolution_section(experiment: Path) -> str:
    """HTML for every finished run under ``probes/evolve/``: elite curves and images, first/last elite per site."""
    runs = sorted(p.parent for p in (experiment / "probes" / "evolve").glob("*/summary.json"))
    if not runs:
        return _not_run(experiment, "evolve", "evolves images that drive each site (MAP-Elites, CPPN or direct encoding), "
                                              "in silico or in the loop on the rig.")
    parts = []
    for run in runs:
        settings, summary = read_json(run / "settings.json"), read_json(run / "summary.json")
        mode = "in the loop (spike counts from the rig)" if settings.get("mode") == "loop" else "in silico (IT model)"
        ball = (f", inside the ε = {settings['eps']:g} ball around clean image {settings.get('clean_index')}"
                if settings.get("eps") else "")
        caption = (f"Run {run.name}: {settings['encoding']} encoding, {mode}{ball}; {settings['n_generations']} generations × "
                   f"{settings['n_children']} children, seed {settings['seed']}. Left: each site's elite score (predicted or mean "
                   "recorded spikes per window) over generations; right: the elite image per site with its score and the "
                   "generation it was found in. Every generation's images, scores, parents and seeds are in "
                   f"probes/evolve/{run.name}/generations/.")
        rows = [{"objective": label, "elite_generation_0": first, "elite_last": last}
                for label, first, last in zip(summary["objectives"], summary["first_elite"], summary["last_elite"])]
        if (run / "elites.png").exists():
            parts.append(_embed(run / "elites.png", caption))
        parts.append(render_table(rows))
        if settings.get("mode") == "loop":
            parts.append('<p class="note">Drift control: the reference images\' counts per generation are in each '
                         "generation file (reference_counts). Elites are shown again every generation and ranked by their "
                         "mean count over all showings, so a lucky single measurement does not keep an image (the "
                         "winner's curse); scores are still noisy means of a few presentations.</p>")
    return "".join(parts)


def render_patterns_section(experiment: Path) -> str:
    """HTML of ``probes/patterns/``: a figure per site and the similarity table."""
    folder = experiment / "probes" / "patterns"
    if not (folder / "summary.json").exists():
        return _not_run(experiment, "patterns", "computes zero-feed, noise-feed and average adversarial patterns per site "
                                                "and compares them with the contrast image of the recorded responses.")
    summary = read_json(folder / "summary.json")
    caption = (f"Day {summary['day']} model, ε = {summary['eps']:g}, {summary['n_images']} recorded clean images. Zero feed: "
               "δ of the increase attack on a mid-grey image; noise feed: mean δ over noise starts; AAI: mean δ over attacks "
               "on clean images (signed patterns shown around grey, scaled to their maximum). PNC: mean of the images the "
               "site responds to above its median minus the mean of the rest, from predictions and from the recording. "
               "Titles: cosine similarity to the recorded PNC.")
    figures = "".join(_embed(path, caption if k == 0 else "") for k, path in
                      enumerate(sorted(folder.glob("site_*.png"), key=lambda p: int(p.stem.split("_")[1]))))
    return figures + render_table(_read_csv(folder / "similarity.csv"))


def render_geometry_section(experiment: Path) -> str:
    """HTML of ``probes/geometry/``: contour maps, the curvature–sensitivity scatter and its correlation."""
    folder = experiment / "probes" / "geometry"
    if not (folder / "summary.json").exists():
        return _not_run(experiment, "geometry", "maps iso-response contours in the plane of the attack direction and a "
                                                "second direction and relates their curvature to sensitivity.")
    summary = read_json(folder / "summary.json")
    c = summary["correlation"]
    pearson, spearman = (("—" if value is None else f"{value:.2f}") for value in (c["pearson_r"], c["spearman_r"]))
    contours = (f"Day {summary['day']} model. Each map: the site's predicted response in the plane through a clean image "
                f"(white dot) spanned by the increase-attack direction (x axis) and the {summary['second']} direction made "
                f"orthogonal to it (y axis), ± 2ε (ε = {summary['eps']:g}, pixel units). White: the iso-response contour "
                "through the clean image; red arrow: the attack δ. |κ|: mean absolute curvature of the contours along the "
                "arrow (1 / pixel-unit distance).")
    scatter = ("One point per site × image (colour: site): curvature against the model sensitivity the attack reached, in "
               f"units of the site's s.d. over the clean images. n = {c['n']}, Pearson r = {pearson}, Spearman r = {spearman}.")
    return (_embed(folder / "contours.png", contours) + _embed(folder / "curvature_vs_sensitivity.png", scatter)
            + render_table(_read_csv(folder / "curvature.csv")))
