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

Before anything is written, :func:`closedloop.day.preflight.check_experiment` opens every input
of the day. The day's config is then frozen into ``config.toml`` (paths inside the experiment
folder written relative to the day folder, so a moved experiment folder resumes). A later run
with another ``experiment.toml`` is accepted when no stage that has used the changed sections
has finished or begun keeping partial work (:data:`STAGE_SECTIONS`); the frozen config is
rewritten and the change appended to ``provenance.json`` under ``config_changes``. Otherwise it
is refused unless ``force``.

Under ``torchrun`` (a :class:`~closedloop.core.distributed.ProcessGroup` of several ranks) rank 0
runs the day up to synthesize as above, and the other ranks only make their share of the
synthesize stage's attack parts (:func:`closedloop.day.synthesize.run_shard`; docs/scaling.md).
"""

from __future__ import annotations

import json
import logging
import time
import tomllib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from closedloop.config import (
    DAY_INDEPENDENT_SECTIONS,
    build_config,
    make_relative_paths,
    read_config,
    render_config,
    resolve_paths,
)
from closedloop.core.distributed import ProcessGroup
from closedloop.core.files import (
    compute_file_digest,
    read_json,
    remove_temporaries,
    reporting_full_disk,
    write_json,
    write_text,
)
from closedloop.core.lock import hold_lock
from closedloop.core.logs import logger
from closedloop.core.provenance import compute_provenance
from closedloop.core.validation import check_dir, check_integer, check_option
from closedloop.data import layout
from closedloop.data.layout import STAGES
from closedloop.day import bundle, estimate, ingest, plan, present, refit, report, synthesize
from closedloop.day.context import DayContext
from closedloop.day.preflight import check_experiment
from closedloop.link.access import RigAccess

__all__ = ["run_day", "STAGE_SECTIONS"]

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

# The config sections each stage reads: itself, or through what it builds (the day-0 model from
# [model], the simulated rig from [model], [sites], [rsvp], [response] and [sim]; the files
# hand-off's RSVP list from [rig] kind and [rsvp] repetitions). [experiment] holds the seed every
# stage derives its own from.
STAGE_SECTIONS: dict[str, frozenset[str]] = {
    "plan": frozenset({"experiment", "images", "sites", "attack", "rsvp"}),
    "synthesize": frozenset({"experiment", "images", "model", "sites", "attack"}),
    "bundle": frozenset({"experiment", "rig", "rsvp"}),
    "present": frozenset({"experiment", "model", "sites", "rsvp", "response", "rig", "sim"}),
    "ingest": frozenset({"experiment", "sites", "response"}),
    "estimate": frozenset({"experiment", "model", "sites", "rsvp", "response", "sim"}),
    "refit": frozenset({"experiment", "model", "fit"}),
    "report": frozenset({"experiment"}),
}
assert tuple(STAGE_SECTIONS) == STAGES
# Stages that keep their work so far when interrupted (attacks saved in parts, presentations
# stored as they come): once begun, the settings they read are as fixed as a finished stage's.
_KEEPS_PARTIAL_WORK = ("synthesize", "present")
# The last stages a torchrun job may run (only synthesize is shared out over its ranks).
_SHARDED_UNTIL = ("plan", "synthesize")
# How to reach the rig, never what a stage makes: a change is accepted at any point.
_LINK_KEYS = frozenset({"rig.address", "rig.security", "rig.keys_dir", "rig.heartbeat_s", "rig.timeout_s",
                        "rig.retries", "rig.reconnect_s"})


# -- the runner -------------------------------------------------------------------------------
class _WarningsToLog(logging.Handler):
    """Copies the package's warnings into the day's ``log.jsonl`` (``event: "warning"``), where the
    dashboard shows them; the alarms write their own events (:mod:`closedloop.day.alarms`)."""

    def __init__(self, day: DayContext) -> None:
        super().__init__(logging.WARNING)
        self.day = day

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "alarm", False):
            return
        try:
            self.day.log_event(event="warning", message=record.getMessage()[:2000])
        except Exception:  # noqa: BLE001 - a full disk must not turn a warning into a crash
            self.handleError(record)


@contextmanager
def _warnings_logged(day: DayContext) -> Iterator[None]:
    handler = _WarningsToLog(day)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


def _freeze_config(day: DayContext, force: bool) -> dict[str, dict]:
    """Write the day's config once, paths inside the experiment folder relative to the day folder.

    For a day already begun, a different config is accepted when no stage that has used the changed
    sections has finished or begun keeping partial work: the frozen config is rewritten and the
    changes are returned ({"section.key": {"before", "after"}}) for the provenance. Otherwise it is
    refused unless ``force`` (the old day folder is set aside and the day starts over). The
    export-only sections (``[nwb]``) are not part of it: the lab may fill them in at any time.
    """
    text = render_config(make_relative_paths(day.config, day.folder, within=day.experiment), exclude=DAY_INDEPENDENT_SECTIONS)
    frozen = day.path(layout.CONFIG)
    current = {section: values for section, values in day.config.to_dict().items() if section not in DAY_INDEPENDENT_SECTIONS}
    changes = _changed_keys(_read_frozen_config(frozen), current) if frozen.exists() else {}
    if not changes:
        if not frozen.exists():
            day.folder.mkdir(parents=True, exist_ok=True)
            write_text(frozen, text)
        return {}
    users = _stages_using(day, changes)
    if not users:
        write_text(frozen, text)
        logger.info("day %d: configuration changed (%s); no stage has used it yet", day.number, _describe(changes))
        return changes
    if not force:
        raise ValueError(
            f"day {day.number} ({day.folder}) was started with a different configuration "
            f"(changed: {_describe(changes)}); {', '.join(users)} already used these settings; "
            "restore experiment.toml, or pass --force to set the old day folder aside and start the day over"
        )
    aside = day.folder.with_name(f"{day.folder.name}.replaced-{time.strftime('%Y%m%dT%H%M%S')}")
    day.folder.rename(aside)
    logger.warning("day %d: configuration changed; the old day folder was moved to %s", day.number, aside)
    day.folder.mkdir(parents=True, exist_ok=True)
    write_text(frozen, text)
    return {}


def _read_frozen_config(path: Path) -> dict:
    """A day's frozen config as plain data, its relative paths resolved against the day folder."""
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    try:
        return resolve_paths(build_config(data, source=str(path)), path.parent).to_dict()
    except ValueError:
        return data  # frozen under older, looser rules: compare it as written


def _changed_keys(before: dict, after: dict) -> dict[str, dict]:
    return {
        f"{section}.{key}": {"before": before.get(section, {}).get(key), "after": value}
        for section, values in after.items() for key, value in values.items()
        if before.get(section, {}).get(key) != value
    }


def _describe(changes: dict[str, dict]) -> str:
    return "; ".join(f"{key} {change['before']!r} -> {change['after']!r}" for key, change in changes.items())


def _stages_using(day: DayContext, changes: dict[str, dict]) -> list[str]:
    """The stages that have used a changed section: finished, or begun and keeping partial work."""
    sections = {key.split(".")[0] for key in changes if key not in _LINK_KEYS}
    begun = _begun_stages(day)
    return [
        stage for stage in STAGES
        if STAGE_SECTIONS[stage] & sections
        and (layout.marker_path(day.folder, stage).exists() or (stage in _KEEPS_PARTIAL_WORK and stage in begun))
    ]


def _begun_stages(day: DayContext) -> set[str]:
    """Stages with a start event in the day's log (a line cut short by a crash is skipped)."""
    path = day.path(layout.LOG)
    if not path.exists():
        return set()
    begun = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("event") == "start":
            begun.add(event.get("stage"))
    return begun


def _compute_inputs(day: DayContext) -> tuple[dict, dict]:
    """The seeds of every stage and the digests of the day's inputs, for the provenance."""
    inputs = {"image_pool": day.images.digest()}
    backbone = Path(day.config.model.backbone)
    if backbone.is_file():
        inputs["base_checkpoint"] = compute_file_digest(backbone)
    if day.number > 0 and day.previous_model_path().exists():
        inputs["previous_model"] = compute_file_digest(day.previous_model_path())
    seeds = {"experiment": day.config.experiment.seed} | {stage: day.seed(stage) for stage in (*STAGES, "truth")}
    return seeds, inputs


def _write_provenance(day: DayContext, changes: dict[str, dict]) -> None:
    """Write the day's provenance once; after an accepted config change, update its seeds and
    inputs and append the change under ``config_changes`` (time, keys, before and after)."""
    path = day.path(layout.PROVENANCE)
    if path.exists() and not changes:
        return
    seeds, inputs = _compute_inputs(day)
    record = read_json(path) if path.exists() else compute_provenance(seeds=seeds, inputs=inputs)
    if changes:
        record.update(seeds=seeds, inputs=inputs)
        time_utc = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        record.setdefault("config_changes", []).append({"time_utc": time_utc, "changes": changes})
    write_json(path, record)


def run_day(experiment: str | Path, day: int, *, force: bool = False, until: str | None = None,
            rig: RigAccess | None = None, group: ProcessGroup | None = None) -> dict:
    """Run (or resume) day ``day`` of the experiment in folder ``experiment``.

    ``rig``: how the day reaches its rig (default: the rig at ``[rig] address``;
    :class:`rigs.launch.RigLauncher` also starts the simulated rig of ``[rig] kind = "sim"``).
    Every input is checked first (:func:`~closedloop.day.preflight.check_experiment`), before
    anything is written. Stages already finished are skipped; ``until`` stops after the named
    stage. A configuration that differs from the one the day was started with is accepted and
    recorded when no stage that used the changed sections has finished (or begun, for stages that
    keep partial work); otherwise it is refused unless ``force`` (the old day folder is then set
    aside as ``day_NNN.replaced-<time>`` and the day starts over).
    One process at a time runs a day: a second is refused with
    :class:`~closedloop.core.lock.LockedError` naming the holder (``day_NNN.lock``).
    ``group``: the ranks of a ``torchrun`` job (:func:`closedloop.core.distributed.join_process_group`;
    default: this process alone). Then ``until`` must be ``"plan"`` or ``"synthesize"``; rank 0
    holds the lock and runs the day as above, sharing the synthesize stage's attack parts with the
    other ranks, which run nothing else and return ``{}``; a failure on any rank stops them all.
    Returns ``{stage: {"skipped": bool, "seconds": float, "summary": dict}}``.
    """
    group = group or ProcessGroup()
    if group.world_size > 1 and until not in _SHARDED_UNTIL:
        raise ValueError(
            f"under torchrun ({group.world_size} ranks) a day runs up to synthesize only, but 'until' = {until!r}: "
            "pass --until synthesize (or plan), then run the rest of the day in one process"
        )
    if group.rank != 0:
        return _assist_day(Path(experiment), day, group)
    try:
        experiment_lock = layout.experiment_lock_path(experiment)
        if not experiment_lock.parent.is_dir():  # no folder to hold the lock file: the experiment is not there either
            check_dir("experiment", experiment)
        # the experiment's lock first: a validation campaign holds it before its folder exists
        with (reporting_full_disk(layout.day_folder(experiment, day)),
              hold_lock(experiment_lock, what=f"the experiment {experiment}", remove=True, nested=True)):
            check_dir("experiment", experiment)  # before the day's lock file is made beside its days
            with hold_lock(layout.day_lock_path(experiment, day)):
                results = _run_day(experiment, day, force=force, until=until, rig=rig, group=group)
    except Exception as error:
        _release_ranks(group, error)
        raise
    _release_ranks(group, None)
    return results


def _release_ranks(group: ProcessGroup, error: Exception | None) -> None:
    """Rank 0's last word to the other ranks, unless an exchange has already stopped them all:
    ``start`` with nothing to make (when the synthesize stage did not announce its plan) and
    ``finish`` (the store and the marker written, or ``error``)."""
    if group.world_size == 1 or group.failed:
        return
    if "start" not in group.steps:
        group.exchange("start", None, error)
    group.exchange("finish", None, error)


def _assist_day(experiment: Path, day: int, group: ProcessGroup) -> dict:
    """A rank other than 0: wait for rank 0 to announce the day's plan, make this rank's attack
    parts (:func:`closedloop.day.synthesize.run_shard`), wait for rank 0 to commit them."""
    state, error = None, None
    try:
        state = DayContext(experiment, check_integer("day", day, minimum=0, maximum=999), read_config(experiment),
                           layout.day_folder(experiment, day), group=group)
    except Exception as caught:
        error = caught
    announced = group.exchange("start", None, error)[0]
    if announced is not None:
        synthesize.run_shard(state, announced)
    group.exchange("finish")
    return {}


def _run_day(experiment: str | Path, day: int, *, force: bool, until: str | None, rig: RigAccess | None,
             group: ProcessGroup) -> dict:
    experiment = Path(experiment)
    config = read_config(experiment)
    if until is not None:
        check_option("until", until, STAGES)
    state = DayContext(experiment, check_integer("day", day, minimum=0, maximum=999), config,
                       layout.day_folder(experiment, day), rig or RigAccess(), group)
    if day > 0 and not state.previous_model_path().exists():
        raise FileNotFoundError(
            f"day {day} needs day {day - 1}'s fitted model {state.previous_model_path()}; "
            f"run `closedloop fit-day {day - 1}` first"
        )
    previous = state.previous_model_path() if day > 0 else None
    check_experiment(config, images=state.images, previous_model=previous)
    changes = _freeze_config(state, force)
    _write_provenance(state, changes)
    for leftover in remove_temporaries(state.folder):  # half-written by a process killed mid-write
        logger.info("day %d: removed %s, left by an interrupted write", day, leftover.relative_to(state.folder))
    ingest.check_ingest_source(state)  # finished stages too may rest on the counts of another file
    with _warnings_logged(state):
        return _run_stages(state, until)


def _run_stages(state: DayContext, until: str | None) -> dict:
    day = state.number
    results = {}
    for stage in STAGES:
        marker = layout.marker_path(state.folder, stage)
        if marker.exists():
            results[stage] = {"skipped": True, **read_json(marker)}
            logger.info("day %d: %s already done", day, stage)
        else:
            logger.info("day %d: %s ...", day, stage)
            state.log_event(stage=stage, event="start")
            start = time.monotonic()
            summary = _STAGE_FUNCTIONS[stage](state)
            seconds = round(time.monotonic() - start, 3)
            write_json(marker, {"stage": stage, "seconds": seconds, "summary": summary})
            state.log_event(stage=stage, event="done", seconds=seconds)
            logger.info("day %d: %s done in %.1f s", day, stage, seconds)
            results[stage] = {"skipped": False, "seconds": seconds, "summary": summary}
        if stage == until:
            break
    return results
