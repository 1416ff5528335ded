"""The sections of the experiment report (:func:`analysis.report.write_report`), each in three steps.

For every section, its data comes from one function (an ``analysis`` ``compute_*`` function, or
one here when a section combines several: :func:`compute_overview`, :func:`compute_sensitivity`,
:func:`compute_networks`, :func:`compute_quality`, :func:`read_selection_best`); its figure is
drawn from that data by ``make_*_figure``; and ``make_*_section`` assembles it in one place: the
caption, the CSV tables (through a :class:`TableWriter`), the HTML and the section's entries of
``summary.json``, returned as a :class:`Section`. Nothing here keeps state between sections: the
network-unit section draws section 1's mean curve, which it takes as an argument.

matplotlib is imported only where a figure is drawn (:func:`analysis.html.make_figure` selects
the off-screen Agg backend first), so importing the report does not load it.
"""

from __future__ import annotations

import csv
import html
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from analysis.experiment import ExperimentDay, read_clean_images
from analysis.html import make_figure, render_figure, render_links, render_table, write_csv
from analysis.model_quality import compute_model_quality
from analysis.network_units import compute_network_sensitivity
from analysis.sensitivity_curves import compute_response_scale, compute_sensitivity_curves
from closedloop.config import read_config

__all__ = [
    "NetworkOptions",
    "Section",
    "TableWriter",
    "render_number",
    "compute_overview",
    "make_overview_section",
    "compute_sensitivity",
    "make_sensitivity_figure",
    "make_sensitivity_section",
    "make_images_figure",
    "make_images_section",
    "make_progress_figure",
    "make_progress_section",
    "make_categories_figure",
    "make_categories_section",
    "compute_networks",
    "make_networks_figure",
    "make_networks_section",
    "compute_quality",
    "make_quality_figure",
    "make_quality_section",
    "read_selection_best",
    "make_selection_section",
    "make_truth_figure",
    "make_truth_section",
]

EPS_LABEL = "budget ε (L2 norm, [0, 1] pixel units)"
NORMALIZED_LABEL = "sensitivity lower bound\n(units of the site's clean-response s.d.)"
BASELINE_STYLE = {"gaussian": ("tab:gray", "Gaussian noise"), "interpolation": ("tab:blue", "interpolation")}
_MAX_PANELS = 8
_NETWORK_COLORS = ("tab:purple", "tab:brown", "tab:olive", "tab:cyan", "tab:pink")


@dataclass(frozen=True)
class NetworkOptions:
    """The network-unit comparison: which networks and how much solver effort (see :mod:`analysis.network_units`).

    ``networks``: backbone names or checkpoint paths (None: the experiment's base backbone; []:
    skip the comparison); ``n_units``, ``n_images``, ``n_starts``, ``n_steps``: size;
    ``n_sigma_images``: clean images over which each unit's s.d. is taken.
    """

    networks: list[str] | None = None
    n_units: int = 4
    n_images: int = 2
    n_starts: int = 2
    n_steps: int = 10
    n_sigma_images: int = 256
    trust: bool = False


@dataclass(frozen=True)
class Section:
    """One assembled section of the page: its ``heading``, its HTML ``body`` and its entries of ``summary.json``."""

    heading: str
    body: str
    summary: dict = field(default_factory=dict)


class TableWriter:
    """Writes the sections' tables as CSV files into ``folder`` (beside the page); ``written``: every path, in order."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.written: list[Path] = []

    def write(self, prefix: str, tables: dict[str, list[dict]]) -> str:
        """Write each table (name → rows) as ``<prefix>_<name>.csv``; return the HTML note linking them."""
        paths = [write_csv(self.folder / f"{prefix}_{name}.csv", rows) for name, rows in tables.items()]
        self.written += paths
        return render_links(paths, self.folder.parent)


def render_number(value, digits: int = 3) -> str:
    """``value`` with ``digits`` significant digits; "—" for None, NaN or infinity."""
    return "—" if value is None or (isinstance(value, float) and not np.isfinite(value)) else f"{value:.{digits}g}"


def _day_colors(days: list[int]) -> dict[int, tuple]:
    from matplotlib import colormaps  # lazy: see the module docstring

    cmap = colormaps["viridis"]
    return {day: cmap(0.1 + 0.8 * i / max(len(days) - 1, 1)) for i, day in enumerate(days)}


def _panel_grid(n_panels: int, width: float, height: float, extra_width: float, extra_height: float):
    """(figure, flat axes) of ``n_panels`` panels, at most 4 per row, each ``width`` × ``height`` inches."""
    ncols = min(4, n_panels)
    nrows = -(-n_panels // ncols)
    figure, axes = make_figure(width * ncols + extra_width, height * nrows + extra_height, ncols=ncols, nrows=nrows)
    axes = np.atleast_1d(axes).ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return figure, axes


# -- overview --------------------------------------------------------------------------------------
def compute_overview(days: list[ExperimentDay]) -> list[dict]:
    """Per day: stimuli, clean images, attacked images, attacks, valid presentations, counts source, sites."""
    rows = []
    for d in days:
        s = d.stimuli
        kinds = np.array(s["kind"].tolist(), dtype=str)
        rows.append({"day": d.day, "n_stimuli": len(kinds), "n_clean": int((kinds == "clean").sum()),
                     "n_attacked_images": int(np.unique(s["parent"][kinds == "attack"]).size),
                     "n_attacks": int((kinds == "attack").sum()), "n_valid_presentations": int(d.responses.valid.sum()),
                     "counts_from": d.responses.source, "n_sites": int(d.responses.means.shape[1])})
    return rows


def make_overview_section(experiment: Path, days: list[ExperimentDay], rows: list[dict], tables: TableWriter) -> Section:
    """The experiment, its days and units; the table is written but not linked (the page shows it whole)."""
    tables.write("0_days", {"overview": rows})
    day = days[-1]
    text = (f"<p>Experiment <code>{html.escape(str(experiment))}</code>: {len(days)} finished day(s) "
            f"({', '.join(str(d.day) for d in days)}); single-day sections use day {day.day}. Rig: "
            f"{'simulated' if day.simulated else 'real'}; response window {day.window_s[0] * 1000:.0f}–"
            f"{day.window_s[1] * 1000:.0f} ms after onset. Sensitivities are in spikes per response window, or divided "
            "by each site's clean-response s.d. (normalised); ε is the L2 norm of the perturbation over all 3 × 224 × 224 "
            "values in [0, 1] units. Every figure's numbers are in the linked CSV tables; docs/report.md explains "
            "each analysis.</p>")
    return Section("Overview", text + render_table(rows))


# -- 1. sensitivity curves -----------------------------------------------------------------------
def compute_sensitivity(day: ExperimentDay) -> dict:
    """Section 1 of ``day``: ``curves`` (:func:`compute_sensitivity_curves` of the attacks: ``sites``,
    ``mean``), ``scale`` (:func:`compute_response_scale` of the clean means) and ``baselines``
    (kind → the mean curve of that model-free baseline)."""
    return {"curves": compute_sensitivity_curves(day.records), "scale": compute_response_scale(day.clean_means()),
            "baselines": {kind: compute_sensitivity_curves(day.records, kind=kind)["mean"] for kind in BASELINE_STYLE}}


def make_sensitivity_figure(data: dict, day: int):
    """Every site's normalised lower bound against ε, their mean ± s.d., the baselines and the scale lines."""
    curves = data["curves"]
    figure, axes = make_figure(10, 4.8)
    site_ids = sorted({r["site"] for r in curves["sites"]})
    for site in site_ids:
        rows = [r for r in curves["sites"] if r["site"] == site and r["normalized"] is not None]
        axes.plot([r["eps"] for r in rows], [r["normalized"] for r in rows], color="tab:red", alpha=0.25, lw=1,
                  label="single sites" if site == site_ids[0] else None)
    mean = [r for r in curves["mean"] if r["mean"] is not None]
    axes.errorbar([r["eps"] for r in mean], [r["mean"] for r in mean], yerr=[r["sd"] for r in mean], color="tab:red",
                  lw=2.5, marker="o", capsize=4, label="model-guided attacks: mean ± s.d. over sites")
    for r in mean:
        axes.annotate(f"n={r['n_sites']} sites\n{r['n_images']} images", (r["eps"], r["mean"]), textcoords="offset points",
                      xytext=(6, 6), fontsize=7, color="tab:red")
    for kind, (color, label) in BASELINE_STYLE.items():
        rows = [r for r in data["baselines"][kind] if r["mean"] is not None]
        if rows:
            axes.errorbar([r["eps"] for r in rows], [r["mean"] for r in rows], yerr=[r["sd"] for r in rows], color=color,
                          ls="--", marker="s", ms=4, capsize=3, label=f"{label} (baseline): mean ± s.d.")
    axes.axhline(1.0, color="k", ls=":", lw=1.2, label="clean-response s.d. (= 1)")
    difference = data["scale"]["mean"][0]["normalized_difference"]
    if difference is not None:
        axes.axhline(difference, color="tab:green", ls="-.", lw=1.2,
                     label=f"mean |r(x) − r(x′)|, two random clean images ({difference:.2f})")
    axes.axhline(0, color="k", lw=0.5)
    axes.set(xlabel=EPS_LABEL, ylabel=NORMALIZED_LABEL, title=f"Normalised sensitivity lower bound per site, day {day}")
    axes.legend(fontsize=7.5, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return figure


def make_sensitivity_section(data: dict, day: int, tables: TableWriter) -> Section:
    curves, scale, baselines = data["curves"], data["scale"], data["baselines"]
    links = tables.write("1_sensitivity", {"sites": curves["sites"], "mean": curves["mean"], "scale": scale["sites"],
                                           **{f"baseline_{k}": v for k, v in baselines.items()}})
    caption = (f"Day {day}. Thin red lines: each site's biased-down lower bound ŝ_i(ε) divided by σ_i, the s.d. of its "
               "mean response over the day's clean images; thick: mean ± s.d. over sites, labelled with the number of sites and "
               "perturbed images. Dashed: model-free baselines at the same budgets. Dotted line: one clean-response s.d.; "
               "dash-dotted: the mean difference between the responses to two random clean images, for scale. A curve above "
               "the dotted line means the perturbations moved the site by more than the spread of its clean responses.")
    body = render_figure(make_sensitivity_figure(data, day), caption) + render_table(curves["mean"]) + links
    summary = {"day": day, "mean": curves["mean"], "normalized_difference": scale["mean"][0]["normalized_difference"]}
    return Section("1. Sensitivity curves", body, {"sensitivity": summary})


# -- 2. image-specific curves ----------------------------------------------------------------------
def make_images_figure(result: dict, sites: list[int], day: int):
    """Per site of ``sites``: every image's s_i(x, ε) against ε and their mean ± s.e.m. (``result``:
    :func:`analysis.image_curves.compute_image_curves`)."""
    figure, axes = _panel_grid(len(sites), 3.0, 2.8, 0.5, 0.4)
    slopes = {r["site"]: r for r in result["site_slopes"]}
    for ax, site in zip(axes, sites):
        for image in sorted({p["image"] for p in result["points"] if p["site"] == site}):
            points = sorted((p["eps"], p["change"]) for p in result["points"] if p["site"] == site and p["image"] == image)
            ax.plot(*zip(*points), color="tab:orange", alpha=0.35, lw=1)
        mean = [r for r in result["mean"] if r["site"] == site]
        ax.errorbar([r["eps"] for r in mean], [r["mean"] for r in mean], yerr=[r["sem"] or 0 for r in mean], color="k",
                    marker="o", capsize=3, lw=2)
        ax.axhline(0, color="k", lw=0.5)
        s = slopes[site]
        ax.set_title(f"site {site}: slope {s['mean_slope']:.2g}/ε, p={s['p']:.2g}\n(n={s['n_images']} images)", fontsize=9)
        ax.set_xlabel("ε (L2, [0,1] px units)", fontsize=8)
        ax.set_ylabel("s_i(x, ε), spikes per window", fontsize=8)
    figure.suptitle(f"Image-specific sensitivity, day {day} (orange: one image each; black: mean ± s.e.m.)")
    return figure


def make_images_section(result: dict, day: int, tables: TableWriter) -> Section:
    heading = "2. Image-specific curves"
    sites = sorted({r["site"] for r in result["site_slopes"]})
    links = tables.write("2_images", result)
    if not sites:
        return Section(heading, '<p class="note">No site has images attacked at two or more budgets.</p>' + links)
    shown = sites[:_MAX_PANELS]
    more = f" The first {len(shown)} of {len(sites)} sites are drawn; the tables hold all." if len(sites) > len(shown) else ""
    caption = ("Per-image term of the estimator, s_i(x, ε) = sign(f(x) − f(x+δ))·(r(x) − r(x+δ)), for every clean image "
               "attacked at several budgets. Slope: mean over images of (s(x, ε_max) − s(x, ε_min)) / (ε_max − ε_min); p: "
               "two-sided one-sample t-test of the per-image slopes against 0. Per-image z-tests (pooled trial-to-trial "
               "variance) are in the image_slopes table." + more)
    significant = sum(r["p"] < 0.05 and r["mean_slope"] > 0 for r in result["site_slopes"])
    note = (f'<p class="summary">{significant} of {len(sites)} sites have a significantly positive mean slope '
            "(p &lt; 0.05): larger budgets moved them further.</p>")
    body = note + render_figure(make_images_figure(result, shown, day), caption) + render_table(result["site_slopes"]) + links
    return Section(heading, body, {"image_slopes": {"n_sites": len(sites), "n_significant_positive": significant}})


# -- 3. day-over-day progress ---------------------------------------------------------------------
def make_progress_figure(result: dict):
    """Left: the bound at each budget per day with the baselines; right: the bound at the smallest
    budget against the day (``result``: :func:`analysis.progress.compute_progress`)."""
    attack = [r for r in result["curves"] if r["kind"] == "attack" and r["mean"] is not None]
    days = sorted({r["day"] for r in attack})
    figure, (left, right) = make_figure(11, 4.5, ncols=2)
    colors = _day_colors(days)
    for day in days:
        rows = [r for r in attack if r["day"] == day]
        left.errorbar([r["eps"] for r in rows], [r["mean"] for r in rows], yerr=[r["sd"] for r in rows], color=colors[day],
                      marker="o", capsize=3, label=f"day {day} attacks (n={rows[0]['n_sites']} sites)")
    for kind, (color, label) in BASELINE_STYLE.items():
        rows = [r for r in result["curves"] if r["kind"] == kind and r["mean"] is not None]
        budgets = sorted({r["eps"] for r in rows})
        if budgets:
            pooled = [np.mean([r["mean"] for r in rows if r["eps"] == e]) for e in budgets]
            left.plot(budgets, pooled, color=color, ls="--", marker="s", ms=4, label=f"{label} (mean over days)")
    left.axhline(1.0, color="k", ls=":", lw=1, label="clean-response s.d.")
    left.axhline(0, color="k", lw=0.5)
    left.set(xlabel=EPS_LABEL, ylabel=NORMALIZED_LABEL, title="Lower bound by day (mean ± s.d. over sites)")
    left.legend(fontsize=7)
    if result["fold_change"]:
        _fold_change_panel(right, result, days)
    return figure


def _fold_change_panel(ax, result: dict, days: list[int]) -> None:
    fold = result["fold_change"][0]
    for kind, color in (("attack", "tab:red"), *((k, v[0]) for k, v in BASELINE_STYLE.items())):
        rows = [r for r in result["curves"] if r["kind"] == kind and r["eps"] == fold["eps"] and r["mean"] is not None]
        ax.errorbar([r["day"] for r in rows], [r["mean"] for r in rows], yerr=[r["sd"] for r in rows], color=color,
                    marker="o", capsize=3, ls="-" if kind == "attack" else "--",
                    label="model-guided attacks" if kind == "attack" else BASELINE_STYLE[kind][1])
    ratio = fold["fold_change"]
    change = f"×{ratio:.2f}" if ratio is not None else "no fold change (first ≤ 0)"
    ax.set(xlabel="day", ylabel=NORMALIZED_LABEL,
           title=f"Smallest budget ε = {fold['eps']:g}, day {fold['first_day']} → {fold['last_day']}: {change}")
    ax.title.set_fontsize(9)
    ax.set_xticks(days)
    ax.axhline(0, color="k", lw=0.5)
    ax.legend(fontsize=7)


def make_progress_section(result: dict, tables: TableWriter) -> Section:
    links = tables.write("3_progress", result)
    caption = ("Left: the realised normalised lower bound at each budget, one line per day (day 0, made with a random "
               "readout, is left out as in the paper when later days exist); dashed: the model-free baselines averaged "
               "over the same days. Right: the bound at the smallest budget against the day; the title gives the fold "
               "change from the first to the last included day. Error bars: s.d. over sites.")
    table = render_table(result["fold_change"], ["eps", "first_day", "last_day", "first", "last", "fold_change"])
    body = render_figure(make_progress_figure(result), caption) + table + links
    return Section("3. Day-over-day progress", body, {"progress": {"fold_change": result["fold_change"]}})


# -- 4. category preference and super-stimuli ----------------------------------------------------
def make_categories_figure(result: dict, sites: list[int], window: float):
    """Per site of ``sites``: the rate evoked by increase attacks on non-preferred images against ε,
    and the preferred category's clean rate (``result``: :func:`analysis.categories.compute_category_preference`;
    ``window``: response window length, s)."""
    figure, axes = _panel_grid(len(sites), 3.0, 2.9, 0.5, 0.5)
    crossing = {r["site"]: r for r in result["crossing"]}
    preference = {r["site"]: r for r in result["preference"]}
    for ax, site in zip(axes, sites):
        _category_panel(ax, site, result["curves"], preference[site], crossing[site], window)
    figure.suptitle("Increase attacks on non-preferred images vs the preferred category")
    return figure


def _category_panel(ax, site: int, curves: list[dict], preference: dict, crossing: dict, window: float) -> None:
    rows = [r for r in curves if r["site"] == site]
    eps = [r["eps"] for r in rows]
    ax.errorbar(eps, [r["rate_hz"] for r in rows], yerr=[(r["sd"] or 0) / window for r in rows], color="k", marker="o",
                capsize=3, label="increase attacks, non-preferred")
    for r in rows:
        ax.annotate(f"n={r['n_images']}", (r["eps"], r["rate_hz"]), textcoords="offset points", xytext=(3, -10), fontsize=6)
    level, spread = preference["preferred_mean"] / window, preference["preferred_sd"] / window
    ax.axhspan(level - spread, level + spread, color="tab:green", alpha=0.2)
    ax.axhline(level, color="tab:green", label=f"preferred: {preference['preferred']} (n={preference['n_preferred']})")
    if crossing["crossing_eps"] is not None:
        ax.axvline(crossing["crossing_eps"], color="tab:red", ls="--", lw=1, label=f"crosses at ε = {crossing['crossing_eps']:.2g}")
    ax.set_title(f"site {site}", fontsize=9)
    ax.set_xlabel("ε (L2, [0,1] px units)", fontsize=8)
    ax.set_ylabel("firing rate (Hz)", fontsize=8)
    ax.legend(fontsize=6)


def make_categories_section(result: dict, window: float, tables: TableWriter) -> Section:
    """``window``: response window length, s (rates in Hz = spikes per window ÷ window)."""
    links = tables.write("4_categories", result)
    sites = sorted({r["site"] for r in result["crossing"]})[:_MAX_PANELS]
    body = ""
    if sites:
        caption = ("Per site: black, the mean (± s.d.) rate evoked by model-guided increase attacks on clean images of "
                   "categories other than the site's preferred one, at ε = 0 (the same images, clean) and at each budget; "
                   "n per point is the number of attacked images. Green band: mean ± s.d. of the clean responses to the "
                   "preferred category (pooled over all days). Red line: the budget at which the attacks reach the "
                   "preferred mean. Rates are spikes per response window ÷ "
                   f"{window * 1000:.0f} ms, in Hz.")
        body = render_figure(make_categories_figure(result, sites, window), caption)
    s = result["summary"][0]
    note = (f'<p class="summary">{s["n_crossing"]} of {s["n_sites"]} sites reached their preferred-category mean'
            + (f" at ε = {render_number(s['crossing_eps_mean'])} ± {render_number(s['crossing_eps_sd'])}"
               if s["n_crossing"] else "")
            + f"; at the largest budget the attacks evoked {render_number(s['rate_at_max_eps_hz_mean'])} ± "
              f"{render_number(s['rate_at_max_eps_hz_sd'])} Hz against {render_number(s['preferred_rate_hz_mean'])} ± "
              f"{render_number(s['preferred_rate_hz_sd'])} Hz for the preferred category (paper: ε ≈ 4 ± 1.6; 310 ± 60 vs "
              "216 ± 60 Hz at ε = 10).</p>")
    columns = ["site", "preferred", "n_preferred", "preferred_mean", "least_preferred", "least_mean", "n_categories"]
    body = note + body + render_table(result["preference"], columns) + render_table(result["crossing"]) + links
    return Section("4. Category preference and super-stimuli", body, {"categories": s})


# -- 5. network units ------------------------------------------------------------------------------
@dataclass(frozen=True)
class NetworkData:
    """Section 5's data: ``sources`` (label → backbone name or checkpoint), ``result``
    (:func:`compute_network_sensitivity`: ``units``, ``mean``), the ``options`` it ran with and
    ``n_sigma_images``, the clean images each unit's s.d. was taken over."""

    sources: dict
    result: dict
    options: NetworkOptions
    n_sigma_images: int


def _network_sources(experiment: Path, options: NetworkOptions) -> dict:
    def label(name: str) -> str:
        return Path(name).stem if Path(name).suffix else name

    if options.networks is None:
        base = read_config(experiment).model.backbone
        return {f"base model ({label(base)})": base}
    labels = [label(name) for name in options.networks]
    # checkpoints with the same file name (e.g. two classifier.safetensors) are told apart by their folder
    labels = [f"{Path(name).parent.name}/{text}" if labels.count(text) > 1 else text
              for name, text in zip(options.networks, labels)]
    return dict(zip(labels, options.networks))


def compute_networks(experiment: Path, days: list[ExperimentDay], options: NetworkOptions, *, seed: int,
                     device: str) -> NetworkData | None:
    """The white-box sensitivity of random penultimate units of each network of ``options`` at the
    budgets attacked on the last day, normalised over the experiment's clean images; None when
    ``options`` names no network."""
    sources = _network_sources(experiment, options)
    if not sources:
        return None
    budgets = sorted({r["eps"] for r in days[-1].records if r["kind"] == "attack"})
    images, _ = read_clean_images(days, n_images=options.n_sigma_images, seed=seed)
    result = compute_network_sensitivity(sources, images, budgets, n_units=options.n_units, n_images=options.n_images,
                                         n_starts=options.n_starts, n_steps=options.n_steps, trust=options.trust, seed=seed,
                                         device=device)
    return NetworkData(sources, result, options, len(images))


def make_networks_figure(data: NetworkData, recorded: list[dict], day: int, *, truth: list[dict] | None = None,
                         ceiling: list[dict] | None = None):
    """Each network's mean ± s.d. unit sensitivity against ε beside ``recorded``, section 1's mean
    curve of the sites' lower bound on ``day`` (rows of ``eps``, ``mean``, ``sd``, ``n_sites``), and,
    on a simulated rig, ``truth``: the sites' mean normalised white-box sensitivity, and ``ceiling``:
    the noise-free bound had the best model of the loop's class made the attacks (rows of ``eps``, ``mean``)."""
    figure, axes = make_figure(8, 4.6)
    recorded = [r for r in recorded if r["mean"] is not None]
    axes.errorbar([r["eps"] for r in recorded], [r["mean"] for r in recorded], yerr=[r["sd"] for r in recorded], color="tab:red",
                  marker="o", lw=2.5, capsize=4, label=f"recorded sites, day {day} (n={recorded[0]['n_sites']}; lower bound)")
    if truth:
        axes.plot([r["eps"] for r in truth], [r["mean"] for r in truth], color="tab:red", ls="--", marker="*",
                  label="simulated sites' truth (white-box)")
    if ceiling:
        axes.plot([r["eps"] for r in ceiling], [r["mean"] for r in ceiling], color="tab:red", ls=":", marker="s",
                  label="best model of the loop's class (noise-free bound)")
    for label, color in zip(data.sources, _NETWORK_COLORS):
        rows = [r for r in data.result["mean"] if r["network"] == label]
        axes.errorbar([r["eps"] for r in rows], [r["mean"] for r in rows], yerr=[r["sd"] for r in rows], color=color,
                      marker="^", capsize=3, label=f"{label} penultimate units (n={rows[0]['n_units']}; white-box)")
    axes.axhline(1.0, color="k", ls=":", lw=1, label="clean-response s.d.")
    axes.set(xlabel=EPS_LABEL, ylabel="sensitivity\n(units of the unit's / site's clean-response s.d.)",
             title="Network units (white-box) and recorded sites (lower bound), same normalisation")
    axes.axhline(0, color="k", lw=0.5)
    axes.legend(fontsize=7)
    return figure


def make_networks_section(data: NetworkData | None, recorded: list[dict], day: int, tables: TableWriter) -> Section:
    """``recorded``: section 1's mean curve (``compute_sensitivity(day)["curves"]["mean"]``), drawn for comparison."""
    if data is None:
        return Section("5. Network units", '<p class="note">Skipped (no networks named; see --networks).</p>')
    links = tables.write("5_networks", data.result)
    o = data.options
    caption = (f"Network units: mean ± s.d. over {o.n_units} random penultimate-layer units of each network of the white-box "
               f"sensitivity max|h(x) − h(x+δ)| over {o.n_images} clean images ({o.n_starts} random starts × {o.n_steps} "
               f"steps per direction), divided by the unit's s.d. over {data.n_sigma_images} clean images of the experiment. "
               "Recorded sites: the lower bound of section 1. Networks named by registered name have random weights; give "
               "checkpoint paths (e.g. AT-ResNet-50) for trained ones.")
    body = render_figure(make_networks_figure(data, recorded, day), caption) + render_table(data.result["mean"]) + links
    return Section("5. Network-unit comparison", body, {"networks": data.result["mean"]})


# -- 6. model quality ------------------------------------------------------------------------------
def compute_quality(days: list[ExperimentDay], *, seed: int) -> dict:
    """Section 6: ``quality`` (:func:`compute_model_quality`: ``prediction``, ``refit``,
    ``directions``) and ``medians``, one row per day of the medians over sites."""
    result = compute_model_quality(days, seed=seed)
    days_seen = sorted({r["day"] for r in result["prediction"]})
    pooled = [r for r in result["directions"] if r["site"] == "all"]
    medians = [{"day": d, **{f"median_{k}": _median([r[k] for r in result["prediction"] if r["day"] == d])
                             for k in ("r", "reliability", "normalized")},
                "median_refit_held_out_r": _median([r["held_out_r"] for r in result["refit"] if r["day"] == d]),
                "fraction_right": _median([r["fraction_right"] for r in pooled if r["day"] == d])} for d in days_seen]
    return {"quality": result, "medians": medians}


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.median(values)) if values else None


def make_quality_figure(result: dict):
    """Left and middle: predictivity of the generating and the refitted model per day; right: the
    fraction of attack directions predicted right against ε (``result``: :func:`compute_model_quality`)."""
    figure, (left, middle, right) = make_figure(13, 4.2, ncols=3)
    days = sorted({r["day"] for r in result["prediction"]})
    _predictivity_panel(left, result["prediction"], "r", "Generating model on the day's new clean images", days)
    _predictivity_panel(middle, result["refit"], "held_out_r", "Refitted model on its held-out stimuli", days)
    pooled = [r for r in result["directions"] if r["site"] == "all"]
    colors = _day_colors(days)
    for d in days:
        rows = [r for r in pooled if r["day"] == d]
        right.plot([r["eps"] for r in rows], [r["fraction_right"] for r in rows], marker="o", color=colors[d],
                   label=f"day {d} (n={sum(r['n_pairs'] for r in rows)} pairs)")
    right.axhline(0.5, color="k", ls=":", lw=1, label="chance")
    right.set(xlabel=EPS_LABEL, ylabel="fraction of directions right", ylim=(0, 1.05),
              title="Response change in the direction the model predicted")
    right.title.set_fontsize(9)
    right.legend(fontsize=7)
    return figure


def _predictivity_panel(ax, rows: list[dict], key: str, title: str, days: list[int]) -> None:
    by_day = {d: [r[key] for r in rows if r["day"] == d and r[key] is not None] for d in days}
    normalized = {d: [r["normalized"] for r in rows if r["day"] == d and r["normalized"] is not None] for d in days}
    jitter = np.random.default_rng(0)
    for d, values in by_day.items():
        ax.scatter(d + jitter.uniform(-0.12, 0.12, len(values)), values, s=12, color="tab:blue", alpha=0.6)
    shown = [d for d in days if by_day[d]]
    ax.plot(shown, [np.median(by_day[d]) for d in shown], color="tab:blue", marker="o", label="Pearson r (median; dots: sites)")
    shown = [d for d in days if normalized[d]]
    ax.plot(shown, [np.median(normalized[d]) for d in shown], color="tab:orange", marker="s",
            label="r / √ρ, noise-normalised (median)")
    ax.axhline(0, color="k", lw=0.5)
    ax.set(xlabel="day", ylabel="predictivity (Pearson r)", title=title, xticks=days)
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7)


def make_quality_section(data: dict, tables: TableWriter) -> Section:
    """``data``: :func:`compute_quality`."""
    links = tables.write("6_quality", data["quality"])
    caption = ("Left: the model that made each day's stimuli (the previous day's refit; day 0: random readout) against the "
               "day's mean clean responses, images it never saw. Middle: the end-of-day refit on the stimuli it held out. "
               "Ceiling convention: ρ is the split-half reliability of the mean responses, Spearman-Brown corrected to the "
               "full number of presentations; a perfect model reaches √ρ, so r/√ρ = 1 is at the noise ceiling. Right: the "
               "fraction of attack pairs whose recorded change went the way the model predicted (the estimator equals the "
               "true mean change only when this is 1; noise keeps it below 1).")
    body = render_figure(make_quality_figure(data["quality"]), caption) + render_table(data["medians"]) + links
    return Section("6. Model quality", body, {"model_quality": data["medians"]})


# -- 7. base-model selection (its own command) ---------------------------------------------------
def read_selection_best(experiment: Path) -> list[dict] | None:
    """The best cells of ``closedloop select-base`` (``report/select_base_tables/best.csv``); None if it has not run."""
    best = experiment / "report" / "select_base_tables" / "best.csv"
    if not best.exists():
        return None
    with best.open(encoding="utf-8") as stream:
        return list(csv.DictReader(stream))


def make_selection_section(experiment: Path, best: list[dict] | None, page_folder: Path) -> Section:
    """A link to the select-base page (relative to ``page_folder``, the report's folder) and its best cells."""
    heading = "7. Base-model selection"
    if best is None:
        command = f"closedloop select-base --experiment {html.escape(str(experiment))} --candidates NAMES --layers NAMES"
        return Section(heading, (f'<p class="note">Not run for this experiment. <code>{command}</code> '
                                 "scores candidate backbones × layers (CKA, predictivity, perturbation transfer) "
                                 "and writes its own page.</p>"))
    page = experiment / "report" / "select_base.html"
    link = Path(os.path.relpath(page, page_folder)).as_posix()
    return Section(heading, (f'<p>From <a href="{html.escape(link)}">{html.escape(page.name)}</a> '
                             "(<code>closedloop select-base</code>), best per criterion:</p>" + render_table(best)))


# -- 8. ground truth -------------------------------------------------------------------------------
def make_truth_figure(result: dict):
    """Estimate against the simulated rig's truth, one point per site × ε × day (``result``:
    :func:`analysis.ground_truth.compute_truth_comparison`)."""
    figure, axes = make_figure(6.5, 5.2)
    sites = result["sites"]
    budgets = sorted({r["eps"] for r in sites})
    markers = dict(zip(budgets, "osD^v<>p"))
    colors = _day_colors(sorted({r["day"] for r in sites}))
    for r in sites:
        axes.errorbar(r["truth"], r["estimate"], yerr=2 * (r["sem"] or 0), color=colors[r["day"]], marker=markers[r["eps"]],
                      ms=5, alpha=0.8, capsize=2, lw=0.8)
    top = max(max(r["truth"] for r in sites), max(r["estimate"] for r in sites)) * 1.05
    axes.plot([0, top], [0, top], "k--", lw=1, label="estimate = truth")
    for eps in budgets:
        axes.scatter([], [], marker=markers[eps], color="gray", label=f"ε = {eps:g}")
    for day, color in colors.items():
        axes.scatter([], [], marker="o", color=color, label=f"day {day}")
    axes.axhline(0, color="k", lw=0.5)
    axes.set(xlabel="true sensitivity (spikes per window, simulated rig)", ylabel="lower bound ŝ (spikes per window)",
             title="Estimate vs truth: one point per site × ε × day")
    axes.legend(fontsize=7)
    return figure


def make_truth_section(result: dict, tables: TableWriter) -> Section:
    if not result["sites"]:
        return Section("8. Ground truth", '<p class="note">No ground truth: the days were recorded on a real rig.</p>')
    links = tables.write("8_truth", result)
    n, below = len(result["sites"]), sum(r["within_2se"] for r in result["sites"])
    caption = ("The simulated rig knows each site's true white-box sensitivity over the same clean images. Points below the "
               "dashed identity line are valid lower bounds; error bars: ± 2 standard errors of the estimate; how far below "
               "the line is how loose the bound is (ratio in the table).")
    note = f'<p class="summary">{below} of {n} estimates are at or below the truth within 2 standard errors.</p>'
    days = ""
    if any(row["expected_mean"] is not None for row in result["days"]):
        days = ('<p class="note">By day, means over sites: the estimate; the same estimator on the simulated sites\' '
                "noise-free expected counts (what the estimate measures without response noise); the fraction of attacks "
                "whose predicted direction was the true one; the truth. A model that learns raises the noise-free value "
                "and the fraction right from day to day.</p>" + render_table(result["days"]))
    body = note + render_figure(make_truth_figure(result), caption) + render_table(result["summary"]) + days + links
    return Section("8. Ground truth (simulated rig)", body,
                   {"truth": {"n": n, "n_within_2se": below, "summary": result["summary"]}})
