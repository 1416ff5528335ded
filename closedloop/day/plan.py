"""Stage 1 of a day: pick the clean images, the sites to target, the budgets and repetitions."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from closedloop.config import ExperimentConfig
from closedloop.core.files import read_json, write_json
from closedloop.data import layout
from closedloop.images import ImageSet

__all__ = ["Plan", "make_plan", "read_plan", "run_stage"]


@dataclass(frozen=True)
class Plan:
    """What a day will show.

    ``clean``: indices into the image pool of the day's clean images (n_clean,);
    ``clean_ids``: their ids; ``attack_parents``: the subset of ``clean`` that is attacked
    (every site in ``sites`` at every budget in ``budgets``: ε in [0,1] pixel units, ``[attack] budgets`` ×
    ``paper_scale``);
    ``repetitions``: valid presentations required per stimulus; ``seed``: the stage seed.
    """

    day: int
    clean: tuple[int, ...]
    clean_ids: tuple[str, ...]
    attack_parents: tuple[int, ...]
    sites: tuple[int, ...]
    budgets: tuple[float, ...]
    repetitions: int
    seed: int
    image_pool: str

    def to_json(self) -> dict:
        return asdict(self)


def read_plan(data: dict) -> Plan:
    """A :class:`Plan` from its JSON form (as written by the plan stage)."""
    fields = {key: tuple(value) if isinstance(value, list) else value for key, value in data.items()}
    return Plan(**fields)


def _round_robin(categories: np.ndarray, candidates: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Up to ``n`` of ``candidates``: one per category in turn (categories in random order)."""
    by_category = {c: list(rng.permutation(candidates[categories[candidates] == c])) for c in np.unique(categories[candidates])}
    order = list(rng.permutation(list(by_category)))
    chosen: list[int] = []
    while len(chosen) < n and order:
        for category in list(order):
            if len(chosen) == n:
                break
            chosen.append(int(by_category[category].pop()))
            if not by_category[category]:
                order.remove(category)
    return np.array(chosen, dtype=np.int64)


def make_plan(config: ExperimentConfig, images: ImageSet, day: int, *, used_ids: set[str], seed: int) -> Plan:
    """Plan day ``day``.

    Day 0 shows ``images.n_clean_day0`` clean images, one per category in turn, and attacks
    ``images.n_clean_per_day`` of them; later days show and attack ``images.n_clean_per_day``
    new images, again spread over categories. Images in ``used_ids`` (earlier days) are never
    reused. Raises ``ValueError`` when the pool has too few unused images left.
    """
    rng = np.random.default_rng(seed)
    candidates = np.array([i for i, name in enumerate(images.ids) if name not in used_ids], dtype=np.int64)
    n_clean = config.images.n_clean_day0 if day == 0 else config.images.n_clean_per_day
    n_attacked = min(config.images.n_clean_per_day, n_clean)
    if candidates.size < n_clean:
        raise ValueError(
            f"day {day} needs {n_clean} unused clean images but the image pool ({images.origin}) has only "
            f"{candidates.size} left of {len(images)}; use a larger [images] source or fewer images per day."
        )
    clean = _round_robin(images.categories, candidates, n_clean, rng)
    attacked = _round_robin(images.categories, clean, n_attacked, rng)
    sites = tuple(config.sites.targets) or tuple(range(config.sites.n_sites))
    return Plan(
        day=day,
        clean=tuple(int(i) for i in clean),
        clean_ids=tuple(images.ids[i] for i in clean),
        attack_parents=tuple(int(i) for i in attacked),
        sites=sites,
        budgets=tuple(b * config.attack.paper_scale for b in config.attack.budgets),
        repetitions=config.rsvp.repetitions,
        seed=seed,
        image_pool=images.digest(),
    )


def run_stage(day) -> dict:
    """The plan stage: write ``plan.json`` for the day, avoiding clean images of earlier days."""
    used: set[str] = set()
    for folder in day.earlier_days():
        if (folder / layout.PLAN).exists():
            used |= set(read_json(folder / layout.PLAN)["clean_ids"])
    plan = make_plan(day.config, day.images, day.number, used_ids=used, seed=day.seed("plan"))
    write_json(day.path(layout.PLAN), plan.to_json())
    return {"n_clean": len(plan.clean), "n_attacked_images": len(plan.attack_parents), "n_sites": len(plan.sites)}
