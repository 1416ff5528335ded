"""Benchmark (not a test): each ingest engine on synthetic .nev files of several sizes.

``closedloop bench --ingest`` measures the default engine against a plain memory-mapped pass;
this script also runs the reference engine (neo), which is slow and needs about twice the file
size in memory. For each size it writes a file (``closedloop.bench_ingest.write_bench_nev``)
into a temporary folder that is deleted afterwards, ingests it once per engine, each in a fresh
process (``closedloop.bench_ingest.measure_in_fresh_process``), checks that the engines count
the same spikes, and prints one JSON line per engine.

    PYTHONPATH=. python benchmarks/bench_ingest.py --sizes-mb 250 1000 --engines stream neo
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from closedloop.bench_ingest import measure_in_fresh_process, write_bench_nev
from closedloop.data.nev import NEV_ENGINES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[1000.0], help="file sizes in MB (default: 1000)")
    parser.add_argument("--engines", nargs="+", choices=NEV_ENGINES, default=list(NEV_ENGINES))
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_ingest_") as folder:
        for size_mb in options.sizes_mb:
            path = write_bench_nev(Path(folder) / "bench.nev", size_mb, seed=options.seed)
            results = {engine: measure_in_fresh_process(path, engine) for engine in options.engines}
            counted = {result["counted"] for result in results.values()}
            if len(counted) != 1:
                raise SystemExit(f"the engines disagree on {size_mb} MB: {results}")
            file_mb = path.stat().st_size / 1e6
            for engine, result in results.items():
                print(json.dumps({"file_mb": round(file_mb), "engine": engine, "seconds": round(result["seconds"], 2),
                                  "mb_per_s": round(file_mb / result["seconds"]),
                                  "peak_rss_mb": round(result["peak_mb"]), "growth_mb": round(result["growth_mb"]),
                                  "n_presentations": result["n_presentations"]}), flush=True)
            path.unlink()


if __name__ == "__main__":
    main()
