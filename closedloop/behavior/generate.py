"""Behavioural stimulus sets (``closedloop behavior generate``): perturbed 8-bit PNGs, a manifest, logits.

From start images with categories and a set of guide classifiers, for every budget ε in the
configuration: disruption, targeted toward each other category, composite targets (pairs and
triples), feature-centroid toward a new class, interpolation toward an image of each other
category, Gaussian noise, and the unperturbed control (Gaziv et al.; DESIGN.md §6). Every
perturbation comes from :mod:`closedloop.attacks.classifiers` / :mod:`closedloop.attacks.baselines`, so the
budget holds on the 8-bit image: ‖png/255 − start/255‖₂ ≤ ε.

The output folder::

    run.json            the resolved configuration and every model (role, source, sha256)
    images/<unit>/...   one PNG per item (uint8 RGB, 224 × 224)
    parts/<unit>.json   the records of one finished unit (written after its PNGs)
    manifest.json       every record (written at the end), plus the models and categories
    manifest.csv        the same, one row per item, logits flattened into columns
    provenance.json     versions, commit, seeds and input digests

A unit is one (guide, mode, budget) batch of attacks, or one model-free (mode, budget) batch. A
run that is interrupted resumes at the first unit without a part file; finished units are not
redone. Logits of every guide and surrogate are computed on the PNGs as read back from disk.
"""

from __future__ import annotations

import csv
import io
import itertools
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from closedloop.attacks.baselines import make_gaussian_baseline, make_interpolation_baseline
from closedloop.attacks.classifiers import CLASSIFIER_MODES, make_classifier_attacks
from closedloop.attacks.engine import compute_predictions, compute_realised_eps
from closedloop.behavior.config import EMBEDDED, BehaviorConfig, render_behavior_config
from closedloop.behavior.manifest import MANIFEST_FIELDS, MANIFEST_NAME
from closedloop.behavior.models import EMBEDDED_CATEGORIES, EMBEDDED_NEW_CLASS, load_behavior_models
from closedloop.core.files import read_json, write_bytes, write_json, write_text
from closedloop.core.logs import logger, progress
from closedloop.core.provenance import compute_provenance, derive_seed
from closedloop.images import IMAGE_EXTENSIONS, make_embedded_image_set, quantize, read_image, read_image_folder, select_categories
from models.devices import resolve_device

__all__ = ["write_behavior_stimuli"]

_RUN_NAME = "run.json"


@dataclass(frozen=True)
class _Starts:
    """The start images: ids, category index per image (guides' order), uint8 pixels (n, 224, 224, 3)."""

    ids: tuple[str, ...]
    categories: np.ndarray
    pixels: np.ndarray


@dataclass(frozen=True)
class _Unit:
    """One batch of items made together: ``rows`` index the start images, ``targets`` per row."""

    key: str
    mode: str
    guide: str
    budget: float
    rows: np.ndarray
    targets: tuple[tuple[int, ...], ...]


def _budget_key(budget: float) -> str:
    return f"eps{budget:g}"


def _read_starts(config: BehaviorConfig, category_names: tuple[str, ...]):
    """(pool ImageSet with categories in the guides' order, chosen start images)."""
    stimuli = config.stimuli
    if stimuli.start_images == EMBEDDED:
        pool = make_embedded_image_set(per_photo=stimuli.embedded_per_photo, seed=derive_seed(stimuli.seed, "start images"))
        pool = select_categories(pool, EMBEDDED_CATEGORIES)
    else:
        pool = read_image_folder(stimuli.start_images)
    unknown = [name for name in pool.category_names if name not in category_names]
    if unknown:
        raise ValueError(
            f"[stimuli] start_images: categories {unknown} are not categories of the guides "
            f"({', '.join(category_names)}); name the sub-folders after the guides' categories."
        )
    pool = select_categories(pool, [name for name in category_names if name in pool.category_names])
    rng = np.random.default_rng(derive_seed(stimuli.seed, "choose start images"))
    chosen = []
    for category in range(len(pool.category_names)):
        members = np.flatnonzero(pool.categories == category)
        chosen += sorted(rng.choice(members, size=min(stimuli.n_per_category, len(members)), replace=False).tolist())
    chosen = np.array(chosen, dtype=np.int64)
    index = {name: k for k, name in enumerate(category_names)}
    categories = np.array([index[pool.category_names[c]] for c in pool.categories[chosen]], dtype=np.int64)
    starts = _Starts(tuple(pool.ids[i] for i in chosen), categories, pool.read(chosen))
    return pool, chosen, starts


def _read_new_class(config: BehaviorConfig) -> tuple[str, np.ndarray]:
    """(name, uint8 pixels (n, 224, 224, 3)) of the new class's images."""
    stimuli = config.stimuli
    if stimuli.new_class == EMBEDDED:
        pool = make_embedded_image_set(per_photo=stimuli.n_new_class, seed=derive_seed(stimuli.seed, "new class"))
        pool = select_categories(pool, [EMBEDDED_NEW_CLASS])
        return EMBEDDED_NEW_CLASS, pool.read(np.arange(len(pool)))
    folder = Path(stimuli.new_class)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)[: stimuli.n_new_class]
    if not files:
        raise ValueError(f"[stimuli] new_class = {str(folder)!r} holds no images ({', '.join(IMAGE_EXTENSIONS)}).")
    return folder.name, np.stack([quantize(read_image(path)) for path in files])


def _choose_composites(config: BehaviorConfig, starts: _Starts, n_categories: int) -> list[list[tuple[int, ...]]]:
    """Per start image: the composite target pairs, then triples, drawn from the other categories."""
    chosen = []
    for start_id, category in zip(starts.ids, starts.categories):
        others = [k for k in range(n_categories) if k != category]
        rng = np.random.default_rng(derive_seed(config.stimuli.seed, "composite", start_id))
        combos = []
        for size, count in ((2, config.perturbations.composite_pairs), (3, config.perturbations.composite_triples)):
            options = list(itertools.combinations(others, size))
            picks = rng.choice(len(options), size=min(count, len(options)), replace=False) if options else []
            combos += [options[i] for i in sorted(picks)]
        chosen.append(combos)
    return chosen


def _make_units(config: BehaviorConfig, guides: list[str], starts: _Starts, n_categories: int,
                interpolation_targets: set[int]) -> list[_Unit]:
    modes, rows = config.perturbations.modes, np.arange(len(starts.ids))
    units = [_Unit("control", "control", "", 0.0, rows, tuple(() for _ in rows))] if "control" in modes else []
    others = [tuple((k,) for k in range(n_categories) if k != c) for c in starts.categories]
    composites = _choose_composites(config, starts, n_categories)

    def expand(per_row) -> tuple[np.ndarray, tuple]:
        pairs = [(row, targets) for row in rows for targets in per_row[row]]
        return np.array([p[0] for p in pairs], dtype=np.int64), tuple(p[1] for p in pairs)

    for budget in config.perturbations.budgets:
        eps = _budget_key(budget)
        if "gaussian" in modes:
            units.append(_Unit(f"gaussian/{eps}", "gaussian", "", budget, rows, tuple(() for _ in rows)))
        if "interpolation" in modes:
            reachable = [tuple(t for t in row_targets if t[0] in interpolation_targets) for row_targets in others]
            units.append(_Unit(f"interpolation/{eps}", "interpolation", "", budget, *expand(reachable)))
        for guide in guides:
            for mode in (m for m in CLASSIFIER_MODES if m in modes):
                if mode == "target":
                    unit_rows, targets = expand(others)
                elif mode == "composite":
                    unit_rows, targets = expand(composites)
                else:
                    unit_rows, targets = rows, tuple(() for _ in rows)
                if len(unit_rows):
                    units.append(_Unit(f"{guide}/{mode}/{eps}", mode, guide, budget, unit_rows, targets))
    return units


def _perturb(unit: _Unit, starts: _Starts, models, context: dict, config: BehaviorConfig, device) -> np.ndarray:
    """uint8 (len(unit.rows), 224, 224, 3): the unit's images."""
    clean = starts.pixels[unit.rows]
    if unit.mode == "control":
        return clean.copy()
    if unit.mode == "gaussian":
        return make_gaussian_baseline(clean, unit.budget, seed=derive_seed(config.stimuli.seed, "gaussian", str(unit.budget)))
    if unit.mode == "interpolation":
        destinations = np.stack([context["interpolation_pixels"][t[0]] for t in unit.targets])
        return make_interpolation_baseline(clean, destinations, unit.budget)
    settings = config.perturbations
    options = dict(eps=unit.budget, n_steps=settings.n_steps or None, logit_push=settings.logit_push,
                   batch_size=settings.batch_size, device=device, precision=settings.precision)
    classifier = models[unit.guide].classifier
    if unit.mode == "disrupt":
        return make_classifier_attacks(classifier, clean, mode="disrupt", labels=starts.categories[unit.rows], **options).pixels
    if unit.mode == "centroid":
        return make_classifier_attacks(classifier, clean, mode="centroid", features=classifier.features(),
                                       centroid=context["centroids"][unit.guide], **options).pixels
    pixels = np.empty_like(clean)
    widths = np.array([len(t) for t in unit.targets])
    for width in np.unique(widths):  # target: 1; composite: 2 and 3, one call each
        rows = np.flatnonzero(widths == width)
        targets = np.array([unit.targets[r] for r in rows])
        pixels[rows] = make_classifier_attacks(
            classifier, clean[rows], mode=unit.mode, targets=targets[:, 0] if unit.mode == "target" else targets, **options
        ).pixels
    return pixels


def _write_png(path: Path, pixels: np.ndarray) -> None:
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buffer, format="PNG")
    write_bytes(path, buffer.getvalue())


def _read_png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _run_unit(unit: _Unit, out: Path, starts: _Starts, models, category_names, context, config, device) -> list[dict]:
    """Make, save and score one unit; returns its records."""
    pixels = _perturb(unit, starts, models, context, config, device)
    files = []
    for row, targets, image in zip(unit.rows, unit.targets, pixels):
        stem = starts.ids[row].replace("/", "-") + "".join(f"_{category_names[t]}" for t in targets)
        files.append(Path("images") / unit.key / f"{stem}.png")
        _write_png(out / files[-1], image)
    saved = np.stack([_read_png(out / name) for name in files])
    realised = compute_realised_eps(saved, starts.pixels[unit.rows])
    logits = {name: compute_predictions(model.classifier.to(device), saved, device=device) for name, model in models.items()}
    records = []
    for j, (row, targets) in enumerate(zip(unit.rows, unit.targets)):
        target_names = [category_names[t] for t in targets]
        if unit.mode == "centroid":
            target_names = [f"new:{context['new_class']}"]
        records.append({
            "item": str(files[j].with_suffix("")).removeprefix("images/"),
            "file": str(files[j]),
            "start_image": starts.ids[row],
            "category": category_names[starts.categories[row]],
            "guide": unit.guide,
            "mode": unit.mode,
            "targets": target_names,
            "target_image": context["interpolation_ids"][targets[0]] if unit.mode == "interpolation" else "",
            "budget": unit.budget,
            "realised_eps": float(realised[j]),
            "logits": {name: values[j].tolist() for name, values in logits.items()},
        })
    return records


def _interpolation_images(pool, chosen: np.ndarray, seed: int) -> tuple[dict, dict]:
    """Per category with images: one destination image (not a start image where possible): ids and pixels."""
    rng = np.random.default_rng(derive_seed(seed, "interpolation images"))
    ids, pixels = {}, {}
    for pool_category in range(len(pool.category_names)):
        members = np.flatnonzero(pool.categories == pool_category)
        spare = np.setdiff1d(members, chosen)
        pick = int(rng.choice(spare if len(spare) else members))
        ids[pool_category], pixels[pool_category] = pool.ids[pick], pool.read([pick])[0]
    return ids, pixels


def _check_run(out: Path, run: dict, restart: bool) -> None:
    """Refuse to mix two configurations or two sets of models in one folder (unless ``restart``)."""
    path = out / _RUN_NAME
    if path.is_file() and not restart:
        before = read_json(path)
        changed = [key for key in ("config", "models") if before.get(key) != run[key]]
        if changed:
            raise ValueError(
                f"'out' {str(out)!r} holds a stimulus set made with other {' and '.join(changed)}; give another folder, "
                "or pass --restart (restart=True) to delete it and start over."
            )
        return
    if restart:
        for name in ("images", "parts"):
            shutil.rmtree(out / name, ignore_errors=True)
        for name in (MANIFEST_NAME, "manifest.csv", "provenance.json"):
            (out / name).unlink(missing_ok=True)
    write_json(path, run)


def write_behavior_stimuli(config: BehaviorConfig, out: str | Path, *, restart: bool = False) -> dict:
    """Make (or finish) the stimulus set of ``config`` in folder ``out``; see the module docstring.

    ``config``: a :class:`~closedloop.behavior.config.BehaviorConfig` with paths resolved (as
    :func:`~closedloop.behavior.config.read_behavior_config` returns it). ``restart``: delete an
    earlier set in ``out`` first. Returns a summary: ``out``, ``n_items``, ``n_units``,
    ``n_units_done_before``, ``seconds``, ``manifest``.
    """
    if not isinstance(config, BehaviorConfig):
        raise TypeError(f"'config' must be a BehaviorConfig (read_behavior_config), but got {type(config).__name__}.")
    started = time.monotonic()
    out = Path(out).expanduser()
    device = resolve_device(config.models.device)
    models = load_behavior_models(config.models, device=device)
    category_names = next(iter(models.values())).classifier.category_names
    run = {
        "config": config.to_dict(),
        "models": {name: {"role": m.role, "source": m.source, "sha256": m.digest} for name, m in models.items()},
    }
    _check_run(out, run, restart)
    pool, chosen, starts = _read_starts(config, category_names)
    ids, pixels = _interpolation_images(pool, chosen, config.stimuli.seed)
    to_guides = {name: k for k, name in enumerate(category_names)}
    context = {
        "interpolation_ids": {to_guides[pool.category_names[c]]: i for c, i in ids.items()},
        "interpolation_pixels": {to_guides[pool.category_names[c]]: p for c, p in pixels.items()},
        "centroids": {},
    }
    guides = [name for name, model in models.items() if model.role == "guide"]
    if "centroid" in config.perturbations.modes:
        context["new_class"], new_pixels = _read_new_class(config)
        context["centroids"] = {name: _compute_centroid(models[name].classifier, new_pixels, device) for name in guides}
    units = _make_units(config, guides, starts, len(category_names), set(context["interpolation_ids"]))
    pending = [unit for unit in units if not _part_path(out, unit).is_file()]
    logger.info("%d units (%d done before) in %s", len(units), len(units) - len(pending), out)
    for unit in progress(pending, description="behaviour stimuli"):
        records = _run_unit(unit, out, starts, models, category_names, context, config, device)
        write_json(_part_path(out, unit), {"unit": unit.key, "records": records})
    records = [record for unit in units for record in read_json(_part_path(out, unit))["records"]]
    manifest = {"category_names": list(category_names), "models": run["models"], "records": records}
    write_json(out / MANIFEST_NAME, manifest)
    write_text(out / "manifest.csv", _render_csv(records, list(models), category_names))
    write_text(out / "behavior.toml", render_behavior_config(config))
    write_json(out / "provenance.json", compute_provenance(
        seeds={"stimuli": config.stimuli.seed},
        inputs={name: m.digest for name, m in models.items()} | {"start_images": pool.digest()},
    ))
    return {
        "out": str(out), "n_items": len(records), "n_units": len(units), "n_units_done_before": len(units) - len(pending),
        "seconds": time.monotonic() - started, "manifest": str(out / MANIFEST_NAME),
    }


def _part_path(out: Path, unit: _Unit) -> Path:
    return out / "parts" / (unit.key.replace("/", "__") + ".json")


def _compute_centroid(classifier, pixels: np.ndarray, device) -> np.ndarray:
    """Mean penultimate feature (n_features,) of the classifier over ``pixels``."""
    features = classifier.features().to(device)
    return compute_predictions(features, pixels, device=device).reshape(len(pixels), -1).mean(0)


def _render_csv(records: list[dict], model_names: list[str], category_names) -> str:
    buffer = io.StringIO()
    logit_columns = [f"logit:{model}:{category}" for model in model_names for category in category_names]
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*MANIFEST_FIELDS, *logit_columns])
    for record in records:
        row = [("+".join(record[key]) if key == "targets" else record[key]) for key in MANIFEST_FIELDS]
        writer.writerow(row + [f"{value:.6g}" for model in model_names for value in record["logits"][model]])
    return buffer.getvalue()
