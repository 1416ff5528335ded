"""Onsets from a photodiode on an NSP analog input: crossings, matching to codes, counts, the day and the CLI."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import closedloop.data.nev_scan as nev_scan
import closedloop.data.photodiode as photodiode_module
from closedloop.data.counts import compute_counts, compute_nev_counts, compute_onsets, compute_summary
from closedloop.data.nev import NEV_ENGINES, read_nev
from closedloop.data.photodiode import OnsetMatcher, compute_latency_summary, read_photodiode
from closedloop.data.reconcile import write_day_counts
from closedloop.data.recording import Recording
from closedloop.data.sites import make_default_sites
from closedloop.data.store import create_store, open_store
from rigs.nev import write_nev, write_nsx

ELECTRODES = (1, 2, 3)
SOA = 6000  # 200 ms between codes, in 30 kHz ticks
DARK, LIT = -2000, 20000  # digitization steps; 5000 mV full scale: about -305 mV and +3052 mV


def _light_trace(onset_ticks, latency_ticks, n_ticks, period, seed=0):
    """int16 samples (one every ``period`` ticks): dark, lit for 100 ms from each onset + latency, some noise."""
    trace = np.full(n_ticks, DARK, dtype=np.int16)
    for onset, latency in zip(onset_ticks, latency_ticks):
        if latency >= 0:
            trace[onset + latency : onset + latency + 3000] = LIT
    trace += np.random.default_rng(seed).integers(-300, 300, n_ticks).astype(np.int16)
    return trace[::period]


def _session(tmp_path, *, n_codes=30, period=1, dark_codes=(), version="2.3", seed=0):
    """A .nev with ``n_codes`` codes and spikes, and the photodiode (``ainp1``) in an .ns5 (period 1) or .ns2."""
    rng = np.random.default_rng(seed)
    code_ticks = 30000 + SOA * np.arange(n_codes)
    latency = rng.integers(240, 1200, n_codes)  # 8-40 ms after the code, in ticks
    latency[list(dark_codes)] = -1  # these flips never lit the patch
    n_ticks = int(code_ticks[-1] + 2 * SOA)
    spikes = np.sort(rng.integers(0, n_ticks, 8000))
    events = np.stack([code_ticks, code_ticks + 3000], axis=1).ravel()
    words = np.stack([np.arange(1, n_codes + 1), np.zeros(n_codes, int)], axis=1).ravel()
    recording = Recording.from_ticks(spikes, rng.choice(ELECTRODES, spikes.size), rng.integers(0, 2, spikes.size),
                                     events, words, ELECTRODES)
    nev = write_nev(tmp_path / "session.nev", recording, version=version)
    nsx = write_nsx(tmp_path / ("session.ns5" if period == 1 else "session.ns2"),
                    _light_trace(code_ticks, latency, n_ticks, period, seed)[:, None], [129], labels=["ainp1"],
                    period=period, units="mV", analog_max=5000, version=version)
    return nev, nsx, code_ticks, latency, recording


@pytest.mark.parametrize("version", ["2.2", "2.3", "3.0"])
def test_crossings_are_found_at_the_first_lit_sample_across_chunks(tmp_path, version, monkeypatch):
    monkeypatch.setattr(photodiode_module, "_CHUNK_SAMPLES", 997)  # crossings on and near chunk edges
    _, nsx, code_ticks, latency, _ = _session(tmp_path, version=version)
    found = read_photodiode(nsx, "ainp1", 1000.0)
    np.testing.assert_array_equal(found.crossing_ticks, code_ticks + latency)
    assert found.describe() == {"source": str(nsx), "channel": "ainp1", "threshold": 1000.0, "units": "mV",
                                "sampling_rate_hz": 30000.0, "max_latency_s": 0.1, "n_crossings": 30}
    assert read_photodiode(nsx, 129, 1000.0).channel == "ainp1"  # by id


def test_a_slow_channel_gives_crossings_on_its_own_sample_clock(tmp_path):
    _, nsx, code_ticks, latency, _ = _session(tmp_path, period=30)  # .ns2, 1 kS/s
    found = read_photodiode(nsx, "ainp1", 1000.0)
    np.testing.assert_array_equal(found.crossing_ticks, -(-(code_ticks + latency) // 30) * 30)  # next sample
    assert found.sampling_rate_hz == 1000.0


@pytest.mark.parametrize("engine", NEV_ENGINES)
def test_counts_start_at_the_light_and_latencies_are_reported(tmp_path, engine, monkeypatch):
    monkeypatch.setattr(nev_scan, "_SCAN_PACKETS", 500)  # codes matched window by window
    nev, nsx, code_ticks, latency, recording = _session(tmp_path, dark_codes=(4, 17))
    light = read_photodiode(nsx, "ainp1", 1000.0)
    if engine == "neo":
        onsets = compute_onsets(read_nev(nev, engine="neo"), photodiode=light)
        counts = compute_counts(read_nev(nev, engine="neo"), onsets.times_s)
    else:
        onsets, counts = compute_nev_counts(nev, photodiode=light)
    onset_ticks = np.where(latency >= 0, code_ticks + latency, code_ticks)  # dark codes keep their own time
    np.testing.assert_array_equal(np.rint(onsets.times_s * 30000), onset_ticks)
    np.testing.assert_array_equal(np.rint(onsets.code_times_s * 30000), code_ticks)
    np.testing.assert_array_equal(np.isnan(onsets.latency_s), latency < 0)
    np.testing.assert_allclose(onsets.latency_s[latency >= 0], latency[latency >= 0] / 30000)
    spikes, electrodes = recording.spike_ticks, recording.spike_electrodes
    expected = [[np.sum((electrodes == e) & (spikes >= t + 2100) & (spikes < t + 5100)) for e in ELECTRODES]
                for t in onset_ticks]
    assert counts.tolist() == expected
    summary = compute_latency_summary(onsets.latency_s)
    lit = latency[latency >= 0] / 30
    assert summary["n_codes"] == 30 and summary["n_without_crossing"] == 2
    assert [summary["latency_ms"][key] for key in ("median", "p5", "p95")] == pytest.approx(
        np.percentile(lit, [50, 5, 95]).tolist())


def test_summary_reports_the_photodiode(tmp_path):
    nev, nsx, *_ = _session(tmp_path)
    light = read_photodiode(nsx, "ainp1", 1000.0)
    streamed = compute_summary(nev, photodiode=light)
    assert streamed == compute_summary(read_nev(nev, engine="neo"), photodiode=light)
    assert streamed["photodiode"]["n_without_crossing"] == 0 and streamed["photodiode"]["channel"] == "ainp1"
    assert streamed["counts"] != compute_summary(nev)["counts"]  # the windows moved with the light


def test_codes_closer_than_the_latency_are_refused(tmp_path):
    _, nsx, code_ticks, latency, _ = _session(tmp_path)
    light = read_photodiode(nsx, "ainp1", 1000.0, max_latency_s=0.1)
    matcher = OnsetMatcher(light)
    close = np.sort(np.append(code_ticks[:5], code_ticks[2] + 10))  # a second code 10 ticks after the third
    with pytest.raises(ValueError, match=r"the event code at 1\.4003 s and the one before it are closer together "
                                         r"than the photodiode's latency allows \(0\.1 s\)"):
        matcher.match(close)
    matcher = OnsetMatcher(light)  # the same rule holds over several calls (windows of packets)
    first, _ = matcher.match(code_ticks[:3])
    np.testing.assert_array_equal(first, code_ticks[:3] + latency[:3])
    with pytest.raises(ValueError, match=r"closer together than the photodiode's latency allows"):
        matcher.match(code_ticks[2:3] + 10)


def test_bad_photodiode_inputs(tmp_path):
    _, nsx, *_ = _session(tmp_path)
    with pytest.raises(ValueError, match=r"has no channel 'ainp2'; its channels: ainp1 \(id 129\)"):
        read_photodiode(nsx, "ainp2", 1000.0)
    with pytest.raises(FileNotFoundError, match=r"'photodiode file': the file .*missing.ns5' does not exist"):
        read_photodiode(tmp_path / "missing.ns5", "ainp1", 1000.0)
    (tmp_path / "log.csv").write_text("t\n")
    with pytest.raises(ValueError, match=r"must be a Blackrock continuous file \(.ns1 to .ns6\)"):
        read_photodiode(tmp_path / "log.csv", "ainp1", 1000.0)
    (tmp_path / "garbled.ns5").write_bytes(b"NEURALCD" + bytes(40))
    with pytest.raises(ValueError, match=r"photodiode file '.*garbled.ns5': neo could not read it"):
        read_photodiode(tmp_path / "garbled.ns5", "ainp1", 1000.0)
    with pytest.raises(ValueError, match=r"'max_latency_s' must lie in \(0, inf\), but got 0"):
        read_photodiode(nsx, "ainp1", 1000.0, max_latency_s=0)


@pytest.mark.parametrize("engine", NEV_ENGINES)
def test_a_day_is_reconciled_by_code_and_counted_from_the_light(tmp_path, engine):
    nev, nsx, code_ticks, latency, recording = _session(tmp_path, n_codes=12, dark_codes=(3,))
    store = create_store(tmp_path / "day_001" / "store.zarr", sites=make_default_sites(ELECTRODES))
    frames = np.random.default_rng(0).integers(0, 256, size=(12, 224, 224, 3), dtype=np.uint8)
    store.append_stimuli(frames, parent=-1, site=-1, eps=0.0, direction=0, kind="clean",
                         predicted=np.zeros((12, len(ELECTRODES))), code=np.arange(1, 13))
    store.append_presentations(np.arange(12) + 100, np.arange(12), code_ticks / 30000 + 0.002, np.ones(12, bool),
                               np.zeros((12, len(ELECTRODES)), int))
    light = read_photodiode(nsx, "ainp1", 1000.0)
    report = write_day_counts(nev, store.path, engine=engine, photodiode=light)
    assert report["written"] and report["n_mismatches"] == 0  # codes match the log though the light comes later
    assert report["photodiode"]["n_without_crossing"] == 1 and report["photodiode"]["latency_ms"]["p95"] < 40
    stored = open_store(store.path).read_ingest()
    onset_ticks = np.where(latency >= 0, code_ticks + latency, code_ticks)
    np.testing.assert_array_equal(np.rint(stored["onset"] * 30000), onset_ticks)
    np.testing.assert_array_equal(stored["counts"], compute_counts(recording, onset_ticks / 30000))
    assert stored["attrs"]["photodiode"] == report["photodiode"]


def test_cli_photodiode_options(tmp_path):
    nev, nsx, *_ = _session(tmp_path)

    def run(*args):
        return subprocess.run([sys.executable, "-m", "closedloop", "ingest", str(nev), *map(str, args)],
                              capture_output=True, text=True, timeout=120, env=os.environ | {"PYTHONPATH": os.getcwd()})

    result = run("--photodiode", nsx, "--photodiode-channel", "ainp1", "--photodiode-threshold", 1000, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == compute_summary(nev, photodiode=read_photodiode(nsx, "ainp1", 1000.0))
    text = run("--photodiode", nsx, "--photodiode-channel", "ainp1", "--photodiode-threshold", 1000)
    assert "photodiode ainp1: code to light" in text.stdout and "0 of 30 codes without a crossing" in text.stdout
    missing = run("--photodiode", nsx, "--photodiode-threshold", 1000)
    assert missing.returncode == 2 and "--photodiode, --photodiode-channel and --photodiode-threshold go together" in (
        missing.stderr)
