"""Day-over-day progress: day 0 excluded, fold change at the smallest budget."""

import pytest

from analysis.experiment import read_experiment
from analysis.progress import compute_progress
from tests.planted import GAIN


def test_fold_change_is_the_planted_gain_ratio(planted_experiment):
    days = read_experiment(planted_experiment)
    result = compute_progress({d.day: d.records for d in days})
    assert sorted({r["day"] for r in result["curves"]}) == [1, 2, 3]  # day 0 excluded
    smallest = result["fold_change"][0]
    assert smallest["eps"] == 2.0 and (smallest["first_day"], smallest["last_day"]) == (1, 3)
    assert smallest["fold_change"] == pytest.approx(GAIN[3] / GAIN[1])
    gaussian = [r for r in result["curves"] if r["kind"] == "gaussian"]
    assert gaussian and all(r["mean"] == pytest.approx(0.0) for r in gaussian)


def _record(day_value, eps=1.0, kind="attack", site=0):
    return {"site": site, "eps": eps, "kind": kind, "n_images": 4, "estimate": day_value, "sem": 0.1, "sigma": 1.0,
            "normalized": day_value, "truth": None}


def test_day_zero_alone_is_used_when_nothing_else_exists():
    result = compute_progress({0: [_record(0.3)]})
    assert result["fold_change"] == [{"eps": 1.0, "first_day": 0, "last_day": 0, "first": 0.3, "last": 0.3,
                                      "fold_change": 1.0}]


def test_negative_first_day_has_no_fold_change():
    result = compute_progress({1: [_record(-0.1)], 2: [_record(0.4)]})
    assert result["fold_change"][0]["fold_change"] is None


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="'records_by_day' must be a non-empty dict"):
        compute_progress({})
    with pytest.raises(ValueError, match="'first_day' must lie in"):
        compute_progress({1: [_record(0.1)]}, first_day=-1)
