"""One process at a time in an experiment: `closedloop validate` and `fit-day` refuse each other."""

from __future__ import annotations

import pytest

from tests.closedloop.day.fault_runs import finish, start_closedloop, start_fit_day, wait_for_holder
from tests.tiny_experiment import TINY


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_validate_and_fit_day_on_one_experiment_refuse_each_other_and_lose_nothing(tmp_path):
    """`closedloop validate --out X` (which starts X afresh without --resume) and `fit-day` in X share
    one lock, X.lock beside the folder: whichever comes second stops at once naming the first."""
    from closedloop.data.layout import experiment_lock_path

    experiment = tmp_path / "days"
    experiment.mkdir()
    (experiment / "experiment.toml").write_text(TINY.format(time_scale=1.0))  # a day of about a minute
    day = start_fit_day(experiment)
    wait_for_holder(experiment_lock_path(experiment), day)
    campaigns = [start_closedloop("validate", "--out", str(experiment), "--days", "2", "--sites", "2", *resume)
                 for resume in ((), ("--resume",))]
    for campaign in campaigns:
        assert campaign.wait(timeout=300) == 2
        message = campaign.stderr.read().decode()
        assert f"pid {day.pid}" in message and "is being run by another process" in message, message
    assert day.poll() is None, "the day ended before both campaigns were refused: make it longer"
    finish(day)
    assert (experiment / "day_000" / "stages" / "report.json").exists()  # the day went on, untouched

    out = tmp_path / "campaign"  # validate makes it, once it has trained its networks: a fit-day before is refused too
    campaign = start_closedloop("validate", "--out", str(out), "--days", "2", "--sites", "2")
    try:
        wait_for_holder(experiment_lock_path(out), campaign)
        second = start_fit_day(out)
        assert second.wait(timeout=300) == 2
        message = second.stderr.read().decode()
        assert f"pid {campaign.pid}" in message and "is being run by another process" in message, message
    finally:
        campaign.kill()
        campaign.wait()
