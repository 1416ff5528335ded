"""closedloop bench --ingest on small files: every figure present, consistent, and the engines agree."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from closedloop.bench_ingest import BENCH_ELECTRODES, compute_ingest_bench, measure_in_fresh_process, write_bench_nev
from closedloop.data.counts import compute_counts, compute_nev_counts, compute_onsets
from closedloop.data.nev import read_nev


def test_the_bench_file_is_a_valid_recording_of_the_asked_size(tmp_path):
    path = write_bench_nev(tmp_path / "bench.nev", 2.0, seed=1)
    assert abs(path.stat().st_size / 1e6 - 2.0) < 0.05
    recording = read_nev(path, engine="neo")
    assert recording.electrodes == BENCH_ELECTRODES and set(np.unique(recording.spike_units)) == {0, 1, 2}
    onsets = compute_onsets(recording)
    assert np.all(np.diff(onsets.times_s) == pytest.approx(0.2)) and onsets.codes.min() >= 1
    streamed_onsets, streamed = compute_nev_counts(path)
    np.testing.assert_array_equal(streamed_onsets.codes, onsets.codes)
    np.testing.assert_array_equal(streamed, compute_counts(recording, onsets.times_s))
    rate = recording.n_spikes / len(BENCH_ELECTRODES) / (recording.spike_times_s.max() - recording.spike_times_s.min())
    assert 55 < rate < 65  # ~60 spikes/s per electrode
    fresh = {engine: measure_in_fresh_process(path, engine) for engine in ("stream", "neo")}
    assert fresh["stream"]["counted"] == fresh["neo"]["counted"] == int(streamed.sum())
    assert fresh["stream"]["n_presentations"] == len(onsets.times_s)
    assert all(result["growth_mb"] > 0 and result["seconds"] > 0 for result in fresh.values())


def test_bench_reports_every_figure():
    result = compute_ingest_bench(sizes_mb=(1, 3), n_repeats=2)
    json.dumps(result)  # JSON-ready
    small, large = result["small"], result["large"]
    assert large["n_packets"] == pytest.approx(3 * small["n_packets"], rel=0.01)
    assert abs(large["n_presentations"] - 3 * small["n_presentations"]) <= 3  # an onset every 200 ms
    for figures in (small, large):
        for key in ("memmap_pass_s", "memmap_bytes_pass_s", "memmap_words_pass_s", "ingest_s", "peak_memory_growth_mb"):
            assert figures[key] > 0, key
        assert len(figures["ingest_s_all"]) == len(figures["memmap_pass_s_all"]) == 2
        assert figures["ingest_s"] == pytest.approx(np.median(figures["ingest_s_all"]))
    assert result["ingest_over_memmap"] == pytest.approx(large["ingest_s"] / large["memmap_pass_s"])
    assert result["ingest_over_memmap_words"] == pytest.approx(large["ingest_s"] / large["memmap_words_pass_s"])
    assert result["ingest_over_memmap_bytes"] == pytest.approx(large["ingest_s"] / large["memmap_bytes_pass_s"])
    assert result["ingest_peak_memory_growth"] == pytest.approx(large["peak_memory_growth_mb"] /
                                                                small["peak_memory_growth_mb"])


def test_bench_bad_input():
    with pytest.raises(ValueError, match=r"'sizes_mb' = \(4, 2\): give two sizes in MB, the smaller first"):
        compute_ingest_bench(sizes_mb=(4, 2))
    with pytest.raises(ValueError, match=r"'n_repeats' must lie in \[1, inf\]"):
        compute_ingest_bench(n_repeats=0)


def test_bench_command_prints_json():
    result = subprocess.run([sys.executable, "-m", "closedloop", "bench", "--ingest", "--ingest-mb", "0.5", "1.5",
                             "--repeats", "1", "--json"], capture_output=True, text=True, timeout=300,
                            env=os.environ | {"PYTHONPATH": os.getcwd()})
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["engine"] == "stream" and report["n_repeats"] == 1
    assert report["ingest_over_memmap"] > 0 and report["ingest_peak_memory_growth"] > 0
    assert round(report["small"]["file_mb"], 1) == 0.5 and round(report["large"]["file_mb"], 1) == 1.5
