"""Export a finished day as one NWB file (Neurodata Without Borders, with pynwb), ready for DANDI.

One file per day holds what the day folder holds, in NWB's places (see ``docs/nwb.md``):

- session: start time from the ``.nev`` header's time origin (else the day's provenance time),
  a new uuid4 identifier per file written, the subject (its age at this day's session: ``[nwb]
  age`` is the age at the first day) and lab fields of the experiment's ``[nwb]`` config section;
- ``devices`` (one per Utah array, of the device model ``utah_array`` by Blackrock Microsystems),
  ``electrode_groups`` and the ``electrodes`` table: one row per site of the day store, row i =
  site i (columns ``array``, ``electrode``, ``unit``, ``label``);
- ``units``: row i = site i, every spike of the site in the day's ``recording.nev`` (only when
  the day folder has one);
- ``stimulus_templates/stimuli``: the day's 8-bit frames as ``RGBImage`` ``stimulus_NNNNN``
  (image k = stimulus k of the store), in order;
- ``intervals/presentations``: one row per presentation (id = the store's presentation id), in
  onset order: start/stop on the recording clock, the stimulus and its fields, ``valid`` and the
  counts per site as a 2-D column; ``stimulus/presented_stimuli``: an ``IndexSeries`` from onset
  times to the templates;
- ``processing/sensitivity/lower_bounds``: ``sensitivity.json`` as a table;
- ``notes``: the model checkpoint's sha256 and the store digest (JSON); ``data_collection``: the
  day's provenance (JSON).

Large datasets are gzip-compressed (``H5DataIO``). The file is built in memory (HDF5 never writes
to a disk that may fill up: on a full disk its failed close crashed the process at exit), then
written in one go under a temporary name without ``.nwb`` in it (``.<OUT's stem>.<random>.partial``)
and renamed when complete, with the mode the umask gives; one export at a time writes an OUT (the
lock ``.<stem>.lock``), which first removes the partial files that killed exports of that OUT left.
"""

from __future__ import annotations

import io
import json
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import h5py
import numpy as np
from hdmf.backends.hdf5 import H5DataIO
from hdmf.common import DynamicTable, VectorData
from pynwb import NWBHDF5IO, NWBFile
from pynwb.base import ImageReferences, Images
from pynwb.epoch import TimeIntervals
from pynwb.file import Subject
from pynwb.image import IndexSeries, RGBImage
from pynwb.misc import Units

from closedloop.config import ExperimentConfig, NwbSection, read_config
from closedloop.core.files import atomic_path, compute_file_digest, compute_folder_digest, read_json, remove_temporaries_of
from closedloop.core.lock import hold_lock
from closedloop.core.logs import logger
from closedloop.core.provenance import compute_provenance
from closedloop.core.validation import check_dir, check_integer
from closedloop.data import layout
from closedloop.data.nev import read_nev
from closedloop.data.nev_header import read_nev_header
from closedloop.data.recording import Recording
from closedloop.data.store import DayStore, open_store

__all__ = ["write_day_nwb", "write_experiment_nwb", "make_nwb_name", "find_finished_days", "SENSITIVITY_COLUMNS"]

_GZIP = {"compression": "gzip", "compression_opts": 4}
SENSITIVITY_COLUMNS = {  # sensitivity.json key -> (dtype, description)
    "site": (np.int64, "site index (electrodes table row)"),
    "eps": (np.float64, "L2 budget of the perturbations, [0, 1] pixel units over 3 x 224 x 224 values"),
    "eps_paper": (np.float64, "the budget in paper-equivalent units: eps / [attack] paper_scale (NaN: days before it)"),
    "kind": (str, "attack (model-guided), gaussian or interpolation (model-free baselines)"),
    "n_images": (np.int64, "perturbed images averaged over"),
    "estimate": (np.float64, "biased-down lower bound on the site's sensitivity, spikes per response window"),
    "sem": (np.float64, "standard error of the estimate, spikes per response window (NaN: undefined)"),
    "sigma": (np.float64, "standard deviation of the site's mean response over the day's clean images, spikes per window"),
    "normalized": (np.float64, "estimate / sigma"),
    "truth": (np.float64, "simulated rig only: the site's true white-box sensitivity, spikes per window (NaN: none)"),
    "expected": (np.float64, "simulated rig only: the estimator on noise-free expected counts (NaN: none)"),
    "direction_right": (np.float64, "simulated rig only: fraction of pairs whose predicted direction was right (NaN: none)"),
}
# A file being written is .<OUT's stem>.<random>.partial, and its lock .<OUT's stem>.lock: no ".nwb"
# in either name, since tools find NWB files by it (the NWB Inspector globs *.nwb* in a folder).
_PARTIAL = ".partial"
_OLD_PARTIAL = ".partial.nwb"  # as .<OUT>.<random>.partial.nwb, by earlier versions: removed too
_KEYWORDS = ["closed loop", "adversarial examples", "inferior temporal cortex", "macaque", "Utah array", "RSVP"]


def make_nwb_name(experiment_name: str, day: int) -> str:
    """The export's file name for a day: ``<experiment>_day_NNN.nwb``."""
    return f"{experiment_name.replace('/', '_')}_day_{check_integer('day', day, minimum=0, maximum=999):03d}.nwb"


def _next_stage(folder: Path) -> str | None:
    """The first stage of a day folder without a marker (None: the day is complete)."""
    return next((stage for stage in layout.STAGES if not layout.marker_path(folder, stage).exists()), None)


def find_finished_days(experiment: str | Path) -> tuple[list[int], list[int]]:
    """Day numbers of an experiment folder: (finished: every stage done, unfinished)."""
    days = layout.find_day_folders(experiment)
    finished = [day for day, folder in days.items() if _next_stage(folder) is None]
    return finished, [day for day in days if day not in finished]


def _read_nwb_section(experiment: Path) -> NwbSection:
    """The experiment's ``[nwb]`` section, refused when a field DANDI requires is empty."""
    section = read_config(experiment, check_paths=False).nwb
    missing = section.find_missing()
    if missing:
        raise ValueError(
            f"{experiment / 'experiment.toml'}: [nwb] {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
            "missing; DANDI requires subject_id, species, sex and age (or date_of_birth): set them in the [nwb] section "
            '(e.g. subject_id = "monkeyA", sex = "M", age = "P5Y")'
        )
    return section


@dataclass(frozen=True)
class _Day:
    """What a day folder holds, read and checked (everything the export needs)."""

    experiment: Path
    number: int
    folder: Path
    config: ExperimentConfig
    lab: NwbSection
    store: DayStore
    store_digest: str
    provenance: dict
    sensitivity: list
    model_digest: str
    recording: Recording | None
    session_start: datetime
    start_source: str
    age: str
    date_of_birth: datetime | None


def _read_session_start(folder: Path) -> tuple[datetime, str]:
    """When a day folder's session started (UTC) and where that came from: the time origin in the
    header of its ``recording.nev``, else (no recording, or the NSP left it empty) ``created_utc``
    of its ``provenance.json``."""
    if (folder / layout.RECORDING).exists():
        start = read_nev_header(folder / layout.RECORDING, False)["time_origin"]
        if start is not None:
            return start, "the time origin in the header of recording.nev"
    if not (folder / layout.PROVENANCE).is_file():
        raise FileNotFoundError(f"{folder} has neither a recording.nev with a time origin nor a provenance.json, so "
                                "the date of its session is unknown")
    created = read_json(folder / layout.PROVENANCE)["created_utc"]
    return datetime.fromisoformat(created.replace("Z", "+00:00")), "created_utc of provenance.json"


def _compute_subject_dates(experiment: Path, day: int, lab: NwbSection, start: datetime) -> tuple[str, datetime | None]:
    """The subject's age at day ``day``'s session (``[nwb] age``, the age at the first day, plus the
    whole days from the first day's session date to this one's, UTC; ``""`` if none) and date of
    birth (UTC midnight; None if none), refused if the session comes before either."""
    born = None
    if lab.date_of_birth:
        born = datetime.fromisoformat(lab.date_of_birth).replace(tzinfo=UTC)
        if born.date() > start.astimezone(UTC).date():
            raise ValueError(f"[nwb] date_of_birth = {lab.date_of_birth} is after the session of day {day} "
                             f"({start.isoformat()}); give the subject's date of birth, YYYY-MM-DD")
    if not lab.age:
        return "", born
    first = min(layout.find_day_folders(experiment))
    first_start = start if first == day else _read_session_start(layout.day_folder(experiment, first))[0]
    days = (start.astimezone(UTC).date() - first_start.astimezone(UTC).date()).days
    if days < 0:
        raise ValueError(f"day {day}'s session ({start.isoformat()}) is before the first day's (day {first}, "
                         f"{first_start.isoformat()}), so its age cannot follow from [nwb] age (the age at the first "
                         "day); check the dates of the days' recordings")
    return lab.compute_age(days), born


def _read_day(experiment: str | Path, day: int) -> _Day:
    """Read and check a finished day; every bad input is refused before anything is written."""
    experiment = check_dir("--experiment", experiment)
    folder = layout.day_folder(experiment, day)
    if not folder.is_dir():
        days = list(layout.find_day_folders(experiment))
        raise FileNotFoundError(f"experiment {str(experiment)!r} has no day {day} (no folder {folder.name}); "
                                f"its days are {days or 'none'}")
    stage = _next_stage(folder)
    if stage is not None:
        raise ValueError(f"day {day} of {str(experiment)!r} is not finished (next stage: {stage}); finish it with "
                         f"`closedloop fit-day {day} --experiment {experiment}` before exporting it")
    lab = _read_nwb_section(experiment)
    config = read_config(folder / layout.CONFIG, check_paths=False)
    store = open_store(folder / layout.STORE)
    if not store.finished:
        raise ValueError(f"day store {str(store.path)!r} is not finished; finish the day before exporting it")
    session_start, source = _read_session_start(folder)
    age, born = _compute_subject_dates(experiment, day, lab, session_start)
    recording = read_nev(folder / layout.RECORDING) if (folder / layout.RECORDING).exists() else None
    return _Day(experiment, day, folder, config, lab, store, compute_folder_digest(store.path),
                read_json(folder / layout.PROVENANCE), read_json(folder / layout.SENSITIVITY),
                compute_file_digest(folder / layout.MODEL), recording, session_start, source, age, born)


# -- the parts of the file ----------------------------------------------------------------------
def _compressed(values):

    return H5DataIO(np.ascontiguousarray(values), **_GZIP)


def _column(name: str, description: str, values, *, compress: bool = False):

    values = np.asarray(values)
    if values.dtype.kind in "UT":  # HDF5 stores variable-length UTF-8 strings from Python str
        return VectorData(name=name, description=description, data=values.tolist())
    return VectorData(name=name, description=description, data=_compressed(values) if compress else values)


def _make_nwbfile(day: _Day, identifier: str):

    name, lab = day.config.experiment.name, day.lab
    description = lab.session_description or (
        f"Day {day.number} of the closed-loop experiment '{name}': rapid serial visual presentation of clean images "
        "and of model-guided per-site perturbations (and model-free baselines) while Utah arrays record macaque "
        "inferior temporal cortex sites."
    )
    rsvp = day.config.rsvp
    export = compute_provenance(inputs={layout.STORE: day.store_digest, layout.MODEL: day.model_digest})
    version = export["packages"]["closedloop"] or "unknown"
    notes = {"model_checkpoint": {"file": layout.MODEL, "sha256": day.model_digest},
             "store": {"file": layout.STORE, "sha256_of_files": day.store_digest},
             "session_start_time_from": day.start_source, "export": export}
    return NWBFile(
        session_description=description,
        identifier=identifier,
        session_start_time=day.session_start,
        session_id=f"day_{day.number:03d}",
        experimenter=list(lab.experimenter) or None,
        institution=lab.institution or None,
        lab=lab.lab or None,
        experiment_description=(
            f"Experiment '{name}': each day a model of the recorded IT sites guides L2-bounded image perturbations "
            "that push each site's response up or down; the recorded responses give a conservative lower bound on "
            "each site's adversarial sensitivity, and the model is refitted for the next day."
        ),
        keywords=_KEYWORDS,
        stimulus_notes=(
            f"RSVP: each image {rsvp.on_s:g} s on, {rsvp.off_s:g} s grey, {rsvp.image_size_deg:g} degrees of visual "
            f"angle, during fixation; {rsvp.repetitions} valid presentations per stimulus; the stimulus's event code is "
            "sent on the digital input port at onset."
        ),
        notes=json.dumps(notes),
        data_collection=json.dumps({"provenance": day.provenance}),
        was_generated_by=[["closedloop", version]],
        subject=Subject(subject_id=lab.subject_id, species=lab.species, sex=lab.sex, age=day.age or None,
                        date_of_birth=day.date_of_birth,
                        description=f"The subject of experiment '{name}'."),
    )


def _add_electrodes(nwbfile, day: _Day) -> None:
    """A device and electrode group per Utah array (all of the device model ``utah_array``, by
    Blackrock Microsystems); one electrodes row per site (row i = site i)."""
    sites = day.store.sites
    model = nwbfile.create_device_model(
        name="utah_array", manufacturer="Blackrock Microsystems",
        description="Utah array: 96 electrodes, recorded by a Blackrock NSP (Neural Signal Processor).",
    )
    groups = {}
    for array in sorted(set(sites.array.tolist())):
        device = nwbfile.create_device(
            name=f"utah_array_{array}", model=model,
            description=f"Utah array {array} (Blackrock Microsystems, 96 electrodes), recorded by a Blackrock NSP.",
        )
        groups[array] = nwbfile.create_electrode_group(
            name=f"array_{array}", description=f"Electrodes of Utah array {array}.", location=day.lab.location,
            device=device,
        )
    for column, description in (
        ("array", "Utah array index of the site (electrode group array_<array>)"),
        ("electrode", "Blackrock electrode id (1..)"),
        ("unit", "Blackrock unit class of the site; -1 = every unit of the electrode merged (noise class 255 excluded)"),
        ("label", "the site's label in the day store"),
    ):
        nwbfile.add_electrode_column(name=column, description=description)
    for index in range(sites.n_sites):
        array = int(sites.array[index])
        nwbfile.add_electrode(group=groups[array], location=day.lab.location, array=array,
                              electrode=int(sites.electrode[index]), unit=int(sites.unit[index]), label=sites.label[index])


def _add_units(nwbfile, day: _Day) -> None:
    """Spike times per site from the day's recording (row i = site i = electrodes row i)."""
    recording, sites = day.recording, day.store.sites
    start, stop = day.config.response.window_s

    nwbfile.units = Units(
        name="units",
        resolution=1.0 / recording.sampling_rate_hz,
        description=(
            "One row per recorded site (row i = site i = electrodes row i): every spike of the site's electrode and "
            "unit class (unit -1: every class except noise, 255) in the day's Blackrock recording (recording.nev), "
            f"s on the recording clock (clock zero = session start). A site's response to a presentation is its spike "
            f"count in [onset + {start:g} s, onset + {stop:g} s) (the presentations table's counts column). Times are whole "
            f"ticks of the {recording.sampling_rate_hz:g} Hz clock (resolution), so a merged site can hold equal times."
        ),
    )
    membership = sites.compute_membership(recording.spike_electrodes, recording.spike_units)
    for index in range(sites.n_sites):
        nwbfile.add_unit(spike_times=recording.spike_times_s[membership[:, index]], electrodes=[index], id=index)
    nwbfile.units.spike_times.set_data_io(H5DataIO, _GZIP)


def _describe_stimulus(stimuli: dict, k: int) -> str:
    kind = str(stimuli["kind"][k])
    if kind == "clean":
        return f"stimulus {k}: clean image {stimuli['image_id'][k]} ({stimuli['category'][k]})"
    text = f"stimulus {k}: {kind}, eps {stimuli['eps'][k]:g}, parent stimulus {stimuli['parent'][k]}"
    if kind == "attack":
        text += f", site {stimuli['site'][k]}, {'increase' if stimuli['direction'][k] > 0 else 'decrease'}"
    return text


def _add_templates(nwbfile, stimuli: dict):
    """The day's frames as RGBImage ``stimulus_NNNNN`` in one ordered ``Images``; returns it."""

    frames = [RGBImage(name=f"stimulus_{k:05d}", data=_compressed(pixels), description=_describe_stimulus(stimuli, k))
              for k, pixels in enumerate(stimuli["pixels"])]
    images = Images(
        name="stimuli",
        images=frames,
        description=(
            "The day's stimuli exactly as shown: 8-bit RGB, 224 x 224 pixels, stored (row, column, RGB) as the "
            "frames of the day store; image stimulus_NNNNN is stimulus NNNNN; order_of_images is stimulus order."
        ),
        order_of_images=ImageReferences(name="order_of_images", data=frames),
    )
    nwbfile.add_stimulus_template(images)
    return images


def _time_arguments(times: np.ndarray) -> dict:
    """``timestamps``, or ``starting_time`` and ``rate`` (Hz) when the times are regular (NWB best practice)."""
    steps = np.unique(np.round(np.diff(times), 9))
    if len(times) > 2 and len(steps) == 1 and steps[0] > 0:
        return {"starting_time": float(times[0]), "rate": float(1.0 / steps[0])}
    return {"timestamps": times}


def _add_presentations(nwbfile, day: _Day, stimuli: dict, images) -> int:
    """The ``presentations`` table (onset order) and the ``IndexSeries`` of onsets; returns n_presentations."""

    log = day.store.read_presentations()
    counts, from_nev = day.store.read_counts()
    onset = log["onset"].copy()
    ingest = day.store.read_ingest()
    if ingest is not None:
        onset[from_nev] = ingest["onset"][: len(onset)][from_nev[: len(ingest["onset"])]]
    order = np.argsort(onset, kind="stable")
    shown = log["stimulus"][order]
    start, stop = day.config.response.window_s
    columns = [
        _column("start_time", "onset, s on the recording clock: the .nev's where the presentation was matched in it "
                "(column from_nev), else the logged onset", onset[order]),
        _column("stop_time", f"onset + the image's on time ({day.config.rsvp.on_s:g} s, [rsvp] on_s), s",
                onset[order] + day.config.rsvp.on_s),
        _column("stimulus", "stimulus index (image stimulus_NNNNN of stimulus_templates/stimuli)", shown),
        _column("code", "digital event code of the stimulus (sent at onset)", stimuli["code"][shown]),
        _column("kind", "clean, attack (model-guided), gaussian or interpolation (baselines)", stimuli["kind"][shown]),
        _column("parent_stimulus", "stimulus index of the clean image perturbed (the store's stimuli/parent); -1 for a "
                "clean image", stimuli["parent"][shown]),
        _column("site", "target site of an attack (electrodes row); -1 if none", stimuli["site"][shown]),
        _column("eps", "L2 norm of the perturbation, [0, 1] pixel units over 3 x 224 x 224 values; 0 for clean",
                stimuli["eps"][shown]),
        _column("direction", "+1 increase, -1 decrease (attacks), 0 none", stimuli["direction"][shown]),
        _column("predicted", "the generating model's prediction on the 8-bit image, spikes per response window, "
                "(n_presentations, n_sites), column i = site i (NaN: none)", stimuli["predicted"][shown], compress=True),
        _column("valid", "shown without a fixation break", log["valid"][order]),
        _column("counts", f"spikes per site in [onset + {start:g} s, onset + {stop:g} s), (n_presentations, n_sites), "
                "column i = site i: from the .nev where the presentation was matched in it (column from_nev), else "
                "from the live stream", counts[order], compress=True),
        _column("from_nev", "start_time and counts come from the day's .nev (else from the live stream's log)",
                from_nev[order]),
        _column("logged_onset", "onset in the day's presentation log (live stream), s on the recording clock",
                log["onset"][order]),
    ]
    table = TimeIntervals(name="presentations", id=log["id"][order], columns=columns,
                          description="Every presentation of the day (RSVP), in onset order; id = presentation id of "
                                      "the day store.")
    nwbfile.add_time_intervals(table)
    nwbfile.add_stimulus(IndexSeries(
        name="presented_stimuli", data=_compressed(shown.astype(np.uint32)), unit="N/A", indexed_images=images,
        description="Which stimulus template (index into stimulus_templates/stimuli) was shown at each onset.",
        **_time_arguments(onset[order]),
    ))
    return len(order)


def _add_sensitivity(nwbfile, day: _Day) -> None:
    """``sensitivity.json`` as the table ``lower_bounds`` in the processing module ``sensitivity``."""

    records = day.sensitivity
    columns = []
    for key, (dtype, description) in SENSITIVITY_COLUMNS.items():
        values = [record.get(key) for record in records]
        if records and all(value is None for value in values):
            continue  # e.g. truth on a real rig: an all-NaN column says nothing (and the Inspector flags it)
        if dtype is np.float64:
            values = [np.nan if value is None else value for value in values]
        columns.append(_column(key, description, np.asarray(values, dtype=dtype)))
    table = DynamicTable(name="lower_bounds", columns=columns, id=np.arange(len(records)),
                         description="The day's sensitivity.json: one row per site x budget x kind (see the README); "
                                     "a key that is null in every record (truth on a real rig) has no column.")
    module = nwbfile.create_processing_module(
        name="sensitivity", description="Lower bounds on each site's adversarial sensitivity (closedloop estimate stage).")
    module.add(table)


def write_day_nwb(experiment: str | Path, day: int, out: str | Path, *, overwrite: bool = False) -> dict:
    """Export finished day ``day`` of ``experiment`` as the NWB file ``out`` (``.nwb``); return a summary.

    Refuses (before writing anything) a missing or unfinished day, an ``[nwb]`` section without
    a DANDI-required field, a subject date the day contradicts, an existing ``out`` unless
    ``overwrite``, and (``LockedError`` naming it) an ``out`` another export is writing. Returns
    ``{"day", "path", "identifier" (a new uuid4), "store_digest" (sha256 of the day store's
    files), "n_stimuli", "n_presentations", "n_units", "bytes", "seconds"}``.
    """
    out = _check_out(out, overwrite)
    started = time.perf_counter()
    data = _read_day(experiment, day)
    with _hold_outs([out], overwrite):
        return _write(data, out, started)


def _check_out(out: str | Path, overwrite: bool) -> Path:
    out = Path(out).expanduser()
    if out.suffix != ".nwb":
        raise ValueError(f"OUT {str(out)!r} must be a file name ending in .nwb (e.g. day_003.nwb)")
    _refuse_existing([out], overwrite)
    if out.is_dir():
        raise ValueError(f"OUT {str(out)!r} is a folder; give the .nwb file to write")
    return out


def _refuse_existing(paths: list[Path], overwrite: bool) -> None:
    existing = [str(path) for path in paths if path.exists()]
    if existing and not overwrite:
        verb, pronoun = ("exists", "it") if len(existing) == 1 else ("exist", "them")
        raise FileExistsError(f"{', '.join(existing)} already {verb}; pass --overwrite to replace {pronoun}")


@contextmanager
def _hold_outs(paths: list[Path], overwrite: bool) -> Iterator[None]:
    """Lock each file to write (``.<stem>.lock`` beside it), refuse again those that now exist
    (unless ``overwrite``: another export may have written one meanwhile), and remove the
    partial files that killed exports of them left (:data:`_PARTIAL`, :data:`_OLD_PARTIAL`):
    under the lock, no live export writes them."""
    with ExitStack() as stack:
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            stack.enter_context(hold_lock(path.with_name(f".{path.stem}.lock"), what=f"the export to {path}", remove=True))
        _refuse_existing(paths, overwrite)
        for path in paths:
            stale_files = [*remove_temporaries_of(path, suffix=_PARTIAL, extension=False),
                           *remove_temporaries_of(path, suffix=_OLD_PARTIAL)]
            for stale in stale_files:
                logger.warning("removed %s, left by an export of %s that was killed", stale.name, path.name)
        yield


def _write(day: _Day, out: Path, started: float) -> dict:

    identifier = str(uuid.uuid4())
    nwbfile = _make_nwbfile(day, identifier)
    _add_electrodes(nwbfile, day)
    if day.recording is not None:
        _add_units(nwbfile, day)
    stimuli = day.store.read_stimuli()
    images = _add_templates(nwbfile, stimuli)
    n_presentations = _add_presentations(nwbfile, day, stimuli, images)
    _add_sensitivity(nwbfile, day)
    built = io.BytesIO()  # HDF5 never writes to a disk that may fill: a failed close crashed the process at exit
    with h5py.File(built, "w") as file, NWBHDF5IO(file=file, mode="w") as writer:
        writer.write(nwbfile)
    with atomic_path(out, suffix=_PARTIAL, extension=False) as temporary:
        temporary.write_bytes(built.getbuffer())
    seconds = time.perf_counter() - started
    logger.info("exported day %d to %s (%.1f MB, %.1f s)", day.number, out, out.stat().st_size / 1e6, seconds)
    return {"day": day.number, "path": str(out), "identifier": identifier,
            "store_digest": day.store_digest, "n_stimuli": day.store.n_stimuli,
            "n_presentations": n_presentations, "n_units": 0 if day.recording is None else day.store.n_sites,
            "bytes": out.stat().st_size, "seconds": round(seconds, 2)}


def write_experiment_nwb(experiment: str | Path, out: str | Path, *, overwrite: bool = False) -> dict:
    """Export every finished day of ``experiment`` into folder ``out`` (:func:`make_nwb_name` each).

    Unfinished days are skipped and listed. Refuses, before writing anything, an experiment
    without a finished day, a bad ``[nwb]`` section (or one a day's date contradicts), (unless
    ``overwrite``) any file it would replace, and (``LockedError``) any file another export is
    writing. Returns ``{"days": [summary of each day], "skipped": [unfinished days]}``.
    """
    experiment = check_dir("--experiment", experiment)
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"OUT {str(out)!r} must be a folder with --all (one .nwb per day goes into it)")
    finished, unfinished = find_finished_days(experiment)
    if not finished:
        raise ValueError(f"experiment {str(experiment)!r} has no finished day to export "
                         f"(unfinished: {unfinished or 'none'})")
    lab = _read_nwb_section(experiment)
    for day in finished:  # every day's subject dates checked before any file is written
        _compute_subject_dates(experiment, day, lab, _read_session_start(layout.day_folder(experiment, day))[0])
    name = read_config(experiment, check_paths=False).experiment.name
    paths = {day: out / make_nwb_name(name, day) for day in finished}
    _refuse_existing(list(paths.values()), overwrite)
    summaries = []
    with _hold_outs(list(paths.values()), overwrite):
        for day, path in paths.items():
            started = time.perf_counter()
            summaries.append(_write(_read_day(experiment, day), path, started))
    return {"days": summaries, "skipped": unfinished}
