"""Reading an experiment's finished days."""

import shutil

import numpy as np
import pytest

from analysis.experiment import read_experiment, read_experiment_day


def test_reads_finished_days_in_order_and_ignores_set_aside_folders(planted_experiment, tmp_path):
    experiment = shutil.copytree(planted_experiment, tmp_path / "copy")
    shutil.copytree(experiment / "day_001", experiment / "day_001.replaced-20240101T000000")
    (experiment / "day_004").mkdir()  # begun, not estimated
    days = read_experiment(experiment)
    assert [d.day for d in days] == [0, 1, 2, 3]
    day = days[1]
    assert day.window_s == (0.07, 0.17) and day.window_length_s == pytest.approx(0.1)
    assert day.simulated and "refit" in day.stages and len(day.records) == 3 * 3 + 3 * 3
    assert day.clean_means().shape == (12, 3)
    changes = day.signed_changes()
    attack = changes.kind == "attack"
    np.testing.assert_allclose(changes.change[attack], changes.eps[attack] * 1.0)


def test_last_day_limits_the_days(planted_experiment):
    assert [d.day for d in read_experiment(planted_experiment, last_day=2)] == [0, 1, 2]


def test_unfinished_last_day_is_refused(planted_experiment):
    with pytest.raises(ValueError, match=r"'day': day 7 .* is not finished \(finished days: 0, 1, 2, 3\)"):
        read_experiment(planted_experiment, last_day=7)


def test_experiment_without_finished_days_is_refused(tmp_path):
    (tmp_path / "day_000").mkdir()
    with pytest.raises(FileNotFoundError, match="has no finished day.*closedloop fit-day 0"):
        read_experiment(tmp_path)


def test_day_folder_without_store_is_refused(tmp_path):
    (tmp_path / "day_002").mkdir()
    with pytest.raises(FileNotFoundError, match="has no store.zarr; finish the day with `closedloop fit-day 2`"):
        read_experiment_day(tmp_path / "day_002")
    (tmp_path / "days").mkdir()
    with pytest.raises(ValueError, match="must be a day folder named day_NNN, but got 'days'"):
        read_experiment_day(tmp_path / "days")
