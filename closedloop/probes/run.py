"""The three probes run on an experiment: ``closedloop evolve``, ``patterns`` and ``geometry``.

Each reads the experiment's fitted IT model (``day_NNN/model.safetensors``, the last finished day by
default) and its recorded clean images and responses, runs its analysis, and writes into
``<experiment>/probes/<tool>/``: its data (``.npz``, ``.csv``, ``summary.json``) and one PNG figure
per site, every file atomically. ``closedloop report`` embeds what it finds there.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from analysis.experiment import read_clean_images, read_experiment
from analysis.html import make_figure, write_csv
from closedloop.config import read_config
from closedloop.core.files import atomic_path, write_json, write_npz
from closedloop.core.logs import logger
from closedloop.core.validation import check_dir, check_integer, check_number, check_option
from closedloop.probes.evolution import EvolutionSettings, RigScorer, make_model_scorer, read_evolution, run_evolution
from closedloop.probes.geometry import compute_response_geometry
from closedloop.probes.patterns import compute_site_patterns
from models import load_backbone, load_classifier, read_it_model
from rigs.launch import RigLauncher

__all__ = ["PROBES_DIR", "ProbeInputs", "read_probe_inputs", "write_evolution", "write_patterns", "write_geometry"]

PROBES_DIR = "probes"
_MAX_FIGURES = 8


@dataclass(frozen=True)
class ProbeInputs:
    """What a probe needs from an experiment: ``model`` (the IT model fitted at the end of ``day``),
    ``pixels`` uint8 (n_images, 224, 224, 3) clean images validly shown on days 0..day, their
    ``responses`` float64 (n_images, n_sites) mean spikes per window, and the ``config``."""

    experiment: Path
    day: int
    model: object
    pixels: np.ndarray
    responses: np.ndarray
    config: object


def read_probe_inputs(experiment: str | Path, *, day: int | None = None, n_images: int | None = None, seed: int = 0) -> ProbeInputs:
    """The fitted model of ``day`` (default: the last finished day) and up to ``n_images`` clean
    images (chosen with ``seed``; default all) with their recorded responses."""
    experiment = check_dir("experiment", experiment)
    days = read_experiment(experiment, last_day=day)
    model_path = days[-1].folder / "model.safetensors"
    if not model_path.exists():
        raise FileNotFoundError(f"day {days[-1].day} of {str(experiment)!r} has no fitted model {model_path.name}; "
                                f"finish the day with `closedloop fit-day {days[-1].day}`.")
    if n_images is not None:
        n_images = check_integer("n_images", n_images, minimum=2)
    pixels, responses = read_clean_images(days, n_images=n_images, seed=seed)
    return ProbeInputs(experiment, days[-1].day, read_it_model(model_path).eval(), pixels, responses, read_config(experiment))


def _sites(sites, n_sites: int) -> list[int]:
    chosen = list(range(n_sites)) if sites is None else [int(s) for s in sites]
    bad = [s for s in chosen if not 0 <= s < n_sites]
    if bad or not chosen:
        raise ValueError(f"'sites' must be site indices in [0, {n_sites - 1}], but got {chosen}.")
    return chosen


def _write_png(path: Path, figure) -> Path:
    # pyplot is imported where a figure is written, as in analysis.html (whose make_figure selects the
    # off-screen Agg backend before pyplot's first import): importing this module does not load it.
    from matplotlib import pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    with atomic_path(path) as temporary:
        temporary.write_bytes(buffer.getvalue())
    return path


def _show(ax, image_chw: np.ndarray, title: str, *, signed: bool) -> None:
    """Show a (3, H, W) pattern: signed patterns scaled symmetrically around grey."""
    image = np.asarray(image_chw, dtype=np.float64).transpose(1, 2, 0)
    if signed:
        scale = max(float(np.abs(image).max()), 1e-12)
        image = 0.5 + 0.5 * image / scale
    ax.imshow(np.clip(image, 0, 1), interpolation="nearest")
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


# ---------------------------------------------------------------------------------------------
# evolve


def write_evolution(
    experiment: str | Path,
    settings: EvolutionSettings,
    *,
    mode: str = "silico",
    day: int | None = None,
    sites=None,
    name: str | None = None,
    clean_index: int = 0,
    n_references: int = 4,
    repetitions: int = 2,
    network: str | None = None,
    classifier: str | None = None,
    layer: str = "avgpool",
    units=None,
    trust: bool = False,
    overwrite: bool = False,
) -> dict:
    """Evolve images for the experiment's sites into ``probes/evolve/<name>/`` (see :mod:`closedloop.probes.evolution`).

    ``settings``: how to search (:class:`closedloop.probes.evolution.EvolutionSettings`; its
    ``image_size`` is replaced by that of the recorded images, its ``seed`` also draws the
    reference images and the rig's shuffles). ``mode``: "silico" (scored by the IT model of
    ``day``) or "loop" (scored by spike counts from the experiment's rig, simulated or real,
    ``repetitions`` valid presentations per image, with ``n_references`` recorded clean images
    shown every generation as drift controls; the elites are shown again every generation and
    ranked by their mean count over all showings). ``settings.eps`` with ``clean_index``: search
    inside the ε-ball around that recorded clean image. ``name``: the run folder (default
    ``<mode>_<encoding>``, or ``<network|classifier>_<encoding>``). In silico, instead of the
    sites: ``network`` (a backbone name or checkpoint; ``units`` of its ``layer``, flattened) or
    ``classifier`` (a classifier source for :func:`models.load_classifier`; ``units`` are class
    indices, default all; scored as softmax confidence); these search without the ε-ball.
    ``trust``: allow checkpoints that need unpickling. ``overwrite``: replace an earlier run of the
    same name. Also writes ``elites.png``. Returns the summary.
    """
    check_option("mode", mode, ("silico", "loop"))
    if network is not None and classifier is not None:
        raise ValueError("give at most one of 'network' and 'classifier' (got both); run them as separate evolutions.")
    if (network is not None or classifier is not None) and mode != "silico":
        raise ValueError(f"'network' and 'classifier' are scored in silico, but got mode={mode!r}; use mode='silico'.")
    inputs = read_probe_inputs(experiment, day=day, seed=settings.seed)
    settings = replace(settings, image_size=inputs.pixels.shape[1])
    if network is not None or classifier is not None:
        summary = _evolve_network(inputs, replace(settings, eps=None), network, classifier, layer, units, trust, name=name,
                                  overwrite=overwrite)
    else:
        summary = _evolve_sites(inputs, settings, mode, sites, name=name, clean_index=clean_index, n_references=n_references,
                                repetitions=repetitions, overwrite=overwrite)
    folder = Path(summary["out"])
    _write_png(folder / "elites.png", _elites_figure(folder))
    return summary


def _evolve_sites(inputs: ProbeInputs, settings: EvolutionSettings, mode: str, sites, *, name: str | None, clean_index: int,
                  n_references: int, repetitions: int, overwrite: bool) -> dict:
    """Evolution on the experiment's sites, scored by the IT model (silico) or by the rig (loop)."""
    chosen = _sites(sites, inputs.responses.shape[1])
    out = inputs.experiment / PROBES_DIR / "evolve" / (name or f"{mode}_{settings.encoding}")
    clean = None
    if settings.eps is not None:
        clean = inputs.pixels[check_integer("clean_index", clean_index, minimum=0, maximum=len(inputs.pixels) - 1)]
    metadata = {"mode": mode, "experiment": str(inputs.experiment), "day": inputs.day, "sites": chosen,
                "clean_index": clean_index if settings.eps is not None else None}
    options = dict(clean=clean, objective_labels=[f"site {s}" for s in chosen], overwrite=overwrite)
    if mode == "silico":
        return run_evolution(make_model_scorer(inputs.model, units=chosen), out, settings, metadata=metadata, **options)
    with _rig_scorer(inputs, chosen, out, n_references=n_references, repetitions=repetitions, seed=settings.seed) as scorer:
        metadata = {**metadata, "n_references": len(scorer.references), "repetitions": repetitions}
        return run_evolution(scorer, out, replace(settings, rescore_elites=True), metadata=metadata, **options)


def _evolve_network(inputs: ProbeInputs, settings: EvolutionSettings, network, classifier, layer: str, units, trust: bool, *,
                    name: str | None, overwrite: bool) -> dict:
    """Evolution in silico on units of a network or classes of a classifier (fooling images)."""
    if classifier is not None:
        model = load_classifier(classifier, trust=trust)
        names = list(model.category_names)
        chosen = list(range(len(names))) if units is None else [int(u) for u in units]
        bad = [u for u in chosen if not 0 <= u < len(names)]
        if bad:
            raise ValueError(f"'units' must be class indices in [0, {len(names) - 1}] of the classifier, but got {bad}.")
        labels, source, kind = [names[u] for u in chosen], classifier, "classifier"
    else:
        if not units:
            raise ValueError(f"'units' must name the units of {network!r} at layer {layer!r} to evolve for, e.g. [0, 5, 9].")
        model, chosen = load_backbone(network, layer, trust=trust).eval(), [int(u) for u in units]
        labels, source, kind = [f"unit {u}" for u in chosen], network, "network"
    out = inputs.experiment / PROBES_DIR / "evolve" / (name or f"{Path(str(source)).stem}_{settings.encoding}")
    return run_evolution(make_model_scorer(model, units=chosen, softmax=classifier is not None), out, settings,
                         objective_labels=labels, overwrite=overwrite,
                         metadata={"mode": "silico", kind: str(source), "layer": layer if network else None, "units": chosen})


@contextmanager
def _rig_scorer(inputs: ProbeInputs, sites: list[int], out: Path, *, n_references: int, repetitions: int,
                seed: int) -> Iterator[RigScorer]:
    """A :class:`RigScorer` on the experiment's rig (launched for the run, simulated or real) with
    ``n_references`` recorded clean images drawn with ``seed`` as drift controls; the rig is stopped after."""
    config = inputs.config
    n_references = check_integer("n_references", n_references, minimum=0)
    references = inputs.pixels[np.random.default_rng(seed).choice(len(inputs.pixels), min(n_references, len(inputs.pixels)),
                                                                  replace=False)]
    with RigLauncher().connect(config, out) as client:
        yield RigScorer(client, references, out, sites=sites, repetitions=repetitions, seed=seed)
        client.stop()


def _elites_figure(folder: Path):
    record = read_evolution(folder)
    elites, history = record["elites"], record["history"]
    n = len(elites["scores"])
    figure, axes = make_figure(2.0 * min(n, 6) + 3.5, 2.4 * -(-n // 6) + 0.2, ncols=min(n, 6) + 1, nrows=-(-n // 6))
    axes = np.atleast_2d(axes)
    curves = np.array([g["elite"] for g in history["generations"]])
    chart = axes[0, 0]
    for k in range(n):
        chart.plot(curves[:, k], label=history["objectives"][k])
    chart.set(xlabel="generation", ylabel="elite score", title="elite score per objective")
    chart.yaxis.label.set_size(8)
    chart.legend(fontsize=6)
    for ax in axes[1:, 0]:
        ax.axis("off")
    for k, ax in enumerate(axes[:, 1:].ravel()):
        if k < n:
            ax.imshow(elites["pixels"][k])
            ax.set_title(f"{elites['objectives'][k]}: {elites['scores'][k]:.3g}\n(gen {elites['generation'][k]})", fontsize=7)
        ax.axis("off")
    return figure


# ---------------------------------------------------------------------------------------------
# patterns


def write_patterns(experiment: str | Path, *, day: int | None = None, sites=None, eps: float = 3.0, n_images: int | None = 64,
                   n_aai: int = 8, n_noise: int = 8, n_steps: int = 20, seed: int = 0) -> dict:
    """Adversarial patterns of the experiment's sites into ``probes/patterns/`` (see :mod:`closedloop.probes.patterns`).

    Writes ``patterns.npz`` (``site_<k>_<pattern>`` float32 (3, 224, 224)), ``similarity.csv``,
    ``site_<k>.png`` and ``summary.json``. Returns the summary.
    """
    check_number("eps", eps, minimum=0.0, inclusive=False)
    inputs = read_probe_inputs(experiment, day=day, n_images=n_images, seed=seed)
    chosen = _sites(sites, inputs.responses.shape[1])
    out = inputs.experiment / PROBES_DIR / "patterns"
    out.mkdir(parents=True, exist_ok=True)
    result = compute_site_patterns(inputs.model, chosen, inputs.pixels, inputs.responses, eps=eps, n_aai=n_aai,
                                   n_noise=n_noise, n_steps=n_steps, seed=seed)
    arrays = {f"site_{site}_{name}": pattern for site, found in result["patterns"].items() for name, pattern in found.items()}
    write_npz(out / "patterns.npz", **arrays)
    write_csv(out / "similarity.csv", result["similarity"])
    for site, found in list(result["patterns"].items())[:_MAX_FIGURES]:
        figure, axes = make_figure(12, 2.6, ncols=len(found))
        for ax, (pattern_name, pattern) in zip(axes, found.items()):
            score = next((r["similarity_to_data"] for r in result["similarity"]
                          if r["site"] == site and r["pattern"] == pattern_name), None)
            title = pattern_name.replace("_", " ").replace("pnc", "PNC")
            _show(ax, pattern, title + ("" if score is None else f"\ncos to recorded PNC {score:.2f}"), signed=True)
        figure.suptitle(f"site {site}: adversarial patterns (ε = {eps:g}) and contrast images", fontsize=9)
        _write_png(out / f"site_{site}.png", figure)
    summary = {"day": inputs.day, "eps": eps, "sites": chosen, "n_images": len(inputs.pixels), "similarity": result["similarity"]}
    write_json(out / "summary.json", summary)
    logger.info("patterns: wrote %s", out)
    return summary


# ---------------------------------------------------------------------------------------------
# geometry


def write_geometry(experiment: str | Path, *, day: int | None = None, sites=None, eps: float = 1.0, n_images: int = 2,
                   second: str = "mei", n_grid: int = 15, n_path: int = 4, n_steps: int = 10, seed: int = 0) -> dict:
    """Response geometry of the experiment's sites into ``probes/geometry/`` (see :mod:`closedloop.probes.geometry`).

    ``n_images`` recorded clean images per site. Writes ``curvature.csv`` (one row per site × image),
    ``maps.npz`` (``responses`` (n_maps, n_grid, n_grid), ``a``/``b`` grid, ``unit``, ``image``,
    ``path_length``), ``contours.png``, ``curvature_vs_sensitivity.png`` and ``summary.json``.
    """
    inputs = read_probe_inputs(experiment, day=day, n_images=n_images, seed=seed)
    chosen = _sites(sites, inputs.responses.shape[1])
    out = inputs.experiment / PROBES_DIR / "geometry"
    out.mkdir(parents=True, exist_ok=True)
    result = compute_response_geometry(inputs.model, inputs.pixels, chosen, eps=eps, second=second, n_grid=n_grid,
                                       n_path=n_path, n_steps=n_steps, seed=seed)
    maps = result["maps"]
    write_npz(out / "maps.npz", responses=np.stack([m["responses"] for m in maps]), a=maps[0]["a"], b=maps[0]["b"],
              unit=np.array([m["unit"] for m in maps]), image=np.array([m["image"] for m in maps]),
              clean=np.array([m["clean"] for m in maps]), path_length=np.array([m["path_length"] for m in maps]))
    write_csv(out / "curvature.csv", result["rows"])
    _write_png(out / "contours.png", _contour_figure(maps[:_MAX_FIGURES], result["rows"], second, eps))
    _write_png(out / "curvature_vs_sensitivity.png", _scatter_figure(result["rows"], result["correlation"]))
    summary = {"day": inputs.day, "eps": eps, "second": second, "sites": chosen, "correlation": result["correlation"]}
    write_json(out / "summary.json", summary)
    logger.info("geometry: wrote %s", out)
    return summary


def _contour_figure(maps: list[dict], rows: list[dict], second: str, eps: float):
    ncols = min(4, len(maps))
    nrows = -(-len(maps) // ncols)
    figure, axes = make_figure(3.2 * ncols, 3.0 * nrows, ncols=ncols, nrows=nrows)
    for ax, m, row in zip(np.atleast_1d(axes).ravel(), maps, rows):
        levels = np.linspace(m["responses"].min(), m["responses"].max(), 12)
        filled = ax.contourf(m["a"], m["b"], m["responses"], levels=levels, cmap="viridis")
        ax.contour(m["a"], m["b"], m["responses"], levels=[m["clean"]], colors="white", linewidths=1.5)
        ax.annotate("", xy=(m["path_length"], 0), xytext=(0, 0), arrowprops={"arrowstyle": "->", "color": "red", "lw": 2})
        ax.plot([0], [0], "wo", ms=4)
        ax.set_title(f"site {m['unit']}, image {m['image']}: |κ| = {row['curvature']:.3g}", fontsize=8)
        ax.set_xlabel("attack direction (pixel units)", fontsize=7)
        ax.set_ylabel(f"{second} direction ⊥", fontsize=7)
        figure.colorbar(filled, ax=ax, shrink=0.8).ax.tick_params(labelsize=6)
    return figure


def _scatter_figure(rows: list[dict], correlation: dict):
    figure, ax = make_figure(5.5, 4.2)
    usable = [r for r in rows if r["normalized_sensitivity"] is not None]
    ax.scatter([r["curvature"] for r in usable], [r["normalized_sensitivity"] for r in usable], c=[r["unit"] for r in usable],
               cmap="tab10", s=25)
    r = correlation["spearman_r"]
    ax.set(xlabel="mean |κ| along the attack path (1 / pixel-unit distance)",
           ylabel="model sensitivity at ε (units of the site's s.d.)",
           title=f"curvature vs sensitivity: n = {correlation['n']}, Spearman r = " + ("—" if r is None else f"{r:.2f}"))
    return figure
