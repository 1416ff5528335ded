"""One day of the closed loop, stage by stage, resumable after a crash at any point.

``run_day(experiment, N)`` runs the stages of DESIGN.md §3 in order, one module per stage in
this package (plan, synthesize, bundle, present, ingest, estimate, refit, report), each handed a
:class:`~closedloop.day.context.DayContext`. Each stage reads what the earlier ones wrote into
``<experiment>/day_NNN/`` (names in :mod:`closedloop.data.layout`) and writes its own artifact;
when it has finished, a marker ``stages/<stage>.json`` (timing and a summary) is written last,
atomically. A stage whose marker exists is skipped, so running the same day again continues at
the first unfinished stage; a half-written artifact is never mistaken for a finished one because
the marker only appears after it (and artifacts are themselves written under temporary names and
renamed, or append-only with committed lengths, as the day store is). Stages never import this
module.
"""

from __future__ import annotations

import json
import time
import tomllib
from collections.abc import Callable
from pathlib import Path

from closedloop.config import read_config, render_config
from closedloop.core.files import compute_file_digest, read_json, write_json, write_text
from closedloop.core.logs import logger
from closedloop.core.provenance import compute_provenance
from closedloop.core.validation import check_dir, check_integer, check_option
from closedloop.data import layout
from closedloop.data.layout import STAGES
from closedloop.data.store import open_store
from closedloop.day import bundle, estimate, ingest, plan, present, refit, report, synthesize
from closedloop.day.context import DayContext
from closedloop.day.lock import hold_day_lock
from closedloop.link.access import RigAccess

__all__ = ["run_day", "read_status"]

_STAGE_FUNCTIONS: dict[str, Callable[[DayContext], dict]] = {
    "plan": plan.run_stage,
    "synthesize": synthesize.run_stage,
    "bundle": bundle.run_stage,
    "present": present.run_stage,
    "ingest": ingest.run_stage,
    "estimate": estimate.run_stage,
    "refit": refit.run_stage,
    "report": report.run_stage,
}
assert tuple(_STAGE_FUNCTIONS) == STAGES


# -- the runner -------------------------------------------------------------------------------
def _log(day: DayContext, **event) -> None:
    event = {"time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "day": day.number, **event}
    with day.path(layout.LOG).open("a", encoding="utf-8") as stream:
        stream.write(json.dumps(event) + "\n")


def _freeze_config(day: DayContext, force: bool) -> None:
    """Write the day's config once; refuse a different one for an existing day unless ``force``."""
    text = render_config(day.config)
    frozen = day.path(layout.CONFIG)
    if frozen.exists() and frozen.read_text(encoding="utf-8") != text:
        if not force:
            changed = _changed_keys(frozen.read_text(encoding="utf-8"), text)
            raise ValueError(
                f"day {day.number} ({day.folder}) was started with a different configuration (changed: {changed}); "
                "restore experiment.toml, or pass --force to set the old day folder aside and start the day over"
            )
        aside = day.folder.with_name(f"{day.folder.name}.replaced-{time.strftime('%Y%m%dT%H%M%S')}")
        day.folder.rename(aside)
        logger.warning("day %d: configuration changed; the old day folder was moved to %s", day.number, aside)
    day.folder.mkdir(parents=True, exist_ok=True)
    if not frozen.exists():
        write_text(frozen, text)


def _changed_keys(old: str, new: str) -> str:
    before, after = tomllib.loads(old), tomllib.loads(new)
    changes = [
        f"{section}.{key} {before.get(section, {}).get(key)!r} -> {value!r}"
        for section, values in after.items() for key, value in values.items()
        if before.get(section, {}).get(key) != value
    ]
    return "; ".join(changes) or "formatting"


def _write_provenance(day: DayContext) -> None:
    path = day.path(layout.PROVENANCE)
    if path.exists():
        return
    inputs = {"image_pool": day.images.digest()}
    backbone = Path(day.config.model.backbone)
    if backbone.is_file():
        inputs["base_checkpoint"] = compute_file_digest(backbone)
    if day.number > 0 and day.previous_model_path().exists():
        inputs["previous_model"] = compute_file_digest(day.previous_model_path())
    seeds = {stage: day.seed(stage) for stage in (*STAGES, "truth")}
    write_json(path, compute_provenance(seeds={"experiment": day.config.experiment.seed, **seeds}, inputs=inputs))


def run_day(experiment: str | Path, day: int, *, force: bool = False, until: str | None = None,
            rig: RigAccess | None = None) -> dict:
    """Run (or resume) day ``day`` of the experiment in folder ``experiment``.

    ``rig``: how the day reaches its rig (default: the rig at ``[rig] address``;
    :class:`rigs.launch.RigLauncher` also starts the simulated rig of ``[rig] kind = "sim"``).
    Stages already finished are skipped; ``until`` stops after the named stage. A configuration
    that differs from the one the day was started with is refused unless ``force`` (the old day
    folder is then set aside as ``day_NNN.replaced-<time>`` and the day starts over).
    One process at a time runs a day: a second is refused with
    :class:`~closedloop.day.lock.DayLockedError` naming the holder (``day_NNN.lock``).
    Returns ``{stage: {"skipped": bool, "seconds": float, "summary": dict}}``.
    """
    check_dir("experiment", experiment)  # before the lock file is made beside its days
    with hold_day_lock(layout.day_lock_path(experiment, day)):
        return _run_day(experiment, day, force=force, until=until, rig=rig)


def _run_day(experiment: str | Path, day: int, *, force: bool, until: str | None, rig: RigAccess | None) -> dict:
    experiment = Path(experiment)
    config = read_config(experiment)
    if until is not None:
        check_option("until", until, STAGES)
    state = DayContext(experiment, check_integer("day", day, minimum=0, maximum=999), config,
                       layout.day_folder(experiment, day), rig or RigAccess())
    if day > 0 and not state.previous_model_path().exists():
        raise FileNotFoundError(
            f"day {day} needs day {day - 1}'s fitted model {state.previous_model_path()}; "
            f"run `closedloop fit-day {day - 1}` first"
        )
    _freeze_config(state, force)
    _write_provenance(state)
    results = {}
    for stage in STAGES:
        marker = layout.marker_path(state.folder, stage)
        if marker.exists():
            results[stage] = {"skipped": True, **read_json(marker)}
            logger.info("day %d: %s already done", day, stage)
        else:
            logger.info("day %d: %s ...", day, stage)
            _log(state, stage=stage, event="start")
            start = time.monotonic()
            summary = _STAGE_FUNCTIONS[stage](state)
            seconds = round(time.monotonic() - start, 3)
            write_json(marker, {"stage": stage, "seconds": seconds, "summary": summary})
            _log(state, stage=stage, event="done", seconds=seconds)
            logger.info("day %d: %s done in %.1f s", day, stage, seconds)
            results[stage] = {"skipped": False, "seconds": seconds, "summary": summary}
        if stage == until:
            break
    return results


def read_status(experiment: str | Path) -> list[dict]:
    """Where every day of an experiment stands.

    One record per ``day_NNN`` folder: ``day``, ``stages_done`` (names), ``next_stage`` (or
    None when complete), ``n_stimuli``, ``n_presentations`` (committed rows of the day store),
    ``model_fitted`` (bool).
    """
    records = []
    for number, folder in layout.find_day_folders(experiment).items():
        done = [stage for stage in STAGES if layout.marker_path(folder, stage).exists()]
        n_stimuli = n_presentations = 0
        if (folder / layout.STORE).exists():
            store = open_store(folder / layout.STORE)
            n_stimuli, n_presentations = store.n_stimuli, store.n_presentations
        records.append({
            "day": number,
            "stages_done": done,
            "next_stage": next((s for s in STAGES if s not in done), None),
            "n_stimuli": n_stimuli,
            "n_presentations": n_presentations,
            "model_fitted": (folder / layout.MODEL).exists() and "refit" in done,
        })
    return records
