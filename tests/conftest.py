"""Shared fixtures: every test builds its own data."""

from pathlib import Path

import numpy as np
import pytest

from tests.tiny_experiment import TINY


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)


@pytest.fixture
def tiny_sim_experiment():
    """A function ``(folder, time_scale=0.0) -> folder`` writing ``tests.tiny_experiment.TINY``
    into ``folder/experiment.toml``."""

    def make(folder: Path, time_scale: float = 0.0) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "experiment.toml").write_text(TINY.format(time_scale=time_scale))
        return folder

    return make
