"""The planted experiment (tests/planted.py) for the analysis tests."""

from tests.planted import planted_experiment  # noqa: F401  (a fixture)
