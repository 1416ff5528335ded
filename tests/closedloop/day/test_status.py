"""`closedloop status` and read_status: where each day stands, down to the stimuli lacking valid repetitions."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from closedloop.cli import cli
from closedloop.core.files import write_json
from closedloop.data import layout
from closedloop.day.present import compute_lacking_valid
from closedloop.day.status import read_status

pytestmark = pytest.mark.timeout(60)


def _presented_day(experiment, day: int, stimulus, valid, n_stimuli: int, repetitions: int) -> None:
    """A day folder whose present and ingest stages are done, with the present stage's summary."""
    folder = experiment / f"day_{day:03d}"
    summary = {"n_presentations": len(stimulus), **compute_lacking_valid(stimulus, valid, n_stimuli, repetitions)}
    for stage in ("present", "ingest"):
        write_json(layout.marker_path(folder, stage), {"stage": stage, "seconds": 0.0, "summary": summary})


def test_status_lists_the_stimuli_lacking_valid_repetitions(tmp_path):
    rng = np.random.default_rng(0)
    stimulus = np.repeat(np.arange(14), 2)
    valid = np.ones(stimulus.size, dtype=bool)
    valid[[1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21]] = False  # stimuli 0..10 have 1 of 2 valid
    valid[[0]] = False  # stimulus 0 has none
    order = rng.permutation(stimulus.size)
    _presented_day(tmp_path, 0, stimulus[order], valid[order], n_stimuli=14, repetitions=2)
    _presented_day(tmp_path, 1, stimulus, np.ones(stimulus.size, dtype=bool), n_stimuli=14, repetitions=2)

    day0, day1 = read_status(tmp_path)
    assert day0["n_lacking_valid"] == 11 and day1["n_lacking_valid"] == 0 and day1["lacking_valid"] == []
    assert day0["lacking_valid"][:2] == [{"stimulus_id": 0, "n_valid": 0, "repetitions": 2},
                                         {"stimulus_id": 1, "n_valid": 1, "repetitions": 2}]
    assert [s["stimulus_id"] for s in day0["lacking_valid"]] == list(range(11))

    text = CliRunner().invoke(cli, ["status", "--experiment", str(tmp_path)])
    assert text.exit_code == 0, text.output
    assert ("11 stimuli lack valid repetitions: 0 (0 of 2 valid), 1 (1 of 2 valid), 2 (1 of 2 valid)" in text.output
            and "9 (1 of 2 valid) and 1 more (--json lists all)" in text.output), text.output
    assert "10 (1 of 2 valid)" not in text.output
    as_json = CliRunner().invoke(cli, ["status", "--experiment", str(tmp_path), "--json"])
    days = json.loads(as_json.output)["days"]
    assert [s["stimulus_id"] for s in days[0]["lacking_valid"]] == list(range(11))
    assert days[0]["lacking_valid"][10] == {"stimulus_id": 10, "n_valid": 1, "repetitions": 2}
