import numpy as np
import pytest

from closedloop.config import build_config
from closedloop.day.plan import make_plan, read_plan
from closedloop.images import ImageSet


def _pool(n_categories=10, per_category=12):
    categories = np.repeat(np.arange(n_categories), per_category)
    ids = tuple(f"c{c}/{i}" for i, c in enumerate(categories))
    names = tuple(f"c{c}" for c in range(n_categories))
    return ImageSet(ids=ids, categories=categories, category_names=names, origin="test", _reader=None)


def _config(**images):
    return build_config({"images": images, "sites": {"n_sites": 4}, "attack": {"budgets": [2.0, 1.0]}})


def test_day0_takes_one_per_category_before_repeating_any():
    pool = _pool()
    plan = make_plan(_config(n_clean_day0=25, n_clean_per_day=5), pool, 0, used_ids=set(), seed=1)
    counts = np.bincount(pool.categories[list(plan.clean)], minlength=10)
    assert len(plan.clean) == 25 and len(set(plan.clean)) == 25
    assert counts.min() >= 2 and counts.max() <= 3
    assert set(plan.attack_parents) <= set(plan.clean) and len(plan.attack_parents) == 5
    assert len(set(pool.categories[list(plan.attack_parents)])) == 5
    assert plan.sites == (0, 1, 2, 3) and plan.budgets == (1.0, 2.0)


def test_later_days_never_reuse_images_and_plans_round_trip():
    pool = _pool()
    config = _config(n_clean_day0=30, n_clean_per_day=10)
    used: set[str] = set()
    for day in range(4):
        plan = make_plan(config, pool, day, used_ids=used, seed=day)
        assert not used & set(plan.clean_ids)
        assert len(plan.attack_parents) == 10
        assert day == 0 or set(plan.attack_parents) == set(plan.clean)
        used |= set(plan.clean_ids)
        assert read_plan(plan.to_json()) == plan
    with pytest.raises(ValueError, match=r"day 9 needs 10 unused clean images but the image pool \(test\) has only 0 left of 120"):
        make_plan(config, pool, 9, used_ids=set(pool.ids), seed=0)


def test_plans_are_deterministic_in_the_seed():
    pool, config = _pool(), _config(n_clean_day0=20, n_clean_per_day=4)
    a = make_plan(config, pool, 0, used_ids=set(), seed=5)
    assert a == make_plan(config, pool, 0, used_ids=set(), seed=5)
    assert a.clean != make_plan(config, pool, 0, used_ids=set(), seed=6).clean
