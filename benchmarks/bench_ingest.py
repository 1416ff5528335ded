"""Benchmark (not a test): ingest throughput and peak memory on a large synthetic .nev.

Writes a NEV 2.3 file of about ``--size-gb`` GB (96 electrodes, RSVP onsets every 200 ms,
spikes at ~60 Hz per electrode) into a temporary folder that is deleted afterwards, then times,
each in a fresh process:

- ``memmap``: a plain numpy pass over every data packet (timestamps and packet ids, read a
  window at a time through ``np.memmap``): the floor for any reader;
- ``neo``: ``read_nev`` (layout checks + neo) + ``compute_onsets`` + ``compute_counts``, i.e.
  ``closedloop ingest FILE --summary``;
- ``stream``: ``compute_nev_counts``, i.e. ``closedloop ingest FILE --summary --engine stream``.

Prints one JSON line per measurement (seconds, MB/s, peak resident memory, time relative to the
memmap pass). ``--engines stream`` skips the (slow, memory-hungry) neo path.
``--sizes 0.25 1`` repeats the measurement for several file sizes to show how memory scales.

    PYTHONPATH=. python benchmarks/bench_ingest.py --sizes 0.25 1
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ELECTRODES = tuple(range(1, 97))
PACKET_BYTES = 104  # NEV 2.3 with 48-sample int16 waveforms
SOA_TICKS = 6000  # 200 ms at 30 kHz

_PEAK = """
def _peak_mb():  # VmHWM starts afresh at exec, unlike ru_maxrss (which keeps the parent's peak)
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024
"""

_MEMMAP_PASS = _PEAK + """
import json, sys, time
import numpy as np
path, header_bytes, packet_bytes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
start = time.perf_counter()
dtype = np.dtype({"names": ["timestamp", "packet_id"], "formats": ["<u4", "<u2"], "offsets": [0, 4],
                  "itemsize": packet_bytes})
n = (__import__("os").path.getsize(path) - header_bytes) // packet_bytes
total, spikes, step = 0, 0, 1 << 18
for first in range(0, n, step):
    window = np.memmap(path, dtype=dtype, mode="r", offset=header_bytes + first * packet_bytes,
                       shape=(min(step, n - first),))
    total += int(window["timestamp"].astype(np.int64).sum())
    spikes += int(np.count_nonzero(window["packet_id"]))
    del window
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "peak_rss_mb": _peak_mb(),
                  "n_spikes": spikes}))
"""

_INGEST = _PEAK + """
import json, sys, time
from closedloop.data.counts import compute_counts, compute_nev_counts, compute_onsets
from closedloop.data.nev import read_nev
start = time.perf_counter()
if sys.argv[2] == "neo":
    recording = read_nev(sys.argv[1])
    onsets = compute_onsets(recording)
    counts = compute_counts(recording, onsets.times_s)
else:
    onsets, counts = compute_nev_counts(sys.argv[1])
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "peak_rss_mb": _peak_mb(),
                  "n_presentations": len(onsets.times_s), "counted": int(counts.sum())}))
"""


def _write_file(path: Path, size_gb: float, seed: int) -> int:
    from closedloop.data.recording import Recording
    from rigs.nev import write_nev

    rng = np.random.default_rng(seed)
    n_packets = int(size_gb * 1e9 / PACKET_BYTES)
    rate_per_tick = 96 * 60.0 / 30000 + 1.0 / SOA_TICKS * 2  # spikes of all electrodes + onset and clear words
    duration = int(n_packets / rate_per_tick)
    n_onsets = duration // SOA_TICKS
    onsets = np.arange(n_onsets, dtype=np.int64) * SOA_TICKS + 3000
    events = np.stack([onsets, onsets + 3000], axis=1).ravel()
    words = np.stack([rng.integers(1, 65536, n_onsets), np.zeros(n_onsets, np.int64)], axis=1).ravel()
    n_spikes = n_packets - events.size
    spikes = np.sort(rng.integers(0, duration, n_spikes))
    recording = Recording.from_ticks(spikes, rng.choice(ELECTRODES, n_spikes), rng.integers(0, 3, n_spikes),
                                     events, words, ELECTRODES)
    write_nev(path, recording, version="2.3")
    return 336 + 64 * len(ELECTRODES)


def _measure(script: str, *args) -> dict:
    result = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=float, nargs="+", default=[1.0], help="file sizes in GB (default: 1)")
    parser.add_argument("--engines", nargs="+", choices=["neo", "stream"], default=["neo", "stream"])
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_ingest_") as folder:
        for size_gb in options.sizes:
            path = Path(folder) / "bench.nev"
            header_bytes = _write_file(path, size_gb, options.seed)
            size_mb = path.stat().st_size / 1e6
            baseline = _measure(_MEMMAP_PASS, path, header_bytes, PACKET_BYTES)
            results = {"memmap": baseline} | {name: _measure(_INGEST, path, name) for name in options.engines}
            counted = {results[name]["counted"] for name in options.engines}
            assert len(counted) == 1, f"the engines disagree: {counted}"
            for name, result in results.items():
                print(json.dumps({"file_mb": round(size_mb), "pass": name, "seconds": round(result["seconds"], 2),
                                  "mb_per_s": round(size_mb / result["seconds"]),
                                  "peak_rss_mb": round(result["peak_rss_mb"]),
                                  "time_over_memmap": round(result["seconds"] / baseline["seconds"], 1),
                                  "n_presentations": result.get("n_presentations")}), flush=True)
            path.unlink()


if __name__ == "__main__":
    main()
