"""Benchmark (not a test): a paper-size day's synthesize stage with the paper's attack against faster step rules.

Writes a paper-size day-0 experiment (21 sites, 42 attacked clean images, the paper's 5 budgets
1, 2, 4, 6, 10 × ``--paper-scale``, ``BASE`` as the backbone: e.g. the embedded robust
``resnet_tiny`` checkpoint) into a temporary folder once per contender and runs
``fit-day 0 --until synthesize`` on it, in turn, in fresh processes with ``--threads`` torch
threads:

- ``pgd100``: the paper's rule (``[attack] step_rule = "pgd"``), 100 steps of ε/3: today's day;
- ``apgdN``: ``step_rule = "apgd"`` with N steps, for each N of ``--apgd-steps``.

(Each contender plans its own copy of the day, since a planned day's attack settings are frozen;
the plan is seeded, so all get the same jobs, which the script checks.)

Per contender it reports the synthesize stage's own seconds (its marker), their share of
``pgd100``'s, and the strength of the stored 8-bit attacks against ``pgd100``'s on the same jobs
(the model's predicted |Δ| of the targeted site against its clean parent, spikes per window): per
budget the mean over jobs as a share of ``pgd100``'s mean, the smallest per-job share and how many
jobs fall below 98%. Prints one JSON object.

    PYTHONPATH=. python benchmarks/bench_synthesize_rules.py CACHE/embedded-robust-*/classifier.safetensors
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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
n_clean_day0 = 48
n_clean_per_day = 42
embedded_per_photo = 8
[model]
backbone = "{base}"
device = "cpu"
[sites]
n_sites = 21
[attack]
budgets = [1.0, 2.0, 4.0, 6.0, 10.0]
paper_scale = {paper_scale}
steps = {steps}
step_rule = "{step_rule}"
[rig]
kind = "sim"
"""


def _fit_day(experiment: Path, until: str, threads: int) -> float:
    """``fit-day 0 --until until`` in a fresh process; its wall time, s."""
    command = [sys.executable, "-m", "closedloop", "-q", "fit-day", "0", "--experiment", str(experiment), "--until", until]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT,
                          env=os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)})
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def _changes(experiment: Path) -> tuple[np.ndarray, np.ndarray]:
    """Per stored attack, in store order: the predicted |Δ| of its site against its clean parent, and its budget."""
    stimuli = zarr.open_group(str(experiment / "day_000" / "store.zarr"), mode="r")["stimuli"]
    kind, parent, site, predicted = (stimuli[name][:] for name in ("kind", "parent", "site", "predicted"))
    attack = np.flatnonzero(kind == "attack")
    jobs = np.stack([parent[attack], site[attack], stimuli["eps"][:][attack]])
    return np.abs(predicted[attack, site[attack]] - predicted[parent[attack], site[attack]]), jobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", help="backbone checkpoint ([model] backbone)")
    parser.add_argument("--paper-scale", type=float, default=6.3, help="[attack] paper_scale (k)")
    parser.add_argument("--apgd-steps", type=int, nargs="+", default=[30, 40], help="steps of each APGD contender")
    parser.add_argument("--threads", type=int, default=2)
    options = parser.parse_args()
    contenders = {"pgd100": ("pgd", 100)} | {f"apgd{n}": ("apgd", n) for n in options.apgd_steps}
    load = os.getloadavg()
    seconds, changes = {}, {}
    settings = dict(base=str(Path(options.base).resolve()), paper_scale=options.paper_scale)
    with tempfile.TemporaryDirectory() as folder:
        for name, (rule, steps) in contenders.items():  # the plan is seeded: every contender gets the same jobs
            experiment = Path(folder) / name
            experiment.mkdir()
            (experiment / "experiment.toml").write_text(EXPERIMENT.format(steps=steps, step_rule=rule, **settings))
            _fit_day(experiment, "synthesize", options.threads)
            marker = json.loads((experiment / "day_000" / "stages" / "synthesize.json").read_text())
            seconds[name], changes[name] = marker["seconds"], _changes(experiment)
            print(f"{name}: synthesize {seconds[name]:.0f} s", file=sys.stderr, flush=True)
            shutil.rmtree(experiment)
    reference, jobs = changes["pgd100"]
    eps = jobs[2]
    strength = {}
    for name, (change, own_jobs) in changes.items():
        if not np.array_equal(own_jobs, jobs):
            raise SystemExit(f"{name} planned other attack jobs than pgd100: the plan is not seeded as assumed")
        share = change / np.maximum(reference, 1e-9)
        strength[name] = {
            f"{budget / options.paper_scale:g}": {
                "mean_share": round(float(change[eps == budget].mean() / reference[eps == budget].mean()), 4),
                "smallest_share": round(float(share[eps == budget].min()), 4),
                "jobs_below_98pct": int(np.sum(share[eps == budget] < 0.98)),
            } for budget in np.unique(eps)}
    print(json.dumps({
        "n_attack_jobs": int(len(reference)), "threads": options.threads, "load_average_before": [round(x, 2) for x in load],
        "synthesize_s": {name: round(value, 1) for name, value in seconds.items()},
        "share_of_pgd100_time": {name: round(value / seconds["pgd100"], 3) for name, value in seconds.items()},
        "strength_by_paper_eps": strength,
    }, indent=1))


if __name__ == "__main__":
    main()
