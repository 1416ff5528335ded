"""How fast this machine ingests a Blackrock ``.nev``: ``closedloop bench --ingest``.

Two synthetic NEV 2.3 files of different sizes (96 electrodes × 3 units at ~60 spikes/s per
electrode, an onset and a clearing word every 200 ms, 104-byte packets) are written into a
temporary folder, which is deleted afterwards. On each, with the file in the page cache:

- the floor: a plain pass over every data packet through a structured ``numpy.memmap``
  (timestamp and packet id of each, 2¹⁸ packets at a time, summing the timestamps and counting
  the spike packets: the pass the issue's first measurement used, ``memmap_pass``); and plain
  passes over the file's bytes, 16 MB at a time, summed as uint8 (``memmap_bytes_pass``) and, the
  memory-bandwidth floor, as uint64 words (``memmap_words_pass``);
- the default ingest engine, :func:`~closedloop.data.counts.compute_nev_counts` (onsets and
  counts per site, default sites, default window: what ``closedloop ingest FILE`` does);

timed interleaved (floor, words, ingest, floor, …) after one warm-up each, medians of the
repeats. Peak memory: each file ingested in a fresh Python process, whose peak resident set
(``VmHWM`` in ``/proc/self/status``: heap and mapped file pages alike) is read after the imports
and again after the ingest; the growth is the difference.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from closedloop.core.validation import check_integer, check_option
from closedloop.data.counts import compute_nev_counts
from closedloop.data.nev import NEV_ENGINES
from closedloop.data.nev_header import read_nev_header
from closedloop.data.recording import Recording
from rigs.nev import write_nev

__all__ = ["BENCH_ELECTRODES", "DEFAULT_SIZES_MB", "compute_ingest_bench", "measure_in_fresh_process", "write_bench_nev"]

BENCH_ELECTRODES = tuple(range(1, 97))
DEFAULT_SIZES_MB = (100, 400)
_PACKET_BYTES = 104  # NEV 2.3 with 48-sample int16 waveforms, as rigs.nev writes
_SOA_TICKS = 6000  # 200 ms at 30 kHz
_RATE_HZ = 60.0
_CHUNK_BYTES = 1 << 24

_FRESH_PROCESS_SCRIPT = """
import json, sys, time

def peak_mb():  # VmHWM starts afresh at exec, unlike ru_maxrss (which keeps the parent's peak)
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024

from closedloop.data.counts import compute_counts, compute_nev_counts, compute_onsets
from closedloop.data.nev import read_nev
path, engine = sys.argv[1:]
before = peak_mb()
start = time.perf_counter()
if engine == "neo":
    recording = read_nev(path, engine="neo")
    onsets = compute_onsets(recording)
    counts = compute_counts(recording, onsets.times_s)
else:
    onsets, counts = compute_nev_counts(path)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "after_imports_mb": before, "peak_mb": peak_mb(),
                  "n_presentations": len(onsets.times_s), "counted": int(counts.sum())}))
"""


def write_bench_nev(path: str | Path, size_mb: float, *, seed: int = 0) -> Path:
    """Write a synthetic NEV 2.3 file of about ``size_mb`` MB (10⁶ bytes) at ``path``; return the path.

    96 electrodes, unit classes 0–2, spikes at ~60 Hz per electrode at uniform random times, an
    onset word (random code 1–65279) every 200 ms and a clearing zero word 100 ms after each.
    """
    rng = np.random.default_rng(seed)
    n_packets = max(int(size_mb * 1e6 / _PACKET_BYTES), 2)
    packets_per_tick = len(BENCH_ELECTRODES) * _RATE_HZ / 30000.0 + 2.0 / _SOA_TICKS
    duration = int(n_packets / packets_per_tick) + _SOA_TICKS
    n_onsets = max(duration // _SOA_TICKS, 1)
    onsets = np.arange(n_onsets, dtype=np.int64) * _SOA_TICKS + _SOA_TICKS // 2
    events = np.stack([onsets, onsets + _SOA_TICKS // 2], axis=1).ravel()
    words = np.stack([rng.integers(1, 65280, n_onsets), np.zeros(n_onsets, np.int64)], axis=1).ravel()
    n_spikes = max(n_packets - events.size, 0)
    spikes = np.sort(rng.integers(0, duration, n_spikes))
    recording = Recording.from_ticks(spikes, rng.choice(BENCH_ELECTRODES, n_spikes), rng.integers(0, 3, n_spikes),
                                     events, words, BENCH_ELECTRODES)
    return write_nev(path, recording, version="2.3")


def _memmap_pass(path: Path, dtype) -> int:
    """Sum every item of ``dtype`` in the file through ``numpy.memmap``, 16 MB at a time."""
    size = path.stat().st_size // np.dtype(dtype).itemsize
    step, total = _CHUNK_BYTES // np.dtype(dtype).itemsize, 0
    for first in range(0, size, step):
        chunk = np.memmap(path, dtype=dtype, mode="r", offset=first * np.dtype(dtype).itemsize,
                          shape=(min(step, size - first),))
        total += int(chunk.sum(dtype=np.uint64))
        del chunk
    return total


def _packet_pass(path: Path) -> int:
    """Sum the timestamps and count the spike packets (id > 0) of every data packet of ``path``
    through a structured ``numpy.memmap``, 2¹⁸ packets at a time."""
    facts = read_nev_header(path, False)
    header_bytes, packet_bytes = int(facts["header_bytes"]), int(facts["packet_bytes"])
    dtype = np.dtype({"names": ["timestamp", "packet_id"], "formats": ["<u4", "<u2"], "offsets": [0, 4],
                      "itemsize": packet_bytes})
    n = (path.stat().st_size - header_bytes) // packet_bytes
    total, step = 0, 1 << 18
    for first in range(0, n, step):
        window = np.memmap(path, dtype=dtype, mode="r", offset=header_bytes + first * packet_bytes,
                           shape=(min(step, n - first),))
        total += int(window["timestamp"].astype(np.int64).sum()) + int(np.count_nonzero(window["packet_id"]))
        del window
    return total


def _time_interleaved(path: Path, n_repeats: int) -> dict:
    """Seconds of each pass over ``path``: one warm-up each, then ``n_repeats`` rounds in turn."""
    passes = {
        "memmap_pass": lambda: _packet_pass(path),
        "memmap_bytes_pass": lambda: _memmap_pass(path, np.uint8),
        "memmap_words_pass": lambda: _memmap_pass(path, np.uint64),
        "ingest": lambda: compute_nev_counts(path),
    }
    for work in passes.values():
        work()
    seconds = {name: [] for name in passes}
    for _ in range(n_repeats):
        for name, work in passes.items():
            start = time.perf_counter()
            work()
            seconds[name].append(time.perf_counter() - start)
    return seconds


def measure_in_fresh_process(path: str | Path, engine: str = "stream") -> dict:
    """Ingest ``path`` once in a fresh Python process with ``engine`` ("stream" or "neo").

    Returns ``{"seconds", "after_imports_mb", "peak_mb", "growth_mb", "n_presentations",
    "counted"}``: the ingest's wall time (s, file in the page cache), the process's VmHWM (MB =
    2²⁰ bytes) after importing the ingest and after ingesting, their difference, the onsets found
    and the sum of all counts.
    """
    check_option("engine", engine, NEV_ENGINES)
    paths = [str(Path(__file__).resolve().parent.parent), *os.environ.get("PYTHONPATH", "").split(os.pathsep)]
    environment = os.environ | {"PYTHONPATH": os.pathsep.join(path for path in paths if path)}
    result = subprocess.run([sys.executable, "-c", _FRESH_PROCESS_SCRIPT, str(path), engine], capture_output=True,
                            text=True, env=environment, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"ingesting {path} in a fresh process failed: {result.stderr.strip()[-2000:]}")
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    return measured | {"growth_mb": measured["peak_mb"] - measured["after_imports_mb"]}


def compute_ingest_bench(*, sizes_mb=DEFAULT_SIZES_MB, n_repeats: int = 5, seed: int = 0) -> dict:
    """Ingest speed and memory against a plain memory-mapped pass, on two synthetic files.

    ``sizes_mb``: the (smaller, larger) file sizes in MB (10⁶ bytes); ``n_repeats``: timed
    rounds per file (medians reported). Returns a JSON-ready dict (keys in docs/ingest.md), among
    them ``ingest_over_memmap`` (median ingest time ÷ median packet memmap pass time, larger file)
    and ``ingest_peak_memory_growth`` (peak memory growth while ingesting the larger file ÷ the
    smaller).
    """
    check_integer("n_repeats", n_repeats, minimum=1)
    small, large = (float(size) for size in sizes_mb)
    if not 0 < small < large:
        raise ValueError(f"'sizes_mb' = {tuple(sizes_mb)}: give two sizes in MB, the smaller first (> 0).")
    files = {}
    with tempfile.TemporaryDirectory(prefix="closedloop_bench_ingest_") as folder:
        for name, size in (("small", small), ("large", large)):
            path = write_bench_nev(Path(folder) / f"{name}.nev", size, seed=seed)
            seconds = _time_interleaved(path, n_repeats)
            median = {key: float(np.median(values)) for key, values in seconds.items()}
            memory = measure_in_fresh_process(path)
            files[name] = {
                "file_mb": path.stat().st_size / 1e6,
                "n_packets": read_nev_header(path, False)["n_packets"],
                "n_presentations": memory["n_presentations"],
                **{f"{key}_s": value for key, value in median.items()},
                "ingest_mb_per_s": path.stat().st_size / 1e6 / median["ingest"],
                "ingest_over_memmap": median["ingest"] / median["memmap_pass"],
                "ingest_over_memmap_bytes": median["ingest"] / median["memmap_bytes_pass"],
                "ingest_over_memmap_words": median["ingest"] / median["memmap_words_pass"],
                "ingest_s_all": seconds["ingest"],
                "memmap_pass_s_all": seconds["memmap_pass"],
                "after_imports_mb": memory["after_imports_mb"],
                "peak_memory_mb": memory["peak_mb"],
                "peak_memory_growth_mb": memory["growth_mb"],
            }
            path.unlink()
    return {
        "engine": "stream",
        "n_repeats": n_repeats,
        "ingest_over_memmap": files["large"]["ingest_over_memmap"],
        "ingest_over_memmap_bytes": files["large"]["ingest_over_memmap_bytes"],
        "ingest_over_memmap_words": files["large"]["ingest_over_memmap_words"],
        "ingest_peak_memory_growth": files["large"]["peak_memory_growth_mb"] / files["small"]["peak_memory_growth_mb"],
        "small": files["small"],
        "large": files["large"],
    }
