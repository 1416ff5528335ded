"""Days that wait for the NSP's .nev: the files hand-off, and a streaming rig without live counts.

The files hand-off end to end: fit-day writes the RSVP list and stops (exit 3); the test plays
the rig, showing the list with the simulated rig's presenter (its spikes, event and outcome
codes) and writing the .nev (and, on day 1, a trial log) into the day folder; the same fit-day
then finishes the day.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest

from closedloop.cli import main
from closedloop.config import read_config
from closedloop.core.files import read_json
from closedloop.data.event_codes import FIXATION_BREAK, VALID
from closedloop.data.nev import read_nev
from closedloop.data.recording import Recording
from closedloop.data.store import open_store
from closedloop.day.runner import run_day
from closedloop.day.status import read_status
from closedloop.day.waiting import EXIT_WAITING
from rigs.launch import RigLauncher
from rigs.nev import write_nev
from rigs.sim import SimulatedPresenter, compute_hidden_site_options, make_hidden_sites
from tests.tiny_experiment import TINY


def _experiment(folder: Path, rig: str, sim: str = "") -> Path:
    """The tiny experiment of the runner's tests with ``[rig] kind = rig`` and ``sim`` added to ``[sim]``."""
    folder.mkdir(parents=True)
    text = TINY.format(time_scale=0.0).replace('kind = "sim"', f'kind = "{rig}"').replace("[sim]\n", "[sim]\n" + sim)
    (folder / "experiment.toml").write_text(text)
    return folder


def _fit_day(capsys, experiment: Path, day: int) -> tuple[int, str]:
    """``closedloop fit-day`` as the operator runs it: (exit status, what it printed)."""
    try:
        main(["-q", "fit-day", str(day), "--experiment", str(experiment)])
        code = 0
    except SystemExit as done:
        code = done.code
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def _play_the_rig(experiment: Path, day: int, *, breaks=(), outcome_codes: bool = True, shuffle: int | None = None) -> list[dict]:
    """Show the day's rsvp.csv in order on the simulated rig's presenter and write the NSP's .nev
    into the day folder. Every presentation of a stimulus in ``breaks`` ends in a fixation break;
    the first of them is shown again at the end (as a rig re-queues a break), and breaks again.
    Without ``outcome_codes`` the .nev carries onsets and offsets only; with ``shuffle`` (a seed)
    the list is shown in another order, as another day's list would be. Returns the shown rows."""
    config = read_config(experiment)
    folder = experiment / f"day_{day:03d}"
    with (folder / "rsvp.csv").open(newline="") as stream:
        rows = [{key: int(value) for key, value in row.items()} for row in csv.DictReader(stream)]
    if shuffle is not None:
        rows = [rows[k] for k in np.random.default_rng(shuffle).permutation(len(rows))]
    again = next(row for row in rows if row["stimulus_id"] in breaks) if breaks else None
    shown = rows + ([again] if again else [])
    presenter = SimulatedPresenter(
        make_hidden_sites(config.sites.n_sites, config.sim.seed, **compute_hidden_site_options(config)),
        recording_path=folder / "recording.nev", seed=5, time_scale=0.0, fixation_break_rate=0.0,
    )
    presenter.load_bundle(folder / "stimuli.h5", [])
    records = []
    for number, row in enumerate(shown):
        record = presenter.present(number, row["stimulus_id"], config.response.window_s).record
        if row["stimulus_id"] in breaks:
            record["outcome"] = FIXATION_BREAK
        records.append({"record": record})
    presenter.finish(records)
    if not outcome_codes:
        recording = read_nev(folder / "recording.nev")
        keep = ~np.isin(recording.event_words, [VALID, FIXATION_BREAK])
        (folder / "recording.nev").unlink()
        write_nev(folder / "recording.nev", Recording.from_ticks(
            recording.spike_ticks, recording.spike_electrodes, recording.spike_units, recording.event_ticks[keep],
            recording.event_words[keep], recording.electrodes))
    return shown


def _check_finished_day(folder: Path, shown: list[dict], lacking: list[int]) -> None:
    summary = read_json(folder / "stages/present.json")["summary"]
    assert summary["n_presentations"] == len(shown) and summary["lacking_valid"] == lacking
    store = open_store(folder / "store.zarr")
    presentations = store.read_presentations()
    assert presentations["stimulus"].tolist() == [row["stimulus_id"] for row in shown]
    assert presentations["valid"].tolist() == [row["stimulus_id"] not in lacking for row in shown]
    assert not store.has_live_counts and not presentations["counts"].any()
    ingest = store.read_ingest()
    assert ingest["matched"].all() and ingest["counts"].any()  # the counts come from the .nev
    assert read_json(folder / "stages/estimate.json")["summary"]["source"] == "nev"
    assert (folder / "model.safetensors").exists() and (folder / "report.html").exists()


@pytest.mark.slow
def test_files_handoff_list_out_recording_in_day_finished(tmp_path, capsys):
    experiment = _experiment(tmp_path / "exp", "files")
    folder = experiment / "day_000"
    code, printed = _fit_day(capsys, experiment, 0)
    assert code == EXIT_WAITING == 3
    assert f"day 0 waits for its recording. On the rig, show the RSVP list {folder / 'rsvp.csv'} in order" in printed
    assert f"copy the NSP's .nev to {folder / 'recording.nev'}" in printed and "fit-day 0" in printed
    assert [s["waiting_for_recording"] for s in read_status(experiment)] == [True]
    assert not (folder / "stages/present.json").exists() and open_store(folder / "store.zarr").n_presentations == 0

    n_stimuli = open_store(folder / "store.zarr").n_stimuli
    rows = list(csv.DictReader((folder / "rsvp.csv").open()))
    assert len(rows) == 2 * n_stimuli  # [rsvp] repetitions = 2
    shown = _play_the_rig(experiment, 0, breaks=(3,))
    code, printed = _fit_day(capsys, experiment, 0)
    assert code == 0, printed
    assert "1 stimuli lack their valid repetitions (not re-queued): 3" in printed
    _check_finished_day(folder, shown, lacking=[3])
    status = read_status(experiment)[0]
    assert status["next_stage"] is None and not status["waiting_for_recording"] and status["n_lacking_valid"] == 1

    # day 1: validity from the rig's trial log; wrong files first
    day1 = experiment / "day_001"
    assert _fit_day(capsys, experiment, 1)[0] == EXIT_WAITING
    shutil.copyfile(folder / "recording.nev", day1 / "recording.nev")  # day 0's recording: day 0 has more stimuli
    code, printed = _fit_day(capsys, experiment, 1)
    assert code == 2 and "holds onset codes that no stimulus of the day has" in printed, printed
    (day1 / "recording.nev").unlink()
    _play_the_rig(experiment, 1, shuffle=4)  # the day's stimuli in another list's order
    code, printed = _fit_day(capsys, experiment, 1)
    assert code == 2 and "does not follow this day's RSVP list" in printed and "another day's recording" in printed
    (day1 / "recording.nev").unlink()
    shown = _play_the_rig(experiment, 1, breaks=(0,), outcome_codes=False)
    code, printed = _fit_day(capsys, experiment, 1)
    assert code == 2 and "holds no outcome codes" in printed and "trial_log.csv" in printed
    (day1 / "trial_log.csv").write_text("trial,stimulus,result\n")
    code, printed = _fit_day(capsys, experiment, 1)
    assert code == 2 and "lacks the column(s) ['code', 'outcome']" in printed
    assert open_store(day1 / "store.zarr").n_presentations == 0  # nothing stored from a refused recording
    codes = open_store(day1 / "store.zarr").read_stimuli(pixels=False)["code"]
    (day1 / "trial_log.csv").write_text("trial,code,outcome\n" + "".join(
        f"{k},{codes[row['stimulus_id']]},{'fixation_break' if row['stimulus_id'] == 0 else 'valid'}\n"
        for k, row in enumerate(shown)))
    code, printed = _fit_day(capsys, experiment, 1)
    assert code == 0, printed
    _check_finished_day(day1, shown, lacking=[0])
    assert read_json(day1 / "stages/present.json")["summary"]["validity_from"] == "trial log"


def test_the_list_is_rewritten_after_a_kill_before_its_marker(tmp_path):
    """The state a kill leaves between the bundle stage's artifacts and its marker: a rerun writes
    the same list again, and the day waits for its recording."""
    experiment = _experiment(tmp_path / "exp", "files")
    folder = experiment / "day_000"
    run_day(experiment, 0, until="bundle", rig=RigLauncher())
    written = (folder / "rsvp.csv").read_text()
    (folder / "stages/bundle.json").unlink()
    (folder / "rsvp.csv").write_text(written[: len(written) // 2])  # as a writer without atomic renames would leave it
    assert not run_day(experiment, 0, until="bundle", rig=RigLauncher())["bundle"]["skipped"]
    assert (folder / "rsvp.csv").read_text() == written
    assert not list(folder.glob("*.tmp"))


@pytest.mark.slow
def test_a_streaming_rig_without_live_counts_waits_for_the_recording(tmp_path, capsys):
    experiment = _experiment(tmp_path / "exp", "sim", sim="live_counts = false\n")
    folder = experiment / "day_000"
    code, printed = _fit_day(capsys, experiment, 0)
    assert code == EXIT_WAITING, printed
    assert "day 0 waits for its recording: the session is over, but the rig sent no spike counts" in printed
    assert f"(the simulated rig wrote it to {folder / 'rig_sim' / 'recording.nev'})" in printed
    store = open_store(folder / "store.zarr")
    assert store.finished and not store.has_live_counts and not store.read_presentations()["counts"].any()
    assert read_json(folder / "stages/present.json")["summary"]["lacking_valid"] == []  # re-queued until done
    assert [s["waiting_for_recording"] for s in read_status(experiment)] == [True]
    with pytest.raises(ValueError, match=r"has no spike counts yet: its rig sent presentations without counts"):
        store.read_counts()
    shutil.copyfile(folder / "rig_sim/recording.nev", folder / "recording.nev")  # the operator copies the .nev
    code, printed = _fit_day(capsys, experiment, 0)
    assert code == 0, printed
    ingest = open_store(folder / "store.zarr").read_ingest()
    assert ingest["matched"].all() and ingest["counts"].any()
    assert read_json(folder / "stages/estimate.json")["summary"]["source"] == "nev"
    assert not read_status(experiment)[0]["waiting_for_recording"]


def test_a_files_rig_has_no_link_to_open(tmp_path):
    config = read_config(_experiment(tmp_path / "exp", "files"))
    with pytest.raises(ValueError, match=r"\[rig\] kind = 'files' hands the RSVP list over as files: there is no rig link"):
        with RigLauncher().connect(config, tmp_path):
            pass
