"""One day of the closed loop, stage by stage, resumable after a crash at any point.

``run_day(experiment, N)`` runs the stages of DESIGN.md §3 in order. Each stage reads what the
earlier ones wrote into ``<experiment>/day_NNN/`` and writes its own artifact; when it has
finished, a marker ``stages/<stage>.json`` (timing and a summary) is written last, atomically.
A stage whose marker exists is skipped, so running the same day again continues at the first
unfinished stage; a half-written artifact is never mistaken for a finished one because the
marker only appears after it (and artifacts are themselves written under temporary names and
renamed, or append-only with committed lengths, as the day store is).

Day folder:

| file | stage | what |
| --- | --- | --- |
| ``config.toml`` | — | the resolved configuration the day runs with (frozen) |
| ``provenance.json`` | — | versions, git commit, seeds, input hashes |
| ``log.jsonl`` | — | one JSON line per stage start / end |
| ``plan.json`` | plan | clean images, attacked images, sites, budgets |
| ``store.zarr`` | synthesize, present, ingest | the day store (stimuli, presentations, counts) |
| ``stimuli.h5`` | bundle | the rig bundle |
| ``recording.nev`` | present (simulated rig) | the rig's Blackrock recording |
| ``sensitivity.json`` | estimate | the lower bounds per site, budget and kind |
| ``model.safetensors`` + ``.json`` | refit | the IT model fitted on days 0..N |
| ``report.html`` | report | the day's report |
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from closedloop.config import ExperimentConfig, read_config, render_config
from closedloop.files import compute_file_digest, read_json, write_json, write_text
from closedloop.logs import logger
from closedloop.provenance import compute_provenance, derive_seed
from closedloop.validation import check_integer

__all__ = ["STAGES", "run_day", "read_status", "day_folder", "compute_base_seed"]

STAGES = ("plan", "synthesize", "bundle", "present", "ingest", "estimate", "refit", "report")
MODEL_NAME = "model.safetensors"


def compute_base_seed(config: ExperimentConfig) -> int:
    """Seed of the day-0 model (random-weight backbones and the random readout)."""
    return derive_seed(config.experiment.seed, "day-0 model")


def day_folder(experiment: str | Path, day: int) -> Path:
    """``<experiment>/day_NNN``."""
    return Path(experiment) / f"day_{check_integer('day', day, minimum=0, maximum=999):03d}"


@dataclass
class _Day:
    """Everything a stage needs: the experiment, the day number and its folder, the config."""

    experiment: Path
    number: int
    config: ExperimentConfig
    folder: Path
    summaries: dict = field(default_factory=dict)

    def path(self, name: str) -> Path:
        return self.folder / name

    def seed(self, stage: str) -> int:
        return derive_seed(self.config.experiment.seed, self.number, stage)

    @cached_property
    def images(self):
        from closedloop.images import read_image_source

        images = self.config.images
        return read_image_source(images.source, per_photo=images.embedded_per_photo, seed=self.config.experiment.seed)

    @cached_property
    def device(self):
        from models.devices import resolve_device

        return resolve_device(self.config.model.device)

    def previous_model_path(self) -> Path:
        return day_folder(self.experiment, self.number - 1) / MODEL_NAME

    def earlier_days(self) -> list[Path]:
        return [day_folder(self.experiment, d) for d in range(self.number)]


# -- stages -----------------------------------------------------------------------------------
def _stage_plan(day: _Day) -> dict:
    from closedloop.plan import make_plan

    used: set[str] = set()
    for folder in day.earlier_days():
        if (folder / "plan.json").exists():
            used |= set(read_json(folder / "plan.json")["clean_ids"])
    plan = make_plan(day.config, day.images, day.number, used_ids=used, seed=day.seed("plan"))
    write_json(day.path("plan.json"), plan.to_json())
    return {"n_clean": len(plan.clean), "n_attacked_images": len(plan.attack_parents), "n_sites": len(plan.sites)}


def _generating_model(day: _Day):
    """Day N−1's fitted model; on day 0 the base backbone with a random readout."""
    from models import make_it_model, read_it_model

    if day.number == 0:
        model = day.config.model
        return make_it_model(
            model.backbone, model.layer, day.config.sites.n_sites, trust=model.trust_checkpoint,
            positive=model.readout_positive, seed=compute_base_seed(day.config),
        )
    return read_it_model(day.previous_model_path())  # run_day checked that it exists


def _site_table(config: ExperimentConfig):
    from closedloop.sites import make_default_sites, read_site_map

    if config.sites.site_map:
        sites = read_site_map(config.sites.site_map)
        if sites.n_sites != config.sites.n_sites:
            raise ValueError(
                f"[sites] site_map {config.sites.site_map!r} defines {sites.n_sites} sites but n_sites = "
                f"{config.sites.n_sites}; make them agree"
            )
        return sites
    return make_default_sites(config.sites.n_sites)


def _stage_synthesize(day: _Day) -> dict:
    from closedloop.bundle import make_event_codes
    from closedloop.plan import read_plan
    from closedloop.store import create_store
    from closedloop.synthesize import make_day_stimuli

    plan = read_plan(read_json(day.path("plan.json")))
    model = _generating_model(day).to(day.device)
    clean = day.images.read(plan.clean)
    stimuli = make_day_stimuli(
        model, clean, day.images.categories[list(plan.clean)], plan, day.config.attack,
        seed=day.seed("synthesize"), parts_dir=day.path("synthesis_parts"), part_size=day.config.attack.part_size,
        device=day.device,
    )
    partial = day.path("store.zarr.partial")
    store = create_store(partial, sites=_site_table(day.config), overwrite=True)
    clean_row = np.where(stimuli.parent < 0, np.arange(len(stimuli.parent)), stimuli.parent)
    pool_index = np.asarray(plan.clean)[clean_row]
    store.append_stimuli(
        stimuli.pixels, parent=stimuli.parent, site=stimuli.site, eps=stimuli.eps, direction=stimuli.direction,
        kind=stimuli.kind, predicted=stimuli.predicted, code=make_event_codes(len(stimuli.pixels)),
        image_id=np.array(day.images.ids)[pool_index],
        category=np.array(day.images.category_names)[day.images.categories[pool_index]],
    )
    partial.rename(day.path("store.zarr"))
    shutil.rmtree(day.path("synthesis_parts"), ignore_errors=True)
    kinds, counts = np.unique(stimuli.kind, return_counts=True)
    return {"n_stimuli": len(stimuli.pixels), "by_kind": dict(zip(kinds.tolist(), counts.tolist()))}


def _stage_bundle(day: _Day) -> dict:
    from closedloop.bundle import write_bundle
    from closedloop.store import open_store

    stimuli = open_store(day.path("store.zarr")).read_stimuli(pixels=True)
    n = len(stimuli["code"])
    digest = write_bundle(
        day.path("stimuli.h5"), stimuli["pixels"], np.arange(n), stimuli["code"],
        attrs={"experiment": day.config.experiment.name, "day": day.number},
    )
    return {"n_stimuli": n, "sha256": digest}


def _stage_present(day: _Day) -> dict:
    from closedloop.session import run_day_session

    return run_day_session(day.config, day.folder, seed=day.seed("present"))


def _stage_ingest(day: _Day) -> dict:
    from closedloop.ingest import write_day_counts

    recording = day.path("recording.nev")
    if not recording.exists():
        return {"reconciled": False, "reason": f"no {recording.name} in the day folder"}
    report = write_day_counts(recording, day.path("store.zarr"), window_s=day.config.response.window_s)
    return {"reconciled": True, **{k: report[k] for k in ("n_presentations", "n_onsets", "n_matched", "n_mismatches")}}


def _stage_estimate(day: _Day) -> dict:
    from closedloop.estimate import compute_sensitivity
    from closedloop.responses import read_day_responses

    responses = read_day_responses(day.path("store.zarr"))
    stimuli = responses.stimuli
    truth = expected = None
    if day.config.rig.kind == "sim":
        from closedloop.truth import compute_sim_truth

        truth, expected = compute_sim_truth(day.config, day.path("store.zarr"), seed=day.seed("truth"), device=day.device)
    records = compute_sensitivity(
        stimuli["parent"], stimuli["site"], stimuli["eps"], stimuli["kind"], stimuli["predicted"], responses.means,
        truth=truth, expected=expected,
    )
    write_json(day.path("sensitivity.json"), records)
    return {"n_records": len(records), "source": responses.source}


def _stage_refit(day: _Day) -> dict:
    from closedloop.refit import fit_day_model

    return fit_day_model(day.config, day.experiment, day.number, _generating_model(day), seed=day.seed("refit"),
                         device=day.device, path=day.path(MODEL_NAME))


def _stage_report(day: _Day) -> dict:
    from analysis.day_report import write_day_report

    path = write_day_report(day.folder)
    return {"report": path.name}


_STAGE_FUNCTIONS: dict[str, Callable[[_Day], dict]] = {
    "plan": _stage_plan,
    "synthesize": _stage_synthesize,
    "bundle": _stage_bundle,
    "present": _stage_present,
    "ingest": _stage_ingest,
    "estimate": _stage_estimate,
    "refit": _stage_refit,
    "report": _stage_report,
}


# -- the runner -------------------------------------------------------------------------------
def _log(day: _Day, **event) -> None:
    event = {"time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "day": day.number, **event}
    with day.path("log.jsonl").open("a", encoding="utf-8") as stream:
        stream.write(json.dumps(event) + "\n")


def _freeze_config(day: _Day, force: bool) -> None:
    """Write the day's config once; refuse a different one for an existing day unless ``force``."""
    text = render_config(day.config)
    frozen = day.path("config.toml")
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
    import tomllib

    before, after = tomllib.loads(old), tomllib.loads(new)
    changes = [
        f"{section}.{key} {before.get(section, {}).get(key)!r} -> {value!r}"
        for section, values in after.items() for key, value in values.items()
        if before.get(section, {}).get(key) != value
    ]
    return "; ".join(changes) or "formatting"


def _write_provenance(day: _Day) -> None:
    path = day.path("provenance.json")
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


def run_day(experiment: str | Path, day: int, *, force: bool = False, until: str | None = None) -> dict:
    """Run (or resume) day ``day`` of the experiment in folder ``experiment``.

    Stages already finished are skipped; ``until`` stops after the named stage. A configuration
    that differs from the one the day was started with is refused unless ``force`` (the old day
    folder is then set aside as ``day_NNN.replaced-<time>`` and the day starts over).
    Returns ``{stage: {"skipped": bool, "seconds": float, "summary": dict}}``.
    """
    experiment = Path(experiment)
    config = read_config(experiment)
    if until is not None and until not in STAGES:
        from closedloop.validation import check_option

        check_option("until", until, STAGES)
    state = _Day(experiment, check_integer("day", day, minimum=0, maximum=999), config, day_folder(experiment, day))
    if day > 0 and not state.previous_model_path().exists():
        raise FileNotFoundError(
            f"day {day} needs day {day - 1}'s fitted model {state.previous_model_path()}; "
            f"run `closedloop fit-day {day - 1}` first"
        )
    _freeze_config(state, force)
    _write_provenance(state)
    results = {}
    for stage in STAGES:
        marker = state.path(f"stages/{stage}.json")
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
    from closedloop.store import open_store

    experiment = Path(experiment)
    records = []
    for folder in sorted(experiment.glob("day_[0-9][0-9][0-9]")):
        if not folder.is_dir():
            continue
        done = [stage for stage in STAGES if (folder / "stages" / f"{stage}.json").exists()]
        n_stimuli = n_presentations = 0
        if (folder / "store.zarr").exists():
            store = open_store(folder / "store.zarr")
            n_stimuli, n_presentations = store.n_stimuli, store.n_presentations
        records.append({
            "day": int(folder.name[4:]),
            "stages_done": done,
            "next_stage": next((s for s in STAGES if s not in done), None),
            "n_stimuli": n_stimuli,
            "n_presentations": n_presentations,
            "model_fitted": (folder / MODEL_NAME).exists() and "refit" in done,
        })
    return records
