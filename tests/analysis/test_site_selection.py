"""Site selection on a new array: planted metrics, the criteria, and a simulated 96-electrode day 0 end to end."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import zarr

from analysis.site_selection import SiteCriteria, compute_site_metrics, compute_site_selection
from closedloop.cli import main
from closedloop.config import read_config
from closedloop.core.files import read_json
from closedloop.data.recording import Recording
from closedloop.data.store import create_store
from rigs.nev import write_nev

RATE = 30000  # NSP ticks per second
N_IMAGES, N_REPEATS = 10, 4


def _planted_day(tmp_path, repeats: int = N_REPEATS, display_clock: tuple[float, float] | None = None):
    """A day store and its .nev with three sites whose metrics are known exactly.

    Site 0 (electrode 1): k spikes in the response window for clean image k and one in the
    baseline window, every presentation (perfectly reliable, driven). Site 1: one spike at 20 ms
    and one at 100 ms (baseline 20 Hz > response 10 Hz: not driven). Site 2: silent. A gaussian
    stimulus and an invalid presentation carry 50 spikes on site 2 that must not be counted.
    ``display_clock`` (offset s, drift ppm): the day was streamed without counts and logged its
    onsets on a display clock, NSP time = offset + (1 + drift · 1e-6) · display time.
    """
    store = create_store(tmp_path / "store.zarr", sites=3)
    frames = np.zeros((N_IMAGES + 1, 224, 224, 3), np.uint8)
    store.append_stimuli(frames[:N_IMAGES], parent=-1, site=-1, eps=0.0, direction=0, kind="clean",
                         predicted=np.zeros((N_IMAGES, 3)), code=np.arange(1, N_IMAGES + 1))
    store.append_stimuli(frames[:1], parent=0, site=-1, eps=1.0, direction=0, kind="gaussian",
                         predicted=np.zeros((1, 3)), code=[99])
    stimulus = np.concatenate([np.tile(np.arange(N_IMAGES), repeats), [N_IMAGES, 3]])
    valid = np.ones(stimulus.size, bool)
    valid[-1] = False
    onsets = RATE + np.arange(stimulus.size) * RATE // 5  # every 200 ms
    ticks, electrodes = [], []
    for onset, image, shown in zip(onsets, stimulus, valid):
        loud = image == N_IMAGES or not shown
        planted = [(onset + 3000 + 10 * j, 1) for j in range(image if image < N_IMAGES else 0)]  # 100 ms
        planted += [(onset + 300, 1), (onset + 600, 2), (onset + 3000, 2)]  # 10 ms, 20 ms, 100 ms
        planted += [(onset + 2400 + 10 * j, 3) for j in range(50)] if loud else []
        ticks += [t for t, _ in planted]
        electrodes += [e for _, e in planted]
    if display_clock is None:
        store.append_presentations(np.arange(stimulus.size), stimulus, onsets / RATE, valid,
                                   np.zeros((stimulus.size, 3), np.uint16))
    else:
        offset_s, drift_ppm = display_clock
        store.append_presentations(np.arange(stimulus.size), stimulus, (onsets / RATE - offset_s) / (1 + drift_ppm * 1e-6),
                                   valid, None)
    codes = np.array([*range(1, N_IMAGES + 1), 99])[stimulus]
    recording = Recording.from_ticks(ticks, electrodes, np.ones(len(ticks), int), np.concatenate([onsets, onsets + 3000]),
                                     np.concatenate([codes, np.zeros_like(codes)]), (1, 2, 3))
    return store.path, write_nev(tmp_path / "day.nev", recording)


def test_metrics_of_planted_sites(tmp_path):
    store, nev = _planted_day(tmp_path)
    rows = compute_site_metrics(store, nev, window_s=(0.07, 0.17), held_out_r=[0.8, None, 0.1])
    driven, baseline_only, silent = rows
    assert [r["n_presentations"] for r in rows] == [N_IMAGES * N_REPEATS] * 3 and driven["n_images"] == N_IMAGES
    assert driven["rate_hz"] == pytest.approx(np.arange(N_IMAGES).mean() / 0.1)  # 45 Hz
    assert driven["baseline_hz"] == pytest.approx(20.0) and driven["drive_hz"] == pytest.approx(25.0)
    assert driven["reliability"] == pytest.approx(1.0) and driven["drive_p"] < 1e-3
    assert baseline_only["rate_hz"] == pytest.approx(10.0) and baseline_only["drive_hz"] == pytest.approx(-10.0)
    assert baseline_only["drive_p"] > 0.999 and baseline_only["reliability"] is None  # constant responses
    assert silent["rate_hz"] == 0.0 and silent["drive_p"] == 1.0  # the loud gaussian and invalid presentations are left out
    assert [r["predictivity"] for r in rows] == [0.8, None, 0.1]
    assert [r["electrode"] for r in rows] == [1, 2, 3] and driven["label"] == "e1"


def test_a_streamed_day_on_another_clock_is_matched_through_the_clock_fit(tmp_path):
    """Display and NSP clocks 1234.5 s apart with a 40 ppm drift: the same metrics as on one clock."""
    store, nev = _planted_day(tmp_path, display_clock=(-1234.5, 40.0))
    rows = compute_site_metrics(store, nev, window_s=(0.07, 0.17))
    assert [r["n_presentations"] for r in rows] == [N_IMAGES * N_REPEATS] * 3
    assert rows[0]["rate_hz"] == pytest.approx(45.0) and rows[0]["reliability"] == pytest.approx(1.0)


def test_one_repetition_is_not_enough_for_reliability(tmp_path):
    store, nev = _planted_day(tmp_path, repeats=1)
    with pytest.raises(ValueError, match=r"0 clean images have 2 or more valid presentations.*\[rsvp\] repetitions >= 2"):
        compute_site_metrics(store, nev, window_s=(0.07, 0.17))


def _row(site, reliability, drive_p=1e-9, rate_hz=50.0, predictivity=None):
    return {"site": site, "reliability": reliability, "drive_p": drive_p, "rate_hz": rate_hz, "predictivity": predictivity}


def test_criteria_rank_cap_and_count_what_they_remove():
    rows = [_row(0, 0.6), _row(1, 0.9), _row(2, 0.95, drive_p=0.2), _row(3, 0.7, rate_hz=0.5), _row(4, None), _row(5, 0.8)]
    chosen = compute_site_selection(rows, SiteCriteria(max_sites=2))
    assert chosen["targets"] == [1, 5] and chosen["n_passed"] == 3
    assert [r["site"] for r in chosen["sites"]] == [1, 5, 0, 2, 3, 4]  # passing by reliability, then the rest
    assert [r["failed"] for r in chosen["sites"]] == ["", "", "", "drive", "rate", "reliability"]
    assert chosen["removed"] == {"reliability": 1, "drive": 1, "rate": 1}
    assert compute_site_selection(rows, SiteCriteria(max_sites=0))["targets"] == [0, 1, 5]
    with pytest.raises(ValueError, match="no site of 6 passes.*reliability removed 6, drive removed 1, rate removed 1"):
        compute_site_selection(rows, SiteCriteria(min_reliability=0.99))
    with pytest.raises(ValueError, match="'min_predictivity' needs the day's fitted model"):
        compute_site_selection(rows, SiteCriteria(min_predictivity=0.2))
    rows[1]["predictivity"], rows[5]["predictivity"] = 0.5, 0.1
    strict = compute_site_selection(rows, SiteCriteria(min_predictivity=0.2))
    assert strict["targets"] == [1] and strict["removed"]["predictivity"] == 5


@pytest.mark.parametrize("options, message", [
    ({"min_reliability": 1.5}, r"'min_reliability' must lie in \[-1, 1\], but got 1.5"),
    ({"max_drive_p": 0.0}, r"'max_drive_p' must lie in \(0, 1\]"),
    ({"min_rate_hz": -1.0}, r"'min_rate_hz' must lie in \[0, inf\]"),
    ({"min_predictivity": 2.0}, r"'min_predictivity' must lie in \[-1, 1\]"),
    ({"max_sites": -1}, r"'max_sites' must lie in \[0, inf\]"),
])
def test_thresholds_out_of_range(options, message):
    with pytest.raises(ValueError, match=message):
        SiteCriteria(**options)


UTAH = """
[experiment]
seed = 5
[images]
n_clean_day0 = 40
n_clean_per_day = 2
embedded_per_photo = 4
[model]
backbone = "resnet_tiny"
[sites]
n_sites = 96    # one Utah array, one site per electrode
# day 0 attacks one site; select-sites chooses the rest
targets = [0]
[attack]
budgets = [2.0]
steps = 2
[rsvp]
repetitions = 4
[rig]
kind = "sim"
[sim]
time_scale = 0.0
driven_fraction = 0.25
truth_starts = 1
truth_steps = 2
[fit]
epochs = 2
batch_size = 16
"""


@pytest.fixture(scope="module")
def utah_day(tmp_path_factory):
    """A simulated 96-electrode array, a quarter of it visually driven, with day 0 recorded and fitted."""
    from closedloop.day.runner import run_day
    from rigs.launch import RigLauncher

    experiment = tmp_path_factory.mktemp("utah") / "exp"
    experiment.mkdir()
    (experiment / "experiment.toml").write_text(UTAH)
    run_day(experiment, 0, until="refit", rig=RigLauncher())  # select-sites reads up to the refit's held-out r
    return experiment


def _select(capsys, *args):
    capsys.readouterr()
    try:
        main(["-q", "select-sites", *args])
        code = 0
    except SystemExit as done:
        code = done.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_select_sites_picks_the_driven_electrodes_and_the_next_day_attacks_them(utah_day, capsys):
    from closedloop.day.runner import run_day
    from rigs.launch import RigLauncher
    from rigs.truth import compute_driven_sites

    experiment, config_path = utah_day, utah_day / "experiment.toml"
    truly = set(np.flatnonzero(compute_driven_sites(read_config(experiment))).tolist())
    assert len(truly) == 24
    text = config_path.read_text()
    code, out, _ = _select(capsys, "--experiment", str(experiment), "--dry-run", "--json", "--max-sites", "0")
    dry = json.loads(out)
    assert code == 0 and dry["config"] is None and config_path.read_text() == text
    assert not (experiment / "site_selection.json").exists()
    ranked = [row["site"] for row in dry["sites"]]
    assert set(ranked[:24]) == truly  # every driven electrode ranks above every undriven one
    chosen = set(dry["targets"])
    precision, recall = len(chosen & truly) / len(chosen), len(chosen & truly) / len(truly)
    assert precision >= 0.8 and recall >= 0.95, (precision, recall, sorted(chosen - truly))

    code, out, _ = _select(capsys, "--experiment", str(experiment))  # the defaults: at most 21, the most reliable
    assert code == 0 and "wrote [sites] targets" in out and "chosen 21 of 96" in out
    record = read_json(experiment / "site_selection.json")
    targets = record["targets"]
    assert len(targets) == 21 and set(targets) <= truly and targets == sorted(ranked[:21])
    assert record["criteria"]["min_reliability"] == 0.5 and record["previous_targets"] == [0] and record["selected_at"]
    assert read_config(experiment).sites.targets == targets
    new = config_path.read_text()
    assert "n_sites = 96    # one Utah array, one site per electrode" in new and "# day 0 attacks one site" in new
    assert "# targets: chosen by `closedloop select-sites` from day 0" in new
    assert (experiment / "report" / "select_sites_day_000.html").read_text().count("<tr>") == 97
    assert (experiment / "report" / "select_sites_day_000.png").stat().st_size > 10_000

    run_day(experiment, 1, until="plan", rig=RigLauncher())
    assert read_json(experiment / "day_001" / "plan.json")["sites"] == targets


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.filterwarnings("ignore:Consolidated metadata")
def test_select_sites_errors(utah_day, capsys, tmp_path):
    experiment = str(utah_day)
    cases = [
        (["--day", "7"], "day 7 of .* is not recorded yet .* run `closedloop fit-day 7"),
        (["--min-reliability", "0.999"], r"no site of 96 passes .*: reliability removed 96, drive removed \d+, rate removed 0"),
        (["--min-reliability", "2"], r"'min_reliability' must lie in \[-1, 1\], but got 2"),
        (["--baseline-window", "0", "0.1"], r"must end by the response window's start \(0.07 s after onset\)"),
        (["--out", "x.png"], "'out' must be an .html path"),
    ]
    for args, message in cases:
        code, _, err = _select(capsys, "--experiment", experiment, "--dry-run", *args)
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, (args, err)
        assert re.search(message, err), (args, err)
    copy = tmp_path / "exp"
    shutil.copytree(utah_day / "day_000", copy / "day_000", ignore=shutil.ignore_patterns("rig_sim"))
    shutil.copy(utah_day / "experiment.toml", copy)
    (copy / "day_000" / "recording.nev").unlink()
    code, out, _ = _select(capsys, "--experiment", str(copy), "--dry-run")
    assert code == 0 and "chosen 21 of 96" in out  # the file the day's ingest read stands in for it
    ingest = zarr.open_group(str(copy / "day_000" / "store.zarr"), mode="a")["ingest"]
    ingest.attrs["source"] = str(tmp_path / "moved.nev")
    zarr.consolidate_metadata(str(copy / "day_000" / "store.zarr"))  # a finished store reads consolidated metadata
    code, _, err = _select(capsys, "--experiment", str(copy), "--dry-run")
    assert code == 2 and "day 0 has no Blackrock recording" in err


def test_a_second_select_sites_on_the_experiment_is_refused_naming_the_first(tmp_path, capsys):
    """select-sites rewrites experiment.toml: two at once on one experiment would lose one's targets."""
    import os
    import socket

    from closedloop.core.lock import hold_lock

    experiment = tmp_path / "exp"
    experiment.mkdir()
    (experiment / "experiment.toml").write_text("[sites]\nn_sites = 2\n")
    with hold_lock(experiment / "site_selection.lock"):  # as a select-sites running now holds it
        code, out, err = _select(capsys, "--experiment", str(experiment))
    assert code == 2 and err.strip().count("\n") == 0, err
    assert re.search(rf"site_selection is being run by another process \(pid {os.getpid()} on {socket.gethostname()}, "
                     r"started \d{4}-\d\d-\d\dT", err)
    assert (experiment / "experiment.toml").read_text() == "[sites]\nn_sites = 2\n"
    assert not (experiment / "site_selection.json").exists() and not (experiment / "report").exists()
