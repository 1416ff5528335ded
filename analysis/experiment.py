"""An experiment's finished days, read once for every offline analysis.

A day counts as finished for the analyses once its estimate stage has written
``sensitivity.json`` next to its ``store.zarr``. Folders set aside by ``fit-day --force``
(``day_NNN.replaced-<time>``) are ignored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from closedloop.config import read_config
from closedloop.core.files import read_json
from closedloop.core.validation import check_dir, check_integer
from closedloop.data.store import open_store
from closedloop.sensitivity.estimator import SignedChanges, compute_signed_changes
from closedloop.sensitivity.responses import DayResponses, read_day_responses

__all__ = ["ExperimentDay", "read_experiment", "read_experiment_day", "read_clean_images"]

_DAY_FOLDER = re.compile(r"day_(\d{3})")


@dataclass(frozen=True)
class ExperimentDay:
    """One finished day: its number and folder, the artifacts the analyses read.

    ``records``: the rows of ``sensitivity.json``; ``stages``: ``{stage: marker}`` from
    ``stages/*.json`` (timing and summary); ``window_s``: the response window (start, stop) in
    s after onset, from the day's frozen ``config.toml``; ``simulated``: the day was recorded on
    the simulated rig; ``responses``: the day's stimuli and responses (:class:`closedloop.sensitivity.responses.DayResponses`).
    """

    day: int
    folder: Path
    records: list[dict]
    stages: dict
    window_s: tuple[float, float]
    simulated: bool
    responses: DayResponses

    @property
    def stimuli(self) -> dict:
        """The day store's ``stimuli/`` arrays (without pixels), n_stimuli rows each."""
        return self.responses.stimuli

    @property
    def window_length_s(self) -> float:
        """Length of the response window, s (spikes per window ÷ this = Hz)."""
        return float(self.window_s[1] - self.window_s[0])

    def signed_changes(self) -> SignedChanges:
        """Every (site, perturbed stimulus) pair's model-signed change (see :mod:`closedloop.sensitivity.estimator`)."""
        s = self.stimuli
        return compute_signed_changes(s["parent"], s["site"], s["eps"], s["kind"], s["predicted"], self.responses.means)

    def shown_clean(self) -> np.ndarray:
        """Indices of the day's clean stimuli that were validly shown (every site has a mean response), (n_clean,)."""
        return np.flatnonzero((self.stimuli["parent"] < 0) & np.isfinite(self.responses.means).all(axis=1))

    def clean_means(self) -> np.ndarray:
        """Mean responses to the day's clean stimuli that were validly shown, (n_clean, n_sites), spikes per window."""
        return self.responses.means[self.shown_clean()]


def read_experiment_day(folder: str | Path) -> ExperimentDay:
    """Read one finished day folder (``day_NNN`` with ``store.zarr`` and ``sensitivity.json``)."""
    folder = check_dir("folder", folder)
    match = _DAY_FOLDER.fullmatch(folder.name)
    if match is None:
        raise ValueError(f"'folder' must be a day folder named day_NNN, but got {folder.name!r}.")
    for name in ("store.zarr", "sensitivity.json", "config.toml"):
        if not (folder / name).exists():
            raise FileNotFoundError(
                f"day folder {str(folder)!r} has no {name}; finish the day with `closedloop fit-day {int(match[1])}`."
            )
    config = read_config(folder / "config.toml", check_paths=False)
    return ExperimentDay(
        day=int(match[1]),
        folder=folder,
        records=read_json(folder / "sensitivity.json"),
        stages={path.stem: read_json(path) for path in sorted((folder / "stages").glob("*.json"))},
        window_s=tuple(float(t) for t in config.response.window_s),
        simulated=config.rig.kind == "sim",
        responses=read_day_responses(folder / "store.zarr"),
    )


def read_experiment(folder: str | Path, *, last_day: int | None = None) -> list[ExperimentDay]:
    """Every finished day of the experiment in ``folder``, in day order, up to ``last_day``.

    ``last_day``: the last day to include (default: every finished day); it must be finished.
    Raises ``FileNotFoundError`` when no day is finished yet.
    """
    folder = check_dir("experiment", folder)
    numbers = sorted(int(m[1]) for p in folder.iterdir() if p.is_dir() and (m := _DAY_FOLDER.fullmatch(p.name)))
    finished = [d for d in numbers if (folder / f"day_{d:03d}" / "sensitivity.json").exists()]
    if last_day is not None:
        check_integer("day", last_day, minimum=0, maximum=999)
        if last_day not in finished:
            shown = ", ".join(map(str, finished)) or "none"
            raise ValueError(
                f"Invalid value for 'day': day {last_day} of {str(folder)!r} is not finished (finished days: {shown}); "
                f"finish it with `closedloop fit-day {last_day}` or pick a finished day."
            )
        finished = [d for d in finished if d <= last_day]
    if not finished:
        raise FileNotFoundError(
            f"'experiment' {str(folder)!r} has no finished day (a day_NNN folder with sensitivity.json); "
            "run `closedloop fit-day 0` first."
        )
    return [read_experiment_day(folder / f"day_{d:03d}") for d in finished]


def read_clean_images(days: list[ExperimentDay], *, n_images: int | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Clean images validly shown on ``days``, pooled: all of them, or ``n_images`` chosen with ``seed``.

    Returns (pixels uint8 (n, 224, 224, 3), mean responses float64 (n, n_sites), spikes per
    window), in day order.
    """
    chosen = [(d, int(i)) for d in days for i in d.shown_clean()]
    if n_images is not None and n_images < len(chosen):
        n_images = check_integer("n_images", n_images, minimum=1)
        picks = np.sort(np.random.default_rng(seed).choice(len(chosen), n_images, replace=False))
        chosen = [chosen[k] for k in picks]
    pixels, responses = [], []
    for d in days:
        rows = [i for owner, i in chosen if owner is d]
        if rows:
            pixels.append(open_store(d.folder / "store.zarr").read_pixels(rows))
            responses.append(d.responses.means[rows])
    return np.concatenate(pixels), np.concatenate(responses).astype(np.float64)
