"""Benchmark (not a test): the synthesize stage in one process against the same stage under torchrun.

Writes a small experiment (``resnet_tiny``, embedded images, ``--sites`` sites, ``--budgets``
budgets, ``--steps`` PGD steps; by default 4 attacked images × 4 sites × 4 budgets = 64 attack
jobs in parts of 8) into a temporary folder, runs its plan stage once, then times
``fit-day 0 --until synthesize`` on copies of that day, each in fresh processes, in turn:

- ``1proc_1thread``: ``OMP_NUM_THREADS=1 closedloop fit-day``;
- ``1proc_Nthreads``: ``OMP_NUM_THREADS=N closedloop fit-day`` (N = ``--ranks``);
- ``Nprocs_1thread``: ``OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node N -m closedloop fit-day``.

``--repeats`` rounds of the three, interleaved. Reports per configuration the median of the
synthesize stage's own seconds (its marker: model and images loaded, attacks, baselines, store
written; for torchrun, rank 0's, which waits for every rank) and of the command's wall time
(with interpreter start and imports), the speed-ups against ``1proc_1thread``, whether every
run's stored stimuli (pixels, predictions, …) are bit-identical to the first run's, and the load
average before the first run. Prints one JSON object.

    PYTHONPATH=. python benchmarks/bench_sharded_synthesize.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = """
[experiment]
seed = 1
[images]
n_clean_day0 = 8
n_clean_per_day = {n_attacked}
embedded_per_photo = 2
[model]
backbone = "resnet_tiny"
device = "cpu"
[sites]
n_sites = {n_sites}
[attack]
budgets = {budgets}
steps = {steps}
part_size = {part_size}
[rig]
kind = "sim"
"""
STIMULI = ("pixels", "predicted", "parent", "site", "eps", "direction", "kind")


def _fit_day(experiment: Path, *, ranks: int, threads: int, until: str = "synthesize") -> float:
    """Run fit-day 0 up to ``until``; the command's wall time in seconds."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"] if ranks > 1 else []
    command = [sys.executable, *launcher, "-m", "closedloop", "-q", "fit-day", "0", "--experiment", str(experiment),
               "--until", until]
    environment = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=environment)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def _stimuli(experiment: Path) -> dict[str, np.ndarray]:
    root = zarr.open_group(str(experiment / "day_000" / "store.zarr"), mode="r")
    return {name: root[f"stimuli/{name}"][:] for name in STIMULI}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2, help="torchrun processes (and threads of the one-process run)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds of the three configurations")
    parser.add_argument("--steps", type=int, default=20, help="PGD steps per attack")
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--attacked", type=int, default=4, help="attacked clean images")
    parser.add_argument("--budgets", type=float, nargs="+", default=[1.0, 2.0, 4.0, 6.0])
    parser.add_argument("--part-size", type=int, default=8, help="attack jobs per part")
    options = parser.parse_args()
    configurations = {"1proc_1thread": (1, 1), f"1proc_{options.ranks}threads": (1, options.ranks),
                      f"{options.ranks}procs_1thread": (options.ranks, 1)}
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as folder:
        planned = Path(folder) / "planned"
        planned.mkdir()
        (planned / "experiment.toml").write_text(EXPERIMENT.format(
            n_attacked=options.attacked, n_sites=options.sites, budgets=list(options.budgets), steps=options.steps,
            part_size=options.part_size))
        _fit_day(planned, ranks=1, threads=1, until="plan")
        stage_s, wall_s, reference, identical = {n: [] for n in configurations}, {n: [] for n in configurations}, None, True
        for repeat in range(options.repeats):
            for name, (ranks, threads) in configurations.items():
                experiment = Path(folder) / f"{name}_{repeat}"
                shutil.copytree(planned, experiment)
                wall_s[name].append(_fit_day(experiment, ranks=ranks, threads=threads))
                marker = json.loads((experiment / "day_000" / "stages" / "synthesize.json").read_text())
                stage_s[name].append(marker["seconds"])
                stimuli = _stimuli(experiment)
                reference = reference or stimuli
                identical = identical and all(np.array_equal(reference[k], stimuli[k]) for k in STIMULI)
                shutil.rmtree(experiment)
    n_jobs = options.attacked * options.sites * len(options.budgets)
    medians = {name: statistics.median(values) for name, values in stage_s.items()}
    wall = {name: statistics.median(values) for name, values in wall_s.items()}
    alone = "1proc_1thread"
    print(json.dumps({
        "n_attack_jobs": n_jobs, "steps": options.steps, "part_size": options.part_size,
        "load_average_before": [round(x, 2) for x in load],
        "synthesize_s": {name: round(value, 2) for name, value in medians.items()},
        "synthesize_s_runs": stage_s,
        "command_wall_s": {name: round(value, 2) for name, value in wall.items()},
        "speedup_vs_1proc_1thread": {name: round(medians[alone] / value, 2) for name, value in medians.items()},
        "wall_speedup_vs_1proc_1thread": {name: round(wall[alone] / value, 2) for name, value in wall.items()},
        "bit_identical": identical,
    }, indent=1))


if __name__ == "__main__":
    main()
