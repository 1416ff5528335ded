"""Shared fixtures: every test builds its own data."""

from pathlib import Path

import numpy as np
import pytest


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)


_TINY_SIM_EXPERIMENT = """
[experiment]
seed = 3
[images]
n_clean_day0 = 6
n_clean_per_day = 2
embedded_per_photo = 2
[model]
backbone = "resnet_tiny"
[sites]
n_sites = 2
[attack]
budgets = [2.0, 6.0]
steps = 3
part_size = 2
[rig]
kind = "sim"
[sim]
time_scale = {time_scale}
fixation_break_rate = 0.2
truth_starts = 1
truth_steps = 6
[fit]
epochs = 2
batch_size = 8
"""


@pytest.fixture
def tiny_sim_experiment():
    """A function ``(folder, time_scale=0.0) -> folder`` writing a tiny experiment against the
    simulated rig (2 sites, budgets 2 and 6, 3 attack steps, random-weight resnet_tiny): a day runs
    in seconds."""

    def make(folder: Path, time_scale: float = 0.0) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "experiment.toml").write_text(_TINY_SIM_EXPERIMENT.format(time_scale=time_scale))
        return folder

    return make
