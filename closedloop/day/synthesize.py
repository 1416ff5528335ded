"""Stage 2 of a day: the day's stimuli — clean images, per-site attacks, model-free baselines.

Attacks come from the generating model (day N−1's fitted model; on day 0 the base backbone with
a random readout): for every attacked clean image, targeted site and budget, both directions are
solved and the one with the larger predicted change kept (:func:`closedloop.attacks.sites.make_site_attacks`).
Baselines at the same budgets: Gaussian noise and interpolation toward a clean image of another
category. Every stimulus carries the generating model's prediction on its 8-bit image.

Attack jobs are made in parts saved under ``parts_dir`` as they finish, so a crash loses at
most the part in progress and a rerun continues from the parts already made.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from closedloop.attacks.baselines import make_gaussian_baseline, make_interpolation_baseline
from closedloop.attacks.engine import compute_predictions
from closedloop.attacks.sites import make_site_attacks
from closedloop.config import AttackSection
from closedloop.core.files import read_json, write_npz
from closedloop.core.logs import progress
from closedloop.core.provenance import derive_seed
from closedloop.data import layout
from closedloop.data.bundle import make_event_codes
from closedloop.data.store import create_store, open_store
from closedloop.day.context import make_site_table
from closedloop.day.plan import Plan, read_plan

__all__ = ["DayStimuli", "make_day_stimuli", "run_stage"]

PART_NAME = "part_{:05d}.npz"


@dataclass(frozen=True)
class DayStimuli:
    """The day's stimuli in store order (clean first, then attacks, then baselines).

    All arrays have n_stimuli rows: ``pixels`` uint8 (n, 224, 224, 3); ``parent`` (index of the
    clean stimulus, −1 for clean); ``site`` (−1 if none); ``eps`` (budget, [0,1] pixel units, 0 for
    clean); ``direction`` (+1/−1 for attacks, 0 otherwise); ``kind`` (str); ``predicted``
    (n, n_sites), spikes per window predicted on the 8-bit image by the generating model.
    """

    pixels: np.ndarray
    parent: np.ndarray
    site: np.ndarray
    eps: np.ndarray
    direction: np.ndarray
    kind: np.ndarray
    predicted: np.ndarray


def _attack_jobs(plan: Plan, clean_position: dict[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(clean row, site, eps) of every attack, ordered by budget, then site, then image."""
    rows = [(clean_position[p], s, e) for e in plan.budgets for s in plan.sites for p in plan.attack_parents]
    if not rows:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    image, site, eps = (np.array(column) for column in zip(*rows))
    return image.astype(np.int64), site.astype(np.int64), eps.astype(np.float64)


def _make_attacks(model, clean, jobs, settings: AttackSection, *, seed, parts_dir: Path, part_size: int, device):
    image, site, eps = jobs
    n_parts = -(-len(image) // part_size)
    parts = []
    for part in progress(range(n_parts), description="attacks (parts)"):
        path = parts_dir / PART_NAME.format(part)
        chosen = slice(part * part_size, (part + 1) * part_size)
        if not path.exists():
            made = make_site_attacks(
                model, clean, image[chosen], site[chosen], eps[chosen],
                n_steps=settings.steps, step_ratio=settings.step_ratio, random_start=settings.random_start,
                n_restarts=settings.restarts, batch_size=settings.batch_size,
                seed=derive_seed(seed, "attack-part", part), device=device, precision=settings.precision,
            )
            write_npz(path, compressed=False, pixels=made.pixels, direction=made.direction, predicted=made.predicted)
        with np.load(path) as saved:
            if len(saved["pixels"]) != len(image[chosen]):
                raise ValueError(f"{path} holds {len(saved['pixels'])} attacks, expected {len(image[chosen])}; "
                                 "it was made with another plan: delete the parts folder and run again")
            parts.append({key: saved[key] for key in ("pixels", "direction", "predicted")})
    return {key: np.concatenate([p[key] for p in parts]) for key in ("pixels", "direction", "predicted")}


def _interpolation_targets(categories: np.ndarray, parents: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """For each parent row, a clean row of another category (any other row if only one category)."""
    targets = []
    for row in parents:
        others = np.flatnonzero(categories != categories[row])
        others = others if others.size else np.setdiff1d(np.arange(len(categories)), [row])
        targets.append(rng.choice(others))
    return np.array(targets, dtype=np.int64)


def make_day_stimuli(
    model,
    clean: np.ndarray,
    categories: np.ndarray,
    plan: Plan,
    settings: AttackSection,
    *,
    seed: int,
    parts_dir: str | Path,
    part_size: int = 64,
    device="cpu",
) -> DayStimuli:
    """All of a day's stimuli.

    ``model``: the generating IT model (images (N,3,224,224) in [0,1] → (N, n_sites)), on
    ``device``. ``clean``: uint8 (n_clean, 224, 224, 3), the pixels of ``plan.clean`` in that
    order; ``categories``: (n_clean,) their categories. ``settings``: the ``[attack]`` section.
    ``part_size``: attack jobs per saved part (crash granularity).
    """
    parts_dir = Path(parts_dir)
    clean_position = {index: row for row, index in enumerate(plan.clean)}
    jobs = _attack_jobs(plan, clean_position)
    attacks = _make_attacks(model, clean, jobs, settings, seed=seed, parts_dir=parts_dir, part_size=part_size, device=device)

    parents = np.array([clean_position[p] for p in plan.attack_parents], dtype=np.int64)
    rng = np.random.default_rng(derive_seed(seed, "baselines"))
    targets = _interpolation_targets(np.asarray(categories), parents, rng)
    baseline_rows, baseline_pixels, baseline_kind, baseline_eps = [], [], [], []
    for eps in plan.budgets:
        for kind in settings.baselines:
            if kind == "gaussian":
                made = make_gaussian_baseline(clean[parents], eps, seed=derive_seed(seed, "gaussian", str(eps)))
            else:
                made = make_interpolation_baseline(clean[parents], clean[targets], eps)
            baseline_pixels.append(made)
            baseline_rows.append(parents)
            baseline_kind += [kind] * len(parents)
            baseline_eps += [eps] * len(parents)
    baseline_pixels = np.concatenate(baseline_pixels) if baseline_pixels else clean[:0]
    unattacked = np.concatenate([clean, baseline_pixels])
    predicted_unattacked = compute_predictions(model, unattacked, device=device)

    n_clean, n_attacks, n_baselines = len(clean), len(jobs[0]), len(baseline_pixels)
    return DayStimuli(
        pixels=np.concatenate([clean, attacks["pixels"], baseline_pixels]),
        parent=np.concatenate([np.full(n_clean, -1), jobs[0], np.concatenate(baseline_rows or [[]])]).astype(np.int64),
        site=np.concatenate([np.full(n_clean, -1), jobs[1], np.full(n_baselines, -1)]).astype(np.int64),
        eps=np.concatenate([np.zeros(n_clean), jobs[2], np.array(baseline_eps, dtype=np.float64)]),
        direction=np.concatenate([np.zeros(n_clean), attacks["direction"], np.zeros(n_baselines)]).astype(np.int8),
        kind=np.array(["clean"] * n_clean + ["attack"] * n_attacks + baseline_kind),
        predicted=np.concatenate([predicted_unattacked[:n_clean], attacks["predicted"], predicted_unattacked[n_clean:]]),
    )


def run_stage(day) -> dict:
    """The synthesize stage: make the day's stimuli and write them into a new day store.

    The store is built as ``store.zarr.partial`` and renamed when complete, so an existing
    ``store.zarr`` is a finished one (a run killed between the rename and the marker): it is kept.
    """
    store_path, parts = day.path(layout.STORE), day.path(layout.SYNTHESIS_PARTS)
    if not store_path.exists():
        _write_store(day, store_path, parts)
    shutil.rmtree(parts, ignore_errors=True)
    kinds, counts = np.unique(open_store(store_path).read_stimuli(pixels=False)["kind"], return_counts=True)
    return {"n_stimuli": int(counts.sum()), "by_kind": dict(zip(kinds.tolist(), counts.tolist()))}


def _write_store(day, store_path: Path, parts: Path) -> None:
    plan = read_plan(read_json(day.path(layout.PLAN)))
    model = day.generating_model().to(day.device)
    clean = day.images.read(plan.clean)
    stimuli = make_day_stimuli(
        model, clean, day.images.categories[list(plan.clean)], plan, day.config.attack,
        seed=day.seed("synthesize"), parts_dir=parts, part_size=day.config.attack.part_size, device=day.device,
    )
    partial = store_path.with_name(store_path.name + ".partial")
    store = create_store(partial, sites=make_site_table(day.config), overwrite=True)
    clean_row = np.where(stimuli.parent < 0, np.arange(len(stimuli.parent)), stimuli.parent)
    pool_index = np.asarray(plan.clean)[clean_row]
    store.append_stimuli(
        stimuli.pixels, parent=stimuli.parent, site=stimuli.site, eps=stimuli.eps, direction=stimuli.direction,
        kind=stimuli.kind, predicted=stimuli.predicted, code=make_event_codes(len(stimuli.pixels)),
        image_id=np.array(day.images.ids)[pool_index],
        category=np.array(day.images.category_names)[day.images.categories[pool_index]],
    )
    partial.rename(store_path)
