"""The layout of an experiment folder: every file name of a day, in one place.

An experiment folder holds ``experiment.toml`` and one ``day_NNN/`` folder per day:

| name | written by | what |
| --- | --- | --- |
| ``config.toml`` | the runner | the resolved configuration the day runs with (frozen) |
| ``provenance.json`` | the runner | versions, git commit, seeds, input hashes |
| ``log.jsonl`` | the runner, present | one JSON line per stage start / end, warning and alarm (docs/dashboard.md) |
| ``stages/<stage>.json`` | the runner | a stage's marker (timing, summary), written after its artifact |
| ``plan.json`` | plan | clean images, attacked images, sites, budgets |
| ``synthesis_parts/`` | synthesize (every torchrun rank) | attack parts as they are made; removed once the store is written |
| ``store.zarr`` | synthesize, present, ingest | the day store (stimuli, presentations, counts) |
| ``stimuli.h5`` | bundle | the rig bundle (with ``rsvp/``, the RSVP list, for ``[rig] kind = "files"``) |
| ``rsvp.csv`` | bundle (``[rig] kind = "files"``) | the RSVP list for a rig that runs its own software |
| ``live.json`` | present | the session as it runs, rewritten every second, for ``closedloop dashboard`` |
| ``recording.nev`` | present (simulated rig) or the operator | the Blackrock recording |
| ``trial_log.csv`` | the operator (optional, files hand-off) | the rig's outcome of every presentation |
| ``sensitivity.json`` | estimate | the lower bounds per site, budget and kind |
| ``model.safetensors`` + ``.json`` | refit | the IT model fitted on days 0..N |
| ``report.html`` | report | the day's report |
| ``rig_sim/`` | present (simulated rig) | the simulated rig's own state folder and recording |

Beside the day folders, ``site_selection.json`` records the last ``closedloop select-sites``
(its date, day, criteria and every site's numbers; the chosen sites are ``[sites] targets`` in
``experiment.toml``); ``site_selection.lock`` is the lock of the ``select-sites`` running now.

Beside each day folder, ``day_NNN.lock`` is the lock of the process running the day (empty when
no process holds it; see :mod:`closedloop.core.lock`).

Every module that reads or writes a day goes through these names; none spells them itself.
"""

from __future__ import annotations

import re
from pathlib import Path

from closedloop.core.provenance import derive_seed
from closedloop.core.validation import check_integer

__all__ = [
    "STAGES", "CONFIG", "PROVENANCE", "LOG", "PLAN", "STORE", "BUNDLE", "RSVP_LIST", "RECORDING", "TRIAL_LOG",
    "LIVE", "LIVE_FORMAT",
    "SENSITIVITY", "MODEL", "REPORT", "RIG_STATE", "SYNTHESIS_PARTS", "SITE_SELECTION", "SITE_SELECTION_LOCK",
    "day_folder", "day_lock_path", "experiment_lock_path",
    "find_day_folders", "marker_path", "compute_base_seed",
]

STAGES = ("plan", "synthesize", "bundle", "present", "ingest", "estimate", "refit", "report")

CONFIG = "config.toml"
PROVENANCE = "provenance.json"
LOG = "log.jsonl"
PLAN = "plan.json"
STORE = "store.zarr"
BUNDLE = "stimuli.h5"
RSVP_LIST = "rsvp.csv"
RECORDING = "recording.nev"
LIVE = "live.json"
LIVE_FORMAT = "closedloop.present_live"  # the "format" field of live.json (docs/dashboard.md)
TRIAL_LOG = "trial_log.csv"
SENSITIVITY = "sensitivity.json"
MODEL = "model.safetensors"
REPORT = "report.html"
RIG_STATE = "rig_sim"
SYNTHESIS_PARTS = "synthesis_parts"
SITE_SELECTION = "site_selection.json"  # in the experiment folder, beside the days
SITE_SELECTION_LOCK = "site_selection.lock"  # held by the select-sites running now
_MARKERS = "stages"
_DAY_NAME = re.compile(r"day_(\d{3})")


def day_folder(experiment: str | Path, day: int) -> Path:
    """``<experiment>/day_NNN`` for day ``day`` (0..999)."""
    return Path(experiment) / f"day_{check_integer('day', day, minimum=0, maximum=999):03d}"


def experiment_lock_path(experiment: str | Path) -> Path:
    """``<experiment>.lock`` beside the experiment folder: held by the process running a day or a
    validation campaign in it (one at a time)."""
    folder = Path(experiment).absolute()
    return folder.with_name(folder.name + ".lock")


def day_lock_path(experiment: str | Path, day: int) -> Path:
    """``<experiment>/day_NNN.lock``: the lock file of the process running day ``day``."""
    folder = day_folder(experiment, day)
    return folder.with_name(folder.name + ".lock")


def find_day_folders(experiment: str | Path) -> dict[int, Path]:
    """Every ``day_NNN`` folder of an experiment, by day number, in day order."""
    found = {}
    for path in sorted(Path(experiment).glob("day_[0-9][0-9][0-9]")):
        match = _DAY_NAME.fullmatch(path.name)
        if match and path.is_dir():
            found[int(match.group(1))] = path
    return found


def marker_path(folder: str | Path, stage: str) -> Path:
    """The marker a finished stage leaves in day folder ``folder``: ``stages/<stage>.json``."""
    return Path(folder) / _MARKERS / f"{stage}.json"


def compute_base_seed(config) -> int:
    """Seed of the day-0 model (random-weight backbones and the random readout) of an
    :class:`~closedloop.config.ExperimentConfig`; the simulated rig builds its base network
    from the same seed."""
    return derive_seed(config.experiment.seed, "day-0 model")
