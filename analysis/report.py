"""The offline experiment report (``closedloop report``) and the base-selection page (``closedloop select-base``).

:func:`write_report` runs every analysis of :mod:`analysis` over an experiment's finished days
and writes one self-contained HTML page (figures embedded as PNG) plus, next to it, a folder
``<name>_tables/`` holding the table behind every figure as CSV and ``summary.json`` with the
headline numbers. :func:`write_selection_report` does the same for the base-model selection.
"""

from __future__ import annotations

import html
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from analysis.base_selection import CRITERIA, compute_base_selection
from analysis.categories import compute_category_preference
from analysis.experiment import ExperimentDay, read_clean_images, read_experiment
from analysis.ground_truth import compute_truth_comparison
from analysis.html import make_figure, render_figure, render_links, render_table, write_csv, write_page, write_pdf
from analysis.image_curves import compute_image_curves
from analysis.model_quality import compute_model_quality
from analysis.network_units import compute_network_sensitivity
from analysis.probe_sections import render_evolution_section, render_geometry_section, render_patterns_section
from analysis.progress import compute_progress
from analysis.sensitivity_curves import compute_response_scale, compute_sensitivity_curves
from closedloop.config import read_config
from closedloop.core.files import write_json
from closedloop.core.logs import progress
from closedloop.core.validation import check_dir, check_integer

__all__ = ["NetworkOptions", "write_report", "write_selection_report"]

EPS_LABEL = "budget ε (L2 norm, [0, 1] pixel units)"
NORMALIZED_LABEL = "sensitivity lower bound\n(units of the site's clean-response s.d.)"
BASELINE_STYLE = {"gaussian": ("tab:gray", "Gaussian noise"), "interpolation": ("tab:blue", "interpolation")}
_MAX_PANELS = 8


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


@dataclass
class _Context:
    experiment: Path
    days: list[ExperimentDay]
    day: ExperimentDay
    tables_dir: Path
    networks: NetworkOptions
    device: str
    seed: int
    written: list[Path] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    curves: dict = field(default_factory=dict)

    def write_tables(self, prefix: str, tables: dict[str, list[dict]]) -> str:
        paths = [write_csv(self.tables_dir / f"{prefix}_{name}.csv", rows) for name, rows in tables.items()]
        self.written += paths
        return render_links(paths, self.tables_dir.parent)


def _fmt(value, digits: int = 3) -> str:
    return "—" if value is None or (isinstance(value, float) and not np.isfinite(value)) else f"{value:.{digits}g}"


# -- 1. sensitivity curves -----------------------------------------------------------------------
def _section_curves(c: _Context) -> tuple[str, str]:
    curves = compute_sensitivity_curves(c.day.records)
    scale = compute_response_scale(c.day.clean_means())
    baselines = {kind: compute_sensitivity_curves(c.day.records, kind=kind)["mean"] for kind in BASELINE_STYLE}
    c.curves = curves
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
        rows = [r for r in baselines[kind] if r["mean"] is not None]
        if rows:
            axes.errorbar([r["eps"] for r in rows], [r["mean"] for r in rows], yerr=[r["sd"] for r in rows], color=color,
                          ls="--", marker="s", ms=4, capsize=3, label=f"{label} (baseline): mean ± s.d.")
    axes.axhline(1.0, color="k", ls=":", lw=1.2, label="clean-response s.d. (= 1)")
    difference = scale["mean"][0]["normalized_difference"]
    if difference is not None:
        axes.axhline(difference, color="tab:green", ls="-.", lw=1.2,
                     label=f"mean |r(x) − r(x′)|, two random clean images ({difference:.2f})")
    axes.axhline(0, color="k", lw=0.5)
    axes.set(xlabel=EPS_LABEL, ylabel=NORMALIZED_LABEL,
             title=f"Normalised sensitivity lower bound per site, day {c.day.day}")
    axes.legend(fontsize=7.5, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    links = c.write_tables("1_sensitivity", {"sites": curves["sites"], "mean": curves["mean"], "scale": scale["sites"],
                                             **{f"baseline_{k}": v for k, v in baselines.items()}})
    c.summary["sensitivity"] = {"day": c.day.day, "mean": curves["mean"], "normalized_difference": difference}
    caption = (f"Day {c.day.day}. Thin red lines: each site's biased-down lower bound ŝ_i(ε) divided by σ_i, the s.d. of its "
               "mean response over the day's clean images; thick: mean ± s.d. over sites, labelled with the number of sites and "
               "perturbed images. Dashed: model-free baselines at the same budgets. Dotted line: one clean-response s.d.; "
               "dash-dotted: the mean difference between the responses to two random clean images, for scale. A curve above "
               "the dotted line means the perturbations moved the site by more than the spread of its clean responses.")
    return "1. Sensitivity curves", render_figure(figure, caption) + render_table(curves["mean"]) + links


# -- 2. image-specific curves ----------------------------------------------------------------------
def _section_images(c: _Context) -> tuple[str, str]:
    result = compute_image_curves(c.day.responses)
    sites = sorted({r["site"] for r in result["site_slopes"]})
    links = c.write_tables("2_images", result)
    if not sites:
        return "2. Image-specific curves", '<p class="note">No site has images attacked at two or more budgets.</p>' + links
    shown = sites[:_MAX_PANELS]
    ncols = min(4, len(shown))
    nrows = -(-len(shown) // ncols)
    figure, axes = make_figure(3.0 * ncols + 0.5, 2.8 * nrows + 0.4, ncols=ncols, nrows=nrows)
    axes = np.atleast_1d(axes).ravel()
    slopes = {r["site"]: r for r in result["site_slopes"]}
    for ax, site in zip(axes, shown):
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
    for ax in axes[len(shown):]:
        ax.set_visible(False)
    figure.suptitle(f"Image-specific sensitivity, day {c.day.day} (orange: one image each; black: mean ± s.e.m.)")
    more = f" The first {len(shown)} of {len(sites)} sites are drawn; the tables hold all." if len(sites) > len(shown) else ""
    caption = ("Per-image term of the estimator, s_i(x, ε) = sign(f(x) − f(x+δ))·(r(x) − r(x+δ)), for every clean image "
               "attacked at several budgets. Slope: mean over images of (s(x, ε_max) − s(x, ε_min)) / (ε_max − ε_min); p: "
               "two-sided one-sample t-test of the per-image slopes against 0. Per-image z-tests (pooled trial-to-trial "
               "variance) are in the image_slopes table." + more)
    significant = sum(r["p"] < 0.05 and r["mean_slope"] > 0 for r in result["site_slopes"])
    c.summary["image_slopes"] = {"n_sites": len(sites), "n_significant_positive": significant}
    note = (f'<p class="summary">{significant} of {len(sites)} sites have a significantly positive mean slope '
            "(p &lt; 0.05): larger budgets moved them further.</p>")
    return "2. Image-specific curves", note + render_figure(figure, caption) + render_table(result["site_slopes"]) + links


# -- 3. day-over-day progress ---------------------------------------------------------------------
def _section_progress(c: _Context) -> tuple[str, str]:
    result = compute_progress({d.day: d.records for d in c.days})
    links = c.write_tables("3_progress", result)
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
    fold = result["fold_change"]
    if fold:
        eps = fold[0]["eps"]
        for kind, color in (("attack", "tab:red"), *((k, v[0]) for k, v in BASELINE_STYLE.items())):
            rows = [r for r in result["curves"] if r["kind"] == kind and r["eps"] == eps and r["mean"] is not None]
            right.errorbar([r["day"] for r in rows], [r["mean"] for r in rows], yerr=[r["sd"] for r in rows], color=color,
                           marker="o", capsize=3, ls="-" if kind == "attack" else "--",
                           label="model-guided attacks" if kind == "attack" else BASELINE_STYLE[kind][1])
        ratio = fold[0]["fold_change"]
        change = f"×{ratio:.2f}" if ratio is not None else "no fold change (first ≤ 0)"
        right.set(xlabel="day", ylabel=NORMALIZED_LABEL,
                  title=f"Smallest budget ε = {eps:g}, day {fold[0]['first_day']} → {fold[0]['last_day']}: {change}")
        right.title.set_fontsize(9)
        right.set_xticks(days)
        right.axhline(0, color="k", lw=0.5)
        right.legend(fontsize=7)
    c.summary["progress"] = {"fold_change": fold}
    caption = ("Left: the realised normalised lower bound at each budget, one line per day (day 0, made with a random "
               "readout, is left out as in the paper when later days exist); dashed: the model-free baselines averaged "
               "over the same days. Right: the bound at the smallest budget against the day; the title gives the fold "
               "change from the first to the last included day. Error bars: s.d. over sites.")
    table = render_table(fold, ["eps", "first_day", "last_day", "first", "last", "fold_change"])
    return "3. Day-over-day progress", render_figure(figure, caption) + table + links


def _day_colors(days: list[int]) -> dict[int, tuple]:
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return {day: cmap(0.1 + 0.8 * i / max(len(days) - 1, 1)) for i, day in enumerate(days)}


# -- 4. category preference and super-stimuli ----------------------------------------------------
def _section_categories(c: _Context) -> tuple[str, str]:
    result = compute_category_preference([d.responses for d in c.days], window_length_s=c.day.window_length_s)
    links = c.write_tables("4_categories", result)
    window = c.day.window_length_s
    crossing = {r["site"]: r for r in result["crossing"]}
    preference = {r["site"]: r for r in result["preference"]}
    sites = sorted(crossing)[:_MAX_PANELS]
    body = ""
    if sites:
        ncols = min(4, len(sites))
        nrows = -(-len(sites) // ncols)
        figure, axes = make_figure(3.0 * ncols + 0.5, 2.9 * nrows + 0.5, ncols=ncols, nrows=nrows)
        axes = np.atleast_1d(axes).ravel()
        for ax, site in zip(axes, sites):
            _category_panel(ax, site, result["curves"], preference[site], crossing[site], window)
        for ax in axes[len(sites):]:
            ax.set_visible(False)
        figure.suptitle("Increase attacks on non-preferred images vs the preferred category")
        caption = ("Per site: black, the mean (± s.d.) rate evoked by model-guided increase attacks on clean images of "
                   "categories other than the site's preferred one, at ε = 0 (the same images, clean) and at each budget; "
                   "n per point is the number of attacked images. Green band: mean ± s.d. of the clean responses to the "
                   "preferred category (pooled over all days). Red line: the budget at which the attacks reach the "
                   "preferred mean. Rates are spikes per response window ÷ "
                   f"{window * 1000:.0f} ms, in Hz.")
        body = render_figure(figure, caption)
    s = result["summary"][0]
    c.summary["categories"] = s
    note = (f'<p class="summary">{s["n_crossing"]} of {s["n_sites"]} sites reached their preferred-category mean'
            + (f" at ε = {_fmt(s['crossing_eps_mean'])} ± {_fmt(s['crossing_eps_sd'])}" if s["n_crossing"] else "")
            + f"; at the largest budget the attacks evoked {_fmt(s['rate_at_max_eps_hz_mean'])} ± "
              f"{_fmt(s['rate_at_max_eps_hz_sd'])} Hz against {_fmt(s['preferred_rate_hz_mean'])} ± "
              f"{_fmt(s['preferred_rate_hz_sd'])} Hz for the preferred category (paper: ε ≈ 4 ± 1.6; 310 ± 60 vs 216 ± 60 Hz "
              "at ε = 10).</p>")
    columns = ["site", "preferred", "n_preferred", "preferred_mean", "least_preferred", "least_mean", "n_categories"]
    return "4. Category preference and super-stimuli", (note + body + render_table(result["preference"], columns)
                                                          + render_table(result["crossing"]) + links)


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


# -- 5. network units ------------------------------------------------------------------------------
def _network_sources(c: _Context) -> dict:
    def label(name: str) -> str:
        return Path(name).stem if Path(name).suffix else name

    if c.networks.networks is None:
        base = read_config(c.experiment).model.backbone
        return {f"base model ({label(base)})": base}
    return {label(name): name for name in c.networks.networks}


def _section_networks(c: _Context) -> tuple[str, str]:
    sources = _network_sources(c)
    if not sources:
        return "5. Network units", '<p class="note">Skipped (no networks named; see --networks).</p>'
    o = c.networks
    budgets = sorted({r["eps"] for r in c.day.records if r["kind"] == "attack"})
    images, _ = read_clean_images(c.days, n_images=o.n_sigma_images, seed=c.seed)
    result = compute_network_sensitivity(sources, images, budgets, n_units=o.n_units, n_images=o.n_images, n_starts=o.n_starts,
                                         n_steps=o.n_steps, trust=o.trust, seed=c.seed, device=c.device)
    links = c.write_tables("5_networks", result)
    figure, axes = make_figure(8, 4.6)
    recorded = [r for r in c.curves["mean"] if r["mean"] is not None]
    axes.errorbar([r["eps"] for r in recorded], [r["mean"] for r in recorded], yerr=[r["sd"] for r in recorded], color="tab:red",
                  marker="o", lw=2.5, capsize=4, label=f"recorded sites, day {c.day.day} (n={recorded[0]['n_sites']}; lower bound)")
    for (label, _), color in zip(sources.items(), ("tab:purple", "tab:brown", "tab:olive", "tab:cyan", "tab:pink")):
        rows = [r for r in result["mean"] if r["network"] == label]
        axes.errorbar([r["eps"] for r in rows], [r["mean"] for r in rows], yerr=[r["sd"] for r in rows], color=color,
                      marker="^", capsize=3, label=f"{label} penultimate units (n={rows[0]['n_units']}; white-box)")
    axes.axhline(1.0, color="k", ls=":", lw=1, label="clean-response s.d.")
    axes.set(xlabel=EPS_LABEL, ylabel="sensitivity\n(units of the unit's / site's clean-response s.d.)",
             title="Network units (white-box) and recorded sites (lower bound), same normalisation")
    axes.axhline(0, color="k", lw=0.5)
    axes.legend(fontsize=7)
    caption = (f"Network units: mean ± s.d. over {o.n_units} random penultimate-layer units of each network of the white-box "
               f"sensitivity max|h(x) − h(x+δ)| over {o.n_images} clean images ({o.n_starts} random starts × {o.n_steps} "
               f"steps per direction), divided by the unit's s.d. over {len(images)} clean images of the experiment. Recorded "
               "sites: the lower bound of section 1. Networks named by registered name have random weights; give checkpoint "
               "paths (e.g. AT-ResNet-50) for trained ones.")
    c.summary["networks"] = result["mean"]
    return "5. Network-unit comparison", render_figure(figure, caption) + render_table(result["mean"]) + links


# -- 6. model quality ------------------------------------------------------------------------------
def _section_quality(c: _Context) -> tuple[str, str]:
    result = compute_model_quality(c.days, seed=c.seed)
    links = c.write_tables("6_quality", result)
    figure, (left, middle, right) = make_figure(13, 4.2, ncols=3)
    days = sorted({r["day"] for r in result["prediction"]})
    for ax, rows, key, title in ((left, result["prediction"], "r", "Generating model on the day's new clean images"),
                                 (middle, result["refit"], "held_out_r", "Refitted model on its held-out stimuli")):
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
    caption = ("Left: the model that made each day's stimuli (the previous day's refit; day 0: random readout) against the "
               "day's mean clean responses, images it never saw. Middle: the end-of-day refit on the stimuli it held out. "
               "Ceiling convention: ρ is the split-half reliability of the mean responses, Spearman-Brown corrected to the "
               "full number of presentations; a perfect model reaches √ρ, so r/√ρ = 1 is at the noise ceiling. Right: the "
               "fraction of attack pairs whose recorded change went the way the model predicted (the estimator equals the "
               "true mean change only when this is 1; noise keeps it below 1).")
    medians = [{"day": d, **{f"median_{k}": _median([r[k] for r in result["prediction"] if r["day"] == d])
                             for k in ("r", "reliability", "normalized")},
                "median_refit_held_out_r": _median([r["held_out_r"] for r in result["refit"] if r["day"] == d]),
                "fraction_right": _median([r["fraction_right"] for r in pooled if r["day"] == d])} for d in days]
    c.summary["model_quality"] = medians
    return "6. Model quality", render_figure(figure, caption) + render_table(medians) + links


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.median(values)) if values else None


# -- 7. base-model selection (its own command) ---------------------------------------------------
def _section_selection(c: _Context) -> tuple[str, str]:
    page = c.experiment / "report" / "select_base.html"
    tables = page.parent / "select_base_tables"
    if not (tables / "best.csv").exists():
        command = f"closedloop select-base --experiment {html.escape(str(c.experiment))} --candidates NAMES --layers NAMES"
        return "7. Base-model selection", (f'<p class="note">Not run for this experiment. <code>{command}</code> '
                                           "scores candidate backbones × layers (CKA, predictivity, perturbation transfer) "
                                           "and writes its own page.</p>")
    import csv

    with (tables / "best.csv").open(encoding="utf-8") as stream:
        best = list(csv.DictReader(stream))
    link = Path(os.path.relpath(page, c.tables_dir.parent)).as_posix()
    return "7. Base-model selection", (f'<p>From <a href="{html.escape(link)}">{html.escape(page.name)}</a> '
                                       "(<code>closedloop select-base</code>), best per criterion:</p>" + render_table(best))


# -- 8. ground truth -------------------------------------------------------------------------------
def _section_truth(c: _Context) -> tuple[str, str]:
    result = compute_truth_comparison({d.day: d.records for d in c.days})
    if not result["sites"]:
        return "8. Ground truth", '<p class="note">No ground truth: the days were recorded on a real rig.</p>'
    links = c.write_tables("8_truth", result)
    figure, axes = make_figure(6.5, 5.2)
    budgets = sorted({r["eps"] for r in result["sites"]})
    markers = dict(zip(budgets, "osD^v<>p"))
    colors = _day_colors(sorted({r["day"] for r in result["sites"]}))
    for r in result["sites"]:
        axes.errorbar(r["truth"], r["estimate"], yerr=2 * (r["sem"] or 0), color=colors[r["day"]], marker=markers[r["eps"]],
                      ms=5, alpha=0.8, capsize=2, lw=0.8)
    top = max(max(r["truth"] for r in result["sites"]), max(r["estimate"] for r in result["sites"])) * 1.05
    axes.plot([0, top], [0, top], "k--", lw=1, label="estimate = truth")
    for eps in budgets:
        axes.scatter([], [], marker=markers[eps], color="gray", label=f"ε = {eps:g}")
    for day, color in colors.items():
        axes.scatter([], [], marker="o", color=color, label=f"day {day}")
    axes.axhline(0, color="k", lw=0.5)
    axes.set(xlabel="true sensitivity (spikes per window, simulated rig)", ylabel="lower bound ŝ (spikes per window)",
             title="Estimate vs truth: one point per site × ε × day")
    axes.legend(fontsize=7)
    n, below = len(result["sites"]), sum(r["within_2se"] for r in result["sites"])
    c.summary["truth"] = {"n": n, "n_within_2se": below, "summary": result["summary"]}
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
    return "8. Ground truth (simulated rig)", note + render_figure(figure, caption) + render_table(result["summary"]) + days + links


# -- overview and the page -----------------------------------------------------------------------
def _section_overview(c: _Context) -> tuple[str, str]:
    rows = []
    for d in c.days:
        s = d.stimuli
        kinds = np.array(s["kind"].tolist(), dtype=str)
        rows.append({"day": d.day, "n_stimuli": len(kinds), "n_clean": int((kinds == "clean").sum()),
                     "n_attacked_images": int(np.unique(s["parent"][kinds == "attack"]).size),
                     "n_attacks": int((kinds == "attack").sum()), "n_valid_presentations": int(d.responses.valid.sum()),
                     "counts_from": d.responses.source, "n_sites": int(d.responses.means.shape[1])})
    c.write_tables("0_days", {"overview": rows})
    text = (f"<p>Experiment <code>{html.escape(str(c.experiment))}</code>: {len(c.days)} finished day(s) "
            f"({', '.join(str(d.day) for d in c.days)}); single-day sections use day {c.day.day}. Rig: "
            f"{'simulated' if c.day.simulated else 'real'}; response window {c.day.window_s[0] * 1000:.0f}–"
            f"{c.day.window_s[1] * 1000:.0f} ms after onset. Sensitivities are in spikes per response window, or divided "
            "by each site's clean-response s.d. (normalised); ε is the L2 norm of the perturbation over all 3 × 224 × 224 "
            "values in [0, 1] units. Every figure's numbers are in the linked CSV tables; docs/report.md explains "
            "each analysis.</p>")
    return "Overview", text + render_table(rows)


# -- 9–11. probes (their own commands) -----------------------------------------------------------
def _section_evolution(c: _Context) -> tuple[str, str]:
    return "9. Evolved images", render_evolution_section(c.experiment)


def _section_patterns(c: _Context) -> tuple[str, str]:
    return "10. Adversarial patterns", render_patterns_section(c.experiment)


def _section_geometry(c: _Context) -> tuple[str, str]:
    return "11. Response geometry", render_geometry_section(c.experiment)


_SECTIONS: tuple[Callable[[_Context], tuple[str, str]], ...] = (
    _section_overview, _section_curves, _section_images, _section_progress, _section_categories, _section_networks,
    _section_quality, _section_selection, _section_truth, _section_evolution, _section_patterns, _section_geometry,
)


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
    context = _Context(experiment, days, days[-1], out.parent / f"{out.stem}_tables", networks or NetworkOptions(),
                       device, seed)
    context.tables_dir.mkdir(parents=True, exist_ok=True)
    sections = [build(context) for build in progress(_SECTIONS, description="report sections")]
    title = f"{experiment.name}: sensitivity report, days {days[0].day}–{days[-1].day}"
    write_page(out, title, sections)
    context.written.append(write_json(context.tables_dir / "summary.json", context.summary))
    pdf_path = write_pdf(out, out.with_suffix(".pdf")) if pdf else None
    return {"html": str(out), "pdf": None if pdf_path is None else str(pdf_path),
            "tables": [str(p) for p in context.written], "summary": context.summary}


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
            ax.text(j, i, _fmt(value, 2), ha="center", va="center", fontsize=8, color="w")
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
    from matplotlib.patches import Rectangle

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
                   f"({_fmt(r['score'])})</li>" for r in result["best"])
    body = (f'<p class="summary">Best per criterion:</p><ul>{best}</ul>' + _selection_figure(result["scores"])
            + render_table(result["scores"]) + render_links(paths, out.parent))
    write_page(out, f"{experiment.name}: base-model selection", [("Candidates × layers", body)])
    return {"html": str(out), "tables": [str(p) for p in paths], **result}
