"""NWB export (closedloop export-nwb): a real simulated day, read back with pynwb and checked
table by table against the day store, the .nev and the day's JSON files; the NWB Inspector."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import uuid
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import h5py
import numpy as np
import pytest
from nwbinspector import Importance, inspect_all, inspect_nwbfile, load_config
from pynwb import NWBHDF5IO

import closedloop.data.nwb as nwb_module
from closedloop.cli import main
from closedloop.core.files import compute_folder_digest, read_json
from closedloop.data.nev import read_nev
from closedloop.data.nev_header import read_nev_header
from closedloop.data.nwb import write_day_nwb, write_experiment_nwb
from closedloop.data.store import open_store
from closedloop.day.runner import run_day
from rigs.launch import RigLauncher
from tests.small_disk import fill_disk, mount_small_disk
from tests.tiny_experiment import TINY

NWB = """
[nwb]
subject_id = "monkeyS"
sex = "M"
age = "P6Y"
experimenter = ["Doe, Jane"]
institution = "Sim Institute"
lab = "Sim Lab"
"""
# The one Inspector message we accept, a suggestion outside our control: the issue asks for a
# processing module named "sensitivity", not one of NWB's schema module names (docs/nwb.md).
ACCEPTED_SUGGESTIONS = {("check_processing_module_name", "sensitivity")}


@pytest.fixture(scope="module")
def experiment(tmp_path_factory) -> Path:
    """A tiny real day 0 against the simulated rig (3 sites), with an [nwb] section."""
    folder = tmp_path_factory.mktemp("nwb") / "exp"
    folder.mkdir()
    (folder / "experiment.toml").write_text(TINY.format(time_scale=0.0).replace("n_sites = 2", "n_sites = 3") + NWB)
    run_day(folder, 0, rig=RigLauncher())
    return folder


@pytest.fixture(scope="module")
def exported(experiment, tmp_path_factory) -> Path:
    return Path(write_day_nwb(experiment, 0, tmp_path_factory.mktemp("out") / "day_000.nwb")["path"])


def _copy(experiment: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "exp"
    shutil.copytree(experiment, copy, ignore=shutil.ignore_patterns("rig_sim"))
    return copy


def _cli(capsys, *args) -> tuple[int, str, str]:
    code = 0
    try:
        main([str(a) for a in args])
    except SystemExit as done:
        code = done.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _by_id(table, ids: np.ndarray) -> np.ndarray:
    """Row of each presentation id in an NWB table."""
    rows = {int(i): row for row, i in enumerate(table.id[:])}
    return np.array([rows[int(i)] for i in ids])


def test_every_table_matches_the_day_exactly(experiment, exported):
    folder = experiment / "day_000"
    store = open_store(folder / "store.zarr")
    stimuli, log, ingest = store.read_stimuli(), store.read_presentations(), store.read_ingest()
    assert ingest["matched"].all()  # so every start time and count comes from the .nev
    recording = read_nev(folder / "recording.nev")
    with NWBHDF5IO(str(exported), "r") as io:
        nwb = io.read()
        # session
        assert nwb.session_start_time == read_nev_header(folder / "recording.nev", False)["time_origin"]
        assert uuid.UUID(nwb.identifier).version == 4 and nwb.session_id == "day_000"
        assert (nwb.subject.subject_id, nwb.subject.species, nwb.subject.sex, nwb.subject.age) == (
            "monkeyS", "Macaca mulatta", "M", "P6Y")
        assert list(nwb.experimenter) == ["Doe, Jane"] and nwb.lab == "Sim Lab" and nwb.institution == "Sim Institute"
        notes = json.loads(nwb.notes)
        assert notes["model_checkpoint"]["sha256"] == hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
        assert json.loads(nwb.data_collection)["provenance"] == read_json(folder / "provenance.json")
        # devices, groups, electrodes: row i = site i
        assert set(nwb.devices) == {"utah_array_0"} and set(nwb.electrode_groups) == {"array_0"}
        assert nwb.devices["utah_array_0"].model.manufacturer == "Blackrock Microsystems"
        electrodes = nwb.electrodes.to_dataframe()
        assert electrodes["array"].tolist() == store.sites.array.tolist()
        assert electrodes["electrode"].tolist() == store.sites.electrode.tolist()
        assert electrodes["unit"].tolist() == store.sites.unit.tolist()
        assert electrodes["label"].tolist() == list(store.sites.label)
        assert electrodes["location"].tolist() == ["inferior temporal cortex"] * store.n_sites
        # units: every spike of each site in the .nev, exactly
        units = nwb.units
        assert list(units.id[:]) == list(range(store.n_sites)) and units.resolution == 1 / 30000
        for site in range(store.n_sites):
            on_site = (recording.spike_electrodes == store.sites.electrode[site]) & (recording.spike_units != 255)
            np.testing.assert_array_equal(units["spike_times"][site], recording.spike_times_s[on_site])
            assert units["electrodes"][site].index.tolist() == [site]
        # presentations, in onset order, id = the store's presentation id
        table = nwb.intervals["presentations"]
        assert sorted(table.id[:]) == sorted(log["id"].tolist())
        rows = _by_id(table, log["id"])
        start = table["start_time"][:]
        np.testing.assert_array_equal(start[rows], ingest["onset"])
        assert (np.diff(start) >= 0).all()
        np.testing.assert_array_equal(table["stop_time"][:][rows], ingest["onset"] + 0.1)
        np.testing.assert_array_equal(table["logged_onset"][:][rows], log["onset"])
        shown = table["stimulus"][:][rows]
        np.testing.assert_array_equal(shown, log["stimulus"])
        for column, name in (("code", "code"), ("parent_stimulus", "parent"), ("site", "site"), ("eps", "eps"),
                             ("direction", "direction")):
            np.testing.assert_array_equal(table[column][:][rows], stimuli[name][shown])
        assert [table["kind"][:][r] for r in rows] == stimuli["kind"][shown].tolist()
        np.testing.assert_array_equal(table["predicted"][:][rows], stimuli["predicted"][shown])
        np.testing.assert_array_equal(table["valid"][:][rows], log["valid"])
        counts = table["counts"][:]
        assert counts.dtype == np.uint16
        np.testing.assert_array_equal(counts[rows], ingest["counts"])
        assert table["from_nev"][:].all()
        # the counts are the spikes of the units table in [start + 0.07, start + 0.17), in clock ticks
        for site in range(store.n_sites):
            ticks = np.rint(units["spike_times"][site] * 30000).astype(np.int64)
            onset = np.rint(start * 30000).astype(np.int64)
            found = np.searchsorted(ticks, onset + 5100) - np.searchsorted(ticks, onset + 2100)
            np.testing.assert_array_equal(found, counts[:, site])
        # templates: bit-exact, in stimulus order; the IndexSeries points into them
        images = nwb.stimulus_template["stimuli"]
        ordered = list(images.order_of_images.data)
        assert [image.name for image in ordered] == [f"stimulus_{k:05d}" for k in range(store.n_stimuli)]
        for k, image in enumerate(ordered):
            assert image.data.dtype == np.uint8
            np.testing.assert_array_equal(image.data[:], stimuli["pixels"][k])
        series = nwb.stimulus["presented_stimuli"]
        assert series.indexed_images.name == "stimuli"
        np.testing.assert_array_equal(series.data[:], table["stimulus"][:])
        np.testing.assert_allclose(series.get_timestamps(), start, rtol=0, atol=1e-9)
        # the day's sensitivity.json
        bounds = nwb.processing["sensitivity"]["lower_bounds"].to_dataframe()
        records = read_json(folder / "sensitivity.json")
        assert len(bounds) == len(records)
        assert bounds["kind"].tolist() == [r["kind"] for r in records]
        for key in set(records[0]) - {"kind"}:  # exactly, null as NaN
            expected = np.array([np.nan if r[key] is None else r[key] for r in records], dtype=float)
            np.testing.assert_array_equal(bounds[key].to_numpy(dtype=float), expected, err_msg=key)
    with h5py.File(exported, "r") as handle:
        assert handle["stimulus/templates/stimuli/stimulus_00000"].compression == "gzip"
        assert handle["intervals/presentations/counts"].compression == "gzip"
        assert handle["units/spike_times"].compression == "gzip"


def test_the_inspector_finds_nothing_to_fix(exported):
    messages = list(inspect_nwbfile(nwbfile_path=exported))
    serious = [m for m in messages if m.importance in (Importance.CRITICAL, Importance.BEST_PRACTICE_VIOLATION)]
    assert not serious, [(m.check_function_name, m.object_name, m.message) for m in serious]
    assert {(m.check_function_name, m.object_name) for m in messages} <= ACCEPTED_SUGGESTIONS


def test_each_export_has_its_own_identifier_and_the_store_digest_apart(experiment, exported, tmp_path):
    """Two exports of one day: unique identifiers (uuid4), so the Inspector passes a folder
    holding both; the store digest (what identifies the data) is the same in both."""
    shutil.copy(exported, tmp_path / "first.nwb")
    again = write_day_nwb(experiment, 0, tmp_path / "again.nwb")
    with NWBHDF5IO(str(exported), "r") as first, NWBHDF5IO(again["path"], "r") as second:
        one, two = first.read(), second.read()
        assert one.identifier != two.identifier == again["identifier"]
        assert uuid.UUID(one.identifier).version == uuid.UUID(two.identifier).version == 4
        digests = {json.loads(nwb.notes)["store"]["sha256_of_files"] for nwb in (one, two)}
    assert digests == {compute_folder_digest(experiment / "day_000" / "store.zarr")} == {again["store_digest"]}
    messages = list(inspect_all(path=tmp_path, config=load_config("dandi"), progress_bar=False))
    assert not [m for m in messages if m.importance == Importance.CRITICAL], [m.message for m in messages]


def test_a_day_without_its_recording_keeps_the_counts(experiment, tmp_path):
    copy = _copy(experiment, tmp_path)
    (copy / "day_000" / "recording.nev").unlink()
    summary = write_day_nwb(copy, 0, tmp_path / "day.nwb")
    assert summary["n_units"] == 0
    with NWBHDF5IO(summary["path"], "r") as io:
        nwb = io.read()
        assert nwb.units is None
        created = read_json(copy / "day_000" / "provenance.json")["created_utc"]
        assert nwb.session_start_time == datetime.fromisoformat(created.replace("Z", "+00:00"))
        assert json.loads(nwb.notes)["session_start_time_from"] == "created_utc of provenance.json"
        assert nwb.intervals["presentations"]["counts"][:].shape[1] == 3
    assert not [m for m in inspect_nwbfile(nwbfile_path=summary["path"])
                if m.importance in (Importance.CRITICAL, Importance.BEST_PRACTICE_VIOLATION)]


def test_all_exports_finished_days_and_lists_the_others(experiment, tmp_path, capsys):
    copy = _copy(experiment, tmp_path)
    shutil.copytree(copy / "day_000", copy / "day_001")
    (copy / "day_001" / "stages" / "report.json").unlink()
    code, out, _ = _cli(capsys, "-q", "export-nwb", "--experiment", copy, "--all", tmp_path / "nwb", "--json")
    assert code == 0
    result = json.loads(out)
    assert [d["day"] for d in result["days"]] == [0] and result["skipped"] == [1]
    assert sorted(p.name for p in (tmp_path / "nwb").iterdir()) == ["experiment_day_000.nwb"]


def _no_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_bad_input_is_one_error_line_and_writes_nothing(experiment, tmp_path, capsys):
    copy = _copy(experiment, tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    cases = [
        (["--day", 4, out / "d.nwb"], "has no day 4 (no folder day_004); its days are [0]"),
        (["--day", 0, out / "d.h5"], "must be a file name ending in .nwb"),
        ([out / "d.nwb"], "give either --day N"),
        (["--day", 0, "--all", out / "d.nwb"], "give either --day N"),
    ]
    for args, message in cases:
        code, _, err = _cli(capsys, "export-nwb", "--experiment", copy, *args)
        assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    (copy / "day_000" / "stages" / "refit.json").rename(copy / "refit.json")
    code, _, err = _cli(capsys, "export-nwb", "--experiment", copy, "--day", 0, out / "d.nwb")
    assert code == 2 and "day 0 of" in err and "is not finished (next stage: refit)" in err
    (copy / "refit.json").rename(copy / "day_000" / "stages" / "refit.json")
    toml = (copy / "experiment.toml").read_text()
    (copy / "experiment.toml").write_text(toml.replace('subject_id = "monkeyS"', "").replace('age = "P6Y"', ""))
    code, _, err = _cli(capsys, "export-nwb", "--experiment", copy, "--day", 0, out / "d.nwb")
    assert code == 2 and "[nwb] subject_id, age are missing; DANDI requires subject_id, species, sex and age" in err
    code, _, err = _cli(capsys, "export-nwb", "--experiment", copy, "--all", out)
    assert code == 2 and "[nwb] subject_id, age are missing" in err and "and age (or date_of_birth)" in err
    for line, message in (('species = "rhesus monkey"', "'nwb.species' = 'rhesus monkey': must be a Latin binomial"),
                          ('location = ""', "'nwb.location' = '': must name the brain area of the arrays"),
                          ('date_of_birth = "2099-01-01"', "[nwb] date_of_birth = 2099-01-01 is after the session of day 0 (")):
        (copy / "experiment.toml").write_text(f"{toml}{line}\n")
        for args in (["--day", 0, out / "d.nwb"], ["--all", out]):
            code, _, err = _cli(capsys, "-q", "export-nwb", "--experiment", copy, *args)
            assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert _no_files(out) == []
    (copy / "experiment.toml").write_text(toml)
    (out / "d.nwb").write_bytes(b"keep me")
    code, _, err = _cli(capsys, "export-nwb", "--experiment", copy, "--day", 0, out / "d.nwb")
    assert code == 2 and "d.nwb already exists; pass --overwrite to replace it" in err
    assert (out / "d.nwb").read_bytes() == b"keep me" and _no_files(out) == ["d.nwb"]
    code, out_text, _ = _cli(capsys, "-q", "export-nwb", "--experiment", copy, "--day", 0, out / "d.nwb", "--overwrite")
    assert code == 0 and "day 0: " in out_text and h5py.is_hdf5(out / "d.nwb")


def test_a_failed_export_leaves_nothing_behind(experiment, tmp_path, monkeypatch):
    write = NWBHDF5IO.write

    def fail(self, *args, **kwargs):  # the whole file is written, then the disk fills up
        write(self, *args, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(NWBHDF5IO, "write", fail)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "d.nwb").write_bytes(b"old")
    with pytest.raises(OSError, match="disk full"):
        write_day_nwb(experiment, 0, tmp_path / "out" / "d.nwb", overwrite=True)
    assert _no_files(tmp_path / "out") == ["d.nwb"] and (tmp_path / "out" / "d.nwb").read_bytes() == b"old"
    with pytest.raises(ValueError, match="must be a folder with --all"):
        write_experiment_nwb(experiment, tmp_path / "out" / "d.nwb")


def test_a_partial_file_is_no_nwb_and_stale_partials_of_out_are_removed(experiment, tmp_path, monkeypatch):
    """A killed export leaves its temporary beside OUT: it must not end in .nwb (the Inspector
    would read it as a broken NWB file), and the next export of that OUT removes it (also one
    named as earlier versions named them), never a partial of another OUT."""
    out = tmp_path / "out"
    out.mkdir()
    stale = [out / ".d.k1ll3d00.partial", out / ".d.nwb.k1ll3d01.partial.nwb"]  # (as earlier versions named it)
    other = out / ".e.k1ll3d02.partial"
    for path in (*stale, other):
        path.write_bytes(b"half an HDF5 file")
    written = []
    atomic = nwb_module.atomic_path

    @contextmanager
    def record(*args, **kwargs):
        with atomic(*args, **kwargs) as temporary:
            written.append(temporary)
            yield temporary

    monkeypatch.setattr(nwb_module, "atomic_path", record)
    write_day_nwb(experiment, 0, out / "d.nwb")
    assert len(written) == 1 and written[0].parent == out and ".nwb" not in written[0].name, written
    assert written[0].name.startswith(".d.") and written[0].name.endswith(".partial")
    assert _no_files(out) == [".e.k1ll3d02.partial", "d.nwb"]


def test_two_exports_to_one_out_at_once_one_is_refused_naming_the_other(experiment, tmp_path, monkeypatch, capsys):
    """A second export (of the day, or --all into the folder) while one writes OUT is refused with
    one error line naming the first (pid, host, start time); the first finishes; nothing is lost."""
    out = tmp_path / "out"
    out.mkdir()
    writing, finish = threading.Event(), threading.Event()
    write = NWBHDF5IO.write

    def slow(self, *args, **kwargs):
        if threading.current_thread() is first:
            writing.set()
            assert finish.wait(60)
        write(self, *args, **kwargs)

    monkeypatch.setattr(NWBHDF5IO, "write", slow)
    first = threading.Thread(target=write_day_nwb, args=(experiment, 0, out / "experiment_day_000.nwb"))
    first.start()
    try:
        assert writing.wait(60)
        for args in (["--day", 0, out / "experiment_day_000.nwb"], ["--all", out], ["--all", out, "--overwrite"]):
            code, _, err = _cli(capsys, "-q", "export-nwb", "--experiment", experiment, *args)
            assert code == 2 and err.count("\n") == 1 and err.startswith("error: the export to "), err
            assert f"experiment_day_000.nwb is being run by another process (pid {os.getpid()} on " in err
            assert ", started 20" in err
    finally:
        finish.set()
        first.join()
    assert _no_files(out) == ["experiment_day_000.nwb"]
    with NWBHDF5IO(str(out / "experiment_day_000.nwb"), "r") as io:
        assert io.read().session_id == "day_000"


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_the_file_gets_the_mode_the_umask_gives(experiment, tmp_path, umask):
    previous = os.umask(umask)
    try:
        summary = write_day_nwb(experiment, 0, tmp_path / "d.nwb")
    finally:
        os.umask(previous)
    assert os.stat(summary["path"]).st_mode & 0o777 == 0o666 & ~umask


def test_each_day_carries_the_subject_s_age_at_its_session(experiment, tmp_path):
    """[nwb] age is the age at the first day: day 1, three days later, is three days older. An
    age range moves as a whole; a date of birth is written as given (and suffices alone)."""
    copy = _copy(experiment, tmp_path)
    shutil.copytree(copy / "day_000", copy / "day_001")
    start = datetime.now(UTC) - timedelta(days=10)  # (a session in the future is CRITICAL for the Inspector)
    for day, days in (("day_000", 0), ("day_001", 3)):
        (copy / day / "recording.nev").unlink()  # so its session starts at its provenance's created_utc
        provenance = read_json(copy / day / "provenance.json")
        provenance["created_utc"] = (start + timedelta(days=days)).strftime("%Y-%m-%dT%H:%M:%SZ")
        (copy / day / "provenance.json").write_text(json.dumps(provenance))
    toml = (copy / "experiment.toml").read_text()
    for lines, ages, born in (
        ('age = "P6Y"', ["P6Y", "P6Y3D"], None),
        ('age = "P5Y/P7Y"\ndate_of_birth = "2019-04-01"', ["P5Y/P7Y", "P5Y3D/P7Y3D"], datetime(2019, 4, 1, tzinfo=UTC)),
        ('date_of_birth = 2019-04-01', [None, None], datetime(2019, 4, 1, tzinfo=UTC)),
    ):
        (copy / "experiment.toml").write_text(toml.replace('age = "P6Y"', lines))
        summary = write_experiment_nwb(copy, tmp_path / "nwb", overwrite=True)
        for day, age in zip(summary["days"], ages):
            with NWBHDF5IO(day["path"], "r") as io:
                subject = io.read().subject
                assert (subject.age, subject.date_of_birth) == (age, born), (lines, day["day"])
            messages = list(inspect_nwbfile(nwbfile_path=day["path"], config=load_config("dandi")))
            assert not [m for m in messages if m.importance == Importance.CRITICAL], [m.message for m in messages]


def test_a_killed_export_leaves_nothing_an_nwb_tool_reads_and_the_next_export_cleans_up(experiment, tmp_path):
    """SIGKILL of a real `closedloop export-nwb` while it writes: no file ending in .nwb is left
    (the Inspector, given the folder, finds no file), and the next export of the same OUT takes
    over the dead export's lock and removes its partial file and its lock."""
    out = tmp_path / "out"
    out.mkdir()
    root = Path(__file__).resolve().parents[3]
    command = [sys.executable, "-m", "closedloop", "-q", "export-nwb", "--experiment", str(experiment), "--day", "0",
               str(out / "d.nwb")]
    # killed by an audit hook at its first audited step after the partial file was opened (the file is built in
    # memory and written in one go: a timer would rarely catch it)
    hook = ("import os, signal, sys\narmed, killing = [], []\ndef hook(event, args):\n"
            "    if armed and not killing:\n        killing.append(1)  # os.kill is audited too\n"
            "        os.kill(os.getpid(), signal.SIGKILL)\n"
            "    if event == 'open' and str(args[0]).endswith('.partial') and args[1] not in (None, 'r', 'rb'): armed.append(1)\n"
            "sys.addaudithook(hook)\nfrom closedloop.cli import main\nmain(sys.argv[1:])")
    process = subprocess.run([sys.executable, "-c", hook, *command[3:]], cwd=root, capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}, timeout=300)
    assert process.returncode == -signal.SIGKILL, process.stderr[-3000:]  # killed while writing, not finished
    left = sorted(p.name for p in out.iterdir())
    assert len(left) == 2 and ".d.lock" in left and all(name.endswith((".lock", ".partial")) for name in left), left
    assert not list(inspect_all(path=out, progress_bar=False))
    summary = write_day_nwb(experiment, 0, out / "d.nwb")
    assert _no_files(out) == ["d.nwb"] and summary["n_presentations"] == 65


def test_a_full_disk_is_one_error_line_leaves_no_partial_and_the_export_goes_through_with_room(experiment, tmp_path):
    """`closedloop export-nwb` into a real small file system, filled up: exit 1 with one line naming OUT
    (no crash: HDF5 never writes to that disk), nothing but the filler left; with room, the export is whole."""
    out = tmp_path / "out"
    root = Path(__file__).resolve().parents[3]
    command = [sys.executable, "-m", "closedloop", "-q", "export-nwb", "--experiment", str(experiment), "--day", "0",
               str(out / "d.nwb")]
    with mount_small_disk(out, 8 << 20):
        filler = fill_disk(out, leave_bytes=64 << 10)  # the lock fits, the file (3 MB) does not
        failed = subprocess.run(command, env={**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}, cwd=root,
                                capture_output=True, text=True, timeout=300)
        assert failed.returncode == 1 and "Traceback" not in failed.stderr, failed.stderr[-3000:]
        assert failed.stderr.strip().splitlines()[-1].startswith(f"error: no space left on the device holding {out}/")
        assert sorted(p.name for p in out.iterdir()) == [".filler"]
        filler.unlink()
        summary = write_day_nwb(experiment, 0, out / "d.nwb")
        assert sorted(p.name for p in out.iterdir()) == ["d.nwb"] and summary["n_presentations"] == 65
        with NWBHDF5IO(str(out / "d.nwb"), mode="r") as reader:
            assert reader.read().identifier == summary["identifier"]
