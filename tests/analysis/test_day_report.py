"""The short per-day report (analysis/day_report.py) on synthetic day folders."""

import numpy as np

from analysis.day_report import write_day_report
from analysis.synthetic import write_synthetic_day


def _day(experiment, *, n_perturbed: int, repetitions: int = 2):
    """A finished synthetic day: 3 clean images, ``n_perturbed`` attacks on site 0 at ε = 2."""
    return write_synthetic_day(
        experiment, 0, clean=np.full((3, 2), 5.0), category=["a", "b", "c"], parent=np.arange(n_perturbed) % 3,
        site=np.zeros(n_perturbed, int), eps=np.full(n_perturbed, 2.0), direction=np.ones(n_perturbed, int),
        kind=["attack"] * n_perturbed, perturbed=np.full((n_perturbed, 2), 3.0), repetitions=repetitions, seed=1,
    )


def test_day_without_estimates_renders_a_note_with_the_reason(tmp_path):
    folder = _day(tmp_path / "exp", n_perturbed=0)  # a session too short to reach any attack
    page = write_day_report(folder).read_text(encoding="utf-8")
    assert ">Sensitivity</h2>" in page
    assert "No estimates: none of the day's 3 stimuli is a perturbed image" in page


def test_day_with_estimates_draws_the_sensitivity_figure(tmp_path):
    folder = _day(tmp_path / "exp", n_perturbed=3)
    page = write_day_report(folder).read_text(encoding="utf-8")
    assert "averaged over 1 site" in page and "No estimates" not in page
