import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import zarr

import closedloop.data.nev_scan as nev_scan
from closedloop.data.counts import Onsets, compute_counts, compute_nev_counts, compute_onsets, compute_summary
from closedloop.data.nev import NEV_ENGINES, read_nev
from closedloop.data.reconcile import compute_reconciliation, write_day_counts
from closedloop.data.recording import Recording
from closedloop.data.sites import SiteTable, make_default_sites
from closedloop.data.store import create_store, open_store
from rigs.nev import write_nev

START, STOP = 2100, 5100  # the 0.07-0.17 s window in 30 kHz ticks
ELECTRODES = (1, 2, 3, 4)


def _edge_recording():
    """Two onsets; spikes one tick inside and outside each window edge, on several units."""
    onsets = np.array([30000, 60000])
    spikes, electrodes, units = [], [], []
    for onset in onsets:
        for offset in (START - 1, START, STOP - 1, STOP):  # in: START, STOP - 1
            spikes += [onset + offset] * 3
            electrodes += [1, 2, 2]
            units += [0, 1, 2]
    spikes += [30000 + 3000, 60000 + 3000]
    electrodes += [3, 3]
    units += [255, 1]  # noise is not counted; unit 1 is
    events = [30000, 30100, 60000, 60100]
    return Recording.from_ticks(spikes, electrodes, units, events, [5, 0, 9, 0], ELECTRODES)


def _read_both(path, *, window_s=(0.07, 0.17), **options):
    """The recording of ``path`` read by both engines, which must agree exactly, as must the
    streaming counter with counts from the recording (onsets, codes, counts); the stream one is returned."""
    recording, reference = (read_nev(path, engine=engine, **options) for engine in NEV_ENGINES)
    assert recording.electrodes == reference.electrodes and recording.sampling_rate_hz == reference.sampling_rate_hz
    for name in ("spike_ticks", "spike_electrodes", "spike_units", "event_ticks", "event_words"):
        np.testing.assert_array_equal(getattr(recording, name), getattr(reference, name), err_msg=name)
    onsets, counts = compute_nev_counts(path, window_s=window_s, **options)
    expected = compute_onsets(reference)
    np.testing.assert_array_equal(onsets.times_s, expected.times_s)
    np.testing.assert_array_equal(onsets.codes, expected.codes)
    np.testing.assert_array_equal(counts, compute_counts(reference, expected.times_s, window_s=window_s))
    return recording


def _run(*args):
    return subprocess.run([sys.executable, "-m", "closedloop", *map(str, args)], capture_output=True, text=True,
                          timeout=120, env=os.environ | {"PYTHONPATH": os.getcwd()})


def _snapshot(path):
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*"))
            if p.is_file()}


@pytest.mark.parametrize("version", ["2.2", "2.3", "3.0"])
@pytest.mark.parametrize("with_ns2", [False, True])
def test_round_trip_counts_are_exact_at_window_edges(tmp_path, version, with_ns2):
    original = _edge_recording()
    recording = _read_both(write_nev(tmp_path / "rec.nev", original, version=version, write_ns2=with_ns2))
    assert recording.electrodes == ELECTRODES and recording.sampling_rate_hz == 30000.0
    np.testing.assert_array_equal(recording.spike_ticks, np.sort(original.spike_ticks))
    onsets = compute_onsets(recording)
    assert onsets.codes.tolist() == [5, 9] and onsets.times_s.tolist() == [1.0, 2.0]
    counts = compute_counts(recording, onsets.times_s, window_s=(0.07, 0.17))
    assert counts.dtype == np.uint16
    assert counts.tolist() == [[2, 4, 0, 0], [2, 4, 1, 0]]
    units = SiteTable(array=[0, 0], electrode=[2, 3], unit=[2, 255], label=("e2u2", "e3 noise"))
    assert compute_counts(recording, onsets.times_s, sites=units, unmapped="ignore").tolist() == [[2, 1], [2, 0]]


def test_the_header_gives_the_time_origin(tmp_path):
    from datetime import UTC, datetime

    from closedloop.data.nev_header import read_nev_header

    when = datetime(2026, 3, 4, 5, 6, 7, 891000, tzinfo=UTC)
    path = write_nev(tmp_path / "rec.nev", _edge_recording(), recorded_at=when)
    assert read_nev_header(path, False)["time_origin"] == when
    raw = bytearray(path.read_bytes())
    raw[28:44] = bytes(16)  # an NSP that left the time origin empty
    (tmp_path / "empty.nev").write_bytes(bytes(raw))
    assert read_nev_header(tmp_path / "empty.nev", False)["time_origin"] is None


@pytest.mark.parametrize("engine", NEV_ENGINES)
def test_file_handles_are_released(tmp_path, engine):
    path = write_nev(tmp_path / "rec.nev", _edge_recording(), write_ns2=True)
    read_nev(path, engine=engine)
    compute_nev_counts(path)
    open_files = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
                  if os.path.exists(f"/proc/self/fd/{fd}")]
    with open("/proc/self/maps") as handle:
        mapped = handle.read()
    assert not [name for name in open_files if str(tmp_path) in name]
    assert str(tmp_path) not in mapped


def test_counts_match_a_brute_force_count(tmp_path):
    rng = np.random.default_rng(7)
    onsets = np.sort(rng.choice(np.arange(3000, 600000, 6000), size=60, replace=False))
    spikes = np.sort(rng.integers(0, 610000, size=20000))
    electrodes, units = rng.choice(ELECTRODES, size=spikes.size), rng.integers(0, 4, size=spikes.size)
    recording = _read_both(write_nev(tmp_path / "r.nev", Recording.from_ticks(
        spikes, electrodes, units, onsets, np.arange(1, 61), ELECTRODES)), window_s=(0.05, 0.25))
    counts = compute_counts(recording, compute_onsets(recording).times_s, window_s=(0.05, 0.25))
    expected = [[np.sum((electrodes == e) & (spikes >= t + 1500) & (spikes < t + 7500)) for e in ELECTRODES]
                for t in onsets]
    assert counts.tolist() == expected


def test_zero_words_clear_and_every_nonzero_word_is_an_onset():
    recording = Recording.from_ticks([], [], [], [10, 20, 30, 40, 50], [3, 0, 3, 7, 0], (1,))
    onsets = compute_onsets(recording)
    assert onsets.codes.tolist() == [3, 3, 7] and (onsets.times_s * 30000).round().tolist() == [10, 30, 40]


def test_control_codes_are_not_onsets_in_either_engine(tmp_path):
    recording = Recording.from_ticks([3200, 9200], [1, 1], [0, 0], [3000, 6000, 6010, 9000, 12000],
                                     [5, 0xFF00, 0xFF02, 9, 0xFF0B], (1,))
    read = _read_both(write_nev(tmp_path / "codes.nev", recording))  # stream and neo agree
    onsets, counts = compute_nev_counts(tmp_path / "codes.nev", window_s=(0.0, 0.01))
    assert onsets.codes.tolist() == [5, 9] == compute_onsets(read).codes.tolist() and counts.tolist() == [[1], [1]]


def test_summary_is_the_operator_check():
    summary = compute_summary(_edge_recording())
    assert summary == {"n_presentations": 2, "electrodes": [1, 2, 3, 4], "window_s": [0.07, 0.17],
                       "counts": {"1": 4, "2": 8, "3": 1, "4": 0}, "codes": {"5": 1, "9": 1}}


def test_unmapped_electrodes_are_an_error_unless_ignored():
    sites = make_default_sites([1, 2])
    with pytest.raises(ValueError, match=r"'\(in memory\)': 2 spikes on electrodes \[3\] that are missing from "
                                         r"the site map; add them to the site map \(\[sites\] site_map or --site-map\), "
                                         r"or ignore them with `closedloop ingest` --ignore-unmapped\.$"):
        compute_counts(_edge_recording(), [1.0], sites=sites)
    assert compute_counts(_edge_recording(), [1.0], sites=sites, unmapped="ignore").tolist() == [[2, 4]]


def test_bad_windows_and_onsets():
    with pytest.raises(ValueError, match=r"'window_s' needs start < stop"):
        compute_counts(_edge_recording(), [1.0], window_s=(0.2, 0.1))
    with pytest.raises(ValueError, match=r"'window_s start' must lie in \[0, 5\]"):
        compute_counts(_edge_recording(), [1.0], window_s=(-0.1, 0.1))
    with pytest.raises(ValueError, match=r"'onset_times_s' must be finite"):
        compute_counts(_edge_recording(), [np.nan])


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda data: data[:-7], r"ends 97 bytes into a 104-byte data packet \(truncated or corrupt\)"),
        (lambda data: data[:300], r"inside the 336-byte basic header \(truncated\)"),
        (lambda data: data[:16] + (7).to_bytes(4, "little") + data[20:], r"7 bytes per data packet \(corrupt header\)"),
        (lambda data: data[:-104 * 3] + b"\x55" * 104 * 3, r"has packet id 21845, neither an electrode"),
        (lambda data: data[:8] + b"\x01\x09" + data[10:], r"file specification 1.9 is not supported"),
        (lambda data: b"timestamp,electrode\n0,1\n" * 20, r"is not a Blackrock NEV file"),
        (lambda data: b"", r"is not a Blackrock NEV file"),
    ],
)
@pytest.mark.parametrize("engine", NEV_ENGINES)
def test_damaged_files_give_clear_errors(tmp_path, damage, message, engine):
    path = write_nev(tmp_path / "rec.nev", _edge_recording())
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ValueError, match=r"recording '.*rec.nev'.*" + message):
        read_nev(path, engine=engine)
    with pytest.raises(ValueError, match=r"recording '.*rec.nev'.*" + message):
        compute_nev_counts(path)


@pytest.mark.parametrize("engine", NEV_ENGINES)
def test_time_going_backwards_is_refused(tmp_path, engine):
    path = write_nev(tmp_path / "rec.nev", _edge_recording())
    data = bytearray(path.read_bytes())
    header_bytes = int.from_bytes(data[12:16], "little")
    data[header_bytes + 104 * 5 : header_bytes + 104 * 5 + 4] = (1).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"time goes backwards at data packet 5"):
        read_nev(path, engine=engine)


def test_truncated_file_can_be_read_when_allowed(tmp_path, capsys):
    from closedloop.cli import main

    path = write_nev(tmp_path / "rec.nev", _edge_recording())
    path.write_bytes(path.read_bytes()[:-50])
    assert _read_both(path, allow_truncated=True).n_spikes == _edge_recording().n_spikes - 1
    with pytest.raises(ValueError, match=r"truncated or corrupt\); to drop the partial packet, run `closedloop ingest` "
                                         r"with --allow-truncated\.$"):
        read_nev(path)
    main(["ingest", str(path), "--summary", "--json", "--allow-truncated"])  # what the message says to type
    assert json.loads(capsys.readouterr().out)["n_presentations"] == 2


@pytest.mark.parametrize("engine", NEV_ENGINES)
def test_other_inputs_are_refused(tmp_path, engine):
    with pytest.raises(FileNotFoundError, match=r"'recording': the file .*missing.nev' does not exist"):
        read_nev(tmp_path / "missing.nev", engine=engine)
    (tmp_path / "rec.ns5").write_bytes(b"NEURALCD")
    with pytest.raises(ValueError, match=r"must be a Blackrock .nev file"):
        read_nev(tmp_path / "rec.ns5", engine=engine)
    with pytest.raises(ValueError, match=r"'engine': allowed values are 'stream', 'neo', but got 'fast'"):
        read_nev(tmp_path / "rec.ns5", engine="fast")


# -- a day: store + recording -----------------------------------------------------------------
def _make_day(root, n_stimuli=6, n_repeats=2, seed=0):
    """An experiment folder with day_001/store.zarr and the matching recording (time in ticks)."""
    rng = np.random.default_rng(seed)
    store = create_store(root / "day_001" / "store.zarr", sites=make_default_sites(ELECTRODES))
    frames = rng.integers(0, 256, size=(n_stimuli, 224, 224, 3), dtype=np.uint8)
    codes = np.arange(100, 100 + n_stimuli)
    store.append_stimuli(frames, parent=-1, site=-1, eps=0.0, direction=0, kind="clean",
                         predicted=np.zeros((n_stimuli, len(ELECTRODES))), code=codes)
    order = np.concatenate([rng.permutation(n_stimuli) for _ in range(n_repeats)])
    onset_ticks = 30000 + 6000 * np.arange(order.size)
    store.append_presentations(np.arange(order.size) + 1000, order, onset_ticks / 30000.0 + 0.002,
                               np.ones(order.size, bool), np.zeros((order.size, len(ELECTRODES)), int))
    spikes = np.sort(rng.integers(0, onset_ticks[-1] + 9000, size=3000))
    events = np.stack([onset_ticks, onset_ticks + 300], axis=1).ravel()
    words = np.stack([codes[order], np.zeros_like(order)], axis=1).ravel()
    recording = Recording.from_ticks(spikes, rng.choice(ELECTRODES, spikes.size), rng.integers(0, 3, spikes.size),
                                     events, words, ELECTRODES)
    return store, recording


def test_day_counts_are_reconciled_and_stored(tmp_path):
    store, recording = _make_day(tmp_path)
    nev = write_nev(tmp_path / "day1.nev", recording)
    live = store.read_presentations()
    report = write_day_counts(nev, store.path, engine="neo")
    assert report["written"] and report["n_mismatches"] == 0 and report["n_matched"] == store.n_presentations
    stored = open_store(store.path).read_ingest()
    onsets = compute_onsets(recording)
    np.testing.assert_array_equal(stored["counts"], compute_counts(recording, onsets.times_s, sites=store.sites))
    assert stored["matched"].all() and stored["attrs"]["sha256"] == hashlib.sha256(nev.read_bytes()).hexdigest()
    after = open_store(store.path).read_presentations()
    for name, values in live.items():
        np.testing.assert_array_equal(after[name], values)
    streamed = write_day_counts(nev, store.path, engine="stream")
    assert streamed["written"] and streamed["engine"] == "stream"
    np.testing.assert_array_equal(open_store(store.path).read_ingest()["counts"], stored["counts"])
    store.finish()
    again = write_day_counts(nev, store.path, window_s=(0.05, 0.1))
    assert again["written"] and open_store(store.path).read_ingest()["attrs"]["window_s"] == [0.05, 0.1]
    assert "ingest" in json.loads((store.path / "zarr.json").read_text())["consolidated_metadata"]["metadata"]


@pytest.mark.parametrize("engine", NEV_ENGINES)
def test_every_mismatch_is_reported_and_nothing_written(tmp_path, engine):
    store, recording = _make_day(tmp_path)
    ticks, words = recording.event_ticks.copy(), recording.event_words.copy()
    words[2] = 999  # presentation 1: unknown code
    ticks[4] += 1500  # presentation 2: shifted by 50 ms
    ticks, words = np.delete(ticks, 6), np.delete(words, 6)  # presentation 3: missing onset
    damaged = Recording.from_ticks(recording.spike_ticks, recording.spike_electrodes, recording.spike_units,
                                   ticks, words, ELECTRODES)
    nev = write_nev(tmp_path / "day1.nev", damaged)
    before = _snapshot(store.path)
    report = write_day_counts(nev, store.path, engine=engine)
    kinds = sorted((m["kind"], m["presentation"]) for m in report["mismatches"] if m["presentation"] is not None)
    assert kinds == [("missing_onset", 3), ("shifted_timing", 2), ("unknown_code", 1)]
    assert [m["nev_code"] for m in report["mismatches"] if m["kind"] == "unknown_code"] == [999]
    shifted = next(m for m in report["mismatches"] if m["kind"] == "shifted_timing")
    assert shifted["shift_s"] == pytest.approx(0.048)
    assert not report["written"] and _snapshot(store.path) == before
    report = write_day_counts(nev, store.path, allow_mismatch=True, engine=engine)
    stored = open_store(store.path).read_ingest()
    assert report["written"] and stored["matched"].sum() == store.n_presentations - 3
    assert np.isnan(stored["onset"][[1, 2, 3]]).all() and not stored["counts"][[1, 2, 3]].any()


def test_code_mismatch_and_extra_onsets():
    times = np.array([1.0, 1.2, 1.4])
    result = compute_reconciliation(Onsets(times, np.array([5, 6, 7], np.uint16)), [5, 8], [1.0, 1.2], [5, 6, 7, 8])
    assert result.onset_index.tolist() == [0, -1]
    assert [(m["kind"], m["code"]) for m in result.mismatches] == [("code_mismatch", 8), ("extra_onset", 7)]
    assert result.mismatches[0]["nev_code"] == 6


def test_spikes_off_the_site_map_leave_the_store_alone(tmp_path):
    store, recording = _make_day(tmp_path)
    extra = Recording.from_ticks(np.append(recording.spike_ticks, 40000), np.append(recording.spike_electrodes, 9),
                                 np.append(recording.spike_units, 0), recording.event_ticks, recording.event_words,
                                 ELECTRODES + (9,))
    nev = write_nev(tmp_path / "day1.nev", extra)
    before = _snapshot(store.path)
    with pytest.raises(ValueError, match=r"day1.nev': 1 spikes on electrodes \[9\] that are missing from the site map"):
        write_day_counts(nev, store.path)
    assert _snapshot(store.path) == before
    assert write_day_counts(nev, store.path, unmapped="ignore")["written"]


# -- the command line -------------------------------------------------------------------------
def test_cli_summary_json(tmp_path):
    nev = write_nev(tmp_path / "rec.nev", _edge_recording(), version="3.0")
    result = _run("ingest", nev, "--summary", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == compute_summary(_edge_recording())
    streamed = _run("ingest", nev, "--json", "--engine", "neo")
    assert json.loads(streamed.stdout) == json.loads(result.stdout) == compute_summary(nev)
    result = _run("ingest", nev, "--json", "--window", "0.07", "0.1701")
    assert json.loads(result.stdout)["counts"]["1"] == 6 and json.loads(result.stdout)["window_s"] == [0.07, 0.1701]


def test_cli_ingests_a_day_with_the_experiment_settings(tmp_path):
    store, recording = _make_day(tmp_path)
    (tmp_path / "sites.csv").write_text("site,array,electrode,unit,label\n" + "".join(
        f"{i},0,{e},-1,e{e}\n" for i, e in enumerate(ELECTRODES)))
    (tmp_path / "experiment.toml").write_text(
        '[sites]\nn_sites = 4\nsite_map = "sites.csv"\n[response]\nwindow_s = [0.05, 0.15]\n')
    nev = write_nev(tmp_path / "day1.nev", recording)
    result = _run("ingest", nev, "--experiment", tmp_path, "--day", 1, "--json", "--summary")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["written"] and report["window_s"] == [0.05, 0.15] and report["summary"]["window_s"] == [0.05, 0.15]
    assert open_store(store.path).read_ingest()["attrs"]["window_s"] == [0.05, 0.15]


def test_cli_errors_are_one_line(tmp_path):
    store, recording = _make_day(tmp_path)
    nev = write_nev(tmp_path / "day1.nev", recording)
    nev.write_bytes(nev.read_bytes()[:-3])
    result = _run("ingest", nev, "--experiment", tmp_path, "--day", 1)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0
    assert "error: recording" in result.stderr and "truncated or corrupt" in result.stderr

    words = recording.event_words.copy()
    words[0] = 4242
    nev = write_nev(tmp_path / "day1.nev", Recording.from_ticks(
        recording.spike_ticks, recording.spike_electrodes, recording.spike_units, recording.event_ticks, words,
        ELECTRODES))
    result = _run("ingest", nev, "--experiment", tmp_path, "--day", 1)
    assert result.returncode == 2 and "unknown_code: presentation 0, code " in result.stdout
    assert "recorded code 4242" in result.stdout
    assert "1 mismatches" in result.stderr and "nothing written" in result.stderr

    root = zarr.open_group(str(store.path), mode="r+")
    root.attrs["schema_version"] = 2
    before = _snapshot(store.path)
    result = _run("ingest", nev, "--experiment", tmp_path, "--day", 1)
    assert result.returncode == 2 and "written with schema version 2" in result.stderr
    assert _snapshot(store.path) == before
    result = _run("ingest", nev, "--day", 1)
    assert result.returncode == 2 and "--experiment and --day go together" in result.stderr


@pytest.mark.parametrize("version", ["2.2", "2.3", "3.0"])
def test_streaming_counts_equal_the_neo_path(tmp_path, version, monkeypatch):
    monkeypatch.setattr(nev_scan, "_SCAN_PACKETS", 1000)  # many windows, onsets and spikes across their edges
    monkeypatch.setattr(nev_scan, "_BLOCK_PACKETS", 96)  # several blocks per window, the last one partial
    store, recording = _make_day(tmp_path, n_stimuli=20, n_repeats=3, seed=3)
    nev = write_nev(tmp_path / "day.nev", recording, version=version)
    for window in [(0.07, 0.17), (0.0, 0.5), (0.1, 1.3)]:  # the last two overlap the next onsets' windows
        _read_both(nev, window_s=window)
    overlapping = SiteTable(array=[0, 0, 0, 0], electrode=[1, 1, 2, 3], unit=[-1, 1, 2, 255],
                            label=("e1", "e1u1", "e2u2", "e3 noise"))
    from_neo = read_nev(nev, engine="neo")
    np.testing.assert_array_equal(
        compute_nev_counts(nev, sites=overlapping, unmapped="ignore")[1],
        compute_counts(from_neo, compute_onsets(from_neo).times_s, sites=overlapping, unmapped="ignore"))
    edges = write_nev(tmp_path / "edges.nev", _edge_recording(), version=version)
    assert compute_nev_counts(edges)[1].tolist() == [[2, 4, 0, 0], [2, 4, 1, 0]]
    with pytest.raises(ValueError, match=r"edges.nev': 2 spikes on electrodes \[3\] that are missing"):
        compute_nev_counts(edges, sites=make_default_sites([1, 2]))


def test_streaming_counts_a_spike_written_just_before_its_onset_at_the_same_tick(tmp_path, monkeypatch):
    path = write_nev(tmp_path / "tie.nev", Recording.from_ticks([3000, 3100], [1, 1], [0, 0], [3000], [8], (1,)))
    data = bytearray(path.read_bytes())
    header_bytes = int.from_bytes(data[12:16], "little")
    event, spike = data[header_bytes : header_bytes + 104], data[header_bytes + 104 : header_bytes + 208]
    data[header_bytes : header_bytes + 208] = spike + event  # same tick: the spike packet comes first
    path.write_bytes(bytes(data))
    monkeypatch.setattr(nev_scan, "_SCAN_PACKETS", 1)
    assert compute_nev_counts(path, window_s=(0.0, 0.001))[1].tolist() == [[1]]
    assert compute_nev_counts(path, window_s=(0.0, 0.01))[1].tolist() == [[2]]
    for engine in NEV_ENGINES:
        recording = read_nev(path, engine=engine)
        assert compute_counts(recording, [0.1], window_s=(0.0, 0.001)).tolist() == [[1]]


def _display_clock_day(tmp_path, live_counts: bool):
    """A .nev on the NSP clock and a day store whose onsets are on a display computer's clock
    (500.3 s behind, running 40 ppm fast), as a real presenter logs them; one logged presentation
    is missing from the recording."""
    rng = np.random.default_rng(2)
    codes = rng.integers(1, 5, size=30)
    nsp_s = 2.0 + 0.2 * np.arange(30)
    ticks = np.round(nsp_s * 30000).astype(np.int64)
    spikes = np.sort(rng.integers(ticks[0], ticks[-1] + 6000, size=400))
    keep = np.arange(30) != 17  # presentation 17 never reached the NSP
    write_nev(tmp_path / "r.nev", Recording.from_ticks(spikes, np.ones(400, int), np.ones(400, int), ticks[keep],
                                                        codes[keep], (1,)))
    store = create_store(tmp_path / "store.zarr", sites=1)
    store.append_stimuli(np.zeros((4, 224, 224, 3), np.uint8), parent=-1, site=-1, eps=0.0, direction=0, kind="clean",
                         predicted=np.zeros((4, 1)), code=[1, 2, 3, 4])
    display_s = (nsp_s + 500.3) * (1 + 40e-6)
    store.append_presentations(np.arange(30), codes - 1, display_s, np.ones(30, bool),
                               np.zeros((30, 1), int) if live_counts else None)
    return write_day_counts(tmp_path / "r.nev", tmp_path / "store.zarr", allow_mismatch=True)


def test_onsets_on_a_presenters_clock_are_mapped_onto_the_recordings(tmp_path):
    report = _display_clock_day(tmp_path, live_counts=False)
    assert report["n_matched"] == 29 and [m["kind"] for m in report["mismatches"]] == ["missing_onset"]
    assert report["mismatches"][0]["presentation"] == 17
    clock = report["clock"]
    assert clock["n_pairs"] == 29 and clock["drift_ppm"] == pytest.approx(-40, abs=0.5)
    assert clock["offset_s"] + clock["rate"] * (2.0 + 500.3) * (1 + 40e-6) == pytest.approx(2.0, abs=1e-6)  # NSP 2.0 s
    # offset_s is the offset at display time 0 (far from the session); this one is where it began
    assert clock["first_onset_offset_s"] == pytest.approx(2.0 - (2.0 + 500.3) * (1 + 40e-6), abs=1e-6)


def test_live_onsets_are_on_the_recording_clock_already(tmp_path):
    report = _display_clock_day(tmp_path, live_counts=True)  # a rig that counts live reports NSP times: no fit
    assert report["clock"] is None and report["n_matched"] == 0


@pytest.mark.parametrize("n_late", [9, 20, 100])
def test_a_recording_started_late_is_aligned_and_the_rest_reported_unrecorded(tmp_path, n_late, capsys):
    """The NSP started after the first ``n_late`` of 168 presentations (display clock 1234.5 s
    ahead, 30 ppm fast): the recorded onsets are a contiguous later part of the log's."""
    rng = np.random.default_rng(7)
    n, n_codes = 168, 24
    codes = rng.integers(1, n_codes + 1, size=n)
    nsp_s = 3.0 + 0.2 * np.arange(n) + rng.normal(0, 2e-4, n)  # RSVP every 200 ms, 0.2 ms jitter
    ticks = np.round(nsp_s * 30000).astype(np.int64)
    recorded = np.arange(n) >= n_late
    spikes = np.sort(rng.integers(ticks[n_late], ticks[-1] + 6000, size=500))
    write_nev(tmp_path / "r.nev", Recording.from_ticks(spikes, np.ones(500, int), np.ones(500, int), ticks[recorded],
                                                        codes[recorded], (1,)))
    store = create_store(tmp_path / "day_000" / "store.zarr", sites=1)
    store.append_stimuli(np.zeros((n_codes, 224, 224, 3), np.uint8), parent=-1, site=-1, eps=0.0, direction=0,
                         kind="clean", predicted=np.zeros((n_codes, 1)), code=np.arange(1, n_codes + 1))
    store.append_presentations(np.arange(n), codes - 1, (nsp_s + 1234.5) * (1 + 30e-6), np.ones(n, bool), None)
    from closedloop.cli import main

    main(["-q", "ingest", str(tmp_path / "r.nev"), "--experiment", str(tmp_path), "--day", "0"])  # no --allow-mismatch
    assert (f"{n - n_late} of {n} logged presentations matched {n - n_late} recorded onsets; 0 mismatches\n"
            f"{n_late} presentations logged outside the recording (unrecorded, not mismatches): 0-{n_late - 1}\n") in capsys.readouterr().out
    report = write_day_counts(tmp_path / "r.nev", tmp_path / "day_000" / "store.zarr")
    assert report["written"] and report["n_matched"] == n - n_late and report["n_mismatches"] == 0, report["mismatches"][:3]
    assert report["n_unrecorded"] == n_late and report["unrecorded"] == [[0, n_late - 1]]
    assert report["clock"]["drift_ppm"] == pytest.approx(-30, abs=3)
    ingest = open_store(tmp_path / "day_000" / "store.zarr").read_ingest()
    np.testing.assert_array_equal(ingest["matched"], recorded)
    np.testing.assert_allclose(ingest["onset"][recorded], ticks[recorded] / 30000)
