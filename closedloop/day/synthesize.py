"""Stage 2 of a day: the day's stimuli — clean images, per-site attacks, model-free baselines.

Attacks come from the generating model (day N−1's fitted model; on day 0 the base backbone with
a random readout): for every attacked clean image, targeted site and budget, both directions are
solved and the one with the larger predicted change kept (:func:`closedloop.attacks.sites.make_site_attacks`).
Baselines at the same budgets: Gaussian noise and interpolation toward a clean image of another
category. Every stimulus carries the generating model's prediction on its 8-bit image.

Attack jobs are made in parts saved under ``parts_dir`` as they finish, so a crash loses at
most the part in progress and a rerun continues from the parts already made. Under ``torchrun``
the parts are shared out over the ranks (part p on rank p mod world size); each part has the
same jobs, batches and seed as in one process, so the stimuli are the same (docs/scaling.md).
"""

from __future__ import annotations

import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from closedloop.attacks.baselines import make_gaussian_baseline, make_interpolation_baseline
from closedloop.attacks.engine import compute_predictions
from closedloop.attacks.sites import make_site_attacks
from closedloop.config import AttackSection
from closedloop.core.distributed import ProcessGroup
from closedloop.core.files import compute_file_digest, read_json, write_npz
from closedloop.core.logs import progress
from closedloop.core.provenance import derive_seed
from closedloop.data import layout
from closedloop.data.bundle import make_event_codes
from closedloop.data.store import create_store, open_store
from closedloop.day.context import make_site_table
from closedloop.day.plan import Plan, read_plan

__all__ = ["DayStimuli", "make_day_stimuli", "run_stage", "run_shard"]

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


def _make_attacks(model, clean, jobs, settings: AttackSection, *, seed, parts_dir: Path, part_size: int, device,
                  group: ProcessGroup):
    """The attack jobs in parts of ``part_size``, each saved under ``parts_dir`` (kept if already there).

    Part p is made by rank p mod world size, in rounds of one part per rank, each round ending
    with an exchange of every rank's outcome (a failure stops every rank). A part's jobs, batches
    and seed are the same whatever the number of ranks, so the parts are too. Rank 0 reads every
    part back and returns the attacks in job order; other ranks return None.
    """
    image, site, eps = jobs
    n_parts = -(-len(image) // part_size)
    n_rounds = -(-n_parts // group.world_size)
    for round_index in progress(range(n_rounds), description="attacks (parts)"):
        part = round_index * group.world_size + group.rank
        with group.step(f"attack round {round_index}"):
            if part < n_parts:
                _make_part(model, clean, jobs, part, settings, seed=seed, parts_dir=parts_dir, part_size=part_size,
                           device=device)
    if group.rank:
        return None
    parts = [_read_part(parts_dir, part, part_size, len(image)) for part in range(n_parts)]
    return {key: np.concatenate([p[key] for p in parts]) for key in ("pixels", "direction", "predicted")}


def _make_part(model, clean, jobs, part: int, settings: AttackSection, *, seed, parts_dir: Path, part_size: int, device):
    """Make attack part ``part`` unless it is saved already; check the saved part."""
    image, site, eps = jobs
    chosen = slice(part * part_size, (part + 1) * part_size)
    path = parts_dir / PART_NAME.format(part)
    if not path.exists():
        made = make_site_attacks(
            model, clean, image[chosen], site[chosen], eps[chosen],
            n_steps=settings.steps, step_ratio=settings.step_ratio, step_rule=settings.step_rule,
            choose_direction_at=settings.choose_direction_at, random_start=settings.random_start,
            n_restarts=settings.restarts, batch_size=settings.batch_size,
            seed=derive_seed(seed, "attack-part", part), device=device, precision=settings.precision,
        )
        write_npz(path, compressed=False, pixels=made.pixels, direction=made.direction, predicted=made.predicted)
    _read_part(parts_dir, part, part_size, len(image))


def _read_part(parts_dir: Path, part: int, part_size: int, n_jobs: int) -> dict[str, np.ndarray]:
    path = parts_dir / PART_NAME.format(part)
    expected = len(range(n_jobs)[part * part_size : (part + 1) * part_size])
    with np.load(path) as saved:
        if len(saved["pixels"]) != expected:
            raise ValueError(f"{path} holds {len(saved['pixels'])} attacks, expected {expected}; "
                             "it was made with another plan: delete the parts folder and run again")
        return {key: saved[key] for key in ("pixels", "direction", "predicted")}


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
    group: ProcessGroup | None = None,
) -> DayStimuli:
    """All of a day's stimuli.

    ``model``: the generating IT model (images (N,3,224,224) in [0,1] → (N, n_sites)), on
    ``device``. ``clean``: uint8 (n_clean, 224, 224, 3), the pixels of ``plan.clean`` in that
    order; ``categories``: (n_clean,) their categories. ``settings``: the ``[attack]`` section.
    ``part_size``: attack jobs per saved part (crash granularity). ``group``: the ``torchrun``
    ranks that share the attack parts, this process being rank 0 (the others run
    :func:`run_shard`); default: this process alone. The stimuli do not depend on the number of ranks.
    """
    group = group or ProcessGroup()
    if group.rank != 0:
        raise ValueError(f"make_day_stimuli runs on rank 0 only, but this process is rank {group.rank}; "
                         "the other ranks run run_shard")
    parts_dir = Path(parts_dir)
    clean_position = _clean_position(plan)
    jobs = _attack_jobs(plan, clean_position)
    attacks = _make_attacks(model, clean, jobs, settings, seed=seed, parts_dir=parts_dir, part_size=part_size,
                            device=device, group=group)

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
    Under ``torchrun`` this runs on rank 0, which tells the other ranks (:func:`run_shard`) to
    start, makes its share of the attack parts with them, and alone writes the store.
    """
    store_path, parts = day.path(layout.STORE), day.path(layout.SYNTHESIS_PARTS)
    if not store_path.exists():
        _write_store(day, store_path, parts)
    shutil.rmtree(parts, ignore_errors=True)
    kinds, counts = np.unique(open_store(store_path).read_stimuli(pixels=False)["kind"], return_counts=True)
    return {"n_stimuli": int(counts.sum()), "by_kind": dict(zip(kinds.tolist(), counts.tolist()))}


def run_shard(day, announced: dict) -> None:
    """This rank's share of the synthesize stage (ranks other than 0 of a ``torchrun`` job): the
    attack parts p with p mod world size = rank, saved under the day's parts folder.

    ``announced``: what rank 0 announced, ``{"plan": sha256 of plan.json, "config": its config as a
    dict}``; a different plan or config here means this rank does not see rank 0's experiment
    folder (every node must see it at the same path).
    """
    plan, model, clean = _read_inputs(day, announced)
    _make_attacks(model, clean, _attack_jobs(plan, _clean_position(plan)), day.config.attack, seed=day.seed("synthesize"),
                  parts_dir=day.path(layout.SYNTHESIS_PARTS), part_size=day.config.attack.part_size, device=day.device,
                  group=day.group)


def _clean_position(plan: Plan) -> dict[int, int]:
    """Pool index of each clean image → its row in the day's clean pixels."""
    return {index: row for row, index in enumerate(plan.clean)}


def _read_inputs(day, announced: dict) -> tuple[Plan, object, np.ndarray]:
    """(plan, model on the day's device, clean pixels) on every rank; a failure on any rank stops all."""
    with day.group.step("read inputs"):
        path = day.path(layout.PLAN)
        seen = compute_file_digest(path) if path.is_file() else "no file"
        where = f"rank {day.group.rank} on {socket.gethostname()}"
        share = "every node must see the experiment folder at the same path, on a shared file system"
        if seen != announced["plan"]:
            raise FileNotFoundError(f"{where} does not see the plan rank 0 wrote at {path} (sha256 "
                                    f"{announced['plan'][:12]}, here: {seen[:12]}); {share}")
        config = day.config.to_dict()
        changed = sorted(f"{section}.{key}" for section, values in announced["config"].items()
                         for key, value in values.items() if config.get(section, {}).get(key) != value)
        if changed:
            raise ValueError(f"{where} reads another {day.experiment / 'experiment.toml'} than rank 0 "
                             f"(differs in {', '.join(changed)}); {share}")
        plan = read_plan(read_json(path))
        model = day.generating_model().to(day.device)
        clean = day.images.read(plan.clean)
    return plan, model, clean


def _write_store(day, store_path: Path, parts: Path) -> None:
    announced = {"plan": compute_file_digest(day.path(layout.PLAN)), "config": day.config.to_dict()}
    day.group.exchange("start", announced)  # the other ranks begin
    plan, model, clean = _read_inputs(day, announced)
    stimuli = make_day_stimuli(
        model, clean, day.images.categories[list(plan.clean)], plan, day.config.attack,
        seed=day.seed("synthesize"), parts_dir=parts, part_size=day.config.attack.part_size, device=day.device,
        group=day.group,
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
