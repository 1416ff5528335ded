"""Silent wrong data is refused: a bundle replaced after the bundle stage, a recording of another day."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from closedloop.data.bundle import read_bundle, write_bundle
from closedloop.data.nev import read_nev
from closedloop.data.store import open_store
from closedloop.day.runner import run_day
from rigs.launch import RigLauncher
from rigs.nev import write_nev
from tests.tiny_experiment import TINY


def _experiment(folder):
    folder.mkdir(parents=True)
    (folder / "experiment.toml").write_text(TINY.format(time_scale=0.0))
    return folder


@pytest.mark.slow
def test_a_replaced_bundle_is_not_presented(tmp_path):
    experiment = _experiment(tmp_path / "exp")
    run_day(experiment, 0, until="bundle", rig=RigLauncher())
    path = experiment / "day_000/stimuli.h5"
    bundle = read_bundle(path)
    write_bundle(path, 255 - bundle.pixels, bundle.stimulus_ids, bundle.codes, attrs=bundle.attrs)  # self-consistent
    with pytest.raises(ValueError, match=r"stimuli.h5 changed after the bundle stage: its frames hash to .* restore the file"):
        run_day(experiment, 0, rig=RigLauncher())
    assert open_store(experiment / "day_000/store.zarr").n_presentations == 0  # nothing was shown


@pytest.mark.slow
def test_a_recording_of_another_day_stops_the_day(tmp_path):
    experiment = _experiment(tmp_path / "exp")
    run_day(experiment, 0, until="present", rig=RigLauncher())
    path = experiment / "day_000/recording.nev"
    recording = read_nev(path)
    other = dataclasses.replace(recording, event_words=np.where(recording.event_words > 0, recording.event_words + 500, 0))
    path.unlink()
    write_nev(path, other)
    with pytest.raises(ValueError, match=r"recording.nev does not match day 0's presentation log: 0 of \d+ presentations "
                                         r"matched.*\(first: unknown_code: presentation \d+, code \d+, log [0-9.]+ s, nev "
                                         r"[0-9.]+ s, recorded code \d+\).*nothing was stored.*--allow-mismatch") as refused:
        run_day(experiment, 0, rig=RigLauncher())
    assert "np." not in str(refused.value)
    folder = experiment / "day_000"
    assert open_store(folder / "store.zarr").read_ingest() is None
    assert not (folder / "stages/ingest.json").exists() and not (folder / "sensitivity.json").exists()


@pytest.mark.slow
def test_a_store_renamed_before_its_marker_is_kept(tmp_path):
    """The state SIGKILL leaves between synthesize's rename of store.zarr.partial and its marker
    (a rerun used to fail with 'Directory not empty')."""
    experiment = _experiment(tmp_path / "exp")
    run_day(experiment, 0, until="synthesize", rig=RigLauncher())
    folder = experiment / "day_000"
    pixels = open_store(folder / "store.zarr").read_stimuli(pixels=True)["pixels"]
    (folder / "stages/synthesize.json").unlink()
    results = run_day(experiment, 0, until="synthesize", rig=RigLauncher())
    assert not results["synthesize"]["skipped"] and results["synthesize"]["summary"]["n_stimuli"] == len(pixels)
    np.testing.assert_array_equal(open_store(folder / "store.zarr").read_stimuli(pixels=True)["pixels"], pixels)
    assert not (folder / "store.zarr.partial").exists() and not (folder / "synthesis_parts").exists()


@pytest.mark.slow
def test_an_ingest_of_another_file_than_the_recording_is_refused_until_replaced(tmp_path, capsys):
    """An ``ingest --allow-mismatch`` of a wrong file, then the right recording.nev put in place:
    fit-day refuses (the stored counts are not the file's) and names the command that replaces
    them; after it, the ingest and the stages after it are redone from the right file."""
    from closedloop.cli import main

    experiment = _experiment(tmp_path / "exp")
    folder = experiment / "day_000"
    run_day(experiment, 0, until="present", rig=RigLauncher())
    right = folder / "recording.nev"
    recording = read_nev(right)
    wrong = tmp_path / "wrong.nev"
    write_nev(wrong, dataclasses.replace(recording, event_words=np.where(recording.event_words > 0,
                                                                         recording.event_words + 500, 0)))
    right.rename(tmp_path / "right.nev")
    main(["-q", "ingest", str(wrong), "--experiment", str(experiment), "--day", "0", "--allow-mismatch"])
    run_day(experiment, 0, rig=RigLauncher())  # finished on the wrong file's (empty) counts
    assert not open_store(folder / "store.zarr").read_ingest()["matched"].any()

    (tmp_path / "right.nev").rename(right)  # the operator puts the right recording in place
    with pytest.raises(ValueError, match=r"day 0's store holds the counts of .*wrong.nev \(sha256 [0-9a-f]{12}…, 0 of \d+ presentations matched\), but "
                                         r".*recording.nev is another file \(sha256 [0-9a-f]{12}…\).*"
                                         r"run `closedloop ingest .*recording.nev --experiment .* --day 0`"):
        run_day(experiment, 0, rig=RigLauncher())
    main(["-q", "ingest", str(right), "--experiment", str(experiment), "--day", "0"])
    assert "the counts changed: fit-day 0 redoes ingest, estimate, refit, report" in capsys.readouterr().out
    results = run_day(experiment, 0, rig=RigLauncher())
    assert [stage for stage, r in results.items() if not r["skipped"]] == ["ingest", "estimate", "refit", "report"]
    assert open_store(folder / "store.zarr").read_ingest()["matched"].all()


@pytest.mark.slow
def test_spikes_off_the_site_map_name_the_ingest_command(tmp_path):
    """fit-day has no --ignore-unmapped: the ingest stage names the `closedloop ingest` command that has it."""
    experiment = _experiment(tmp_path / "exp")
    run_day(experiment, 0, until="present", rig=RigLauncher())
    path = experiment / "day_000/recording.nev"
    recording = read_nev(path)
    electrodes = recording.spike_electrodes.copy()
    electrodes[::7] = 99  # an electrode the day's sites do not name
    path.unlink()
    write_nev(path, dataclasses.replace(recording, spike_electrodes=electrodes, electrodes=(*recording.electrodes, 99)))
    with pytest.raises(ValueError, match=r"spikes on electrodes \[99\] that are missing from the site map; .* so ignore them: "
                                         r"run `closedloop ingest .*recording.nev --experiment .* --day 0 --ignore-unmapped`, "
                                         r"then `closedloop fit-day 0 --experiment .*`$"):
        run_day(experiment, 0, rig=RigLauncher())
