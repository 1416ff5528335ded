"""The day's fault tests: an uninterrupted tiny day, which each module builds once and compares its
interrupted days with."""

from pathlib import Path

import pytest

from tests.closedloop.day.fault_runs import finish, make_experiment, start_fit_day


@pytest.fixture(scope="module")
def reference_day(tmp_path_factory) -> Path:
    """``day_000`` of the tiny experiment (time_scale 0.02) run by `closedloop fit-day` without a fault."""
    experiment = make_experiment(tmp_path_factory.mktemp("faults") / "reference")
    finish(start_fit_day(experiment))
    return experiment / "day_000"
